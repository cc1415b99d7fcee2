"""The models of every method, over one interface (:class:`~smat.model.base.TaskModel`).

:data:`MODELS` is the one table from a run's ``method`` to its model; :func:`build` puts it over a
backbone. What a model has is data on its class: ``num_experts``, ``masked`` (sparse hard-concrete
experts) and ``routed`` (a hypernetwork scores the experts per task).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..config import METHODS, Config, ConfigError
from ..runtime.checkpoint import CheckpointError
from .backbone import create_skeleton
from .base import TaskModel
from .baselines import PMF, IndependentExperts, Pretrained, SoftMerge
from .experts import RoutedModel, SparseInterpolatedExperts
from .flat import select_parameters

MODELS: dict[str, type[TaskModel]] = {"smat": SparseInterpolatedExperts, "pretrained": Pretrained, "pmf": PMF,
                                      "softmerge": SoftMerge, "smat_independent": IndependentExperts}
assert tuple(MODELS) == METHODS, "config.METHODS and model.MODELS list the same methods"

# the methods with sparse hard-concrete experts: sparsity constraint, mask analyses, Algorithm 2
MASKED_METHODS = tuple(name for name, model in MODELS.items() if model.masked)

__all__ = ["MASKED_METHODS", "MODELS", "PMF", "IndependentExperts", "Pretrained", "RoutedModel", "SoftMerge",
           "SparseInterpolatedExperts", "TaskModel", "build", "check_buildable", "check_compatible"]


def check_buildable(config: Config) -> None:
    """Whether ``config``'s model can be built: the backbone's sizes and parameters that match
    ``model.expert_patterns``, on the meta device (no memory, weights or download). A ConfigError otherwise,
    so that a command can refuse the config before it creates anything."""
    select_parameters(create_skeleton(config.model), config.model.expert_patterns)


def build(config: Config, backbone: nn.Module) -> TaskModel:
    """The model of ``config.method`` over ``backbone`` (frozen, with its pre-trained weights)."""
    if config.method not in MODELS:
        raise ConfigError(f"method={config.method!r} is unknown; methods: {', '.join(MODELS)}")
    return MODELS[config.method](backbone, config.model)


def check_compatible(state: dict, model: TaskModel, config: Config, folder: Path) -> None:
    """Raise :class:`CheckpointError` unless the checkpoint's ``state`` was written for this model and config."""
    expected = {"method": config.method, "backbone": config.model.backbone,
                "num_elements": model.layout.num_elements, "num_experts": model.num_experts}
    found = {key: state.get(key) for key in expected}
    if found != expected:
        diff = ", ".join(f"{k}: checkpoint {found[k]!r} vs config {expected[k]!r}" for k in expected
                         if found[k] != expected[k])
        raise CheckpointError(f"checkpoint {folder} was written for another backbone or config ({diff}); "
                              f"use the config it was trained with (the run's config.yaml)")
