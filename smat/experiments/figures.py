"""Fig. 3 of a plan: ID against OOD accuracy (a panel per OOD group: near-OOD, far-OOD), SMAT across τ, with the
other methods as reference points."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..analysis import save_figure  # noqa: E402
from ..data.groups import in_group, label, record_group  # noqa: E402
from .claims import ood_groups  # noqa: E402
from .runner import RunResult  # noqa: E402

REFERENCE_STYLE = {"pretrained": ("black", "X"), "pmf": ("tab:red", "*"), "softmerge": ("tab:blue", "D"),
                   "smat_independent": ("tab:purple", "P")}


def role_interval(run: RunResult, group: str) -> float:
    """95% half-width (points) of a group's average: per-domain intervals combined, domains weighted equally."""
    variances = [(100 * _std(d["accuracies"])) ** 2 / len(d["accuracies"])
                 for d in run.domains.values() if in_group(record_group(d), group)]
    return 1.96 * math.sqrt(sum(variances)) / len(variances) if variances else float("nan")


def _std(values) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1))


def _panel(axis, results: list[RunResult], group: str) -> None:
    smat = sorted((r for r in results if r.spec.method == "smat"), key=lambda r: r.spec.tau)
    if smat:
        norm = matplotlib.colors.Normalize(min(r.spec.tau for r in smat), max(r.spec.tau for r in smat) + 1e-9)
        axis.plot([r.average("id") for r in smat], [r.average(group) for r in smat], color="grey", lw=1, zorder=1)
        for run in smat:
            x, y = run.average("id"), run.average(group)
            axis.errorbar(x, y, xerr=role_interval(run, "id"), yerr=role_interval(run, group), fmt="o",
                          color=plt.cm.viridis(norm(run.spec.tau)), markeredgecolor="black", ms=8, zorder=2)
            axis.annotate(f"τ={run.spec.tau:g}", (x, y), fontsize=8, xytext=(5, 4), textcoords="offset points")
        axis.figure.colorbar(plt.cm.ScalarMappable(norm=norm, cmap="viridis"), ax=axis,
                             label="SMAT expert sparsity τ")
    for run in results:
        if run.spec.method == "smat":
            continue
        color, marker = REFERENCE_STYLE.get(run.spec.method, ("grey", "s"))
        x, y = run.average("id"), run.average(group)
        axis.errorbar(x, y, xerr=role_interval(run, "id"), yerr=role_interval(run, group), fmt=marker, color=color,
                      ms=10, label=run.spec.name, zorder=3)
    axis.legend(fontsize=8, loc="best")
    axis.margins(0.15)
    axis.set(xlabel="ID accuracy (%)", ylabel=f"{label(group)} accuracy (%)",
             title=f"ID vs {label(group)} accuracy (Fig. 3)")


def plot_tradeoff(results: list[RunResult], path: Path) -> Path:
    """ID against each OOD group's accuracy (one panel per group: near-OOD and far-OOD, or OOD): SMAT's runs as a
    line through τ (colour), the other methods as labelled markers; 95% error bars."""
    groups = ood_groups(results)
    figure, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 5), squeeze=False)
    for axis, group in zip(axes[0], groups):
        _panel(axis, results, group)
    points = []
    for run in results:
        point = {"run": run.spec.name, "method": run.spec.method, "tau": run.spec.tau}
        for group in ("id", *groups, "ood"):
            point[group], point[f"{group}_ci95"] = run.average(group), role_interval(run, group)
        points.append(point)
    figure.tight_layout()
    return save_figure(figure, path, {"points": points, "groups": groups})
