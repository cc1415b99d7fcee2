"""The CPU kernels' instruction-set paths (csrc/cpu/isa.h).

Every path this CPU can run (portable, AVX2, AVX-512) gives exactly the bits
of the portable path: merge forward and every gradient, in sample,
deterministic and near-noiseless mode, over odd N, M ∈ {1, 3, 8, 32},
B ∈ {1, 4} and every θ dtype; each path draws the reference's uniforms bit
for bit and passes test_merge's comparison with the reference. A path the CPU
cannot run, or one that does not exist, is a clear error, through
SMAT_CPU_ISA as through select_isa. A machine without AVX-512 skips that
path's cases; CI on one with it runs all three.
"""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import sys
import tempfile

import pytest
import torch

from smat_kernels import reference, selftest
from smat_kernels.backends import cpu

from . import test_merge
from .test_merge import BATCHES, DTYPES, MODES, NUM_EXPERTS, OFFSET, SEED

if cpu._cpu is None:
    pytest.skip("smat_kernels._cpu is not built", allow_module_level=True)

PATHS = ("portable", "avx2", "avx512")
RUNNABLE = tuple(cpu.isa()["runnable"])
LARGE_N = test_merge.LARGE_N
# 2^20 + 3 elements in every combination would take minutes on two cores:
# every M, B and mode in fp32, the 16-bit dtypes at M = 8.
SIZES = (1, 97, 1025, LARGE_N)


@contextlib.contextmanager
def using(path: str):
    """Run the block on `path`, then restore the path that was active."""
    previous = cpu.isa()["active"]
    cpu.select_isa(path)
    try:
        yield
    finally:
        cpu.select_isa(previous)


def runnable(path: str):
    return pytest.param(path, marks=pytest.mark.skipif(path not in RUNNABLE, reason=f"this CPU cannot run {path}"))


def cases():
    for n in SIZES:
        for num_experts in NUM_EXPERTS:
            for batch in BATCHES:
                for dtype in DTYPES:
                    for mode in MODES:
                        if n == LARGE_N and (mode == "near_noiseless" or (dtype != torch.float32 and num_experts != 8)):
                            continue
                        yield pytest.param(n, num_experts, batch, dtype, mode,
                                           id=f"N{n}-M{num_experts}-B{batch}-{str(dtype)[6:]}-{mode}")


@functools.cache
def portable_result(n, num_experts, batch, dtype, mode):
    with using("portable"):
        return merge_with_gradients(n, num_experts, batch, dtype, mode)


def merge_with_gradients(n, num_experts, batch, dtype, mode):
    inputs = test_merge.make_inputs(n, num_experts, batch, dtype, seed=n % 1000 * 131 + num_experts * 7 + batch)
    out, grads = test_merge.run_cpu(inputs, mode)
    return (out, *grads)


@pytest.mark.parametrize("path", [runnable(p) for p in PATHS if p != "portable"])
@pytest.mark.parametrize(("n", "num_experts", "batch", "dtype", "mode"), list(cases()))
def test_path_is_bit_identical_to_portable(path, n, num_experts, batch, dtype, mode):
    expected = portable_result(n, num_experts, batch, dtype, mode)
    with using(path):
        actual = merge_with_gradients(n, num_experts, batch, dtype, mode)
    for name, got, want in zip(("out", *test_merge.GRADIENT_NAMES), actual, expected):
        differ = (got != want) & ~(got.isnan() & want.isnan())
        assert not differ.any(), f"{path}: {name} differs from the portable path at {int(differ.sum())} entries"


@pytest.mark.parametrize("path", [runnable(p) for p in PATHS])
@pytest.mark.parametrize(("n", "num_experts"), [(1, 1), (97, 3), (1025, 8), (1025, 32), (LARGE_N, 8)])
def test_path_draws_the_reference_uniforms(path, n, num_experts):
    with using(path):
        drawn = cpu.CpuBackend().uniforms(SEED, OFFSET, 2, n, num_experts, torch.device("cpu"))
    assert torch.equal(drawn, reference.uniforms(SEED, OFFSET, 2, n, num_experts))


