"""The CPU backend's instruction-set paths side by side (csrc/cpu/isa.h):
merge forward + backward and merge forward in sample mode at the ViT-S size
(N = 22M, M = 8, B = 4), once per path this CPU runs, against the eager
reference and torch.compile(reference) in the same run. Each row records
its mask samples per second (B·N·M / seconds); the results file names the
CPU model, its vector ISA flags and the paths (bench_util.machine_info).

    python -m pytest benchmarks/test_bench_isa.py --benchmark-only

SMAT_BENCH_ISA_N sets N (e.g. 100000 for a quick check that it runs).
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from bench_util import bytes_merge_backward, bytes_merge_forward
from test_bench_merge import NUM_EXPERTS, make_inputs, merge_fn, run_merge_case

from smat_kernels.backends import cpu

N = int(os.environ.get("SMAT_BENCH_ISA_N", 22_000_000))
BATCH = 4
PATHS = tuple(cpu.isa()["runnable"]) if cpu._cpu is not None else ()
IMPLS = [f"cpu ({path})" for path in PATHS] + ["reference", "compiled"]


@contextlib.contextmanager
def isa_of(impl: str):
    """The CPU kernels on the path that `impl` names, for the block."""
    if not impl.startswith("cpu ("):
        yield
        return
    previous = cpu.isa()["active"]
    cpu.select_isa(impl[len("cpu ("):-1])
    try:
        yield
    finally:
        cpu.select_isa(previous)


def rounds_for(impl: str) -> int:
    return 5 if impl.startswith("cpu") or N < 10_000_000 else 1


def record_samples(results, op: str, impl: str) -> None:
    row = next(r for r in reversed(results.rows) if r["op"] == op and r["impl"] == impl)
    row["mask_samples_per_second"] = BATCH * N * NUM_EXPERTS / row["seconds"]


@pytest.mark.parametrize("impl", IMPLS)
def test_isa_merge_forward(benchmark, results, copy_bandwidth, impl):
    inputs = make_inputs(N, BATCH)
    merge = merge_fn("cpu" if impl.startswith("cpu") else impl)
    with isa_of(impl):
        run_merge_case(benchmark, results, copy_bandwidth, impl, lambda: merge(*inputs), op="merge forward",
                       nbytes=bytes_merge_forward(N, BATCH, NUM_EXPERTS, torch.float32),
                       output_bytes=BATCH * N * 4, n=N, batch=BATCH, num_experts=NUM_EXPERTS, dtype=torch.float32,
                       rounds=rounds_for(impl))
    record_samples(results, "merge forward", impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_isa_merge_forward_backward(benchmark, results, copy_bandwidth, impl):
    theta_pre, delta, log_alpha, alpha = make_inputs(N, BATCH, requires_grad=True)
    grad = torch.randn(BATCH, N, generator=torch.Generator().manual_seed(1))
    merge = merge_fn("cpu" if impl.startswith("cpu") else impl)

    def step():
        for leaf in (delta, log_alpha, alpha):
            leaf.grad = None
        merge(theta_pre, delta, log_alpha, alpha).backward(grad)

    output_bytes = BATCH * N * 4 + N * 4 + N * NUM_EXPERTS * 4 + BATCH * NUM_EXPERTS * 4
    with isa_of(impl):
        run_merge_case(benchmark, results, copy_bandwidth, impl, step, op="merge forward+backward",
                       nbytes=bytes_merge_forward(N, BATCH, NUM_EXPERTS, torch.float32)
                       + bytes_merge_backward(N, BATCH, NUM_EXPERTS, torch.float32),
                       output_bytes=output_bytes, n=N, batch=BATCH, num_experts=NUM_EXPERTS, dtype=torch.float32,
                       rounds=rounds_for(impl))
    # Forward and backward each draw every mask sample once.
    record_samples(results, "merge forward+backward", impl)
