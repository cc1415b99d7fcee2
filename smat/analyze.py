"""Analyses of trained runs (the paper's Fig. 3, Fig. 4 and Fig. 6) and the ``python -m smat.analyze`` command.

    python -m smat.analyze RUN [RUN ...] [--output DIR] [--episodes N] [--device auto|cpu|cuda]

Across the runs given:

- ``id_ood.png``: ID against OOD test accuracy, one point per run, colour τ, marker M (Fig. 3);
- ``alignment.png``: the mean cosine between tasks' meta-gradients during training, w.r.t. θ_δ (black) and
  each expert (colour), one panel per run (Fig. 4).

For each run, from its best checkpoint:

- ``nonzeros_by_type.png`` / ``nonzeros_by_depth.png``: non-zeros of the hard masks, per expert and their
  union, by layer type and by block (Fig. 6a–b);
- ``domain_alpha.png``: a dendrogram of the test domains by their mean evaluation-time α, next to a heatmap
  of it (Fig. 6c);
- ``mask_overlap.png``: |z_i ∩ z_j| / |z_i ∪ z_j| of the experts' hard masks (Fig. 6d).

Every PNG has a JSON of the plotted numbers next to it. DIR defaults to ``RUN/analysis`` for one run and
to ``./analysis`` for several; with several runs the per-run plots go to ``DIR/<run folder name>/``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from scipy.cluster import hierarchy  # noqa: E402

from . import checkpoint, episodes, runlog  # noqa: E402
from .config import Config, ConfigError  # noqa: E402
from .evaluate import load_run, read_run_config  # noqa: E402
from .io import OutputError, atomic_path, atomic_write_json, ensure_writable_dir  # noqa: E402

# methods whose experts carry learned hard-concrete masks (the dense baselines report all-ones masks)
MASKED_METHODS = ("smat", "smat_independent")
LAYER_TYPES = ("patch embedding", "attention qkv", "attention proj", "MLP fc1", "MLP fc2", "norms", "other")
MARKERS = "osD^vP*Xph"


class AnalysisError(RuntimeError):
    """A run folder that cannot be analysed (missing, or without the files the analyses read)."""


@dataclass
class RunFiles:
    """What the analyses read from a run folder without building its model."""

    path: Path
    name: str
    config: Config
    records: list[dict]
    report: dict | None


# --------------------------------------------------------------------------
# reading runs
# --------------------------------------------------------------------------


def open_run(path: str | Path) -> RunFiles:
    """The config, metrics and (when written) report of a run folder; an error naming what is missing."""
    path = Path(path).expanduser()
    config = read_run_config(path)  # CheckpointError for a missing folder or config.yaml
    try:
        records = runlog.read(path)
    except ValueError as error:  # a line cut short, e.g. by a full disk
        raise AnalysisError(f"cannot read {path / 'metrics.jsonl'}: {error}") from None
    if not records:
        raise AnalysisError(f"{path} has no metrics ({path / 'metrics.jsonl'} is missing or empty); give a run "
                            f"folder that `python -m smat.train` has trained")
    return RunFiles(path, path.resolve().name, config, records, read_report(path))


def read_report(run: Path) -> dict | None:
    """``<run>/report.json``, None where evaluation has not written one."""
    path = run / "report.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise AnalysisError(f"cannot read {path}: {error}") from None


# --------------------------------------------------------------------------
# Fig. 6a–b: non-zeros by layer type and by depth
# --------------------------------------------------------------------------


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


# --------------------------------------------------------------------------
# Fig. 6d: mask overlap
# --------------------------------------------------------------------------


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


# --------------------------------------------------------------------------
# Fig. 6c: domains by their mean α
# --------------------------------------------------------------------------


@torch.no_grad()
def domain_alpha(config: Config, model, episodes_per_domain: int, temperature: float,
                 device: torch.device) -> dict[str, dict]:
    """{test domain: {'role', 'alpha': mean evaluation-time α [M]}} over the first N test episodes.

    The episodes are the evaluation's (same seed), so the α are those the reported accuracies used."""
    evaluation = copy.deepcopy(config)
    evaluation.evaluate.episodes = episodes_per_domain
    source = episodes.open_source(evaluation)
    model.eval()
    result = {}
    for name, dataset in episodes.test_datasets(evaluation, source).items():
        loader = episodes.loader(dataset, evaluation, meta_batch=evaluation.train.meta_batch)
        alphas = [model.task_alpha([t.to(device) for t in (batch if isinstance(batch, list) else [batch])],
                                   temperature).cpu() for batch in loader]
        result[name] = {"role": episodes.domain_role(name, source), "alpha": torch.cat(alphas).mean(0).tolist()}
    return result


