"""The baselines' models (Section 5 and Table 2), on the same frozen backbone, flat layout θ_pre [N] and
features as SMAT; what differs is how θ_i [N] of task i is built:

- :class:`~smat.model.base.TaskModel` (``pretrained``): θ_i = θ_pre (no meta-tuning).
- :class:`PMF` (Hu et al. 2022): θ_i = θ_pre + δ, one dense δ for every task.
- :class:`SoftMerge` (SMEAR, Muqeeth et al. 2023): θ_i = θ_pre + α_i @ Δ with
  M dense experts Δ [M, N] and α_i = softmax(h_ζ(support set)).
- :class:`IndependentExperts` (Table 2, "without interpolated experts"):
  θ_i = θ_pre + Σ_m α_i,m z_m ⊙ δ_m, every expert with its own δ_m and mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import smat_kernels

from ..config import ModelConfig
from .base import TaskModel
from .experts import RoutedModel, SparseInterpolatedExperts

# Philox counters are 64-bit: expert m of IndependentExperts draws its mask noise from its own stretch
# [m·2^58, (m + 1)·2^58) (M ≤ 32), so the noise of a task does not depend on how a meta-batch is split.
EXPERT_COUNTER_STRIDE = 2**63 // 32


class Pretrained(TaskModel):
    """The pre-trained backbone alone: every task runs on θ_pre."""

    def __init__(self, backbone: nn.Module, config: ModelConfig):
        super().__init__(backbone, config.expert_patterns, config.protonet_scale, config.backend)


def dense_merge(theta_pre: torch.Tensor, alpha: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """θ [B, N] = θ_pre + α [B, M] @ Δ [M, N], one matmul for all tasks, accumulated in fp32."""
    return torch.addmm(theta_pre.float(), alpha.float(), delta.float()).to(theta_pre.dtype)


class SoftMerge(RoutedModel):
    """SMEAR-style soft merging: θ_i = θ_pre + α_i @ Δ, Δ [M, N] initialised to 0, α_i = softmax(h_ζ logits)."""

    def init_experts(self, config: ModelConfig, num_experts: int) -> None:
        """Δ = 0 [M, N]."""
        self.delta = nn.Parameter(torch.zeros(num_experts, self.layout.num_elements))

    @property
    def num_experts(self) -> int:
        return self.delta.shape[0]

    @staticmethod
    def merging_weights(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None,
                        hard: bool = False) -> torch.Tensor:
        """α fp32 [B, M] = softmax(logits [B, M]): SMEAR's router has neither noise nor a temperature, so
        ``temperature`` and ``generator`` are ignored. ``hard``: the one-hot of the top expert."""
        alpha = logits.float().softmax(-1)
        return F.one_hot(alpha.argmax(-1), alpha.shape[-1]).float() if hard else alpha

    def merge(self, alpha: torch.Tensor, mode: str = "deterministic", seed: int = 0, offset: int = 0) -> torch.Tensor:
        """θ [B, N] = θ_pre + α @ Δ. Dense experts have no mask noise: ``mode``, ``seed`` and ``offset`` are
        accepted for SMAT's callers and ignored."""
        return dense_merge(self.theta_pre, alpha, self.delta)


class PMF(TaskModel):
    """PMF: θ_i = θ_pre + δ for every task, one dense δ [1, N] (one expert, no router).

    ``model.pmf_head='learnable'`` (PMF's code; configs/baselines/pmf.yaml): the cosine head's scale (initialised to
    ``model.protonet_scale``) and bias (initialised to 0) are parameters, logits = scale·(cos + bias),
    meta-trained with δ and fixed at meta-test time."""

    def __init__(self, backbone: nn.Module, config: ModelConfig):
        super().__init__(backbone, config.expert_patterns, config.protonet_scale, config.backend)
        self.delta = nn.Parameter(torch.zeros(1, self.layout.num_elements))
        if config.pmf_head == "learnable":
            self.protonet_scale = nn.Parameter(torch.tensor(float(config.protonet_scale)))
            self.protonet_bias = nn.Parameter(torch.tensor(0.0))

    def head_parameters(self) -> list[nn.Parameter]:
        """The learned scale and bias of the cosine head (none when it is fixed)."""
        return [value for value in (self.protonet_scale, self.protonet_bias) if isinstance(value, nn.Parameter)]

    @torch.no_grad()
    def load_trainable_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        # a run written before the head was learnable holds no head: its head was the fixed (scale, 0),
        # which are the initial values
        initial = {name: value.detach().clone() for name, value in self.named_parameters(recurse=False)
                   if name.startswith("protonet_")}
        super().load_trainable_tensors({**initial, **tensors})

    @property
    def num_experts(self) -> int:
        return 1

    @torch.no_grad()
    def task_alpha(self, tasks, temperature: float, hard: bool = False, prototypes=None) -> torch.Tensor:
        """α = 1, fp32 [B, 1]."""
        return self.theta_pre.new_ones(len(tasks), 1, dtype=torch.float32)

    def merge(self, alpha: torch.Tensor, mode: str = "deterministic", seed: int = 0, offset: int = 0) -> torch.Tensor:
        """θ [B, N] = θ_pre + δ for each of the B rows of ``alpha`` (all ones)."""
        return dense_merge(self.theta_pre, alpha, self.delta)

    @torch.no_grad()
    def task_parameters(self, tasks, temperature: float, prototypes=None) -> torch.Tensor:
        return self.merge(self.task_alpha(tasks, temperature))


class IndependentExperts(SparseInterpolatedExperts):
    """Table 2's "without interpolated experts": θ_i = θ_pre + Σ_m α_i,m z_m ⊙ δ_m.

    ``delta`` is [M, N] (one dense δ_m per expert, initialised to 0) instead of SMAT's shared [N]; masks,
    hypernetwork and the sparsity constraint are SMAT's."""

    @staticmethod
    def delta_shape(num_elements: int, num_experts: int) -> tuple[int, ...]:
        """One δ_m per expert: [M, N]."""
        return (num_experts, num_elements)

    def merge(self, alpha: torch.Tensor, mode: str = "deterministic", seed: int = 0, offset: int = 0) -> torch.Tensor:
        """θ [B, N] for ``alpha`` [B, M]: one ``smat_kernels.merge`` per expert, with M = 1 and θ_pre = 0.

        The experts are summed in fp32, as the fused kernel accumulates; unbind/split rather than indexing,
        because their backward is one stack/concatenation instead of M zero-filled [M, N] gradients."""
        zeros = torch.zeros_like(self.theta_pre, dtype=torch.float32)
        total = self.theta_pre.float().expand(alpha.shape[0], -1)
        experts = zip(self.delta.float().unbind(0), self.log_alpha.split(1, dim=1), alpha.float().split(1, dim=1))
        for m, (delta_m, log_alpha_m, alpha_m) in enumerate(experts):
            total = total + smat_kernels.merge(zeros, delta_m, log_alpha_m.contiguous(), alpha_m.contiguous(),
                                               mode=mode, seed=seed, offset=offset + m * EXPERT_COUNTER_STRIDE,
                                               backend=self.backend)
        return total.to(self.theta_pre.dtype)

    def counters_per_task(self) -> int:
        """Philox counters of one task in one expert's stretch (the offsets of consecutive tasks)."""
        return smat_kernels.counters_per_call(1, self.layout.num_elements, 1)

    def describe(self) -> str:
        return "without interpolated experts (one delta per expert): " + super().describe()
