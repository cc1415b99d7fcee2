"""``python -m smat_kernels.check``: it runs as a user would run it, prints
every section, and exits non-zero when the backend forced with
SMAT_BACKEND is broken here."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import pytest
import torch

from smat_kernels import check, dispatch, selftest

from .test_selftest import WrongValues, install_first


def run_check(*arguments: str, **environment: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items()
           if key not in (dispatch.ENVIRONMENT_VARIABLE, selftest.ENVIRONMENT_VARIABLE)}
    env.update(environment)
    # From a temporary folder, so that the installed package is what runs.
    return subprocess.run([sys.executable, "-m", "smat_kernels.check", *arguments], capture_output=True, text=True,
                          env=env, timeout=600, cwd=tempfile.gettempdir())


@pytest.fixture(scope="module")
def report() -> subprocess.CompletedProcess:
    return run_check("--repeats", "2")


def section(output: str, name: str) -> str:
    """The text of section `name` (up to the next heading)."""
    start = output.index(f"== {name} ==")
    end = output.find("\n== ", start + 1)
    return output[start:] if end < 0 else output[start:end]


def test_check_prints_every_section(report):
    assert report.returncode == 0, report.stdout + report.stderr
    output = report.stdout
    for name in (*check.SECTIONS, "result"):
        assert f"== {name} ==" in output, name
    versions = section(output, "versions")
    assert f"torch:                     {torch.__version__}" in versions
    assert "triton:" in versions and "python:" in versions
    assert "smat_kernels._cpu:" in versions
    assert "  compiler:" in versions and "  flags:" in versions and "-O3" in versions
    assert "  target:" in versions and "-march=" in versions
    if "smat_kernels._cuda:" in versions and "not importable" not in versions.split("smat_kernels._cuda:")[1]:
        assert "sm_" in versions and "CUDA runtime (linked):" in versions and "CUDA driver:" in versions
    devices = section(output, "devices")
    assert "cpu:" in devices and "logical cores" in devices
    assert "cuda" in devices
    backends = section(output, "backends")
    assert "self-test level:           quick" in backends
    # the CPU verdict names the instruction-set path it tested (csrc/cpu/isa.h) where the module has several
    assert re.search(r"cpu on cpu: +available, self-test passed on cpu(, (avx512|avx2|portable) path)? \(", backends)
    assert "reference on cpu:          available (the oracle: not self-tested)" in backends
    assert "cuda" in backends and "triton" in backends
    speed = section(output, "speed")
    assert "merge forward + backward, sample mode, fp32, M = 8, B = 4" in speed
    assert "cpu on cpu:" in speed and "x the reference" in speed
    assert section(output, "result").strip().endswith("ok")


def test_forced_backend_that_cannot_run_exits_non_zero():
    result = run_check("--no-speed", SMAT_BACKEND="cuda" if not torch.cuda.is_available() else "nonexistent")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "BROKEN: SMAT_BACKEND=" in result.stdout
    assert "== backends ==" in result.stdout  # the report is printed in full before the verdict


def test_forced_backend_that_fails_its_self_test_exits_non_zero(monkeypatch, capsys):
    monkeypatch.setattr(selftest, "_verdicts", {})
    monkeypatch.setattr(dispatch, "_warned", set())
    monkeypatch.delenv(selftest.ENVIRONMENT_VARIABLE, raising=False)
    name = install_first(monkeypatch, WrongValues)
    monkeypatch.setenv(dispatch.ENVIRONMENT_VARIABLE, name)
    assert check.main(["--no-speed"]) == 1
    output = capsys.readouterr().out
    on_cpu = r"on cpu(, \w+ path)?"  # the verdict names the CPU module's path where it has several
    assert f"{name} on cpu:" in output and re.search(rf"DISABLED, self-test failed {on_cpu}: merge \(N=", output)
    assert re.search(rf"BROKEN: SMAT_BACKEND={name}, which failed its self-test: self-test failed {on_cpu}: merge",
                     output)


def test_unforced_broken_backend_is_reported_but_not_an_error(monkeypatch, capsys):
    monkeypatch.setattr(selftest, "_verdicts", {})
    monkeypatch.setattr(dispatch, "_warned", set())
    monkeypatch.delenv(selftest.ENVIRONMENT_VARIABLE, raising=False)
    monkeypatch.delenv(dispatch.ENVIRONMENT_VARIABLE, raising=False)
    name = install_first(monkeypatch, WrongValues)
    monkeypatch.setitem(check.SPEED_SIZES, "cpu", 1031)  # the speed section's logic, not its numbers
    assert check.main(["--repeats", "1"]) == 0
    output = capsys.readouterr().out
    assert f"{name} on cpu:" in output and "not measured: it failed its self-test" in output
    assert "ok; 1 backend(s) disabled by their self-test" in output
