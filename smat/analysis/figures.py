"""A figure and the numbers it plots, written side by side."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..runtime.io import atomic_path, atomic_write_json  # noqa: E402


def finite_or_none(value):
    """The value with NaN and ±inf replaced by None (JSON has no NaN), recursively."""
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def save_figure(figure, path: Path, numbers: dict) -> Path:
    """The figure as ``path`` (PNG) and its numbers as ``path`` with .json, both written atomically."""
    with atomic_path(path, suffix=".png") as temporary:
        figure.savefig(temporary, dpi=120, bbox_inches="tight", format="png")
    plt.close(figure)
    atomic_write_json(path.with_suffix(".json"), finite_or_none(numbers))
    return path

