"""The install builds what the machine can build: the CPU module always, the
CUDA module wherever a CUDA toolkit exists (so that CI, which has nvcc but no
GPU, compiles the CUDA sources and fails on a compile error)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest


def cuda_toolkit() -> Path | None:
    """setup.py's first choices: CUDA_HOME, CUDA_PATH, /usr/local/cuda."""
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and (Path(candidate) / "bin" / "nvcc").exists():
            return Path(candidate)
    return None


def test_the_cpu_module_is_built():
    assert importlib.util.find_spec("smat_kernels._cpu") is not None, \
        "smat_kernels._cpu is missing: reinstall with `pip install .` and read the compiler's error"


def test_the_cuda_module_is_built_wherever_a_toolkit_exists():
    if os.environ.get("SMAT_BUILD_CUDA", "").strip() == "0":
        pytest.skip("SMAT_BUILD_CUDA=0 skips the CUDA module")
    toolkit = cuda_toolkit()
    if toolkit is None:
        pytest.skip("no CUDA toolkit on this machine")
    assert importlib.util.find_spec("smat_kernels._cuda") is not None, \
        f"a CUDA toolkit exists ({toolkit}) but smat_kernels._cuda was not built: reinstall with " \
        f"`SMAT_BUILD_CUDA=1 pip install .` to see why"
