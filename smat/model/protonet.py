"""The cosine ProtoNet head (Snell et al. 2017, as in PMF and SMAT): the one place that turns features
into class prototypes, logits, losses and accuracies.

Class prototypes are the mean support features of each class; a query's
logits are ``scale`` × (the cosine similarity to each prototype + ``bias``).
``scale`` and ``bias`` are 10 and 0, or PMF's learned values (floats or 0-d tensors).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..runtime.device import autocast


def prototypes(features: torch.Tensor, labels: torch.Tensor, n_way: int) -> torch.Tensor:
    """features [S, D], labels int64 [S] in 0 … n_way−1 → class means [n_way, D]."""
    sums = features.new_zeros(n_way, features.shape[-1]).index_add_(0, labels, features)
    counts = torch.bincount(labels, minlength=n_way).clamp_min(1).to(features.dtype)
    return sums / counts[:, None]


def cosine_logits(features: torch.Tensor, centroids: torch.Tensor, scale=10.0, bias=0.0) -> torch.Tensor:
    """features [Q, D], centroids [n_way, D] → logits [Q, n_way] = scale · (cos(feature, centroid) + bias)."""
    return scale * (F.normalize(features, dim=-1) @ F.normalize(centroids, dim=-1).t() + bias)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows of ``logits`` [Q, n_way] whose argmax is the label."""
    return float((logits.argmax(-1) == labels).float().mean())


def accuracies(logits: list[torch.Tensor], tasks) -> list[float]:
    """Query accuracy of each task from its query logits."""
    return [accuracy(out, task.query_y) for out, task in zip(logits, tasks, strict=True)]


def support_cross_entropy(features: torch.Tensor, labels: torch.Tensor, n_way: int, scale, bias=0.0,
                          prototype_features: torch.Tensor | None = None) -> torch.Tensor:
    """CE of classifying the support set by its own class prototypes (the support loss of Algorithms 1–3).

    features [S, D] (any float dtype; computed in fp32), labels int64 [S] → scalar fp32.
    ``prototype_features`` [S, D]: the features the prototypes are computed from, when not ``features``
    (PMF's fine-tuning: prototypes of the clean support images, ``features`` of augmented ones)."""
    features = features.float()
    source = features if prototype_features is None else prototype_features.float()
    centroids = prototypes(source, labels, n_way)
    return F.cross_entropy(cosine_logits(features, centroids, scale, bias), labels)


def task_logits(features: torch.Tensor, task, scale, bias=0.0) -> torch.Tensor:
    """Query logits [Q, n_way] of ``task`` from the features of its [support; query] images, [S + Q, D]."""
    features = features.float()
    support, query = features[:len(task.support_y)], features[len(task.support_y):]
    return cosine_logits(query, prototypes(support, task.support_y, task.n_way), scale, bias)


def query_accuracy(features: torch.Tensor, task, scale, bias=0.0) -> float:
    """Query accuracy of ``task`` from the features of [support; query] images, [S + Q, D]."""
    return accuracy(task_logits(features, task, scale, bias), task.query_y)


def query_logits(model, theta: torch.Tensor | None, tasks, parallel: str = "loop") -> list[torch.Tensor]:
    """ProtoNet logits [Q_b, n_way_b] per task: prototypes from the support set, both sets under row b
    of ``theta`` [B, N] (``None``: the pre-trained backbone). Support and query go through one forward pass."""
    images = [torch.cat([t.support_x, t.query_x]) for t in tasks]
    features = model.task_features(theta, images, parallel)
    return [task_logits(f, task, model.protonet_scale, model.protonet_bias)
            for f, task in zip(features, tasks, strict=True)]


@torch.no_grad()
def task_accuracies(model, tasks, temperature: float, pretrained: bool = False, parallel: str = "loop"):
    """ProtoNet query accuracy of each task under its meta-test weights (one merge for the batch), or
    under the pre-trained backbone's when ``pretrained``."""
    theta = None if pretrained else model.task_parameters(tasks, temperature)
    return accuracies(query_logits(model, theta, tasks, parallel), tasks)


@torch.no_grad()
def paired_task_accuracies(model, tasks, temperature: float, parallel: str = "loop"):
    """(query accuracy of each task under its meta-test weights, and under the pre-trained backbone), from one
    pre-trained pass over each task's [support; query] images, whose support rows also give the router its
    prototypes: 3 image batches per task where the two :func:`task_accuracies` calls run 4."""
    images = [torch.cat([t.support_x, t.query_x]) for t in tasks]
    pretrained = model.task_features(None, images)
    support_prototypes = [prototypes(f[:len(t.support_y)].float(), t.support_y, t.n_way)
                          for f, t in zip(pretrained, tasks, strict=True)]
    theta = model.task_parameters(tasks, temperature, support_prototypes)
    own = pretrained if theta is None else model.task_features(theta, images, parallel)

    def accuracies_of(features):
        return accuracies([task_logits(f, t, model.protonet_scale, model.protonet_bias)
                           for f, t in zip(features, tasks, strict=True)], tasks)

    return accuracies_of(own), accuracies_of(pretrained)


@torch.no_grad()
def loader_accuracies(model, loader, temperature: float, device: torch.device, config=None,
                      pretrained: bool = False, parallel: str = "loop", paired: bool = False):
    """ProtoNet query accuracy of every task of ``loader`` (batches of tasks), in the run's precision.
    ``paired``: (the model's accuracies, the pre-trained backbone's) on the same tasks, from one pass over the
    loader (:func:`paired_task_accuracies`)."""
    model.eval()
    results, baseline = [], []
    for batch in loader:
        tasks = [t.to(device) for t in (batch if isinstance(batch, list) else [batch])]
        with autocast(config, device):
            if paired:
                own, pretrained_accuracies = paired_task_accuracies(model, tasks, temperature, parallel)
                results += own
                baseline += pretrained_accuracies
            else:
                results += task_accuracies(model, tasks, temperature, pretrained, parallel)
    return (results, baseline) if paired else results
