"""Lagrange multipliers for the per-expert sparsity constraints (Algorithm 1, Eq. 2).

Expert m must keep its expected sparsity 1 − E[L0(z_m)]/N at or above τ,
i.e. the violation g_m = E[L0(z_m)]/N − (1 − τ) must be ≤ 0. The model
minimises Σ_m λ_m·g_m; λ_m follows projected gradient ascent, its step
weighted by the mean merging weight of expert m in the batch, and is reset to
0 as soon as the constraint holds (Gallego-Posada et al. 2022).
"""

from __future__ import annotations

import torch


class SparsityMultipliers:
    def __init__(self, num_experts: int, tau: float, lr: float, device=None):
        self.tau, self.lr = float(tau), float(lr)
        self.value = torch.zeros(num_experts, dtype=torch.float64, device=device)

    def violation(self, density: torch.Tensor) -> torch.Tensor:
        """g_m = density_m − (1 − τ), [M]; positive while expert m is too dense."""
        return density - (1.0 - self.tau)

    def penalty(self, density: torch.Tensor) -> torch.Tensor:
        """Σ_m λ_m·g_m, differentiable in ``density`` (λ is a constant for the model's step)."""
        return (self.value.to(density.dtype) * self.violation(density)).sum()

    @torch.no_grad()
    def ascend(self, density: torch.Tensor, mean_alpha: torch.Tensor) -> None:
        """λ_m ← max(0, λ_m + lr·g_m·ᾱ_m) while violated; λ_m ← 0 once the constraint holds."""
        violation = self.violation(density.detach().double())
        stepped = (self.value + self.lr * violation * mean_alpha.detach().double()).clamp_min(0.0)
        self.value = torch.where(violation > 0, stepped, torch.zeros_like(stepped))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"lambda": self.value.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.value = state["lambda"].to(self.value)