def domain_linkage(alpha: np.ndarray) -> np.ndarray | None:
    """Average-linkage (UPGMA) clustering of the domains' mean α [D, M] by Euclidean distance; None for
    fewer than two domains, which have nothing to cluster."""
    if len(alpha) < 2:
        return None
    return hierarchy.linkage(alpha, method="average", metric="euclidean")


def plot_domain_alpha(domains: dict[str, dict], title: str, path: Path, episodes_per_domain: int,
                      temperature: float) -> Path:
    """Dendrogram of the domains by mean α (left) and the mean α heatmap in the dendrogram's leaf order."""
    names = list(domains)
    alpha = np.asarray([domains[n]["alpha"] for n in names], dtype=np.float64)
    linkage = domain_linkage(alpha)
    count, experts = alpha.shape
    figure, (left, right) = plt.subplots(1, 2, figsize=(4 + 0.55 * experts, 1.2 + 0.4 * count),
                                         gridspec_kw={"width_ratios": [1, 2.5], "wspace": 0.02})
    leaves = list(range(count))
    if linkage is not None:
        leaves = hierarchy.dendrogram(linkage, orientation="left", ax=left, no_labels=True,
                                      link_color_func=lambda _: "black")["leaves"]
    left.set_axis_off()
    # the dendrogram puts leaf k at y = 10k + 5 from the bottom: the heatmap rows use the same scale
    image = right.imshow(alpha[leaves], origin="lower", aspect="auto", cmap="viridis", vmin=0,
                         extent=(-0.5, experts - 0.5, 0, 10 * count))
    left.set_ylim(0, 10 * count)
    right.set_yticks([10 * k + 5 for k in range(count)],
                     [f"{names[i]} ({domains[names[i]]['role'].upper()})" for i in leaves])
    right.yaxis.tick_right()
    right.set_xticks(range(experts), [str(m) for m in range(experts)])
    right.set(xlabel="expert", title=f"{title}: mean α ({episodes_per_domain} episodes per domain, T = "
                                     f"{temperature:g})")
    # below both panels (on the right it would cover the domain names), so that both keep the same height
    figure.colorbar(image, ax=[left, right], orientation="horizontal", fraction=0.05, pad=0.12, label="mean α")
    numbers = {"title": title, "episodes_per_domain": episodes_per_domain, "temperature": temperature,
               "domains": domains, "leaf_order": [names[i] for i in leaves], "linkage_method": "average",
               "linkage": linkage.tolist() if linkage is not None else None}
    return save_figure(figure, path, numbers)


# --------------------------------------------------------------------------
# Fig. 3 and Fig. 4: across runs
# --------------------------------------------------------------------------


def id_ood_point(run: RunFiles) -> dict:
    """One run's point of Fig. 3; AnalysisError says why a run has none."""
    if run.report is None:
        raise AnalysisError(f"{run.name} has no report.json (trained with --skip-eval?)")
    averages = run.report.get("summary", {}).get("averages", {})
    # smat.report names the trained model's column 'smat' whatever the method; a method's own name wins
    column = run.config.method if run.config.method in averages.get("id", {}) else "smat"
    if column not in averages.get("id", {}) or column not in averages.get("ood", {}):
        raise AnalysisError(f"{run.name}'s report.json has no ID and OOD average (data.test_domains without "
                            f"an ID or an OOD domain?)")
    return {"run": run.name, "path": str(run.path), "method": run.config.method, "tau": run.config.train.tau,
            "num_experts": run.config.model.num_experts, "id": averages["id"][column],
            "ood": averages["ood"][column]}


