"""The backends' self-test (smat_kernels/selftest.py): what a compiled
backend's first call costs a process. The budget is 1 s on a CPU for the
quick set of the cpu backend.

Timed by pytest-benchmark in this process with every cache dropped before
each round (selftest.forget: the verdicts and the reference's answers), and
also in fresh processes (``fresh_process_seconds``: the median of the
self-test's own clock in new Python processes, after ``import
smat_kernels``), which is what a user's first call pays. The Triton
interpreter (CI's way to run the Triton kernels on a CPU) is timed in fresh
processes only, since TRITON_INTERPRET must be set before the kernels are
defined.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import subprocess
import sys

import pytest
import torch

from smat_kernels import dispatch, selftest

FRESH_PROCESSES = 3


def fresh_process_seconds(backend: str, level: str, **environment: str) -> float:
    """Median over new processes of the self-test's time, as the verdict reports it."""
    script = ("import torch\nfrom smat_kernels import dispatch, selftest\n"
              f"verdict = selftest.run(dispatch.get_backend({backend!r}), torch.device('cpu'), {level!r})\n"
              "assert verdict.passed, verdict.failure\nprint(verdict.seconds)\n")
    seconds = []
    for _ in range(FRESH_PROCESSES):
        result = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, **environment),
                                capture_output=True, text=True, timeout=1800, check=True)
        seconds.append(float(result.stdout.split()[-1]))
    return statistics.median(seconds)


def add_row(results, benchmark, *, level: str, impl: str, device: str, seconds: float, **extra) -> None:
    cases = selftest.case_set(level)
    groups = (cases.merge, cases.uniforms, cases.density, cases.pack)
    row = results.add(op=f"self-test ({level})", impl=impl, device=device,
                      N=max(case.n for group in groups for case in group), B=max(case.batch for case in cases.merge),
                      M=max(case.num_experts for case in cases.merge), dtype="all", seconds=seconds, bytes=0,
                      gbps=0.0, copy_gbps=0.0, copy_ratio=0.0, peak_extra_bytes=0, peak_in_bn_buffers=0.0,
                      checks=len(list(selftest.checks(level))), **extra)
    benchmark.extra_info.update(row)


@pytest.mark.parametrize("level", ("quick", "full"))
def test_selftest_cpu(benchmark, results, level):
    backend = dispatch.get_backend("cpu")
    if dispatch.rejection("cpu", torch.device("cpu")) is not None:
        pytest.skip("the cpu backend is not available")

    def run():
        verdict = selftest.run(backend, torch.device("cpu"), level)
        assert verdict.passed, verdict.failure

    benchmark.pedantic(run, setup=selftest.forget, rounds=5 if level == "quick" else 1, iterations=1)
    fresh = fresh_process_seconds("cpu", level) if level == "quick" else None
    add_row(results, benchmark, level=level, impl="cpu", device="cpu", seconds=benchmark.stats.stats.median,
            fresh_process_seconds=fresh)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_selftest_triton_interpreter(benchmark, results):
    seconds = fresh_process_seconds("triton", "quick", TRITON_INTERPRET="1")
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the timing is the fresh processes' own
    add_row(results, benchmark, level="quick", impl="triton (interpreter)", device="cpu", seconds=seconds,
            fresh_process_seconds=seconds)


@pytest.mark.parametrize("name", ("cuda", "triton"))
def test_selftest_gpu(benchmark, results, name):
    if not torch.cuda.is_available() or dispatch.rejection(name, torch.device("cuda")) is not None:
        pytest.skip(f"the {name} backend cannot run on a GPU here")
    backend, device = dispatch.get_backend(name), torch.device("cuda")
    first = selftest.run(backend, device)  # includes Triton's JIT compilation and autotuning
    assert first.passed, first.failure

    def run():
        verdict = selftest.run(backend, device)
        assert verdict.passed, verdict.failure

    benchmark.pedantic(run, setup=selftest.forget, rounds=5, iterations=1)
    add_row(results, benchmark, level="quick", impl=name, device="cuda", seconds=benchmark.stats.stats.median,
            first_run_seconds=first.seconds)
