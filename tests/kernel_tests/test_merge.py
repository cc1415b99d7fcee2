"""merge: the CPU backend against smat_kernels.reference, values and every
gradient, over shapes, dtypes and mask modes; the reference's written-out
backward against torch.autograd; gradcheck of the reference masks in float64.

N = 2^20 + 3 is compared on windows of rows (the start, the middle, the tail
tile) with the gradient zero outside them: the reference of a window of rows
is the reference of a smaller problem whose Philox offset is shifted by the
documented counter map (checked against the full reference in
``test_window_oracle_matches_full_reference``), which keeps the reference's
cost at a few thousand rows while the kernel runs on all 2^20 + 3 elements.
One configuration is also compared densely over all rows.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

import smat_kernels
from smat_kernels import reference
from smat_kernels.tolerances import merge_scales

from .tolerances import assert_close

SMALL_N = (1, 97, 1025)
LARGE_N = 2**20 + 3
NUM_EXPERTS = (1, 3, 8, 32)
BATCHES = (1, 4)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MODES = reference.MODES
SEED = 2**40 + 12345  # above 2^32: both Philox key words matter
OFFSET = 2**32 - 3000  # the counters of one call cross 2^32
# Rows of the large problem compared with the reference: the first tiles, an
# unaligned middle run, and the last rows (the partial tail tile).
WINDOWS = ((0, 2053), (LARGE_N // 2 - 1021, LARGE_N // 2 + 1030), (LARGE_N - 2051, LARGE_N))
# Gradients of log_α jump at the clamp's kinks; entries whose stretched value
# lies within this distance of 0 or 1 may fall on either side in two backends.
KINK_MARGIN = 1e-4


def inverse_temperature(mode: str) -> float:
    return 1.0 if mode == "deterministic" else 1.0 / reference.BETA


def make_inputs(n: int, num_experts: int, batch: int, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """θ_pre, θ_δ and the output gradient are drawn in fp32 and rounded to
    ``dtype``; the fp32 reference then sees exactly the kernel's input values.
    log_α spans both clamps and the open interval between them."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "theta_pre": torch.randn(n, generator=generator).to(dtype),
        "delta": torch.randn(n, generator=generator).to(dtype),
        "log_alpha": 2.0 * torch.randn(n, num_experts, generator=generator),
        "alpha": torch.randn(batch, num_experts, generator=generator),
        "grad": torch.randn(batch, n, generator=generator).to(dtype),
    }


def stretched(log_alpha: torch.Tensor, batch: int, mode: str, seed: int, offset: int) -> torch.Tensor:
    """The reference's unclamped s·(ζ − γ) + γ: with γ = 0, ζ = 1 the masks are s itself."""
    s = reference.masks(log_alpha, batch, mode, seed, offset, reference.BETA, 0.0, 1.0)
    return s * (reference.ZETA - reference.GAMMA) + reference.GAMMA


