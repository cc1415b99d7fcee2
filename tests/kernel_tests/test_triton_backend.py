"""The Triton backend against smat_kernels.reference: values, every gradient,
bit-identical uniforms, pack and the packed merge.

Where: on a GPU when there is one; otherwise in Triton's interpreter on CPU
tensors. Triton decides between compiling and interpreting when a kernel is
*defined* (TRITON_INTERPRET must be set before smat_kernels.triton is
imported; setting it later has no effect on kernels already defined), so
without a GPU this file re-runs itself in a child pytest process with
TRITON_INTERPRET=1 (``test_suite_in_triton_interpreter``) and leaves this
process's environment, and the other test files, untouched. For per-test
results run it directly: ``TRITON_INTERPRET=1 pytest tests/kernel_tests/test_triton_backend.py``.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import smat_kernels
from smat_kernels import reference

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
REPOSITORY = pathlib.Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

# Tolerances, in one place. fp32: |error| ≤ RTOL·scale + ATOL, where scale is
# the sum of the absolute values of the terms. bf16/fp16: the kernel's error
# against the fp32 reference may be at most LOW_PRECISION_FACTOR times the
# error of the reference run in the same low precision, plus a floor.
RTOL = 1e-5
ATOL = 1e-6
LOW_PRECISION_FACTOR = 2.0
LOW_PRECISION_FLOOR = 1e-5
MODES = tuple(range(len(reference.MODES)))  # 0 deterministic, 1 sample, 2 near_noiseless
SEED = 0x1234_5678_9ABC  # above 2^32: both key words matter
OFFSET = 3 * 2**32 + 5  # both counter words matter


@pytest.fixture
def device():
    if INTERPRETED:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    pytest.skip("runs on a GPU or in Triton's interpreter; see test_suite_in_triton_interpreter")


def test_suite_in_triton_interpreter():
    """Without a GPU: run this file in a child process under TRITON_INTERPRET=1."""
    if INTERPRETED or torch.cuda.is_available():
        pytest.skip("this process already runs the Triton tests")
    environment = dict(os.environ, TRITON_INTERPRET="1")
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, (str(REPOSITORY), environment.get("PYTHONPATH"))))
    result = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"],
                            cwd=REPOSITORY, env=environment, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def backend():
    return smat_kernels.dispatch.get_backend("triton")


def make_inputs(n, num_experts, batch, dtype, device, seed=0, binary=False):
    generator = torch.Generator().manual_seed(seed)
    theta_pre = torch.randn(n, generator=generator)
    delta = torch.randn(n, generator=generator)
    log_alpha = torch.randn(n, num_experts, generator=generator) * 3
    if binary:
        log_alpha = torch.where(log_alpha >= 0, log_alpha + 5, log_alpha - 5)
    alpha = torch.randn(batch, num_experts, generator=generator)
    return (theta_pre.to(dtype).to(device), delta.to(dtype).to(device), log_alpha.to(device), alpha.to(device))


def hard_concrete(mode):
    return dict(mode=mode, seed=SEED, offset=OFFSET, beta=reference.BETA, gamma=reference.GAMMA,
                zeta=reference.ZETA)


def assert_close(actual, exact, scale, low_precision=None, name=""):
    """``exact`` and ``scale`` in fp32; ``low_precision``: the reference's
    result in the kernel's low precision (None for fp32)."""
    error = (actual.float() - exact).abs()
    if low_precision is None:
        excess = error - (RTOL * scale + ATOL)
        assert excess.max() <= 0, f"{name}: max error {error.max():.3g} beyond fp32 tolerance"
        return
    normalised = (error / (scale + ATOL)).max()
    reference_error = ((low_precision.float() - exact).abs() / (scale + ATOL)).max()
    assert normalised <= LOW_PRECISION_FACTOR * reference_error + LOW_PRECISION_FLOOR, (
        f"{name}: error {normalised:.3g} vs the reference's own {reference_error:.3g}")


def reference_merge(theta_pre, delta, log_alpha, alpha, settings):
    return reference.merge(theta_pre, delta, log_alpha, alpha, reference.MODES[settings["mode"]],
                           *(settings[k] for k in ("seed", "offset", "beta", "gamma", "zeta")))


def reference_backward(grad, theta_pre, delta, log_alpha, alpha, settings):
    return reference.merge_backward(grad, theta_pre, delta, log_alpha, alpha, reference.MODES[settings["mode"]],
                                    *(settings[k] for k in ("seed", "offset", "beta", "gamma", "zeta")))


# --------------------------------------------------------------------------
# merge: values and gradients
# --------------------------------------------------------------------------

# (N, M, B, dtype, modes): every M, B, dtype and mode, odd N, trimmed for the interpreter.
MERGE_CASES = [
    (1, 1, 1, torch.float32, MODES),
    (97, 3, 4, torch.float32, MODES),
    (1025, 8, 1, torch.float32, MODES),
    (97, 32, 4, torch.float32, (1,)),
    (1025, 32, 1, torch.float32, (0, 2)),
    (97, 8, 4, torch.bfloat16, MODES),
    (1025, 3, 1, torch.float16, MODES),
    (97, 32, 1, torch.float16, (1,)),
]


