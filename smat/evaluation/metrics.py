"""Summaries of per-task accuracies."""

from __future__ import annotations

import math

import numpy as np

# a run meets its sparsity target when every expert's hard sparsity is within this of τ
SPARSITY_TOLERANCE = 0.02


def confidence_interval(values) -> tuple[float, float]:
    """(mean, 1.96·std/√n) of per-task accuracies, both in the values' unit; n = 1 gives an interval of 0."""
    values = np.asarray(list(values), dtype=np.float64)
    if values.size == 0:
        raise ValueError("no tasks to summarise")
    spread = values.std(ddof=1) if values.size > 1 else 0.0
    return float(values.mean()), float(1.96 * spread / math.sqrt(values.size))
