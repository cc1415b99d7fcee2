"""Metrics of a run: one JSON object per line in ``<run>/metrics.jsonl``, and TensorBoard when installed.

Each record has a ``kind`` ('train', 'val', …) and a ``step``. After a resume
the records past the checkpoint's step are dropped, so the log reads as one
uninterrupted run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .io import OutputError, atomic_write_text, describe_os_error


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
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

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
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
