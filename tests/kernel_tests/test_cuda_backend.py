"""The CUDA backend (smat_kernels._cuda) against smat_kernels.reference:
values and every gradient of the merge, bit-identical uniforms, densities,
pack and the packed merge, and run-to-run determinism of every reduction.

Every test is marked ``gpu`` and skips, at run time and never at collection
time, where there is no CUDA device or no compiled ``_cuda`` module.
"""

from __future__ import annotations

import pytest
import torch

import smat_kernels
from smat_kernels import reference
from smat_kernels.dispatch import get_backend, rejection

pytestmark = pytest.mark.gpu

# Tolerances, in one place. fp32: |error| ≤ RTOL·scale + ATOL, where scale is
# the sum of the absolute values of the terms. bf16/fp16: the kernel's error
# against the fp32 reference may be at most LOW_PRECISION_FACTOR times the
# error of the reference run in the same low precision, plus a floor.
RTOL = 1e-5
ATOL = 1e-6
LOW_PRECISION_FACTOR = 2.0
LOW_PRECISION_FLOOR = 1e-5
SIZES = (1, 97, 1025, 2**20 + 3)
EXPERTS = (1, 3, 8, 32)
BATCHES = (1, 4)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MODES = tuple(range(len(reference.MODES)))  # 0 deterministic, 1 sample, 2 near_noiseless
SEED = 0x1234_5678_9ABC  # above 2^32: both key words matter
OFFSET = 3 * 2**32 + 5  # both counter words matter


@pytest.fixture
def device():
    reason = rejection("cuda", torch.device("cuda"))
    if reason is not None:
        pytest.skip(f"the CUDA backend cannot run here: {reason}")
    return torch.device("cuda")


def backend():
    return get_backend("cuda")


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def make_inputs(n, num_experts, batch, dtype, device, seed=0, binary=False):
    """θ_pre, θ_δ in `dtype`, log_α and α in fp32, on `device`. With
    `binary`, log_α keeps every deterministic mask at exactly 0 or 1 except
    a quarter of the entries, which are fractional but far from z = 0.5 and
    from the clamp's edges, so that no rounding makes a threshold flip."""
    generator = torch.Generator().manual_seed(seed)
    theta_pre = torch.randn(n, generator=generator)
    delta = torch.randn(n, generator=generator)
    if binary:
        sign = torch.randint(0, 2, (n, num_experts), generator=generator) * 2 - 1
        magnitude = 3 + 5 * torch.rand(n, num_experts, generator=generator)
        fractional = torch.rand(n, num_experts, generator=generator) < 0.25
        magnitude = torch.where(fractional, 0.1 + 1.9 * torch.rand(n, num_experts, generator=generator), magnitude)
        log_alpha = sign * magnitude
    else:
        log_alpha = torch.randn(n, num_experts, generator=generator) * 3
    alpha = torch.softmax(torch.randn(batch, num_experts, generator=generator), dim=1)
    return (theta_pre.to(device, dtype), delta.to(device, dtype), log_alpha.to(device), alpha.to(device))


def assert_close_scaled(actual, expected, scale, what):
    """|actual − expected| ≤ RTOL·scale + ATOL elementwise (fp32 outputs)."""
    error = (actual.float() - expected.float()).abs()
    bound = RTOL * scale.float() + ATOL
    worst = (error - bound).argmax()
    assert bool((error <= bound).all()), (f"{what}: error {error.flatten()[worst]:.3g} above bound "
                                          f"{bound.flatten()[worst]:.3g} at flat index {int(worst)}")


def assert_low_precision(actual, exact, low_precision_reference, what):
    """flash-attention's rule: error ≤ factor · (error of the reference in the
    same precision) + floor·(1 + |exact|)."""
    error = (actual.float() - exact).abs()
    reference_error = (low_precision_reference.float() - exact).abs()
    bound = LOW_PRECISION_FACTOR * reference_error + LOW_PRECISION_FLOOR * (1 + exact.abs())
    assert bool((error <= bound).all()), f"{what}: max error {error.max():.3g} above the low-precision bound"


def merge_settings(mode):
    return dict(mode=mode, seed=SEED, offset=OFFSET, beta=reference.BETA, gamma=reference.GAMMA,
                zeta=reference.ZETA)


