"""SMAT's model: θ_i = θ_pre + θ_δ ⊙ Σ_m α_{i,m} z_m over a frozen timm ViT.

- ``theta_pre`` [N]: the pre-trained values of every parameter that carries
  experts, in one flat buffer; the backbone's own parameters are views of it.
- ``delta`` [N] (θ_δ, initialised to 0) and ``log_alpha`` [N, M] (the
  hard-concrete mask logits of M experts, expert-minor): trained.
- ``hypernet``: support set → M logits → Gumbel-sigmoid → α.

The merge of all B tasks of a meta-batch is one ``smat_kernels.merge`` call;
the backbone then runs on each task's row of the merged [B, N] buffer.
"""

from __future__ import annotations

import math

import torch
from torch import nn

import smat_kernels

from ..config import ModelConfig
from . import hypernet as hyper
from .backbone import feature_dim
from .base import TaskModel
from .hypernet import Hypernetwork


def router(backbone: nn.Module, config: ModelConfig, num_experts: int) -> Hypernetwork:
    """The hypernetwork h_ζ of ``config`` scoring ``num_experts`` experts from the backbone's features."""
    return Hypernetwork(feature_dim(backbone), num_experts, config.hyper_tokens, config.hyper_heads,
                        config.hyper_mlp_ratio)


class RoutedModel(TaskModel):
    """A model whose hypernetwork merges M experts per task: α_i = normalise(GumbelSigmoid(h_ζ(support)))."""

    routed = True

    def __init__(self, backbone: nn.Module, config: ModelConfig):
        super().__init__(backbone, config.expert_patterns, config.protonet_scale, config.backend)
        self.init_experts(config, config.num_experts)  # before the router: its random initialisation comes second
        self.hypernet = router(backbone, config, config.num_experts)

    def init_experts(self, config: ModelConfig, num_experts: int) -> None:
        """Create the experts' trained tensors (called once, before the hypernetwork is built)."""
        raise NotImplementedError

    def expert_logits(self, prototypes: list[torch.Tensor]) -> torch.Tensor:
        """Hypernetwork logits fp32 [B, M] from the pre-trained class prototypes of each task."""
        return self.hypernet(prototypes)

    @staticmethod
    def merging_weights(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None,
                        hard: bool = False) -> torch.Tensor:
        """α [B, M]: Gumbel-sigmoid scores (``generator=None``: their evaluation form), normalised to sum 1.

        ``hard``: scores rounded to {0, 1} first (Algorithm 2's starting point)."""
        scores = hyper.gumbel_sigmoid(logits, temperature, generator)
        return hyper.normalise(scores.round() if hard else scores)

    @torch.no_grad()
    def task_alpha(self, tasks, temperature: float, hard: bool = False, prototypes=None) -> torch.Tensor:
        """Evaluation-time α [B, M] of the tasks: the hypernetwork's scores without noise, normalised.
        ``prototypes``: the tasks' :meth:`pretrained_prototypes` where the caller has them already."""
        if prototypes is None:
            prototypes = self.pretrained_prototypes(tasks)
        return self.merging_weights(self.expert_logits(prototypes), temperature, None, hard)

    @torch.no_grad()
    def task_parameters(self, tasks, temperature: float, prototypes=None) -> torch.Tensor:
        """θ [B, N] of the tasks at meta-test time: evaluation α, deterministic masks, one merge call."""
        return self.merge(self.task_alpha(tasks, temperature, prototypes=prototypes), mode="deterministic")

    def merge(self, alpha: torch.Tensor, mode: str = "deterministic", seed: int = 0, offset: int = 0) -> torch.Tensor:
        raise NotImplementedError


class SparseInterpolatedExperts(RoutedModel):
    """SMAT: one shared θ_δ under M sparse hard-concrete masks, merged per task by the hypernetwork's α."""

    masked = True

    def init_experts(self, config: ModelConfig, num_experts: int) -> None:
        """θ_δ = 0 and log_α ~ N(mean, std²), clamped to ``model.log_alpha_range``."""
        n, m = self.layout.num_elements, num_experts
        self.delta = nn.Parameter(torch.zeros(self.delta_shape(n, m)))
        self.log_alpha = nn.Parameter(torch.randn(n, m) * config.log_alpha_init_std + config.log_alpha_init_mean)
        self.log_alpha_range = (float(config.log_alpha_range[0]), float(config.log_alpha_range[1]))
        self.project_log_alpha()

    @classmethod
    def from_config(cls, config: ModelConfig, backbone: nn.Module) -> SparseInterpolatedExperts:
        return cls(backbone, config)

    @staticmethod
    def delta_shape(num_elements: int, num_experts: int) -> tuple[int, ...]:
        """θ_δ is shared by every expert: [N]."""
        return (num_elements,)

    @property
    def num_experts(self) -> int:
        return self.log_alpha.shape[1]

    def merge(self, alpha: torch.Tensor, mode: str = "deterministic", seed: int = 0, offset: int = 0) -> torch.Tensor:
        """θ [B, N] for merging weights ``alpha`` [B, M]; one kernel call for all tasks."""
        return smat_kernels.merge(self.theta_pre, self.delta.to(self.theta_pre.dtype), self.log_alpha,
                                  alpha.float().contiguous(), mode=mode, seed=seed, offset=offset,
                                  backend=self.backend)

    def counters_per_task(self) -> int:
        """Philox counters one task's masks use: offsets of consecutive tasks are this far apart."""
        return smat_kernels.counters_per_call(1, self.layout.num_elements, self.num_experts)

    @torch.no_grad()
    def project_log_alpha(self) -> None:
        self.log_alpha.clamp_(*self.log_alpha_range)

    def expected_density(self) -> torch.Tensor:
        """Mean P(z ≠ 0) per expert, fp32 [M], differentiable (the L0 term)."""
        return smat_kernels.expected_density(self.log_alpha, backend=self.backend)

    @torch.no_grad()
    def hard_masks(self) -> torch.Tensor:
        """bool [N, M]: where each expert's deterministic mask is non-zero.

        z = clamp(sigmoid(log_α)(ζ − γ) + γ, 0, 1) > 0 exactly when sigmoid(log_α) > −γ / (ζ − γ)."""
        threshold = -smat_kernels.GAMMA / (smat_kernels.ZETA - smat_kernels.GAMMA)
        return self.log_alpha.detach() > math.log(threshold / (1 - threshold))

    @torch.no_grad()
    def hard_sparsity(self) -> torch.Tensor:
        """Fraction of each expert's deterministic mask that is exactly 0, [M]."""
        return 1.0 - smat_kernels.hard_density(self.log_alpha, backend=self.backend)

    def describe(self) -> str:
        counts = self.num_parameters()
        return (f"SMAT over {type(self.backbone).__name__}: N = {counts['theta_pre']:,} parameters carry "
                f"{self.num_experts} experts ({len(self.layout.slots)} tensors); hypernetwork "
                f"{counts['hypernet']:,} parameters; log_alpha in [{self.log_alpha_range[0]:g}, "
                f"{self.log_alpha_range[1]:g}]")
