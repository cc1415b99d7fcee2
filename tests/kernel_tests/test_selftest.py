"""The backends' self-test (smat_kernels/selftest.py): it passes for the
real backends (cpu here, triton in its interpreter, cuda and triton on a
GPU), and it catches deliberately broken ones (wrong values, wrong
uniforms, wrong gradients, one that raises): each is disabled with one
warning naming the op, the case and the error, and the next backend of the
order serves correct results. Its time is measured in
benchmarks/test_bench_selftest.py, not here.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import pathlib
import re
import subprocess
import sys
import warnings

import pytest
import torch

import smat_kernels
from smat_kernels import dispatch, reference, selftest
from smat_kernels.backends.cpu import CpuBackend

REPOSITORY = pathlib.Path(__file__).resolve().parents[2]

# where a verdict names the device: "on cpu", or "on cpu, avx2 path" where the CPU module has several paths
ON_CPU = r"on cpu(, \w+ path)?"


# --------------------------------------------------------------------------
# Broken backends: the cpu backend with one deliberate fault each
# --------------------------------------------------------------------------


class WrongValues(CpuBackend):
    """The merge is off by 1e-3 in the last element of the last task (a tail bug)."""

    name = "wrong_values"

    def merge(self, *args):
        out = super().merge(*args)
        out[-1, -1] += 1e-3
        return out


class WrongUniforms(CpuBackend):
    """One uniform one ulp off: invisible in the merge's values, caught only bit for bit."""

    name = "wrong_uniforms"

    def uniforms(self, *args):
        u = super().uniforms(*args)
        u.view(-1)[-1] = torch.nextafter(u.view(-1)[-1], torch.tensor(1.0))
        return u

    def merge(self, theta_pre, delta, log_alpha, alpha, mode, seed, offset, beta, gamma, zeta):
        return super().merge(theta_pre, delta, log_alpha, alpha, mode, seed, offset, beta, gamma, zeta)


class WrongGradients(CpuBackend):
    """∂θ_δ 1 % too large."""

    name = "wrong_gradients"

    def merge_backward(self, *args):
        grads = list(super().merge_backward(*args))
        if grads[1] is not None:
            grads[1] = grads[1] * 1.01
        return tuple(grads)


class Raises(CpuBackend):
    """pack dies inside the kernel."""

    name = "raises"

    def pack(self, *args):
        raise RuntimeError("illegal instruction in pack_scatter")


BROKEN = {
    WrongValues: ("merge", "out: normalised error"),
    WrongUniforms: ("uniforms", "not bit-identical to the reference's"),
    WrongGradients: ("merge backward", "∂delta: normalised error"),
    Raises: ("pack", "RuntimeError: illegal instruction in pack_scatter"),
}


@pytest.fixture
def fresh(monkeypatch):
    """No verdicts and no warnings yet, as in a new process; restored afterwards."""
    monkeypatch.setattr(selftest, "_verdicts", {})
    monkeypatch.setattr(dispatch, "_warned", set())
    monkeypatch.delenv(selftest.ENVIRONMENT_VARIABLE, raising=False)
    monkeypatch.delenv(dispatch.ENVIRONMENT_VARIABLE, raising=False)


def install_first(monkeypatch, backend_class) -> str:
    """Put `backend_class` first in the CPU order, loaded like the real backends."""
    name = backend_class.name
    monkeypatch.setitem(dispatch.BACKEND_CLASSES, name, f"{__name__}:{backend_class.__name__}")
    monkeypatch.setitem(dispatch.DEFAULT_ORDER, "cpu", (name, "cpu", "reference"))
    monkeypatch.delitem(dispatch._instances, name, raising=False)
    return name


def merge_inputs(n=1031, num_experts=5, batch=3):
    generator = torch.Generator().manual_seed(7)
    return (torch.randn(n, generator=generator), torch.randn(n, generator=generator),
            torch.randn(n, num_experts, generator=generator), torch.randn(batch, num_experts, generator=generator))


