"""The paper's analyses of trained runs: Fig. 3 and Fig. 4 across runs (:mod:`.tradeoff`), Fig. 6a–b and
6d from the masks (:mod:`.masks`), Fig. 6c from the router (:mod:`.domains`). Every PNG has a JSON of the
plotted numbers next to it (:mod:`.figures`)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..evaluation.runs import load_run
from ..model import MASKED_METHODS
from .domains import domain_alpha, domain_linkage, plot_domain_alpha
from .figures import finite_or_none, save_figure
from .masks import (
    LAYER_TYPES,
    block_index,
    layer_depths,
    layer_type,
    mask_overlap,
    nonzero_counts,
    plot_mask_overlap,
    plot_nonzeros,
)
from .runs import AnalysisError, RunFiles, open_run, read_report, unique_names
from .tradeoff import alignment_series, id_ood_point, plot_alignment, plot_id_ood

__all__ = ["LAYER_TYPES", "AnalysisError", "RunFiles", "alignment_series", "analyse_all", "analyse_run",
           "block_index", "domain_alpha", "domain_linkage", "finite_or_none", "id_ood_point", "layer_depths",
           "layer_type", "mask_overlap", "nonzero_counts", "open_run", "plot_alignment", "plot_domain_alpha",
           "plot_id_ood", "plot_mask_overlap", "plot_nonzeros", "read_report", "save_figure", "unique_names"]


def analyse_run(run: RunFiles, folder: Path, episodes_per_domain: int, device: torch.device | None
                ) -> tuple[list, list]:
    """The plots of Fig. 6 of one run into ``folder``: (paths written, notes on what was skipped).

    device None: the run config's device."""
    loaded = load_run(run.path, device)
    config, model = loaded.config, loaded.model
    written, notes = [], []
    if model.masked:
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
    if model.routed:
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

