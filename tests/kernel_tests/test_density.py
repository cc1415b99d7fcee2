"""expected_density (and its gradient) and hard_density: the CPU backend
against the reference, and the reference against float64."""

from __future__ import annotations

import pytest
import torch

import smat_kernels
from smat_kernels import reference

from .tolerances import assert_close

SIZES = (1, 97, 1025, 2**20 + 3)
KINK = -float(torch.log(torch.tensor(11.0)))  # deterministic z = 0 below log_α = logit(1/12) = −log 11


def make_log_alpha(n: int, num_experts: int, seed: int) -> torch.Tensor:
    """log_α with no entry within 1e-3 of the hard-density kink (where two
    sigmoid implementations may round to different sides of z = 0)."""
    log_alpha = 3.0 * torch.randn(n, num_experts, generator=torch.Generator().manual_seed(seed))
    near = (log_alpha - KINK).abs() < 1e-3
    return torch.where(near, log_alpha + 2e-3, log_alpha)


@pytest.mark.parametrize("num_experts", (1, 3, 8, 32))
@pytest.mark.parametrize("n", SIZES)
def test_expected_density(n, num_experts):
    log_alpha = make_log_alpha(n, num_experts, seed=n + num_experts).requires_grad_()
    density = smat_kernels.expected_density(log_alpha, backend="cpu")
    exact = reference.expected_density(log_alpha.detach().double())
    # A mean of probabilities: the scale of the sum is the sum itself.
    assert_close("expected density", density, exact, exact)
    assert_close("reference expected density", reference.expected_density(log_alpha.detach()), exact, exact)
    grad = torch.randn(num_experts, generator=torch.Generator().manual_seed(1))
    (cpu_grad,) = torch.autograd.grad(density, log_alpha, grad)
    expected_grad = reference.expected_density_backward(grad, log_alpha.detach())
    assert_close("∂log_alpha", cpu_grad, expected_grad, (grad.abs() / n / 4).expand(n, num_experts))


@pytest.mark.parametrize("num_experts", (1, 3, 8, 32))
@pytest.mark.parametrize("n", SIZES)
def test_hard_density(n, num_experts):
    log_alpha = make_log_alpha(n, num_experts, seed=2 * n + num_experts)
    density = smat_kernels.hard_density(log_alpha, backend="cpu")
    counted = (log_alpha > KINK).double().sum(dim=0) / n
    assert torch.equal(density, reference.hard_density(log_alpha))
    torch.testing.assert_close(density.double(), counted, rtol=1e-7, atol=0)


def test_reference_density_backward_matches_autograd():
    log_alpha = make_log_alpha(97, 5, seed=0).requires_grad_()
    grad = torch.randn(5, generator=torch.Generator().manual_seed(2))
    (autograd,) = torch.autograd.grad(reference.expected_density(log_alpha), log_alpha, grad)
    torch.testing.assert_close(reference.expected_density_backward(grad, log_alpha.detach()), autograd)


def test_gradcheck_expected_density():
    log_alpha = torch.randn(9, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert torch.autograd.gradcheck(reference.expected_density, (log_alpha.requires_grad_(),))
    assert torch.autograd.gradcheck(lambda la: reference.expected_density(la, 0.5, -0.2, 1.3), (log_alpha,))


@pytest.mark.parametrize("backend", ("cpu", "reference"))
def test_density_settings_are_used(backend):
    """β, γ and ζ reach the kernels: other values, other densities."""
    log_alpha = make_log_alpha(1025, 3, seed=4)
    default = smat_kernels.expected_density(log_alpha, backend=backend)
    other = smat_kernels.expected_density(log_alpha, beta=0.5, gamma=-0.2, zeta=1.3, backend=backend)
    torch.testing.assert_close(other, reference.expected_density(log_alpha, 0.5, -0.2, 1.3), rtol=1e-5, atol=1e-7)
    assert (other - default).abs().min() > 1e-3
    hard = smat_kernels.hard_density(log_alpha, gamma=-0.5, zeta=1.5, backend=backend)
    assert torch.equal(hard, reference.hard_density(log_alpha, -0.5, 1.5))