@pytest.mark.parametrize("n, num_experts, batch, dtype, mode",
                         [(n, m, b, d, mode) for n, m, b, d, modes in MERGE_CASES for mode in modes])
def test_merge_and_gradients_match_reference(device, n, num_experts, batch, dtype, mode):
    theta_pre, delta, log_alpha, alpha = make_inputs(n, num_experts, batch, dtype, device, seed=n + num_experts)
    settings = hard_concrete(mode)
    grad = torch.randn(batch, n, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
    exact_inputs = (theta_pre.float(), delta.float(), log_alpha, alpha)
    absolute_inputs = (theta_pre.float().abs(), delta.float().abs(), log_alpha, alpha.abs())
    low = dtype != torch.float32

    merged = backend().merge(theta_pre, delta, log_alpha, alpha, **settings)
    assert merged.dtype == dtype and merged.shape == (batch, n)
    assert_close(merged, reference_merge(*exact_inputs, settings), reference_merge(*absolute_inputs, settings),
                 reference_merge(theta_pre, delta, log_alpha, alpha, settings) if low else None, "merge")

    grads = backend().merge_backward(grad, theta_pre, delta, log_alpha, alpha, **settings, needs=(True,) * 4)
    exact = reference_backward(grad.float(), *exact_inputs, settings)
    scales = reference_backward(grad.float().abs(), *absolute_inputs, settings)
    lows = reference_backward(grad, theta_pre, delta, log_alpha, alpha, settings) if low else (None,) * 4
    for name, value, expected, scale, low_value in zip(("theta_pre", "delta", "log_alpha", "alpha"), grads, exact,
                                                       scales, lows):
        # ∂log_α and ∂α are fp32 outputs: held to the fp32 rule on top of the low-precision inputs.
        fp32_output = name in ("log_alpha", "alpha")
        assert value.dtype == (torch.float32 if fp32_output else dtype), name
        assert_close(value, expected, scale, None if fp32_output else low_value, f"grad {name}")


def test_merge_backward_computes_only_what_is_needed(device):
    theta_pre, delta, log_alpha, alpha = make_inputs(97, 3, 4, torch.float32, device)
    settings = hard_concrete(1)
    grad = torch.randn(4, 97).to(device)
    everything = backend().merge_backward(grad, theta_pre, delta, log_alpha, alpha, **settings, needs=(True,) * 4)
    for needed in range(4):
        needs = tuple(i == needed for i in range(4))
        grads = backend().merge_backward(grad, theta_pre, delta, log_alpha, alpha, **settings, needs=needs)
        for i, (value, full) in enumerate(zip(grads, everything)):
            if needs[i]:
                assert torch.equal(value, full)
            else:
                assert value is None


def test_public_merge_with_gradients(device):
    inputs = make_inputs(97, 3, 4, torch.float32, device, seed=5)
    results = {}
    for name in ("triton", "reference"):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        merged = smat_kernels.merge(*leaves, mode="sample", seed=11, offset=2, backend=name)
        (merged * torch.linspace(-1, 1, 97, device=device)).sum().backward()
        results[name] = (merged.detach(), *(leaf.grad for leaf in leaves))
    for value, expected in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(value, expected, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------
# randomness
# --------------------------------------------------------------------------


@pytest.mark.parametrize("num_experts", [1, 6])
def test_uniforms_identical_to_reference(device, num_experts):
    """With β = 1, γ = 0, ζ = 1 and log_α = 0, z = 1/(1 + (1 − u)/u) = u; α = the
    identity over B = M tasks makes θ[b, j] = u[b, j, b], which reaches every
    task, expert group and word of the counter map."""
    n = 97
    theta_pre = torch.zeros(n, device=device)
    delta = torch.ones(n, device=device)
    log_alpha = torch.zeros(n, num_experts, device=device)
    alpha = torch.eye(num_experts, device=device)
    settings = dict(mode=1, seed=SEED, offset=OFFSET, beta=1.0, gamma=0.0, zeta=1.0)
    merged = backend().merge(theta_pre, delta, log_alpha, alpha, **settings)
    u = reference.uniforms(SEED, OFFSET, num_experts, n, num_experts, device)
    expected = torch.stack([u[b, :, b] for b in range(num_experts)])
    # Two roundings (the ratio and the reciprocal) separate u from z: a wrong
    # Philox word or counter would be off by far more.
    torch.testing.assert_close(merged, expected, rtol=3e-7, atol=1e-9)
    other_seed = backend().merge(theta_pre, delta, log_alpha, alpha, **dict(settings, seed=SEED + 1))
    other_offset = backend().merge(theta_pre, delta, log_alpha, alpha, **dict(settings, offset=OFFSET + 1))
    assert (other_seed != merged).float().mean() > 0.99
    assert (other_offset != merged).float().mean() > 0.99


def test_sampling_is_deterministic_per_key(device):
    inputs = make_inputs(97, 3, 4, torch.float32, device)
    first = backend().merge(*inputs, **hard_concrete(1))
    assert torch.equal(first, backend().merge(*inputs, **hard_concrete(1)))


# --------------------------------------------------------------------------
# densities
# --------------------------------------------------------------------------


@pytest.mark.parametrize("n, num_experts", [(1, 1), (97, 3), (1025, 32)])
def test_densities_match_reference(device, n, num_experts):
    _, _, log_alpha, _ = make_inputs(n, num_experts, 1, torch.float32, device)
    density = backend().expected_density(log_alpha, reference.BETA, reference.GAMMA, reference.ZETA)
    torch.testing.assert_close(density, reference.expected_density(log_alpha), rtol=RTOL, atol=ATOL)
    grad = torch.randn(num_experts).to(device)
    torch.testing.assert_close(
        backend().expected_density_backward(grad, log_alpha, reference.BETA, reference.GAMMA, reference.ZETA),
        reference.expected_density_backward(grad, log_alpha), rtol=RTOL, atol=ATOL)
    hard = backend().hard_density(log_alpha, reference.GAMMA, reference.ZETA)
    assert torch.equal(hard, reference.hard_density(log_alpha))


def test_public_expected_density_gradient(device):
    _, _, log_alpha, _ = make_inputs(97, 3, 1, torch.float32, device)
    leaf = log_alpha.clone().requires_grad_(True)
    (smat_kernels.expected_density(leaf, backend="triton") * torch.arange(1.0, 4.0, device=device)).sum().backward()
    expected = reference.expected_density_backward(torch.arange(1.0, 4.0, device=device), log_alpha)
    torch.testing.assert_close(leaf.grad, expected, rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------
# pack and packed merge
# --------------------------------------------------------------------------

PACK_FIELDS = ("support_bitmap", "word_offsets", "expert_bits", "delta")


@pytest.mark.parametrize("n, num_experts, dtype", [(1, 1, torch.float32), (97, 3, torch.bfloat16),
                                                    (1025, 8, torch.float32), (97, 12, torch.float16),
                                                    (1025, 32, torch.float32)])
@pytest.mark.parametrize("binary", [True, False])
def test_pack_matches_reference(device, n, num_experts, dtype, binary):
    _, delta, log_alpha, _ = make_inputs(n, num_experts, 1, dtype, device, binary=binary)
    log_alpha[::7] = -8.0  # elements outside the support
    packed = backend().pack(delta, log_alpha, reference.GAMMA, reference.ZETA)
    expected = reference.pack(delta, log_alpha)
    for field in PACK_FIELDS:
        value, want = getattr(packed, field), getattr(expected, field)
        assert value.dtype == want.dtype and torch.equal(value, want), field
    assert packed.rounded == expected.rounded
    assert packed.rounded == 0 if binary else packed.rounded > 0 or n == 1


@pytest.mark.parametrize("n, num_experts, batch, dtype", [(1, 1, 1, torch.float32), (97, 3, 4, torch.float32),
                                                           (1025, 8, 4, torch.bfloat16), (97, 12, 1, torch.float16),
                                                           (97, 32, 4, torch.float32)])
def test_packed_merge_equals_deterministic_merge_for_binary_masks(device, n, num_experts, batch, dtype):
    theta_pre, delta, log_alpha, alpha = make_inputs(n, num_experts, batch, dtype, device, binary=True)
    log_alpha[::5] = -8.0
    packed = backend().pack(delta, log_alpha, reference.GAMMA, reference.ZETA)
    assert packed.rounded == 0
    merged = backend().packed_merge(theta_pre, packed, alpha)
    assert torch.equal(merged, backend().merge(theta_pre, delta, log_alpha, alpha, **hard_concrete(0)))
    assert torch.equal(merged, reference.packed_merge(theta_pre, reference.pack(delta, log_alpha), alpha))


def test_public_pack_and_packed_merge(device):
    theta_pre, delta, log_alpha, alpha = make_inputs(97, 3, 4, torch.float32, device, binary=True)
    packed = smat_kernels.pack(delta, log_alpha, backend="triton")
    merged = smat_kernels.packed_merge(theta_pre, packed, alpha, backend="triton")
    assert torch.equal(merged, smat_kernels.merge(theta_pre, delta, log_alpha, alpha, mode="deterministic",
                                                  backend="triton"))


# --------------------------------------------------------------------------
# what the backend declares
# --------------------------------------------------------------------------


def test_backend_declares_devices(device):
    assert backend().unavailable_reason() is None
    assert backend().unsupported_reason(device) is None
    assert "meta" in backend().unsupported_reason(torch.device("meta"))
