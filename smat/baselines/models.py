"""The baselines' models (Section 5 and Table 2), built on SMAT's :class:`SparseInterpolatedExperts`.

They reuse its frozen backbone, flat layout θ_pre [N], features and, where
they route, its hypernetwork; what differs is how θ_i [N] of task i is built:

- :class:`Pretrained`: θ_i = θ_pre (no meta-tuning).
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

from ..model import SparseInterpolatedExperts

# Philox counters are 64-bit: expert m of IndependentExperts draws its mask noise from its own stretch
# [m·2^58, (m + 1)·2^58) (M ≤ 32), so the noise of a task does not depend on how a meta-batch is split.
EXPERT_COUNTER_STRIDE = 2**63 // 32


class Pretrained(SparseInterpolatedExperts):
    """The pre-trained backbone alone; also the base of the dense baselines.

    SMAT's shared θ_δ and masks are dropped (the subclasses add their own deltas); its hypernetwork is kept
    where the class ``routes``. Dense experts count as fully dense: density 1, sparsity 0."""

    routes = False

    def __init__(self, backbone: nn.Module, num_experts: int = 1, *args, **kwargs):
        # SMAT's masks are built, then dropped: for one expert only, unless the router needs M keys
        super().__init__(backbone, num_experts if self.routes else 1, *args, **kwargs)
        del self.delta, self.log_alpha
        if not self.routes:
            del self.hypernet

    @property
    def num_experts(self) -> int:
        return 0

    @torch.no_grad()
    def task_parameters(self, tasks, temperature: float) -> None:
        """None: every task runs on the pre-trained weights."""
        return None

    def counters_per_task(self) -> int:
        """Dense experts draw no mask noise."""
        return 0

    def expected_density(self) -> torch.Tensor:
        """fp32 [M] of ones (MetaObjective's L0 term; constant, so the multipliers' penalty has no gradient)."""
        return self.theta_pre.new_ones(self.num_experts, dtype=torch.float32)

    @torch.no_grad()
    def hard_sparsity(self) -> torch.Tensor:
        return self.theta_pre.new_zeros(self.num_experts, dtype=torch.float32)

    @torch.no_grad()
    def hard_masks(self) -> torch.Tensor:
        """bool [N, M], all True (for the gradient-alignment measurement of the routed baselines)."""
        return torch.ones(self.layout.num_elements, self.num_experts, dtype=torch.bool, device=self.theta_pre.device)

    def trainable_tensors(self) -> dict[str, torch.Tensor]:
        """Everything but the frozen backbone (θ_pre is saved once per run): the deltas, and the router with
        its spectral-norm buffers."""
        return {name: value.detach() for name, value in self.state_dict().items() if not name.startswith("backbone.")}

    @torch.no_grad()
    def load_trainable_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        result = self.load_state_dict(tensors, strict=False)
        missing = [name for name in result.missing_keys if not name.startswith("backbone.")]
        if missing or result.unexpected_keys:
            raise KeyError(f"{type(self).__name__}: tensors missing {missing}, unexpected {result.unexpected_keys}")

    def num_parameters(self) -> dict[str, int]:
        """{"theta_pre": N, <trained submodule or parameter>: count}."""
        counts = {"theta_pre": self.layout.num_elements}
        for name, parameter in self.named_parameters():
            if parameter.requires_grad:
                top = name.split(".")[0]
                counts[top] = counts.get(top, 0) + parameter.numel()
        return counts

    def describe(self) -> str:
        counts = self.num_parameters()
        trained = ", ".join(f"{name} {count:,}" for name, count in counts.items() if name != "theta_pre") or "nothing"
        experts = f"{self.num_experts} dense expert(s); " if self.num_experts else ""
        return (f"{type(self).__name__} over {type(self.backbone).__name__}: N = {counts['theta_pre']:,} parameters "
                f"({len(self.layout.slots)} tensors); {experts}trained: {trained}")


class SoftMerge(Pretrained):
    """SMEAR-style soft merging: θ_i = θ_pre + α_i @ Δ, Δ [M, N] initialised to 0, α_i = softmax(h_ζ logits).

    With ``model.expert_patterns=[blocks.*.mlp.*]`` it is Table 2's "fixed MLP experts"."""

    routes = True

    def __init__(self, backbone: nn.Module, num_experts: int = 8, *args, **kwargs):
        super().__init__(backbone, num_experts, *args, **kwargs)
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

    task_parameters = SparseInterpolatedExperts.task_parameters

    def merge(self, alpha: torch.Tensor, mode: str = "deterministic", seed: int = 0, offset: int = 0,
              backend: str | None = None) -> torch.Tensor:
        """θ [B, N] = θ_pre + α [B, M] @ Δ [M, N], one matmul for all tasks. Dense experts have no mask
        noise: ``mode``, ``seed``, ``offset`` and ``backend`` are accepted for SMAT's callers and ignored."""
        return torch.addmm(self.theta_pre.float(), alpha.float(), self.delta.float()).to(self.theta_pre.dtype)


