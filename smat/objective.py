"""The per-task pieces of SMAT's meta-loss (Algorithm 1's inner loop).

All functions take the merged parameters ``theta`` [B, N] of the B tasks of
this process and the tasks themselves; task b runs on row b. Gradients with
respect to ``theta`` are per task because tasks never share a row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import protonet
from .data import Task


def _features(model, theta, images: list[torch.Tensor], parallel: str) -> list[torch.Tensor]:
    if theta is None:
        return [model.features(None, x) for x in images]
    return model.task_features(theta, images, parallel)


def query_logits(model, theta: torch.Tensor | None, tasks: list[Task], parallel: str = "loop"):
    """ProtoNet logits [Q_b, n_way_b] per task: prototypes from the support set, both sets under row b
    of ``theta`` (``None``: the pre-trained backbone). Support and query go through one forward pass."""
    images = [torch.cat([t.support_x, t.query_x]) for t in tasks]
    logits = []
    for task, features in zip(tasks, _features(model, theta, images, parallel), strict=True):
        features = features.float()
        support, query = features[:len(task.support_y)], features[len(task.support_y):]
        centroids = protonet.prototypes(support, task.support_y, task.n_way)
        logits.append(protonet.cosine_logits(query, centroids, model.protonet_scale))
    return logits


def support_loss(model, theta: torch.Tensor, tasks: list[Task], parallel: str = "loop") -> torch.Tensor:
    """Σ_b CE of classifying task b's support set by its own prototypes (the support-set loss)."""
    total = theta.new_zeros(())
    for task, features in zip(tasks, _features(model, theta, [t.support_x for t in tasks], parallel), strict=True):
        features = features.float()
        centroids = protonet.prototypes(features, task.support_y, task.n_way)
        total = total + F.cross_entropy(protonet.cosine_logits(features, centroids, model.protonet_scale),
                                        task.support_y)
    return total


def query_loss(model, theta: torch.Tensor, tasks: list[Task], parallel: str = "loop") -> torch.Tensor:
    """Σ_b CE of task b's query set."""
    return sum(F.cross_entropy(logits, t.query_y)
               for logits, t in zip(query_logits(model, theta, tasks, parallel), tasks, strict=True))


def gradient_steps(theta: torch.Tensor, loss_fn, lr: float, steps: int) -> torch.Tensor:
    """``steps`` first-order SGD steps: θ ← θ − lr·∇loss(θ), each gradient taken as a constant.

    The result stays differentiable with respect to the ``theta`` passed in (with slope 1), which is the
    first-order approximation of Algorithm 1's support step."""
    for _ in range(steps):
        point = theta.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(point), point)
        theta = theta - lr * grad
    return theta


def distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T²·KL(softmax(teacher/T) ‖ softmax(student/T)), averaged over queries (Hinton et al.)."""
    return F.kl_div(F.log_softmax(student / temperature, -1), F.softmax(teacher / temperature, -1),
                    reduction="batchmean") * temperature ** 2


def dense_teacher_logits(model, theta: torch.Tensor, tasks: list[Task], lr: float, steps: int,
                         parallel: str = "loop") -> list[torch.Tensor]:
    """Query logits of the dense teacher: θ_i with gradients stopped, ``steps`` SGD steps on the query CE.

    Nothing flows back from the teacher to the student."""
    teacher = gradient_steps(theta.detach(), lambda p: query_loss(model, p, tasks, parallel), lr, steps)
    with torch.no_grad():
        return [logits.detach() for logits in query_logits(model, teacher.detach(), tasks, parallel)]
