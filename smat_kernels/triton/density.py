"""Triton kernels of the densities of the masks: the expected density
mean_j P(z[j, m] ≠ 0) (SMAT's L0 term) with its backward, and the hard density
(fraction of deterministic masks > 0).

log_α is read as [BLOCK, M] tiles (rows of M contiguous floats). The two
reductions over N write one partial row per program and the launch helper
sums the [P, M] partials with torch: deterministic, no atomics.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import autotune_configs, next_power_of_2, reduction_programs

BLOCKS = (64, 128, 256)
INTERPRETER_ROWS = 512


@triton.jit
def _log_alpha_tile(log_alpha_ptr, block, n, experts, expert_valid, NUM_EXPERTS: tl.constexpr,
                    BLOCK: tl.constexpr):
    """Rows block·BLOCK … of log_α as a [BLOCK, EXPERTS_PADDED] tile (0 where
    out of range) and the mask of its valid entries."""
    rows = tl.cast(block, tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    valid = (rows < n)[:, None] & expert_valid[None, :]
    log_alpha = tl.load(log_alpha_ptr + rows[:, None] * NUM_EXPERTS + experts[None, :], mask=valid, other=0.0)
    return log_alpha, valid


@triton.autotune(configs=autotune_configs(BLOCKS, interpreter_block=INTERPRETER_ROWS), key=["n", "NUM_EXPERTS"])
@triton.jit
def expected_density_kernel(partials_ptr, log_alpha_ptr, n, shift, NUM_EXPERTS: tl.constexpr,
                            EXPERTS_PADDED: tl.constexpr, BLOCK: tl.constexpr):
    """partials[p, m] = Σ_{j of program p} sigmoid(log_α[j, m] − shift),
    shift = β·log(−γ/ζ).

    Inputs: log_alpha fp32 [N, M]. Output: partials fp32 [P, M].
    Grid: (P,); each program strides over blocks of BLOCK rows."""
    program = tl.program_id(0)
    experts = tl.arange(0, EXPERTS_PADDED)
    expert_valid = experts < NUM_EXPERTS
    total = tl.zeros([EXPERTS_PADDED], dtype=tl.float32)
    for block in range(program, tl.cdiv(n, BLOCK), tl.num_programs(0)):
        log_alpha, valid = _log_alpha_tile(log_alpha_ptr, block, n, experts, expert_valid, NUM_EXPERTS, BLOCK)
        probability = 1.0 / (1.0 + tl.exp(shift - log_alpha))
        total += tl.sum(tl.where(valid, probability, 0.0), axis=0)
    tl.store(partials_ptr + program * NUM_EXPERTS + experts, total, mask=expert_valid)


@triton.autotune(configs=autotune_configs(BLOCKS, interpreter_block=INTERPRETER_ROWS), key=["n", "NUM_EXPERTS"])
@triton.jit
def expected_density_backward_kernel(out_ptr, grad_ptr, log_alpha_ptr, n, shift, NUM_EXPERTS: tl.constexpr,
                                     EXPERTS_PADDED: tl.constexpr, BLOCK: tl.constexpr):
    """out[j, m] = grad[m] / N · p(1 − p), p = sigmoid(log_α[j, m] − shift).

    Inputs: grad fp32 [M]; log_alpha fp32 [N, M]. Output: out fp32 [N, M].
    Grid: (ceil(N / BLOCK),)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    experts = tl.arange(0, EXPERTS_PADDED)
    expert_valid = experts < NUM_EXPERTS
    valid = (rows < n)[:, None] & expert_valid[None, :]
    offsets = rows[:, None] * NUM_EXPERTS + experts[None, :]
    log_alpha = tl.load(log_alpha_ptr + offsets, mask=valid, other=0.0)
    grad = tl.load(grad_ptr + experts, mask=expert_valid, other=0.0)
    probability = 1.0 / (1.0 + tl.exp(shift - log_alpha))
    tl.store(out_ptr + offsets, grad[None, :] / n * probability * (1.0 - probability), mask=valid)


@triton.autotune(configs=autotune_configs(BLOCKS, interpreter_block=INTERPRETER_ROWS), key=["n", "NUM_EXPERTS"])
@triton.jit
def hard_density_kernel(partials_ptr, log_alpha_ptr, n, gamma, stretch, NUM_EXPERTS: tl.constexpr,
                        EXPERTS_PADDED: tl.constexpr, BLOCK: tl.constexpr):
    """partials[p, m] = #{j of program p : clamp(sigmoid(log_α[j, m])·(ζ − γ) + γ, 0, 1) > 0}.

    Inputs: log_alpha fp32 [N, M]. Output: partials int64 [P, M] (exact counts).
    Grid: (P,); each program strides over blocks of BLOCK rows."""
    program = tl.program_id(0)
    experts = tl.arange(0, EXPERTS_PADDED)
    expert_valid = experts < NUM_EXPERTS
    count = tl.zeros([EXPERTS_PADDED], dtype=tl.int64)
    for block in range(program, tl.cdiv(n, BLOCK), tl.num_programs(0)):
        log_alpha, valid = _log_alpha_tile(log_alpha_ptr, block, n, experts, expert_valid, NUM_EXPERTS, BLOCK)
        stretched = stretch / (1.0 + tl.exp(-log_alpha)) + gamma
        count += tl.sum((valid & (stretched > 0.0)).to(tl.int64), axis=0)
    tl.store(partials_ptr + program * NUM_EXPERTS + experts, count, mask=expert_valid)


def _reduction_launch(kernel, partials_dtype, log_alpha: torch.Tensor, *scalars) -> torch.Tensor:
    """Launch a grid-stride reduction over the rows of log_α and sum its
    per-program partials: [M] in ``partials_dtype``."""
    n, num_experts = log_alpha.shape
    programs = reduction_programs(log_alpha.device, n, BLOCKS, INTERPRETER_ROWS)
    partials = torch.zeros(programs, num_experts, dtype=partials_dtype, device=log_alpha.device)
    kernel[(programs,)](partials, log_alpha, n, *scalars, NUM_EXPERTS=num_experts,
                        EXPERTS_PADDED=next_power_of_2(num_experts))
    return partials.sum(dim=0)


def _shift(beta: float, gamma: float, zeta: float) -> float:
    return beta * math.log(-gamma / zeta)


def expected_density(log_alpha: torch.Tensor, beta: float, gamma: float, zeta: float) -> torch.Tensor:
    """fp32 [M]: mean over the N rows of P(z ≠ 0)."""
    return _reduction_launch(expected_density_kernel, torch.float32, log_alpha,
                             _shift(beta, gamma, zeta)) / log_alpha.shape[0]


def expected_density_backward(grad: torch.Tensor, log_alpha: torch.Tensor, beta: float, gamma: float,
                              zeta: float) -> torch.Tensor:
    """fp32 [N, M]: the gradient of :func:`expected_density` to log_α."""
    n, num_experts = log_alpha.shape
    out = torch.empty_like(log_alpha)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK"]),)

    expected_density_backward_kernel[grid](out, grad.to(torch.float32).contiguous(), log_alpha, n,
                                           _shift(beta, gamma, zeta), NUM_EXPERTS=num_experts,
                                           EXPERTS_PADDED=next_power_of_2(num_experts))
    return out


def hard_density(log_alpha: torch.Tensor, gamma: float, zeta: float) -> torch.Tensor:
    """fp32 [M]: fraction of rows whose deterministic mask is > 0."""
    counts = _reduction_launch(hard_density_kernel, torch.int64, log_alpha, gamma, zeta - gamma)
    return counts.to(torch.float32) / log_alpha.shape[0]
