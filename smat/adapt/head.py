"""The ProtoNet head every adaptation mode trains and predicts with (cosine similarity × scale)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import protonet


def support_cross_entropy(features: torch.Tensor, labels: torch.Tensor, n_way: int, scale: float) -> torch.Tensor:
    """CE of classifying the support set by its own class prototypes (the support loss of Algorithms 2 and 3).

    features [S, D] (any float dtype; computed in fp32), labels int64 [S] → scalar fp32."""
    features = features.float()
    centroids = protonet.prototypes(features, labels, n_way)
    return F.cross_entropy(protonet.cosine_logits(features, centroids, scale), labels)


def query_accuracy(features: torch.Tensor, task, scale: float) -> float:
    """Query accuracy of ``task`` from the features of [support; query] images, [S + Q, D]."""
    features = features.float()
    support, query = features[:len(task.support_y)], features[len(task.support_y):]
    centroids = protonet.prototypes(support, task.support_y, task.n_way)
    return protonet.accuracy(protonet.cosine_logits(query, centroids, scale), task.query_y)
