"""Fig. 3 (ID against OOD accuracy across runs) and Fig. 4 (meta-gradient alignment during training)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .figures import save_figure  # noqa: E402
from .runs import AnalysisError, RunFiles  # noqa: E402

MARKERS = "osD^vP*Xph"


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

