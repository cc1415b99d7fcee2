"""Analyses of trained runs (the paper's Fig. 3, Fig. 4 and Fig. 6) and the ``python -m smat.analyze`` command.

    python -m smat.analyze RUN [RUN ...] [--output DIR] [--overwrite] [--episodes N] [--device auto|cpu|cuda]

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
import sys

from .analysis import AnalysisError, analyse_all, analyse_run, open_run, unique_names
from .config import ConfigError, Once, count_flag, device_flag, parsed_once
from .data import DataError
from .runtime import checkpoint
from .runtime.device import resolve_device
from .runtime.io import OutputError, check_output_folder, ensure_writable_dir


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m smat.analyze", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders written by `python -m smat.train`")
    parser.add_argument("--output", action=Once, help="folder for the plots (default: RUN/analysis for one run, "
                        "./analysis for several); never a run folder")
    parser.add_argument("--overwrite", action="store_true", help="write into an --output folder that holds other "
                        "files than an earlier analysis's")
    parser.add_argument("--episodes", action=Once, type=count_flag(1), default=50, help="test episodes per domain "
                        "for the mean α (default 50)")
    parser.add_argument("--device", action=Once, type=device_flag, help="where the models run: auto, cpu, cuda or "
                        "cuda:N (default: each run config's device)")
    return parsed_once(parser.parse_args(argv))


# What an earlier analysis wrote into its folder, replaced without --overwrite (with several runs, also a
# sub-folder per run).
OUTPUTS = tuple(f"{name}.{ext}" for name in ("id_ood", "alignment", "nonzeros_by_type", "nonzeros_by_depth",
                                              "domain_alpha", "mask_overlap") for ext in ("png", "json"))


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        runs = [open_run(path) for path in args.runs]
        unique_names(runs)
        output = args.output or (runs[0].path / "analysis" if len(runs) == 1 else "analysis")
        own = OUTPUTS + (tuple(run.name for run in runs) if len(runs) > 1 else ())
        output = ensure_writable_dir(check_output_folder(output, own, args.overwrite))
        device = None if args.device is None else resolve_device(args.device)
        written, notes = analyse_all(runs, output)
        for run in runs:
            folder = output / run.name if len(runs) > 1 else output
            run_written, run_notes = analyse_run(run, folder, args.episodes, device)
            written += run_written
            notes += run_notes
    except (AnalysisError, ConfigError, DataError, checkpoint.CheckpointError, OutputError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"note: {note}")
    for path in written:
        print(f"wrote {path} (+ .json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