def merge_and_gradients(backend=None):
    leaves = [t.clone().requires_grad_() for t in merge_inputs()]
    out = smat_kernels.merge(*leaves, mode="sample", seed=3, offset=2**32 - 5, backend=backend)
    grads = torch.autograd.grad(out.square().sum(), leaves)
    return out.detach(), grads


# --------------------------------------------------------------------------
# The real backends pass
# --------------------------------------------------------------------------


def test_cpu_passes():
    verdict = selftest.run(dispatch.get_backend("cpu"), torch.device("cpu"))
    assert verdict.passed, verdict.failure
    assert verdict.checks == len(list(selftest.checks("quick")))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_passes_in_interpreter():
    """Triton decides at kernel definition whether to interpret: a child process with TRITON_INTERPRET=1."""
    script = ("import torch\nfrom smat_kernels import dispatch, selftest\n"
              "verdict = selftest.run(dispatch.get_backend('triton'), torch.device('cpu'))\n"
              "print(verdict.passed, verdict.checks, verdict.failure if not verdict.passed else '')\n")
    environment = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[:2] == ["True", str(len(list(selftest.checks("quick"))))], result.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("name", ("cuda", "triton"))
def test_gpu_backends_pass(name):
    reason = dispatch.rejection(name, torch.device("cuda"))
    if reason is not None:
        pytest.skip(f"{name} cannot run here: {reason}")
    verdict = selftest.run(dispatch.get_backend(name), torch.device("cuda"))
    assert verdict.passed, verdict.failure


# --------------------------------------------------------------------------
# Broken backends are caught, disabled with one warning, and replaced
# --------------------------------------------------------------------------


@pytest.mark.parametrize("backend_class", list(BROKEN), ids=lambda c: c.name)
def test_broken_backend_is_caught(backend_class):
    op, error = BROKEN[backend_class]
    verdict = selftest.run(backend_class(), torch.device("cpu"))
    assert not verdict.passed
    assert verdict.op == op, verdict
    assert error in verdict.error, verdict.error
    assert verdict.case.startswith("N=") and "M=" in verdict.case and "B=" in verdict.case


@pytest.mark.parametrize("backend_class", list(BROKEN), ids=lambda c: c.name)
def test_broken_backend_is_disabled_and_the_next_takes_over(backend_class, monkeypatch, fresh):
    name = install_first(monkeypatch, backend_class)
    op, error = BROKEN[backend_class]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, grads = merge_and_gradients()
        packed = smat_kernels.pack(merge_inputs()[1], merge_inputs()[2])
        merge_and_gradients()  # a second call: no second warning
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    message = messages[0]
    assert f"the {name!r} backend failed its self-test on cpu" in message and "'cpu' takes over" in message
    assert f"Failed: {op} (N=" in message and error in message, message
    assert "python -m smat_kernels.check" in message
    # The fallback's results are the cpu backend's, bit for bit.
    expected_out, expected_grads = merge_and_gradients("cpu")
    assert torch.equal(out, expected_out)
    assert all(torch.equal(g, e) for g, e in zip(grads, expected_grads))
    cpu_packed = smat_kernels.pack(merge_inputs()[1], merge_inputs()[2], backend="cpu")
    assert torch.equal(packed.expert_bits, cpu_packed.expert_bits) and torch.equal(packed.delta, cpu_packed.delta)
    # backends() shows the verdict; forcing the broken backend is an error that says why.
    report = smat_kernels.backends()
    assert re.match(rf"disabled in this process: self-test failed {ON_CPU}: {op} \(N=", report[name]), report[name]
    assert re.match(r"available; self-test passed on cpu(, \w+ path)? \(", report["cpu"]), report["cpu"]
    with pytest.raises(ValueError, match=f"backend {name!r} .* cannot run on cpu: self-test failed {ON_CPU}: {op}"):
        smat_kernels.merge(*merge_inputs(), backend=name)