def clamp_edges(log_alpha, batch, mode):
    """Bool [N, M]: entries whose stretched mask lies within 1e-5 of the clamp's
    edges 0 or 1 for some task. There ∂z/∂log_α jumps between (ζ − γ)s(1 − s)/β
    and 0, so one ulp of difference in s between two correct implementations
    decides which side an entry falls on; those entries of ∂log_α are not compared."""
    n, num_experts = log_alpha.shape
    if mode == 0:
        s = torch.sigmoid(log_alpha)[None]
    else:
        u = reference.uniforms(SEED, OFFSET, batch, n, num_experts, log_alpha.device)
        if mode == 2:
            u = reference.NEAR_NOISELESS_LOW + u * reference.NEAR_NOISELESS_WIDTH
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / reference.BETA)
    stretched = s * (reference.ZETA - reference.GAMMA) + reference.GAMMA
    return ((stretched.abs() < 1e-5) | ((stretched - 1).abs() < 1e-5)).any(dim=0)


def merge_scale(theta_pre, delta, alpha):
    """Σ of |terms| of θ[b, j] = θ_pre + θ_δ Σ_m α z with z ∈ [0, 1]."""
    return theta_pre.float().abs() + delta.float().abs() * alpha.abs().sum(dim=1, keepdim=True)


# --------------------------------------------------------------------------
# randomness
# --------------------------------------------------------------------------


@pytest.mark.parametrize("num_experts", EXPERTS)
@pytest.mark.parametrize(("seed", "offset"), [(0, 0), (SEED, OFFSET), (2**63 - 1, 2**32 - 7)])
def test_uniforms_bit_identical_to_reference(device, num_experts, seed, offset):
    batch, n = 3, 1025
    drawn = backend().uniforms(seed, offset, batch, n, num_experts, device)
    on_device = reference.uniforms(seed, offset, batch, n, num_experts, device)
    on_cpu = reference.uniforms(seed, offset, batch, n, num_experts, "cpu")
    assert torch.equal(drawn, on_device)
    assert torch.equal(drawn.cpu(), on_cpu)


# --------------------------------------------------------------------------
# merge
# --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("num_experts", EXPERTS)
@pytest.mark.parametrize("n", SIZES)
def test_merge_values(device, n, num_experts, batch, dtype, mode):
    theta_pre, delta, log_alpha, alpha = make_inputs(n, num_experts, batch, dtype, device)
    settings = merge_settings(mode)
    merged = backend().merge(theta_pre, delta, log_alpha, alpha, **settings)
    assert merged.dtype == dtype and merged.shape == (batch, n)
    exact = reference.merge(theta_pre.float(), delta.float(), log_alpha, alpha,
                            reference.MODES[mode], SEED, OFFSET)
    if dtype == torch.float32:
        assert_close_scaled(merged, exact, merge_scale(theta_pre, delta, alpha), "merge")
    else:
        low = reference.merge(theta_pre, delta, log_alpha, alpha, reference.MODES[mode], SEED, OFFSET)
        assert_low_precision(merged, exact, low, "merge")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("num_experts", EXPERTS)
