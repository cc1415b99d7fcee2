"""Expected density (the L0 term), forward: the CPU backend against the
eager reference and torch.compile(reference)."""

from __future__ import annotations

import pytest
import torch
from bench_util import run_case

import smat_kernels
from smat_kernels import reference

SIZES = [1_000_000, 22_000_000]
NUM_EXPERTS = 8

compiled_expected_density = torch.compile(reference.expected_density)

IMPLS = {
    "cpu": lambda log_alpha: smat_kernels.expected_density(log_alpha, backend="cpu"),
    "reference": reference.expected_density,
    "compiled": compiled_expected_density,
}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("n", SIZES)
def test_expected_density(benchmark, results, copy_bandwidth, impl, n):
    log_alpha = torch.randn(n, NUM_EXPERTS, generator=torch.Generator().manual_seed(0))
    density = IMPLS[impl]
    run_case(benchmark, results, copy_bandwidth, op="expected density", impl=impl,
             fn=lambda: density(log_alpha), nbytes=4 * n * NUM_EXPERTS, output_bytes=4 * NUM_EXPERTS, n=n,
             batch=1, num_experts=NUM_EXPERTS, dtype=torch.float32, rounds=5)
