"""Fig. 3 of a plan: ID against OOD accuracy, SMAT across τ, with the other methods as reference points."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..analysis import save_figure  # noqa: E402
from .runner import RunResult  # noqa: E402

REFERENCE_STYLE = {"pretrained": ("black", "X"), "pmf": ("tab:red", "*"), "softmerge": ("tab:blue", "D"),
                   "smat_independent": ("tab:purple", "P")}


def role_interval(run: RunResult, role: str) -> float:
    """95% half-width (points) of a role's average: per-domain intervals combined, domains weighted equally."""
    variances = [(100 * _std(d["accuracies"])) ** 2 / len(d["accuracies"])
                 for d in run.domains.values() if d["role"] == role]
    return 1.96 * math.sqrt(sum(variances)) / len(variances) if variances else float("nan")


def _std(values) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1))


def plot_tradeoff(results: list[RunResult], path: Path) -> Path:
    """SMAT's runs as a line through τ (colour), the other methods as labelled markers; 95% error bars."""
    figure, axis = plt.subplots(figsize=(6.5, 5))
    points = []
    smat = sorted((r for r in results if r.spec.method == "smat"), key=lambda r: r.spec.tau)
    if smat:
        norm = matplotlib.colors.Normalize(min(r.spec.tau for r in smat), max(r.spec.tau for r in smat) + 1e-9)
        axis.plot([r.average("id") for r in smat], [r.average("ood") for r in smat], color="grey", lw=1, zorder=1)
        for run in smat:
            x, y = run.average("id"), run.average("ood")
            axis.errorbar(x, y, xerr=role_interval(run, "id"), yerr=role_interval(run, "ood"), fmt="o",
                          color=plt.cm.viridis(norm(run.spec.tau)), markeredgecolor="black", ms=8, zorder=2)
            axis.annotate(f"τ={run.spec.tau:g}", (x, y), fontsize=8, xytext=(5, 4), textcoords="offset points")
        figure.colorbar(plt.cm.ScalarMappable(norm=norm, cmap="viridis"), ax=axis, label="SMAT expert sparsity τ")
    for run in results:
        if run.spec.method == "smat":
            continue
        color, marker = REFERENCE_STYLE.get(run.spec.method, ("grey", "s"))
        x, y = run.average("id"), run.average("ood")
        axis.errorbar(x, y, xerr=role_interval(run, "id"), yerr=role_interval(run, "ood"), fmt=marker, color=color,
                      ms=10, label=run.spec.name, zorder=3)
    for run in results:
        points.append({"run": run.spec.name, "method": run.spec.method, "tau": run.spec.tau,
                       "id": run.average("id"), "ood": run.average("ood"),
                       "id_ci95": role_interval(run, "id"), "ood_ci95": role_interval(run, "ood")})
    axis.legend(fontsize=8, loc="best")
    axis.margins(0.15)
    axis.set(xlabel="ID accuracy (%)", ylabel="OOD accuracy (%)", title="ID vs OOD accuracy (Fig. 3)")
    return save_figure(figure, path, {"points": points})
