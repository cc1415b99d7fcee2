"""Packed merge (deployment format) against the dense deterministic merge of
the same backend, the eager reference and torch.compile(reference)."""

from __future__ import annotations

import pytest
import torch
from bench_util import run_case

import smat_kernels
from smat_kernels import reference

SIZES = [1_000_000, 22_000_000]
BATCHES = [1, 4]
NUM_EXPERTS = 8
TARGET_SPARSITY = 0.9

compiled_packed_merge = torch.compile(reference.packed_merge)


def binary_experts(n: int):
    """Masks like a trained SMAT model's: binary, 10% density per expert."""
    generator = torch.Generator().manual_seed(0)
    keep = torch.rand(n, NUM_EXPERTS, generator=generator) > TARGET_SPARSITY
    log_alpha = torch.where(keep, 6.0, -6.0)
    delta = 0.01 * torch.randn(n, generator=generator)
    return torch.randn(n, generator=generator), delta, log_alpha


def packed_bytes(packed, batch: int) -> int:
    return packed.nbytes() + 4 * packed.n + batch * packed.n * 4 + 4 * batch * NUM_EXPERTS


@pytest.mark.parametrize("impl", ["cpu", "dense cpu", "reference", "compiled"])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("n", SIZES)
def test_packed_merge(benchmark, results, copy_bandwidth, impl, batch, n):
    theta_pre, delta, log_alpha = binary_experts(n)
    alpha = torch.softmax(torch.randn(batch, NUM_EXPERTS, generator=torch.Generator().manual_seed(1)), dim=1)
    packed = smat_kernels.pack(delta, log_alpha, backend="cpu")
    functions = {
        "cpu": lambda: smat_kernels.packed_merge(theta_pre, packed, alpha, backend="cpu"),
        "dense cpu": lambda: smat_kernels.merge(theta_pre, delta, log_alpha, alpha, mode="deterministic",
                                                backend="cpu"),
        "reference": lambda: reference.packed_merge(theta_pre, packed, alpha),
        "compiled": lambda: compiled_packed_merge(theta_pre, packed, alpha),
    }
    run_case(benchmark, results, copy_bandwidth, op="packed merge", impl=impl, fn=functions[impl],
             nbytes=packed_bytes(packed, batch), output_bytes=batch * n * 4, n=n, batch=batch,
             num_experts=NUM_EXPERTS, dtype=torch.float32, rounds=5 if impl != "reference" else 2)
