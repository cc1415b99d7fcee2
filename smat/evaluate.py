"""Meta-testing: accuracy per task on test episodes, and mean ± 95% confidence interval.

ProtoNet (no adaptation): each task's weights are merged from the
hypernetwork's evaluation-time α (sigmoid(logits / T)) and the deterministic
masks; class prototypes are the support features' means; queries are
classified by cosine similarity. The B tasks of a batch are merged in one
kernel call.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import numpy as np
import torch

from . import objective


def confidence_interval(values) -> tuple[float, float]:
    """(mean, 1.96·std/√n) of per-task accuracies, both in the values' unit; n = 1 gives an interval of 0."""
    values = np.asarray(list(values), dtype=np.float64)
    if values.size == 0:
        raise ValueError("no tasks to summarise")
    spread = values.std(ddof=1) if values.size > 1 else 0.0
    return float(values.mean()), float(1.96 * spread / math.sqrt(values.size))


def _autocast(device: torch.device, config):
    from .train import precision_dtype

    dtype = precision_dtype(config, device) if config is not None else None
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def _accuracies(logits: list[torch.Tensor], tasks) -> list[float]:
    return [float((out.argmax(-1) == t.query_y).float().mean()) for out, t in zip(logits, tasks, strict=True)]


@torch.no_grad()
def protonet_accuracies(model, loader, temperature: float, device, config=None, pretrained: bool = False):
    """ProtoNet query accuracy of every task of ``loader`` (batches of tasks).

    The tasks' weights are ``model.task_parameters(tasks, temperature)`` ([B, N], one merge for the
    batch), or the pre-trained backbone's when ``pretrained`` (or when the model returns None)."""
    model.eval()
    results = []
    for batch in loader:
        tasks = [t.to(device) for t in (batch if isinstance(batch, list) else [batch])]
        with _autocast(device, config):
            theta = None if pretrained else model.task_parameters(tasks, temperature)
            results += _accuracies(objective.query_logits(model, theta, tasks), tasks)
    return results
