"""Fig. 6a–b (non-zeros of the hard masks by layer type and by depth) and Fig. 6d (mask overlap)."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .figures import save_figure  # noqa: E402

LAYER_TYPES = ("patch embedding", "attention qkv", "attention proj", "MLP fc1", "MLP fc2", "norms", "other")


def layer_type(name: str) -> str:
    """The layer type of a timm ViT parameter name, one of LAYER_TYPES."""
    parts = name.split(".")
    if parts[0] == "patch_embed":
        return "patch embedding"
    if any("norm" in part for part in parts[:-1]):  # norm1, norm2, norm, fc_norm, q_norm, …
        return "norms"
    if "attn" in parts and "qkv" in parts:
        return "attention qkv"
    if "attn" in parts and "proj" in parts:
        return "attention proj"
    if "mlp" in parts and any(part.startswith("fc1") for part in parts):  # fc1, or SwiGLU's fc1_g / fc1_x
        return "MLP fc1"
    if "mlp" in parts and any(part.startswith("fc2") for part in parts):
        return "MLP fc2"
    return "other"


def block_index(name: str) -> int | None:
    """The transformer block of a parameter (``blocks.3.…`` → 3), None outside the blocks."""
    parts = name.split(".")
    if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit():
        return int(parts[1])
    return None


def layer_depths(names: list[str]) -> dict[str, str]:
    """{name: 'embedding' | 'block k' | 'final'} for parameter names in the backbone's order.

    Parameters before the first block (patch and position embeddings, class token, pre-norm) are
    'embedding'; those after it (final norm, head) 'final': by position, since their names vary by model."""
    depths, seen_block = {}, False
    for name in names:
        index = block_index(name)
        seen_block = seen_block or index is not None
        depths[name] = f"block {index}" if index is not None else ("final" if seen_block else "embedding")
    return depths


def nonzero_counts(layout, masks: torch.Tensor, key, order=None) -> list[dict]:
    """Per group of the layout's parameters (``key(name)`` → group): its size, each expert's non-zeros and
    those of the union of the experts' masks, as counts and fractions.

    masks: bool [N, M] (``model.hard_masks()``). order: the groups' order (default: first appearance)."""
    grouped = layout.groups(key)
    labels = [label for label in order if label in grouped] if order else list(grouped)
    rows = []
    for label in labels:
        slots = grouped[label]
        size = sum(slot.numel for slot in slots)
        experts = torch.zeros(masks.shape[1], dtype=torch.int64)
        union = 0
        for slot in slots:  # slot by slot: no [N, M] temporary for a ViT-B's 86M parameters
            part = masks[slot.offset:slot.offset + slot.numel]
            experts += part.sum(0)
            union += int(part.any(1).sum())
        rows.append({"group": label, "parameters": size, "experts": experts.tolist(), "union": union,
                     "fraction_experts": (experts.double() / size).tolist(), "fraction_union": union / size})
    return rows


def plot_nonzeros(rows: list[dict], title: str, path: Path) -> Path:
    """Counts and fractions of non-zeros per group: experts' mean ± std across masks, and their union."""
    figure, axes = plt.subplots(1, 2, figsize=(max(10, 1.3 * len(rows)), 3.8))
    x = np.arange(len(rows))
    for axis, per_expert, union, label in (
            (axes[0], [r["experts"] for r in rows], [r["union"] for r in rows], "non-zeros"),
            (axes[1], [r["fraction_experts"] for r in rows], [r["fraction_union"] for r in rows],
             "fraction of the group's parameters")):
        values = np.asarray(per_expert, dtype=np.float64)
        axis.bar(x - 0.2, values.mean(1), 0.4, yerr=values.std(1), capsize=2, label="per expert (mean ± std)")
        axis.bar(x + 0.2, union, 0.4, label="union of the masks")
        axis.set_xticks(x, [r["group"] for r in rows], rotation=30, ha="right")
        axis.set(ylabel=label, title=f"{title}: {label}")
    axes[1].set_ylim(0, 1.05)
    axes[0].legend(fontsize=8)
    return save_figure(figure, path, {"title": title, "groups": rows})


def mask_overlap(masks: torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
    """IoU |z_i ∩ z_j| / |z_i ∪ z_j| of every pair of experts' masks, float64 [M, M].

    masks: bool [N, M]. Two empty masks are the same set: their IoU is 1."""
    m = masks.shape[1]
    intersection = torch.zeros(m, m, dtype=torch.float64)
    # in chunks of rows: float64 sums are exact and the float copy stays small for large N
    for start in range(0, masks.shape[0], chunk):
        part = masks[start:start + chunk].to(device="cpu", dtype=torch.float64)
        intersection += part.t() @ part
    sizes = intersection.diagonal()
    union = sizes[:, None] + sizes[None, :] - intersection
    return torch.where(union > 0, intersection / union.clamp_min(1), torch.ones_like(union))


def plot_mask_overlap(iou: torch.Tensor, title: str, path: Path) -> Path:
    m = iou.shape[0]
    figure, axis = plt.subplots(figsize=(1.2 + 0.6 * m, 0.8 + 0.6 * m))
    image = axis.imshow(iou.numpy(), vmin=0, vmax=1, cmap="viridis")
    if m <= 16:
        for i in range(m):
            for j in range(m):
                axis.text(j, i, f"{iou[i, j]:.2f}", ha="center", va="center", fontsize=7,
                          color="black" if iou[i, j] > 0.6 else "white")
    axis.set_xticks(range(m), [str(i) for i in range(m)])
    axis.set_yticks(range(m), [str(i) for i in range(m)])
    axis.set(xlabel="expert", ylabel="expert", title=f"{title}: mask overlap |z_i ∩ z_j| / |z_i ∪ z_j|")
    figure.colorbar(image, ax=axis, fraction=0.046)
    return save_figure(figure, path, {"title": title, "iou": iou.tolist()})

