"""The baselines of Section 5 and the ablations of Table 2, trained and evaluated with SMAT's code.

``python -m smat.train method=<name>`` with ``<name>`` one of ``pretrained``, ``pmf``, ``softmerge`` or
``smat_independent`` ends up in :func:`run_baseline`; :func:`build_baseline` is what
:func:`smat.methods.build` returns for them. Models are in :mod:`.models`, their training hooks in
:mod:`.training`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .. import checkpoint, distributed
from ..config import Config, ConfigError
from .models import PMF, IndependentExperts, Pretrained, SoftMerge
from .training import TRAINERS, PMFTrainer, PretrainedTrainer, ProtoNetObjective, SoftMergeTrainer

MODELS: dict[str, type[nn.Module]] = {"pretrained": Pretrained, "pmf": PMF, "softmerge": SoftMerge,
                                      "smat_independent": IndependentExperts}

__all__ = ["MODELS", "PMF", "TRAINERS", "IndependentExperts", "PMFTrainer", "Pretrained", "PretrainedTrainer",
           "ProtoNetObjective", "SoftMerge", "SoftMergeTrainer", "build_baseline", "run_baseline"]


def build_baseline(config: Config, backbone: nn.Module) -> nn.Module:
    """The model of ``config.method`` over ``backbone`` (frozen, with its pre-trained weights)."""
    if config.method not in MODELS:
        raise ConfigError(f"method={config.method!r} is not a baseline; baselines: {', '.join(MODELS)}")
    return MODELS[config.method].from_config(config.model, backbone)


def run_baseline(config: Config, run: Path, device: torch.device, world: distributed.World, log=print,
                 resume: bool = False, evaluate: bool = True) -> int:
    """Meta-train the baseline of ``config.method`` into ``run`` (or only write its run folder, for
    ``pretrained``), then evaluate it against the pre-trained backbone and write the report."""
    if config.method == "pretrained":
        if not world.is_main:
            return 0  # nothing to train, so nothing to share: the main process writes the run alone
        world = distributed.World()
    trainer = TRAINERS[config.method](config, run, device, world, log)
    log(trainer.model.describe())
    if resume:
        trainer.restore(checkpoint.resolve(run))
    elif world.is_main:
        checkpoint.save_backbone(run, trainer.model.backbone.state_dict())
    trainer.fit()
    if world.is_main and evaluate:
        from ..report import evaluate_and_report

        evaluate_and_report(config, run, trainer.model, device, log)
    return 0