def test_selftest_runs_once_per_process_and_device(monkeypatch, fresh):
    calls = []
    real_run = selftest.run
    monkeypatch.setattr(selftest, "run", lambda *args, **kwargs: calls.append(args) or real_run(*args, **kwargs))
    for _ in range(3):
        merge_and_gradients()
        smat_kernels.expected_density(merge_inputs()[2])
    merge_and_gradients("cpu")
    assert [(backend.name, str(device)) for backend, device, *_ in calls] == [("cpu", "cpu")]
    assert "self-test passed on cpu" in smat_kernels.backends()["cpu"]


def test_reference_is_not_self_tested(monkeypatch, fresh):
    monkeypatch.setattr(selftest, "run", lambda *args, **kwargs: pytest.fail("the reference was self-tested"))
    smat_kernels.merge(*merge_inputs(), backend="reference")
    assert smat_kernels.backends()["reference"] == "available"


def test_off_switch_serves_without_testing(monkeypatch, fresh):
    """SMAT_SELFTEST=0: not even a broken backend is caught (which is why it is on by default)."""
    name = install_first(monkeypatch, WrongValues)
    monkeypatch.setenv(selftest.ENVIRONMENT_VARIABLE, "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = smat_kernels.merge(*merge_inputs(), mode="deterministic")
    assert not torch.equal(out, smat_kernels.merge(*merge_inputs(), mode="deterministic", backend="cpu"))
    assert re.fullmatch(rf"available; self-test off {ON_CPU} \(SMAT_SELFTEST=0\)", smat_kernels.backends()[name])


def test_forced_backend_is_self_tested_too(monkeypatch, fresh):
    name = install_first(monkeypatch, WrongGradients)
    monkeypatch.setenv(dispatch.ENVIRONMENT_VARIABLE, name)
    expected = f"SMAT_BACKEND={name}.* cannot run on cpu: self-test failed {ON_CPU}: merge backward"
    with pytest.raises(ValueError, match=expected):
        smat_kernels.merge(*merge_inputs())


def test_levels(monkeypatch):
    for value, level in (("", "quick"), ("1", "quick"), ("0", "off"), ("full", "full"), ("FULL", "full")):
        monkeypatch.setenv(selftest.ENVIRONMENT_VARIABLE, value)
        assert selftest.level_from_environment() == level
    monkeypatch.setenv(selftest.ENVIRONMENT_VARIABLE, "sometimes")
    with pytest.raises(ValueError, match="SMAT_SELFTEST='sometimes' is not understood"):
        selftest.level_from_environment()
    assert len(list(selftest.checks("full"))) > 5 * len(list(selftest.checks("quick")))


@pytest.mark.parametrize("level", ("quick", "full"))
def test_cases_hit_the_edges(level):
    cases = selftest.case_set(level)
    merge = cases.merge
    assert {(c.dtype, c.mode) for c in merge} == set(itertools.product(selftest.DTYPES, reference.MODES))
    assert {c.num_experts for c in merge if c.mode == "sample"} == {1, 3, 8, 32}
    assert {c.batch for c in merge} == {1, 3}
    sizes = {c.n for group in (merge, cases.uniforms, cases.density, cases.pack) for c in group}
    assert 1 in sizes
    # Sizes of more than one element are multiples of no block: CPU lanes, bitmap words, Triton and CUDA blocks.
    assert all(n % block for n in sizes - {1} for block in (16, 32, 256, 512, 1024))
    assert {c.num_experts for c in cases.uniforms} >= {1, 3, 8, 32}
    assert {c.num_experts for c in cases.pack} >= {3, 12, 32}  # uint8, int16 and int32 expert words
    assert {c.dtype for c in cases.pack} == set(selftest.DTYPES)


def test_first_call_under_inference_mode_and_autocast(monkeypatch, fresh):
    """The self-test runs inside the user's first call, whatever mode that call is in."""
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = smat_kernels.merge(*merge_inputs(), mode="deterministic")
    assert out.dtype == torch.float32
    assert "self-test passed on cpu" in smat_kernels.backends()["cpu"]