class PMF(SoftMerge):
    """PMF: θ_i = θ_pre + δ for every task, one dense δ [1, N] (a SoftMerge of one expert, without router)."""

    routes = False

    def __init__(self, backbone: nn.Module, num_experts: int = 1, *args, **kwargs):
        super().__init__(backbone, 1, *args, **kwargs)  # one δ whatever model.num_experts says

    @torch.no_grad()
    def task_alpha(self, tasks, temperature: float, hard: bool = False) -> torch.Tensor:
        """α = 1, fp32 [B, 1]."""
        return self.theta_pre.new_ones(len(tasks), 1, dtype=torch.float32)


class IndependentExperts(SparseInterpolatedExperts):
    """Table 2's "without interpolated experts": θ_i = θ_pre + Σ_m α_i,m z_m ⊙ δ_m.

    ``delta`` is [M, N] (one dense δ_m per expert, initialised to 0) instead of SMAT's shared [N]; masks,
    hypernetwork and the sparsity constraint are SMAT's."""

    def __init__(self, backbone: nn.Module, num_experts: int = 8, *args, **kwargs):
        super().__init__(backbone, num_experts, *args, **kwargs)
        self.delta = nn.Parameter(torch.zeros(num_experts, self.layout.num_elements))

    def merge(self, alpha: torch.Tensor, mode: str = "deterministic", seed: int = 0, offset: int = 0,
              backend: str | None = None) -> torch.Tensor:
        """θ [B, N] for ``alpha`` [B, M]: one ``smat_kernels.merge`` per expert, with M = 1 and θ_pre = 0.

        The experts are summed in fp32, as the fused kernel accumulates; unbind/split rather than indexing,
        because their backward is one stack/concatenation instead of M zero-filled [M, N] gradients."""
        zeros = torch.zeros_like(self.theta_pre, dtype=torch.float32)
        total = self.theta_pre.float().expand(alpha.shape[0], -1)
        experts = zip(self.delta.float().unbind(0), self.log_alpha.split(1, dim=1), alpha.float().split(1, dim=1))
        for m, (delta_m, log_alpha_m, alpha_m) in enumerate(experts):
            total = total + smat_kernels.merge(zeros, delta_m, log_alpha_m.contiguous(), alpha_m.contiguous(),
                                               mode=mode, seed=seed, offset=offset + m * EXPERT_COUNTER_STRIDE,
                                               backend=backend or self.backend)
        return total.to(self.theta_pre.dtype)

    def counters_per_task(self) -> int:
        """Philox counters of one task in one expert's stretch (the offsets of consecutive tasks)."""
        return smat_kernels.counters_per_call(1, self.layout.num_elements, 1)

    def describe(self) -> str:
        return "without interpolated experts (one delta per expert): " + super().describe()