def off_kinks(log_alpha: torch.Tensor, batch: int, mode: str, seed: int, offset: int) -> torch.Tensor:
    """[N, M] True where no task's mask entry is within KINK_MARGIN of a clamp kink."""
    value = stretched(log_alpha, batch, mode, seed, offset)
    near = (value.abs() < KINK_MARGIN) | ((value - 1).abs() < KINK_MARGIN)
    near = near if near.dim() == 2 else near.any(dim=0)
    assert near.sum() <= max(2, near.numel() // 100), "too many entries excluded: the comparison would be empty"
    return ~near


def run_cpu(inputs: dict[str, torch.Tensor], mode: str) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The CPU backend through the public op and autograd."""
    leaves = [inputs[name].clone().requires_grad_() for name in ("theta_pre", "delta", "log_alpha", "alpha")]
    out = smat_kernels.merge(*leaves, mode=mode, seed=SEED, offset=OFFSET, backend="cpu")
    grads = torch.autograd.grad(out, leaves, inputs["grad"])
    return out.detach(), grads


def run_reference(inputs: dict[str, torch.Tensor], mode: str, dtype: torch.dtype | None = None,
                  offset: int = OFFSET) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """reference.merge and reference.merge_backward, with θ, θ_δ and the
    output gradient in ``dtype`` (float32 when None)."""
    cast = (lambda t: t.float()) if dtype is None else (lambda t: t.to(dtype))
    theta_pre, delta, grad = cast(inputs["theta_pre"]), cast(inputs["delta"]), cast(inputs["grad"])
    settings = (mode, SEED, offset)
    out = reference.merge(theta_pre, delta, inputs["log_alpha"], inputs["alpha"], *settings)
    grads = reference.merge_backward(grad, theta_pre, delta, inputs["log_alpha"], inputs["alpha"], *settings)
    return out, grads


GRADIENT_NAMES = ("theta_pre", "delta", "log_alpha", "alpha")


def compare(inputs: dict[str, torch.Tensor], mode: str, actual, expected, low_precision, kink_free) -> None:
    scale = merge_scales(inputs, mode)
    (out, grads), (expected_out, expected_grads) = actual, expected
    low_out, low_grads = low_precision if low_precision is not None else (None, (None,) * 4)
    assert out.dtype == inputs["theta_pre"].dtype
    assert_close("out", out, expected_out, scale["out"], low_precision=low_out)
    for name, grad, expected_grad, low_grad in zip(GRADIENT_NAMES, grads, expected_grads, low_grads):
        assert grad.dtype == inputs[name].dtype, f"∂{name} has dtype {grad.dtype}"
        where = kink_free if name == "log_alpha" else None
        low = low_grad if grad.dtype != torch.float32 else None
        assert_close(f"∂{name}", grad, expected_grad, scale[name], low_precision=low, where=where)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("num_experts", NUM_EXPERTS)
@pytest.mark.parametrize("n", SMALL_N)
def test_cpu_matches_reference(n, num_experts, batch, dtype, mode):
    inputs = make_inputs(n, num_experts, batch, dtype, seed=n * 131 + num_experts * 7 + batch)
    low_precision = run_reference(inputs, mode, dtype) if dtype != torch.float32 else None
    kink_free = off_kinks(inputs["log_alpha"], batch, mode, SEED, OFFSET)
    compare(inputs, mode, run_cpu(inputs, mode), run_reference(inputs, mode), low_precision, kink_free)


# --------------------------------------------------------------------------
# N = 2^20 + 3
# --------------------------------------------------------------------------


@functools.cache
def large_log_alpha(num_experts: int) -> torch.Tensor:
    return 2.0 * torch.randn(LARGE_N, num_experts, generator=torch.Generator().manual_seed(num_experts))


@functools.cache
def large_theta(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(LARGE_N, generator=generator).to(dtype), torch.randn(LARGE_N, generator=generator).to(dtype)


def large_inputs(num_experts: int, batch: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Inputs over all 2^20 + 3 rows; the output gradient is zero outside WINDOWS."""
    generator = torch.Generator().manual_seed(100 * num_experts + batch)
    grad = torch.zeros(batch, LARGE_N)
    for start, stop in WINDOWS:
        grad[:, start:stop] = torch.randn(batch, stop - start, generator=generator)
    theta_pre, delta = large_theta(dtype)
    return {"theta_pre": theta_pre, "delta": delta, "log_alpha": large_log_alpha(num_experts),
            "alpha": torch.randn(batch, num_experts, generator=generator), "grad": grad.to(dtype)}


def window_offset(task: int, start: int, n: int, num_experts: int) -> int:
    """The Philox offset at which row `start` of task `task` draws its noise
    (reference.philox_counter): offset + (task·N + start)·ceil(M/4)."""
    return OFFSET + (task * n + start) * math.ceil(num_experts / reference.WORDS_PER_PHILOX_CALL)


def window_reference(inputs: dict[str, torch.Tensor], mode: str, start: int, stop: int, dtype=None):
    """Reference output [B, rows] and gradients of rows [start, stop), one task at a time."""
    n = inputs["theta_pre"].shape[0]
    batch, num_experts = inputs["alpha"].shape
    outs, grads = [], []
    for task in range(batch):
        rows = {name: inputs[name][start:stop] for name in ("theta_pre", "delta", "log_alpha")}
        rows["alpha"] = inputs["alpha"][task:task + 1]
        rows["grad"] = inputs["grad"][task:task + 1, start:stop]
        out, task_grads = run_reference(rows, mode, dtype, window_offset(task, start, n, num_experts))
        outs.append(out)
        grads.append(task_grads)
    return torch.cat(outs), grads


def test_window_oracle_matches_full_reference():
    inputs = make_inputs(1025, 8, 4, torch.float32, seed=5)
    full_out, full_grads = run_reference(inputs, "sample")
    window_out, task_grads = window_reference(inputs, "sample", 100, 611)
    assert torch.equal(window_out, full_out[:, 100:611])
    masked = dict(inputs, grad=torch.zeros_like(inputs["grad"]))
    masked["grad"][:, 100:611] = inputs["grad"][:, 100:611]
    _, masked_grads = run_reference(masked, "sample")
    torch.testing.assert_close(sum(g[2] for g in task_grads), masked_grads[2][100:611], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.cat([g[3] for g in task_grads]), masked_grads[3], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("num_experts", (8, 32))
def test_cpu_matches_reference_large(num_experts, batch, dtype, mode):
    inputs = large_inputs(num_experts, batch, dtype)
    out, grads = run_cpu(inputs, mode)
    outside = torch.ones(LARGE_N, dtype=torch.bool)
    expected_alpha = torch.zeros_like(inputs["alpha"])
    windows = []
    for start, stop in WINDOWS:
        outside[start:stop] = False
        window_out, task_grads = window_reference(inputs, mode, start, stop)
        expected_alpha += torch.cat([g[3] for g in task_grads])
        windows.append((start, stop, window_out, task_grads))
    # Rows outside the windows got a zero output gradient: their gradients are exactly zero.
    for name, grad in zip(GRADIENT_NAMES[:3], grads[:3]):
        assert not grad[outside].any(), f"∂{name} is non-zero where the output gradient is zero"
    scale = merge_scales(inputs, mode)
    assert_close("∂alpha", grads[3], expected_alpha, scale["alpha"])
    for start, stop, window_out, task_grads in windows:
        rows = dict(inputs, **{name: inputs[name][start:stop] for name in ("theta_pre", "delta", "log_alpha")})
        rows["grad"] = inputs["grad"][:, start:stop]
        row_scale = merge_scales(rows, mode)
        expected = [sum(g[k] for g in task_grads) for k in range(3)]
        kink_free = off_kinks_window(inputs, mode, start, stop)
        low_out = window_reference(inputs, mode, start, stop, dtype)[0] if dtype != torch.float32 else None
        label = f"rows [{start}, {stop})"
        assert_close(f"out {label}", out[:, start:stop], window_out, row_scale["out"], low_precision=low_out)
        for k, name in enumerate(GRADIENT_NAMES[:3]):
            actual = grads[k][start:stop]
            # The reference in low precision rounds its fp32 gradient once (reference.merge_backward).
            low = expected[k].to(dtype) if actual.dtype != torch.float32 else None
            where = kink_free if name == "log_alpha" else None
            assert_close(f"∂{name} {label}", actual, expected[k], row_scale[name], low_precision=low, where=where)


def off_kinks_window(inputs: dict[str, torch.Tensor], mode: str, start: int, stop: int) -> torch.Tensor:
    n = inputs["theta_pre"].shape[0]
    batch, num_experts = inputs["alpha"].shape
    log_alpha = inputs["log_alpha"][start:stop]
    masks = [off_kinks(log_alpha, 1, mode, SEED, window_offset(task, start, n, num_experts)) for task in range(batch)]
    return torch.stack(masks).all(dim=0)


def test_cpu_matches_reference_large_dense():
    """All 2^20 + 3 rows against the full reference, with a dense output
    gradient: ∂α sums a million terms."""
    inputs = make_inputs(LARGE_N, 8, 1, torch.float32, seed=11)
    kink_free = off_kinks(inputs["log_alpha"], 1, "sample", SEED, OFFSET)
    compare(inputs, "sample", run_cpu(inputs, "sample"), run_reference(inputs, "sample"), None, kink_free)


# --------------------------------------------------------------------------
# The reference itself: written-out backward and float64 gradcheck
# --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("num_experts", NUM_EXPERTS)
def test_reference_backward_matches_autograd(num_experts, batch, dtype, mode):
    inputs = make_inputs(97, num_experts, batch, dtype, seed=num_experts + 10 * batch)
    leaves = [inputs[name].clone().requires_grad_() for name in GRADIENT_NAMES]
    out = reference.merge(*leaves, mode, SEED, OFFSET)
    autograd_grads = torch.autograd.grad(out, leaves, inputs["grad"])
    written_out = reference.merge_backward(inputs["grad"], *(inputs[name] for name in GRADIENT_NAMES),
                                           mode, SEED, OFFSET)
    kink_free = off_kinks(inputs["log_alpha"], batch, mode, SEED, OFFSET)
    scale = merge_scales(inputs, mode)
    for name, actual, expected in zip(GRADIENT_NAMES, written_out, autograd_grads):
        assert actual.dtype == expected.dtype == inputs[name].dtype
        # Both are the same fp32 arithmetic in a different order: the fp32 floor, in any θ dtype.
        tolerance_dtype_free = actual.float(), expected.float()
        where = kink_free if name == "log_alpha" else None
        assert_close(f"∂{name}", *tolerance_dtype_free, scale[name], where=where)


def kink_free_log_alpha(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """float64 log_α whose deterministic masks stay 1e-3 away from the clamp's kinks."""
    s = 0.1 + 0.8 * torch.rand(shape, generator=generator, dtype=torch.float64)  # stretched in (0.02, 0.98)
    return torch.logit(s)


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_reference_masks(mode):
    """The reference's masks in float64 with their noise fixed by the key,
    at points whose stretched values stay 1e-3 clear of the clamp's kinks
    (clamped entries far from a kink are kept: their gradient is zero)."""
    generator = torch.Generator().manual_seed(3)
    batch, n, num_experts = 2, 7, 5
    log_alpha = kink_free_log_alpha((n, num_experts), generator)
    for _ in range(20):
        value = stretched(log_alpha, batch, mode, SEED, OFFSET)
        near = ((value.abs() < 1e-3) | ((value - 1).abs() < 1e-3)).reshape(-1, n, num_experts).any(dim=0)
        if not near.any():
            break
        log_alpha = torch.where(near, log_alpha + 0.1, log_alpha)
    assert not near.any()
    log_alpha.requires_grad_()
    assert torch.autograd.gradcheck(lambda la: reference.masks(la, batch, mode, SEED, OFFSET), (log_alpha,))
    z, dz = reference.masks_and_derivatives(log_alpha.detach(), batch, mode, SEED, OFFSET)
    (autograd_dz,) = torch.autograd.grad(reference.masks(log_alpha, batch, mode, SEED, OFFSET).sum(), log_alpha)
    summed = dz if dz.dim() == 2 else dz.sum(dim=0)
    torch.testing.assert_close(summed, autograd_dz, rtol=1e-12, atol=1e-14)


def test_gradcheck_reference_sampled_and_deterministic_masks():
    generator = torch.Generator().manual_seed(4)
    log_alpha = kink_free_log_alpha((6, 3), generator).requires_grad_()
    assert torch.autograd.gradcheck(reference.deterministic_mask, (log_alpha,))
    # u near 1/2 keeps the sample's stretched value near the deterministic one's, away from the kinks.
    u = 0.45 + 0.1 * torch.rand(6, 3, generator=generator, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda la: reference.sampled_mask(la, u, 0.9), (log_alpha,))


def test_gradcheck_weight_sum():
    """θ = θ_pre + θ_δ ⊙ Σ_m α_m z_m in float64 with the reference's masks:
    the function whose fp32 version reference.merge computes."""
    generator = torch.Generator().manual_seed(6)
    n, num_experts, batch = 5, 3, 2
    u = 0.45 + 0.1 * torch.rand(batch, n, num_experts, generator=generator, dtype=torch.float64)

    def merged(theta_pre, delta, log_alpha, alpha):
        z = reference.sampled_mask(log_alpha, u)
        return theta_pre + delta * (alpha[:, None, :] * z).sum(dim=-1)

    tensors = (torch.randn(n, generator=generator, dtype=torch.float64),
               torch.randn(n, generator=generator, dtype=torch.float64),
               kink_free_log_alpha((n, num_experts), generator),
               torch.randn(batch, num_experts, generator=generator, dtype=torch.float64))
    assert torch.autograd.gradcheck(merged, tuple(t.requires_grad_() for t in tensors))


# --------------------------------------------------------------------------
# Autograd plumbing of the op
# --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ("cpu", "reference"))
@pytest.mark.parametrize("wanted", ((True, False, False, False), (False, False, True, False),
                                    (False, True, False, True), (True, True, True, True)))
def test_only_the_needed_gradients(backend, wanted):
    inputs = make_inputs(97, 3, 4, torch.float32, seed=8)
    leaves = [inputs[name].clone().requires_grad_(need) for name, need in zip(GRADIENT_NAMES, wanted)]
    out = smat_kernels.merge(*leaves, seed=SEED, offset=OFFSET, backend=backend)
    out.backward(inputs["grad"])
    _, expected = run_reference(inputs, "sample")
    for name, leaf, need, expected_grad in zip(GRADIENT_NAMES, leaves, wanted, expected):
        if need:
            torch.testing.assert_close(leaf.grad, expected_grad, rtol=1e-5, atol=1e-5, msg=f"∂{name}")
        else:
            assert leaf.grad is None


def test_merge_is_deterministic_for_a_key_and_changes_with_it():
    inputs = make_inputs(1025, 8, 4, torch.float32, seed=9)
    args = [inputs[name] for name in GRADIENT_NAMES]
    first = smat_kernels.merge(*args, seed=SEED, offset=OFFSET, backend="cpu")
    assert torch.equal(first, smat_kernels.merge(*args, seed=SEED, offset=OFFSET, backend="cpu"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CPU backend follows torch's thread count
    try:
        single_thread = smat_kernels.merge(*args, seed=SEED, offset=OFFSET, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first, single_thread)
    fresh = smat_kernels.merge(*args, seed=SEED, offset=OFFSET + smat_kernels.counters_per_call(4, 1025, 8),
                               backend="cpu")
    assert (fresh != first).float().mean() > 0.5