def plot_id_ood(points: list[dict], path: Path) -> Path:
    """ID against OOD accuracy, colour τ, marker M, each point annotated with its run."""
    taus = [p["tau"] for p in points]
    low, high = min(taus), max(taus)
    norm = matplotlib.colors.Normalize(low - 0.05 if low == high else low, high + 0.05 if low == high else high)
    experts = sorted({p["num_experts"] for p in points})
    marker = {m: MARKERS[i % len(MARKERS)] for i, m in enumerate(experts)}
    figure, axis = plt.subplots(figsize=(6.5, 5))
    for p in points:
        axis.scatter(p["id"], p["ood"], color=plt.cm.viridis(norm(p["tau"])), marker=marker[p["num_experts"]],
                     s=70, edgecolors="black", linewidths=0.5)
        axis.annotate(f"{p['run']}\nτ={p['tau']:g}, M={p['num_experts']}", (p["id"], p["ood"]), fontsize=7,
                      xytext=(5, 4), textcoords="offset points")
    figure.colorbar(plt.cm.ScalarMappable(norm=norm, cmap="viridis"), ax=axis, label="expert sparsity τ")
    handles = [Line2D([], [], color="grey", marker=marker[m], linestyle="", label=f"M = {m}") for m in experts]
    axis.legend(handles=handles, fontsize=8)
    axis.margins(x=0.3, y=0.2)  # room for the annotations of the outermost points
    axis.set(xlabel="ID accuracy (%)", ylabel="OOD accuracy (%)", title="ID vs OOD test accuracy")
    return save_figure(figure, path, {"points": points})


def alignment_series(records: list[dict]) -> dict | None:
    """{'step', 'overall', 'experts' [M][steps]} of a run's alignment records; None when it has none."""
    rows = sorted((r for r in records if r.get("kind") == "alignment" and "overall" in r), key=lambda r: r["step"])
    if not rows:
        return None
    return {"step": [r["step"] for r in rows], "overall": [r["overall"] for r in rows],
            "experts": [[r["experts"][m] for r in rows] for m in range(len(rows[0]["experts"]))]}


def plot_alignment(series: dict[str, dict], taus: dict[str, float], path: Path) -> Path:
    """One panel per run: alignment w.r.t. θ_δ in black, w.r.t. each expert z_m ⊙ θ_δ in colour."""
    figure, axes = plt.subplots(1, len(series), figsize=(5.5 * len(series), 3.8), squeeze=False, sharey=True)
    for axis, (name, s) in zip(axes[0], series.items()):
        style = {"marker": "." if len(s["step"]) < 50 else None, "linewidth": 1}
        for m, values in enumerate(s["experts"]):
            axis.plot(s["step"], values, color=f"C{m % 10}", label=f"expert {m}", **style)
        axis.plot(s["step"], s["overall"], color="black", label="θ_δ (overall)", **{**style, "linewidth": 2})
        axis.set(title=f"{name} (τ = {taus[name]:g})", xlabel="step")
        axis.legend(fontsize=7, ncol=2)  # in every panel: runs may have different numbers of experts
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(s["step"]) == 1:  # matplotlib would span ±0.05 around a lone step
            axis.set_xlim(s["step"][0] - 1, s["step"][0] + 1)
        axis.ticklabel_format(axis="y", useOffset=False)
    axes[0][0].set_ylabel("mean cos between tasks' meta-gradients")
    return save_figure(figure, path, {"runs": series, "tau": taus})


# --------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------


def finite_or_none(value):
    """The value with NaN and ±inf replaced by None (JSON has no NaN), recursively."""
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def save_figure(figure, path: Path, numbers: dict) -> Path:
    """The figure as ``path`` (PNG) and its numbers as ``path`` with .json, both written atomically."""
    with atomic_path(path, suffix=".png") as temporary:
        figure.savefig(temporary, dpi=120, bbox_inches="tight", format="png")
    plt.close(figure)
    atomic_write_json(path.with_suffix(".json"), finite_or_none(numbers))
    return path


# --------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------


