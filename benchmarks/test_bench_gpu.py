"""Merge forward, and forward plus backward, in sample mode on a GPU: the
CUDA and Triton backends against the eager reference and
torch.compile(reference), at ViT-S and ViT-B sizes, θ in fp32 and bf16.

    python -m pytest benchmarks/test_bench_gpu.py --benchmark-only

Each case records the median time, GB/s from an explicit byte count
(bench_util.bytes_merge_*), its ratio to the device-to-device copy bandwidth
measured in the same run, and torch.cuda.max_memory_allocated above the
inputs; the session writes benchmarks/results/gpu_<date>.json (and .md) with
the device name, date and versions (see conftest.py). Skipped without a GPU;
CUDA is touched only inside the tests.
"""

from __future__ import annotations

import functools

import pytest
import torch
from bench_util import bytes_merge_backward, bytes_merge_forward, run_case

import smat_kernels
from smat_kernels import reference
from smat_kernels.dispatch import rejection

SIZES = [22_000_000, 86_000_000]  # ViT-S, ViT-B
BATCHES = [1, 4]
NUM_EXPERTS = 8
DTYPES = [torch.float32, torch.bfloat16]
IMPLS = ["cuda", "triton", "reference", "compiled"]
SEED, OFFSET = 1234, 0
ROUNDS = {"cuda": 20, "triton": 20, "compiled": 5, "reference": 3}


def require(impl: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if impl in ("cuda", "triton"):
        reason = rejection(impl, torch.device("cuda"))
        if reason is not None:
            pytest.skip(f"backend {impl} cannot run: {reason}")


def make_inputs(n: int, batch: int, dtype: torch.dtype, requires_grad=False):
    generator = torch.Generator(device="cuda").manual_seed(0)
    theta_pre = torch.randn(n, generator=generator, device="cuda").to(dtype)
    delta = (0.01 * torch.randn(n, generator=generator, device="cuda")).to(dtype).requires_grad_(requires_grad)
    log_alpha = torch.randn(n, NUM_EXPERTS, generator=generator, device="cuda").requires_grad_(requires_grad)
    alpha = torch.softmax(torch.randn(batch, NUM_EXPERTS, generator=generator, device="cuda"), dim=1)
    return theta_pre, delta, log_alpha, alpha.requires_grad_(requires_grad)


@functools.cache
def compiled_reference_merge():
    return torch.compile(reference.merge)


def merge_fn(impl: str):
    if impl in ("cuda", "triton"):
        return lambda *x: smat_kernels.merge(*x, mode="sample", seed=SEED, offset=OFFSET, backend=impl)
    if impl == "reference":
        return lambda *x: reference.merge(*x, "sample", SEED, OFFSET)
    return lambda *x: compiled_reference_merge()(*x, "sample", SEED, OFFSET)


def synchronized(fn):
    def call():
        fn()
        torch.cuda.synchronize()

    return call


def run_or_skip_on_oom(case):
    """The eager reference materialises [B, N, M] tensors; at ViT-B sizes it
    may not fit, which is a result to report, not a failure."""
    try:
        case()
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        pytest.skip("out of GPU memory")


def theta_bytes(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("n", SIZES)
def test_gpu_merge_forward(benchmark, results, cuda_copy_bandwidth, impl, dtype, batch, n):
    require(impl)
    inputs = make_inputs(n, batch, dtype)
    merge = merge_fn(impl)
    run_or_skip_on_oom(lambda: run_case(
        benchmark, results, cuda_copy_bandwidth, op="merge forward", impl=impl, fn=synchronized(lambda: merge(*inputs)),
        nbytes=bytes_merge_forward(n, batch, NUM_EXPERTS, dtype), output_bytes=batch * n * theta_bytes(dtype),
        n=n, batch=batch, num_experts=NUM_EXPERTS, dtype=dtype, rounds=ROUNDS[impl], warmup_rounds=2,
        device="cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("n", SIZES)
def test_gpu_merge_forward_backward(benchmark, results, cuda_copy_bandwidth, impl, dtype, batch, n):
    require(impl)
    theta_pre, delta, log_alpha, alpha = make_inputs(n, batch, dtype, requires_grad=True)
    grad = torch.randn(batch, n, generator=torch.Generator(device="cuda").manual_seed(1), device="cuda").to(dtype)
    merge = merge_fn(impl)

    def step():
        for leaf in (delta, log_alpha, alpha):
            leaf.grad = None
        merge(theta_pre, delta, log_alpha, alpha).backward(grad)

    size = theta_bytes(dtype)
    # Outputs: θ [B, N] and the gradients of θ_δ, log_α and α.
    output_bytes = batch * n * size + n * size + n * NUM_EXPERTS * 4 + batch * NUM_EXPERTS * 4
    run_or_skip_on_oom(lambda: run_case(
        benchmark, results, cuda_copy_bandwidth, op="merge forward+backward", impl=impl, fn=synchronized(step),
        nbytes=bytes_merge_forward(n, batch, NUM_EXPERTS, dtype) + bytes_merge_backward(n, batch, NUM_EXPERTS, dtype),
        output_bytes=output_bytes, n=n, batch=batch, num_experts=NUM_EXPERTS, dtype=dtype, rounds=ROUNDS[impl],
        warmup_rounds=2, device="cuda"))
