"""Pictures of a run: training curves, each expert's sparsity and λ over time, accuracy per domain."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..runtime.io import atomic_path  # noqa: E402
from .metrics import SPARSITY_TOLERANCE  # noqa: E402


def _save(figure, path: Path) -> Path:
    with atomic_path(path, suffix=".png") as temporary:
        figure.savefig(temporary, dpi=120, bbox_inches="tight", format="png")
    plt.close(figure)
    return path


def training_curves(records: list[dict], path: Path) -> Path:
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    figure, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    steps = [r["step"] for r in train]
    for key, label in (("loss", "meta-loss"), ("ce", "query CE"), ("kd", "KD")):
        axes[0].plot(steps, [r.get(key, float("nan")) for r in train], label=label)
    axes[0].set(title="losses", xlabel="step")
    axes[0].legend()
    axes[1].plot(steps, [r["accuracy"] for r in train], label="train query (student)")
    if val:
        axes[1].plot([r["step"] for r in val], [r["val_accuracy"] for r in val], "o-", label="validation")
    axes[1].set(title="ProtoNet accuracy", xlabel="step")
    axes[1].legend()
    axes[2].plot(steps, [r["temperature"] for r in train])
    axes[2].set(title="Gumbel-sigmoid temperature", xlabel="step")
    return _save(figure, path)


def sparsity_curves(records: list[dict], tau: float, path: Path, tolerance: float = SPARSITY_TOLERANCE) -> Path:
    train = [r for r in records if r["kind"] == "train"]
    steps = [r["step"] for r in train]
    experts = len(train[0]["hard_sparsity"]) if train else 0
    figure, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for m in range(experts):
        colour = f"C{m % 10}"
        axes[0].plot(steps, [r["hard_sparsity"][m] for r in train], color=colour, label=f"expert {m}")
        axes[1].plot(steps, [r["expected_sparsity"][m] for r in train], color=colour)
        axes[2].plot(steps, [r["lambda"][m] for r in train], color=colour)
    for axis, title in ((axes[0], "hard sparsity (deterministic masks)"), (axes[1], "expected sparsity")):
        axis.axhline(tau, color="black", linestyle="--", linewidth=1, label=f"τ = {tau}")
        axis.axhspan(tau - tolerance, tau + tolerance, color="grey", alpha=0.15)
        axis.set(title=title, xlabel="step", ylim=(0, 1))
    axes[0].legend(fontsize=7, ncol=2)
    axes[2].set(title="Lagrange multiplier λ", xlabel="step")
    return _save(figure, path)


def accuracy_bars(table: dict[str, dict[str, tuple[float, float]]], methods: list[str], path: Path) -> Path:
    """table[domain][method] = (mean, ci) in %."""
    domains = list(table)
    figure, axis = plt.subplots(figsize=(max(6, 1.1 * len(domains)), 3.8))
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        xs = [d + (i - (len(methods) - 1) / 2) * width for d in range(len(domains))]
        means = [table[name][method][0] for name in domains]
        errors = [table[name][method][1] for name in domains]
        axis.bar(xs, means, width, yerr=errors, capsize=2, label=method)
    axis.set_xticks(range(len(domains)), domains, rotation=30, ha="right")
    axis.set(ylabel="ProtoNet accuracy (%)", title="test accuracy, mean ± 95% CI")
    axis.legend()
    return _save(figure, path)
