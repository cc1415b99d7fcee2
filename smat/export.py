"""``python -m smat.export RUN --output DIR``: the deployable packed form of a SMAT run.

Writes θ_pre (backbone.safetensors), the packed experts (experts.safetensors: the M expert bits of each
element on the union support, θ_δ there only), the hypernetwork, the config and export.json, and reports
the experts' size against the dense θ_δ + log_α of the run. ``smat.load(DIR)`` reads it; it specialises
exactly as the run does where the masks are binary.
"""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError
from .inference import export_run
from .runtime import checkpoint
from .runtime.io import OutputError


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m smat.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", metavar="RUN", help="run folder written by `python -m smat.train` (best checkpoint)")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for the export (new or empty; "
                        "never a run folder)")
    parser.add_argument("--overwrite", action="store_true", help="write into an --output folder that already holds "
                        "an export or other files")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        report = export_run(args.run, args.output, overwrite=args.overwrite)
    except (ConfigError, OutputError, checkpoint.CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