@pytest.mark.parametrize("n", SIZES)
def test_merge_gradients(device, n, num_experts, batch, dtype, mode):
    theta_pre, delta, log_alpha, alpha = make_inputs(n, num_experts, batch, dtype, device, seed=1)
    grad = torch.randn(batch, n, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    settings = merge_settings(mode)
    grads = backend().merge_backward(grad, theta_pre, delta, log_alpha, alpha, **settings,
                                     needs=(True, True, True, True))
    exact = reference.merge_backward(grad.float(), theta_pre.float(), delta.float(), log_alpha, alpha,
                                     reference.MODES[mode], SEED, OFFSET)
    low = reference.merge_backward(grad, theta_pre, delta, log_alpha, alpha, reference.MODES[mode], SEED, OFFSET)
    g, d = grad.float().abs(), delta.float().abs()
    scales = (
        g.sum(dim=0),
        (g * alpha.abs().sum(dim=1, keepdim=True)).sum(dim=0),
        # |∂z/∂log α| ≤ (ζ − γ)/(4β) in every mode.
        (g * d).sum(dim=0)[:, None] * alpha.abs().sum(dim=0)[None, :] * (reference.ZETA - reference.GAMMA)
        / (4 * reference.BETA),
        (g * d).sum(dim=1, keepdim=True).expand(batch, num_experts),
    )
    names = ("grad_theta_pre", "grad_delta", "grad_log_alpha", "grad_alpha")
    edges = clamp_edges(log_alpha, batch, mode)
    assert edges.float().mean() < 1e-3
    grads = list(grads)
    grads[2] = torch.where(edges, exact[2] if dtype == torch.float32 else low[2], grads[2])
    for name, actual, expected, expected_low, scale in zip(names, grads, exact, low, scales):
        assert actual.shape == expected.shape, name
        if dtype == torch.float32 or actual.dtype == torch.float32:
            # fp32 outputs of low-precision inputs: compare with the reference on the same inputs.
            target = expected if dtype == torch.float32 else expected_low
            assert_close_scaled(actual, target, scale, name)
        else:
            assert_low_precision(actual, expected, expected_low, name)


@pytest.mark.parametrize("needs", [(True, False, False, False), (False, True, True, False),
                                   (False, False, False, True), (False, False, False, False)])
def test_merge_backward_skips_unneeded_gradients(device, needs):
    theta_pre, delta, log_alpha, alpha = make_inputs(1025, 8, 4, torch.float32, device)
    grad = torch.randn(4, 1025, device=device)
    settings = merge_settings(1)
    partial = backend().merge_backward(grad, theta_pre, delta, log_alpha, alpha, **settings, needs=needs)
    full = backend().merge_backward(grad, theta_pre, delta, log_alpha, alpha, **settings, needs=(True,) * 4)
    for need, got, expected in zip(needs, partial, full):
        assert (got is None) == (not need)
        if need:
            assert torch.equal(got, expected)


def test_merge_backward_many_tasks(device):
    """B·M beyond one block's shared memory: the backward runs in task slices."""
    batch, num_experts = 80, 32
    theta_pre, delta, log_alpha, alpha = make_inputs(4097, num_experts, batch, torch.float32, device)
    grad = torch.randn(batch, 4097, device=device)
    grads = backend().merge_backward(grad, theta_pre, delta, log_alpha, alpha, **merge_settings(1),
                                     needs=(True,) * 4)
    exact = reference.merge_backward(grad, theta_pre, delta, log_alpha, alpha, "sample", SEED, OFFSET)
    grads = (*grads[:2], torch.where(clamp_edges(log_alpha, batch, 1), exact[2], grads[2]), grads[3])
    for got, expected in zip(grads, exact):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_merge_through_public_op_with_autograd(device):
    theta_pre, delta, log_alpha, alpha = make_inputs(1025, 3, 4, torch.float32, device)
    inputs = [t.clone().requires_grad_() for t in (theta_pre, delta, log_alpha, alpha)]
    merged = smat_kernels.merge(*inputs, mode="sample", seed=SEED, offset=OFFSET, backend="cuda")
    merged.square().sum().backward()
    expected_inputs = [t.clone().requires_grad_() for t in (theta_pre, delta, log_alpha, alpha)]
    expected = reference.merge(*expected_inputs, "sample", SEED, OFFSET)
    expected.square().sum().backward()
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(inputs, expected_inputs):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_deterministic_run_to_run(device, dtype):
    n, num_experts, batch = 2**20 + 3, 8, 4
    theta_pre, delta, log_alpha, alpha = make_inputs(n, num_experts, batch, dtype, device)
    grad = torch.randn(batch, n, device=device).to(dtype)
    settings = merge_settings(1)
    first = backend().merge(theta_pre, delta, log_alpha, alpha, **settings)
    first_grads = backend().merge_backward(grad, theta_pre, delta, log_alpha, alpha, **settings, needs=(True,) * 4)
    side = torch.cuda.Stream(device)
    with torch.cuda.stream(side):  # another stream: same bits
        second = backend().merge(theta_pre, delta, log_alpha, alpha, **settings)
        second_grads = backend().merge_backward(grad, theta_pre, delta, log_alpha, alpha, **settings,
                                                needs=(True,) * 4)
    side.synchronize()
    assert torch.equal(first, second)
    for a, b in zip(first_grads, second_grads):
        assert torch.equal(a, b)


def test_merge_misaligned_views(device):
    """Buffers that start one element off a 16-byte boundary take the scalar path."""
    n, num_experts, batch = 1025, 4, 2
    theta_pre, delta, log_alpha, alpha = make_inputs(n + 1, num_experts, batch, torch.float32, device)
    theta_pre, delta, log_alpha = theta_pre[1:], delta[1:], log_alpha[1:]
    merged = backend().merge(theta_pre, delta, log_alpha, alpha, **merge_settings(1))
    exact = reference.merge(theta_pre, delta, log_alpha, alpha, "sample", SEED, OFFSET)
    assert_close_scaled(merged, exact, merge_scale(theta_pre, delta, alpha), "merge")


# --------------------------------------------------------------------------
# densities
# --------------------------------------------------------------------------


@pytest.mark.parametrize("num_experts", EXPERTS)
@pytest.mark.parametrize("n", SIZES)
def test_expected_density_and_backward(device, n, num_experts):
    _, _, log_alpha, _ = make_inputs(n, num_experts, 1, torch.float32, device)
    settings = dict(beta=reference.BETA, gamma=reference.GAMMA, zeta=reference.ZETA)
    got = backend().expected_density(log_alpha, **settings)
    torch.testing.assert_close(got, reference.expected_density(log_alpha.double()).float(), rtol=1e-5, atol=1e-7)
    grad = torch.randn(num_experts, device=device)
    got_grad = backend().expected_density_backward(grad, log_alpha, **settings)
    torch.testing.assert_close(got_grad, reference.expected_density_backward(grad, log_alpha), rtol=1e-5, atol=1e-12)
    assert torch.equal(got, backend().expected_density(log_alpha, **settings))


@pytest.mark.parametrize("num_experts", EXPERTS)
@pytest.mark.parametrize("n", SIZES)
def test_hard_density(device, n, num_experts):
    _, _, log_alpha, _ = make_inputs(n, num_experts, 1, torch.float32, device, binary=True)
    got = backend().hard_density(log_alpha, reference.GAMMA, reference.ZETA)
    # Same counts (no log_α near a threshold); the division by N may round differently.
    torch.testing.assert_close(got, reference.hard_density(log_alpha), rtol=0, atol=1e-7)
    assert torch.equal(got, backend().hard_density(log_alpha, reference.GAMMA, reference.ZETA))


# --------------------------------------------------------------------------
# pack and the packed merge
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_experts", EXPERTS)
@pytest.mark.parametrize("n", SIZES)
def test_pack_matches_reference(device, n, num_experts, dtype):
    _, delta, log_alpha, _ = make_inputs(n, num_experts, 1, dtype, device, binary=True)
    got = backend().pack(delta, log_alpha, reference.GAMMA, reference.ZETA)
    expected = reference.pack(delta, log_alpha)
    assert got.rounded == expected.rounded
    for name in ("support_bitmap", "word_offsets", "expert_bits", "delta"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("num_experts", EXPERTS)
@pytest.mark.parametrize("n", SIZES)
def test_packed_merge_equals_dense_deterministic_exactly(device, n, num_experts, batch, dtype):
    theta_pre, delta, log_alpha, alpha = make_inputs(n, num_experts, batch, dtype, device, binary=True)
    binary = torch.where(log_alpha > 0, log_alpha.abs().clamp_min(3.0), -log_alpha.abs().clamp_min(3.0))
    packed = backend().pack(delta, binary, reference.GAMMA, reference.ZETA)
    assert packed.rounded == 0
    got = backend().packed_merge(theta_pre, packed, alpha)
    dense = backend().merge(theta_pre, delta, binary, alpha, **merge_settings(0))
    assert torch.equal(got, dense)
    assert torch.equal(got, reference.packed_merge(theta_pre, packed, alpha))


def test_packed_merge_many_tasks_without_table(device):
    """B·2^M beyond shared memory: the kernel sums bits instead of a table."""
    theta_pre, delta, log_alpha, alpha = make_inputs(1025, 8, 64, torch.float32, device, binary=True)
    binary = torch.where(log_alpha > 0, log_alpha.abs().clamp_min(3.0), -log_alpha.abs().clamp_min(3.0))
    packed = backend().pack(delta, binary, reference.GAMMA, reference.ZETA)
    assert torch.equal(backend().packed_merge(theta_pre, packed, alpha),
                       backend().merge(theta_pre, delta, binary, alpha, **merge_settings(0)))

