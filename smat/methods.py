"""Which model a run's ``method`` builds over its backbone.

Every model exposes the same meta-test interface, used by evaluation and
analysis: ``features(theta_row | None, images)``, ``task_parameters(tasks,
temperature) -> [B, N] | None`` (None: the pre-trained weights),
``trainable_tensors()`` / ``load_trainable_tensors(tensors)``, ``layout``,
``theta_pre`` and ``protonet_scale``.
"""

from __future__ import annotations

from torch import nn

from .config import Config
from .model import SparseInterpolatedExperts


def build(config: Config, backbone: nn.Module) -> nn.Module:
    if config.method == "smat":
        return SparseInterpolatedExperts.from_config(config.model, backbone)
    from .baselines import build_baseline

    return build_baseline(config, backbone)