def analyse_run(run: RunFiles, folder: Path, episodes_per_domain: int, device: torch.device | None
                ) -> tuple[list, list]:
    """The plots of Fig. 6 of one run into ``folder``: (paths written, notes on what was skipped).

    device None: the run config's device."""
    loaded = load_run(run.path, device)
    config, model = loaded.config, loaded.model
    written, notes = [], []
    if config.method in MASKED_METHODS:
        masks = model.hard_masks().cpu()
        depths = layer_depths(model.layout.names)
        written.append(plot_nonzeros(nonzero_counts(model.layout, masks, layer_type, LAYER_TYPES),
                                     f"{run.name}, by layer type", folder / "nonzeros_by_type.png"))
        written.append(plot_nonzeros(nonzero_counts(model.layout, masks, depths.__getitem__),
                                     f"{run.name}, by depth", folder / "nonzeros_by_depth.png"))
        written.append(plot_mask_overlap(mask_overlap(masks), run.name, folder / "mask_overlap.png"))
    else:
        notes.append(f"{run.name}: method {config.method!r} has no sparse masks; skipped the non-zero and mask "
                     f"overlap plots (methods with masks: {', '.join(MASKED_METHODS)})")
    if hasattr(model, "hypernet"):  # the methods that route tasks to experts (not pretrained, pmf)
        alpha = domain_alpha(config, model, episodes_per_domain, loaded.temperature, loaded.device)
        written.append(plot_domain_alpha(alpha, run.name, folder / "domain_alpha.png", episodes_per_domain,
                                         loaded.temperature))
    else:
        notes.append(f"{run.name}: method {config.method!r} has no router (hypernetwork) giving α; skipped the "
                     f"domain plot")
    return written, notes


def analyse_all(runs: list[RunFiles], output: Path) -> tuple[list, list]:
    """Fig. 3 and Fig. 4 over all runs into ``output``: (paths written, notes on what was skipped)."""
    written, notes, points = [], [], []
    for run in runs:
        try:
            points.append(id_ood_point(run))
        except AnalysisError as reason:
            notes.append(f"{reason}; left out of id_ood.png")
    if points:
        written.append(plot_id_ood(points, output / "id_ood.png"))
    series = {run.name: alignment_series(run.records) for run in runs}
    missing = [name for name, s in series.items() if s is None]
    if missing:
        notes.append(f"no alignment records (train.alignment_every=0?) in {', '.join(missing)}; left out of "
                     f"alignment.png")
    series = {name: s for name, s in series.items() if s is not None}
    if series:
        written.append(plot_alignment(series, {r.name: r.config.train.tau for r in runs}, output / "alignment.png"))
    return written, notes


def unique_names(runs: list[RunFiles]) -> None:
    """Give runs whose folders share a name (runs/a/seed0, runs/b/seed0) distinct names, in place."""
    seen: dict[str, int] = {}
    for run in runs:
        seen[run.name] = seen.get(run.name, 0) + 1
        if seen[run.name] > 1:
            run.name = f"{run.name}-{seen[run.name]}"


def resolve_device(choice: str | None) -> torch.device | None:
    """None (each run config's device), or the device --device names."""
    if choice is None:
        return None
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise AnalysisError("--device cuda but no CUDA GPU is visible; use --device cpu or auto")
    return torch.device(choice)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m smat.analyze", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders written by `python -m smat.train`")
    parser.add_argument("--output", help="folder for the plots (default: RUN/analysis for one run, ./analysis "
                        "for several)")
    parser.add_argument("--episodes", type=positive_int, default=50, help="test episodes per domain for the "
                        "mean α (default 50)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where the models run (default: "
                        "each run config's device)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        runs = [open_run(path) for path in args.runs]
        unique_names(runs)
        output = ensure_writable_dir(args.output or (runs[0].path / "analysis" if len(runs) == 1 else "analysis"))
        device = resolve_device(args.device)
        written, notes = analyse_all(runs, output)
        for run in runs:
            folder = output / run.name if len(runs) > 1 else output
            run_written, run_notes = analyse_run(run, folder, args.episodes, device)
            written += run_written
            notes += run_notes
    except (AnalysisError, ConfigError, checkpoint.CheckpointError, OutputError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"note: {note}")
    for path in written:
        print(f"wrote {path} (+ .json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
