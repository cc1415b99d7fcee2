"""Merge forward, and forward plus backward, in sample mode: the compiled CPU
backend against the eager reference and torch.compile(reference).

    python -m pytest benchmarks/test_bench_merge.py --benchmark-only
"""

from __future__ import annotations

import functools
import time

import pytest
import torch
from bench_util import bytes_merge_backward, bytes_merge_forward, run_case

import smat_kernels
from smat_kernels import reference

SIZES = [1_000_000, 22_000_000]  # 22M: ViT-S
BATCHES = [1, 4]
NUM_EXPERTS = 8
IMPLS = ["cpu", "reference", "compiled"]
SEED, OFFSET = 1234, 0


def make_inputs(n: int, batch: int, dtype=torch.float32, requires_grad=False):
    generator = torch.Generator().manual_seed(0)
    theta_pre = torch.randn(n, generator=generator).to(dtype)
    delta = (0.01 * torch.randn(n, generator=generator)).to(dtype).requires_grad_(requires_grad)
    log_alpha = torch.randn(n, NUM_EXPERTS, generator=generator).requires_grad_(requires_grad)
    alpha = torch.softmax(torch.randn(batch, NUM_EXPERTS, generator=generator), dim=1).requires_grad_(requires_grad)
    return theta_pre, delta, log_alpha, alpha


# One static compilation per shape and grad mode (8 in all): the compiled
# reference at its best, never a dynamic-shape kernel.
torch._dynamo.config.recompile_limit = 64


@functools.cache
def compiled_reference_merge():
    return torch.compile(reference.merge, dynamic=False)


def merge_fn(impl: str):
    if impl == "cpu":
        return lambda *x: smat_kernels.merge(*x, mode="sample", seed=SEED, offset=OFFSET, backend="cpu")
    if impl == "reference":
        return lambda *x: reference.merge(*x, "sample", SEED, OFFSET)
    return lambda *x: compiled_reference_merge()(*x, "sample", SEED, OFFSET)


def rounds_for(impl: str, n: int) -> int:
    return 5 if impl == "cpu" or n < 10_000_000 else 1


def run_merge_case(benchmark, results, copy_bandwidth, impl: str, fn, **case) -> None:
    """bench_util.run_case, with the first call kept out of the timings where
    it differs from the rest: torch.compile compiles there (its seconds are
    recorded as ``first_call_seconds``), the CPU backend warms up."""
    first_call_seconds, warmup_rounds = None, 0 if impl == "reference" else 1
    if impl == "compiled":
        start = time.perf_counter()
        fn()
        first_call_seconds, warmup_rounds = time.perf_counter() - start, 0
    row = run_case(benchmark, results, copy_bandwidth, impl=impl, fn=fn, warmup_rounds=warmup_rounds, **case)
    if first_call_seconds is not None:
        row["first_call_seconds"] = first_call_seconds


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("n", SIZES)
def test_merge_forward(benchmark, results, copy_bandwidth, impl, batch, n):
    inputs = make_inputs(n, batch)
    merge = merge_fn(impl)
    run_merge_case(benchmark, results, copy_bandwidth, impl, lambda: merge(*inputs), op="merge forward",
                   nbytes=bytes_merge_forward(n, batch, NUM_EXPERTS, torch.float32),
                   output_bytes=batch * n * 4, n=n, batch=batch, num_experts=NUM_EXPERTS, dtype=torch.float32,
                   rounds=rounds_for(impl, n))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("n", SIZES)
def test_merge_forward_backward(benchmark, results, copy_bandwidth, impl, batch, n):
    theta_pre, delta, log_alpha, alpha = make_inputs(n, batch, requires_grad=True)
    grad = torch.randn(batch, n, generator=torch.Generator().manual_seed(1))
    merge = merge_fn(impl)

    def step():
        for leaf in (delta, log_alpha, alpha):
            leaf.grad = None
        merge(theta_pre, delta, log_alpha, alpha).backward(grad)

    # Outputs: θ [B, N] and the gradients of θ_δ, log_α and α.
    output_bytes = batch * n * 4 + n * 4 + n * NUM_EXPERTS * 4 + batch * NUM_EXPERTS * 4
    run_merge_case(benchmark, results, copy_bandwidth, impl, step, op="merge forward+backward",
                   nbytes=bytes_merge_forward(n, batch, NUM_EXPERTS, torch.float32)
                   + bytes_merge_backward(n, batch, NUM_EXPERTS, torch.float32),
                   output_bytes=output_bytes, n=n, batch=batch, num_experts=NUM_EXPERTS, dtype=torch.float32,
                   rounds=rounds_for(impl, n))
