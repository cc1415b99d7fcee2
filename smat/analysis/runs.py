"""What the analyses read from a run folder without building its model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..evaluation.runs import read_run_config
from ..runtime import runlog


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


def unique_names(runs: list[RunFiles]) -> None:
    """Give runs whose folders share a name (runs/a/seed0, runs/b/seed0) distinct names, in place."""
    seen: dict[str, int] = {}
    for run in runs:
        seen[run.name] = seen.get(run.name, 0) + 1
        if seen[run.name] > 1:
            run.name = f"{run.name}-{seen[run.name]}"

