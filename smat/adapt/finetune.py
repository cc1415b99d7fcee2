"""Algorithm 3: full fine-tuning from the task's merged weights θ_i at meta-test time.

θ_i (``model.task_parameters``; θ_pre for models without experts) is copied into a private copy of
the backbone, whose every parameter is then a leaf detached from the meta-tuned model. ``steps``
AdamW steps minimise the support loss: DiffAugment-ed support images classified by the cosine
ProtoNet head against the prototypes of the clean support images under the current weights (PMF's
``ProtoNet_Finetune``; ``adapt.prototypes=augmented``: prototypes of the augmented batch itself). The
query is then classified by ProtoNet with the fine-tuned backbone. :mod:`smat.adapt.lora` reuses the
same loop with LoRA adapters.

Where no validation split chooses the learning rate, :func:`choose_task_lr` chooses it per task from
the support set alone (PMF's ``ProtoNet_Auto_Finetune``): one image per class forms the prototypes,
the other support images score each rate, and the task's query set is never read.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ..data import Task
from ..data.transforms import diff_augment
from ..model.protonet import query_accuracy, support_cross_entropy
from ..runtime.device import autocast_to


@dataclass
class FineTuned:
    backbone: nn.Module  # the task's adapted backbone, in eval mode
    losses: list[float]  # support loss on the augmented batch of each step, before that step's update


def task_backbone(model, theta: torch.Tensor | None) -> nn.Module:
    """A private copy of ``model.backbone`` holding the task weights ``theta`` [N] (None: θ_pre).

    Parameters outside ``model.layout`` keep their pre-trained values. Frozen, eval mode."""
    backbone = copy.deepcopy(model.backbone)  # deepcopy clones every parameter: nothing is shared with θ_pre
    if theta is not None:
        parameters = dict(backbone.named_parameters())
        with torch.no_grad():
            for name, value in model.layout.views(theta.detach()).items():
                parameters[name].copy_(value)
    return backbone.requires_grad_(False).eval()


def head_of(model) -> tuple[float, float]:
    """The cosine head's (scale, bias) as plain numbers: fixed while a task is adapted (PMF's as well)."""
    return tuple(float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
                 for value in (model.protonet_scale, model.protonet_bias))


def fine_tune(backbone: nn.Module, parameters: list[nn.Parameter], task, lr: float, steps: int, scale: float,
              augment_probability: float = 0.9, weight_decay: float = 0.0,
              generator: torch.Generator | None = None, precision: torch.dtype | None = None,
              flip: bool = True, bias: float = 0.0, prototypes: str = "clean") -> list[float]:
    """``steps`` AdamW steps on the support loss of ``task`` with respect to ``parameters``.

    Every step draws a fresh DiffAugment of the support images [S, 3, H, W] (each image augmented with
    ``augment_probability``; ``generator`` on their device) and classifies it against the prototypes of
    the clean support images (``prototypes='clean'``, PMF; both batches in one forward pass, gradients
    through both) or of the augmented batch itself (``'augmented'``). ``precision``: the autocast dtype
    (fp16 scales the loss). Returns the loss of every step; the backbone is left in eval mode."""
    device = task.support_x.device
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == torch.float16)
    autocast = autocast_to(device, precision)
    losses = []
    backbone.train()  # LoRA's dropout is part of the recipe
    for _ in range(steps):
        with torch.no_grad():
            images = diff_augment(task.support_x, generator, augment_probability, flip=flip)
        with autocast:
            if prototypes == "clean":
                clean, augmented = backbone(torch.cat([task.support_x, images])).split(len(images))
                loss = support_cross_entropy(augmented, task.support_y, task.n_way, scale, bias, clean)
            else:
                loss = support_cross_entropy(backbone(images), task.support_y, task.n_way, scale, bias)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.detach())
    backbone.eval()
    return [float(loss) for loss in losses]  # one device sync at the end instead of one per step


@torch.no_grad()
def backbone_accuracy(backbone: nn.Module, task, scale: float, precision: torch.dtype | None = None,
                      bias: float = 0.0) -> float:
    """ProtoNet query accuracy of ``task`` with ``backbone``; support and query in one forward pass."""
    device = task.support_x.device
    autocast = autocast_to(device, precision)
    with autocast:
        features = backbone(torch.cat([task.support_x, task.query_x]))
    return query_accuracy(features, task, scale, bias)


def full_finetune(model, theta: torch.Tensor | None, task, lr: float, options,
                  generator: torch.Generator | None = None, precision: torch.dtype | None = None) -> FineTuned:
    """Algorithm 3 for one task: every backbone parameter trained from θ_i (``theta`` [N]; None: θ_pre)
    for ``options.steps`` steps (``options``: :class:`smat.adapt.AdaptConfig`)."""
    backbone = task_backbone(model, theta)
    parameters = list(backbone.parameters())
    for parameter in parameters:
        parameter.requires_grad_(True)
    scale, bias = head_of(model)
    losses = fine_tune(backbone, parameters, task, lr, options.steps, scale, options.augment_probability,
                       options.weight_decay, generator, precision, options.augment_flip, bias, options.prototypes)
    return FineTuned(backbone, losses)


def support_probe(task) -> Task:
    """PMF's split of a support set for choosing a learning rate: the first support image of each class
    is the probe's support set (its prototypes), the other support images its query set. Reads only the
    task's support set."""
    labels = task.support_y
    first = torch.stack([(labels == label).nonzero()[0, 0] for label in range(task.n_way)])
    rest = torch.ones_like(labels, dtype=torch.bool)
    rest[first] = False
    return Task(task.support_x[first], labels[first], task.support_x[rest], labels[rest], task.domain,
                task.class_names)


def choose_task_lr(method, model, theta: torch.Tensor | None, task, rates, options,
                   generator: torch.Generator | None = None, precision: torch.dtype | None = None):
    """(rate, {rate: probe accuracy}): the rate of ``rates`` whose fine-tuning (``method``: full_finetune or
    lora_finetune) on the one-image-per-class probe classifies the other support images best (ties: the
    first). A support set with one image per class leaves nothing to score: the smallest rate, {}."""
    probe = support_probe(task)
    if not len(probe.query_y):
        return min(rates), {}
    scale, bias = head_of(model)
    scores = {}
    for rate in rates:
        steps = options.steps if rate else 0  # lr 0 leaves θ_i as it is: no need to run the steps
        tuned = method(model, theta, probe, rate, dataclasses.replace(options, steps=steps), generator, precision)
        scores[rate] = backbone_accuracy(tuned.backbone, probe, scale, precision, bias)
    return max(scores, key=scores.get), scores
