"""The parameter-free cosine ProtoNet head (Snell et al. 2017, as in PMF and SMAT).

Class prototypes are the mean support features of each class; a query's
logits are ``scale`` × the cosine similarity to each prototype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prototypes(features: torch.Tensor, labels: torch.Tensor, n_way: int) -> torch.Tensor:
    """features [S, D], labels int64 [S] in 0 … n_way−1 → class means [n_way, D]."""
    sums = features.new_zeros(n_way, features.shape[-1]).index_add_(0, labels, features)
    counts = torch.bincount(labels, minlength=n_way).clamp_min(1).to(features.dtype)
    return sums / counts[:, None]


def cosine_logits(features: torch.Tensor, centroids: torch.Tensor, scale: float = 10.0) -> torch.Tensor:
    """features [Q, D], centroids [n_way, D] → logits [Q, n_way] = scale · cos(feature, centroid)."""
    return scale * F.normalize(features, dim=-1) @ F.normalize(centroids, dim=-1).t()


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean())
