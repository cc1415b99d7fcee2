"""Sampled masks follow the hard-concrete law (Louizos et al. 2018).

With u ~ U(0, 1), logit(u) is standard logistic, so s = sigmoid((logit(u) +
log_α)/β) has P(s ≤ t) = sigmoid(β·logit(t) − log_α), and the stretched and
clamped z = clamp(s(ζ − γ) + γ, 0, 1) has

    P(z ≤ x) = sigmoid(β·logit((x − γ)/(ζ − γ)) − log_α)   for 0 ≤ x < 1,
    P(z = 0) = sigmoid(β·log(−γ/ζ) − log_α)                 (x = 0),
    P(z = 1) = sigmoid(log_α − β·log((1 − γ)/(ζ − 1))).

The samples come from the merge op with θ_pre = 0, θ_δ = 1 and α = identity
(task b reads expert b), so that the output is the masks themselves. The seed
is fixed; by the Dvoretzky–Kiefer–Wolfowitz inequality a correct sampler
exceeds the KS distance 6/√n with probability below 2·e^-72.
"""

from __future__ import annotations

import math

import pytest
import torch

import smat_kernels
from smat_kernels import reference

LOG_ALPHAS = (-2.0, 0.0, 1.5)


def law_cdf(x: torch.Tensor, log_alpha: float, beta: float = reference.BETA, gamma: float = reference.GAMMA,
            zeta: float = reference.ZETA) -> torch.Tensor:
    """P(z ≤ x) for x in [0, 1), float64."""
    t = (x.double() - gamma) / (zeta - gamma)
    return torch.sigmoid(beta * torch.logit(t) - log_alpha)


def probability_zero(log_alpha: float, beta=reference.BETA, gamma=reference.GAMMA, zeta=reference.ZETA) -> float:
    return 1 / (1 + math.exp(-(beta * math.log(-gamma / zeta) - log_alpha)))


def probability_one(log_alpha: float, beta=reference.BETA, gamma=reference.GAMMA, zeta=reference.ZETA) -> float:
    return 1 / (1 + math.exp(-(log_alpha - beta * math.log((1 - gamma) / (zeta - 1)))))


def test_closed_forms_agree_with_each_other():
    """The atoms are the limits of the continuous part, and P(z ≠ 0) is the
    expected density the L0 term uses."""
    for log_alpha in LOG_ALPHAS:
        edge = torch.tensor([0.0, 1 - 1e-12], dtype=torch.float64)
        cdf = law_cdf(edge, log_alpha)
        assert math.isclose(float(cdf[0]), probability_zero(log_alpha), rel_tol=1e-12)
        assert math.isclose(1 - float(cdf[1]), probability_one(log_alpha), rel_tol=1e-6)
        density = reference.expected_density(torch.full((1, 1), log_alpha, dtype=torch.float64))
        assert math.isclose(float(density), 1 - probability_zero(log_alpha), rel_tol=1e-12)


def sample_masks(n: int, backend: str, seed: int = 2024) -> torch.Tensor:
    """[len(LOG_ALPHAS), n]: row b holds n samples of the mask with log_α = LOG_ALPHAS[b]."""
    num_experts = len(LOG_ALPHAS)
    log_alpha = torch.tensor(LOG_ALPHAS).expand(n, num_experts).contiguous()
    alpha = torch.eye(num_experts)
    return smat_kernels.merge(torch.zeros(n), torch.ones(n), log_alpha, alpha, mode="sample", seed=seed,
                              offset=0, backend=backend)


def ks_distance(samples: torch.Tensor, log_alpha: float, beta: float = reference.BETA) -> float:
    """sup_x |F_n(x) − F(x)| over x in [0, 1), atoms included, for the law at temperature beta."""
    n = samples.numel()
    inner = torch.sort(samples[(samples > 0) & (samples < 1)].double()).values
    zeros = int((samples == 0).sum())
    below = zeros + torch.arange(inner.numel(), dtype=torch.float64)  # #samples < x_i (values are distinct-ish)
    cdf = law_cdf(inner, log_alpha, beta)
    distance = max(abs(zeros / n - probability_zero(log_alpha, beta)),
                   float((below / n - cdf).abs().max()), float(((below + 1) / n - cdf).abs().max()))
    return distance


@pytest.mark.parametrize(("backend", "n"), (("cpu", 2**20), ("reference", 2**16)))
def test_sampled_masks_follow_the_hard_concrete_law(backend, n):
    masks = sample_masks(n, backend)
    margin = 6 / math.sqrt(n)
    for row, log_alpha in enumerate(LOG_ALPHAS):
        samples = masks[row]
        assert abs(float((samples == 0).double().mean()) - probability_zero(log_alpha)) < margin
        assert abs(float((samples == 1).double().mean()) - probability_one(log_alpha)) < margin
        assert ks_distance(samples, log_alpha) < margin, f"log_α = {log_alpha}"


def test_law_check_rejects_a_wrong_temperature():
    """The margin is tight enough to see β = 1 instead of 2/3."""
    n = 2**20
    masks = sample_masks(n, "cpu")
    right = [ks_distance(masks[row], log_alpha) for row, log_alpha in enumerate(LOG_ALPHAS)]
    wrong = [ks_distance(masks[row], log_alpha, beta=1.0) for row, log_alpha in enumerate(LOG_ALPHAS)]
    assert max(right) < 6 / math.sqrt(n) < 5 * 6 / math.sqrt(n) < min(wrong)


def test_masks_of_different_tasks_and_experts_are_independent():
    """P(z_a = 0 and z_b = 0) = P(z_a = 0)·P(z_b = 0) for the masks of one
    element in two tasks and two experts (neighbouring words and counters)."""
    n = 2**20
    masks = sample_masks(n, "cpu") == 0
    margin = 6 / math.sqrt(n)
    for first, second in ((0, 1), (1, 2), (0, 2)):
        joint = float((masks[first] & masks[second]).double().mean())
        product = probability_zero(LOG_ALPHAS[first]) * probability_zero(LOG_ALPHAS[second])
        assert abs(joint - product) < margin