@pytest.mark.parametrize("path", [runnable(p) for p in PATHS])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("n", "num_experts", "batch"), [(1, 1, 1), (97, 3, 4), (1025, 8, 4), (1025, 32, 1)])
def test_path_matches_reference(path, n, num_experts, batch, dtype, mode):
    """test_merge's comparison with the reference, on each path."""
    inputs = test_merge.make_inputs(n, num_experts, batch, dtype, seed=n * 131 + num_experts * 7 + batch)
    low_precision = test_merge.run_reference(inputs, mode, dtype) if dtype != torch.float32 else None
    kink_free = test_merge.off_kinks(inputs["log_alpha"], batch, mode, SEED, OFFSET)
    with using(path):
        actual = test_merge.run_cpu(inputs, mode)
    test_merge.compare(inputs, mode, actual, test_merge.run_reference(inputs, mode), low_precision, kink_free)


def test_active_path_is_the_best_runnable_by_default():
    info = cpu.isa()
    assert info["runnable"][0] == "portable"
    if os.environ.get(cpu.ISA_ENVIRONMENT_VARIABLE, "auto") in ("", "auto"):
        assert info["active"] == info["runnable"][-1]
    assert set(info["runnable"]) <= set(info["compiled"]) <= set(PATHS)


def run_with_isa(value: str, code: str) -> subprocess.CompletedProcess:
    """`code` in a new interpreter with SMAT_CPU_ISA=`value`, run outside the checkout: `python -c` puts the
    working folder first on sys.path, and the source tree's smat_kernels has no compiled module (CI installs
    the package, it does not build in place)."""
    environment = dict(os.environ, **{cpu.ISA_ENVIRONMENT_VARIABLE: value, "SMAT_SELFTEST": "0"})
    with tempfile.TemporaryDirectory() as folder:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment,
                              timeout=300, cwd=folder)


@pytest.mark.parametrize("path", [runnable(p) for p in PATHS])
def test_environment_variable_forces_the_path(path):
    result = run_with_isa(path, "import torch, smat_kernels\n"
                                "x = torch.randn(33)\n"
                                "smat_kernels.merge(x, x, torch.randn(33, 3), torch.randn(2, 3), mode='sample', "
                                "seed=1, offset=0, backend='cpu')\n"
                                "from smat_kernels.backends import cpu\n"
                                "print(cpu.isa()['active'], cpu.CpuBackend().variant())")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [path, path, "path"]


def unrunnable_paths() -> list[str]:
    return [p for p in cpu.isa()["compiled"] if p not in RUNNABLE]


@pytest.mark.parametrize("path", unrunnable_paths() or [pytest.param("avx512", marks=pytest.mark.skip(
    reason="this CPU runs every path of the build"))])
def test_forcing_a_path_this_cpu_cannot_run_is_a_clear_error(path):
    with pytest.raises(ValueError, match=f"this CPU cannot run the {path} path"):
        cpu.select_isa(path)
    result = run_with_isa(path, "import torch, smat_kernels\n"
                                "x = torch.randn(8)\n"
                                "smat_kernels.merge(x, x, torch.randn(8, 1), torch.randn(1, 1), mode='sample', "
                                "seed=1, offset=0)")
    assert result.returncode != 0
    assert f"SMAT_CPU_ISA={path}: this CPU cannot run the {path} path" in result.stderr


def test_an_unknown_path_is_a_clear_error():
    with pytest.raises(ValueError, match="SMAT_CPU_ISA=avx1024: not a path of this build"):
        cpu.select_isa("avx1024")
    assert cpu.isa()["active"] in RUNNABLE  # the failed request changed nothing
    result = run_with_isa("avx1024", "import torch, smat_kernels\n"
                                     "x = torch.randn(8)\n"
                                     "smat_kernels.merge(x, x, torch.randn(8, 1), torch.randn(1, 1), mode='sample', "
                                     "seed=1, offset=0)")
    assert result.returncode != 0
    assert "SMAT_CPU_ISA=avx1024: not a path of this build (built: portable" in result.stderr


def test_selftest_verdict_names_the_path():
    backend = cpu.CpuBackend()
    verdict = selftest.run(backend, torch.device("cpu"))
    assert verdict.passed, verdict
    assert f"{cpu.isa()['active']} path" in str(verdict)
