"""Metrics of a run: one JSON object per line in ``<run>/metrics.jsonl``, and TensorBoard when installed.

Each record has a ``kind`` ('train', 'val', …) and a ``step``. After a resume
the records past the checkpoint's step are dropped, so the log reads as one
uninterrupted run.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

from .checkpoint import CheckpointError, RecoveryWarning
from .io import OutputError, atomic_write_text, describe_os_error


class RunLogError(CheckpointError, ValueError):
    """``metrics.jsonl`` cannot be read (a damaged line other than a partial last one)."""


class RunLog:
    def __init__(self, run: Path, enabled: bool = True):
        self.path = Path(run) / "metrics.jsonl"
        self.enabled = enabled
        self._tensorboard = None
        self._opened = False  # nothing is written to the run folder before the first record

    def _open_tensorboard(self):
        if not self._opened:
            self._opened = True
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tensorboard = SummaryWriter(str(self.path.parent / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self._tensorboard = None
        return self._tensorboard

    def truncate(self, step: int) -> None:
        """Forget records after ``step`` (written before an interruption, replayed after the resume)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [record for record in read(self.path.parent) if record.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(record) + "\n" for record in kept))

    def write(self, kind: str, record: dict) -> None:
        if not self.enabled:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as file:
                file.write(json.dumps({"kind": kind, **record}) + "\n")
        except OSError as error:
            raise OutputError(describe_os_error(error, self.path)) from None
        tensorboard = self._open_tensorboard()
        if tensorboard is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and math.isfinite(value) and key != "step":
                    tensorboard.add_scalar(f"{kind}/{key}", value, record["step"])
                elif isinstance(value, list) and value and isinstance(value[0], (int, float)):
                    for index, item in enumerate(value):
                        tensorboard.add_scalar(f"{kind}/{key}/{index}", item, record["step"])


def read(run: Path) -> list[dict]:
    """The records of ``<run>/metrics.jsonl``. A partial last line (a kill or a full disk in the middle of a
    write) is dropped with a warning; any other line that is not a JSON record is a :class:`RunLogError`."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        return []
    try:
        lines = path.read_bytes().decode().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise RunLogError(damaged(path, f"it cannot be read as text ({error})")) from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if _is_record(record):
            records.append(record)
        elif number == len(lines):
            warnings.warn(f"{path}: its last line is incomplete (a write was interrupted) and is dropped",
                          RecoveryWarning, stacklevel=2)
        else:
            raise RunLogError(damaged(path, f"line {number} is not a JSON record"))
    return records


def _is_record(value) -> bool:
    return (isinstance(value, dict) and isinstance(value.get("kind"), str)
            and isinstance(value.get("step", 0), (int, float)) and not isinstance(value.get("step", 0), bool))


def damaged(path: Path, problem: str) -> str:
    return (f"{path} is damaged: {problem}. It is the run's training log only: restore it from a backup, or "
            f"move it away to go on without the history it held")
