"""How each method is meta-trained, as data: its objective, its optimisers, and whether a sparsity
constraint holds its experts to τ. :class:`~smat.training.trainer.Trainer` reads one :class:`TrainingSpec`.

- ``smat`` and ``smat_independent``: Algorithm 1 (:class:`MetaObjective`), SGD with momentum for θ_δ,
  plain SGD for log_α, AdamW for the hypernetwork; λ and the projection of log_α after every step.
- ``softmerge``: the same objective over soft-merged dense experts; θ_δ's and the router's optimisers;
  no sparsity constraint.
- ``pmf``: the ProtoNet query loss under θ_pre + δ (:class:`ProtoNetObjective`); θ_δ's optimiser only.
- ``pretrained``: nothing to train; the run records the backbone's validation accuracy once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import TrainConfig
from .objective import MetaObjective, ProtoNetObjective


@dataclass(frozen=True)
class TrainingSpec:
    objective: type | None  # the meta-loss module; None: nothing to train
    optimizers: tuple[str, ...]  # names in OPTIMIZERS, each over the parameters it names
    constrained: bool  # Lagrangian sparsity constraint on the masks (λ, log_α projection)


SPECS: dict[str, TrainingSpec] = {
    "smat": TrainingSpec(MetaObjective, ("delta", "mask", "hypernet"), True),
    "smat_independent": TrainingSpec(MetaObjective, ("delta", "mask", "hypernet"), True),
    "softmerge": TrainingSpec(MetaObjective, ("delta", "hypernet"), False),
    "pmf": TrainingSpec(ProtoNetObjective, ("delta",), False),
    "pretrained": TrainingSpec(None, (), False),
}


def _delta(model, train: TrainConfig) -> torch.optim.Optimizer:
    """θ_δ's SGD; PMF's learned head (scale, bias) joins it without weight decay, as in PMF's code."""
    groups = [{"params": [model.delta], "weight_decay": train.delta_weight_decay}]
    head = model.head_parameters()
    if head:
        groups.append({"params": head, "weight_decay": 0.0})
    return torch.optim.SGD(groups, lr=train.delta_lr, momentum=train.delta_momentum)


def _mask(model, train: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD([model.log_alpha], lr=train.mask_lr)


def _hypernet(model, train: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.hypernet.parameters(), lr=train.hyper_lr, weight_decay=train.hyper_weight_decay)


# the reference code's optimisers: SGD+momentum for θ_δ, plain SGD for log_α, AdamW for h_ζ
OPTIMIZERS = {"delta": _delta, "mask": _mask, "hypernet": _hypernet}

# gradient-norm clipping per optimiser (θ_δ is not clipped), as the reference code
CLIPPING = {"mask": lambda model, train: ([model.log_alpha], train.mask_clip),
            "hypernet": lambda model, train: (list(model.hypernet.parameters()), train.hyper_clip)}


def make_optimizers(spec: TrainingSpec, model, train: TrainConfig) -> dict[str, torch.optim.Optimizer]:
    return {name: OPTIMIZERS[name](model, train) for name in spec.optimizers}


def clip_gradients(spec: TrainingSpec, model, train: TrainConfig) -> None:
    for name in spec.optimizers:
        if name in CLIPPING:
            parameters, max_norm = CLIPPING[name](model, train)
            torch.nn.utils.clip_grad_norm_(parameters, max_norm)
