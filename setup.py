"""Build of smat's compiled kernels.

* ``smat_kernels._cpu``: pybind11 + OpenMP, always built.
* ``smat_kernels._cuda``: pybind11 + CUDA, built wherever nvcc is found.

Environment variables:
  SMAT_BUILD_CUDA  0 skips the CUDA module, 1 makes a missing nvcc an error;
                   unset: build it when nvcc is found.
  SMAT_CUDA_ARCHS  semicolon-separated SM versions (default "90": H100/H200;
                   e.g. "80;90" adds A100 at twice the compile time).
  SMAT_CPU_ARCH    value of -march for the CPU module (default "native";
                   set e.g. "x86-64-v3" to build for other machines).
  CUDA_HOME        the CUDA toolkit (default: /usr/local/cuda, then nvcc on PATH).
  MAX_JOBS         parallel compile jobs (default: the number of cores).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent
INCLUDE = ROOT / "csrc" / "include"


def relative_sources(folder: str, pattern: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / folder).glob(pattern))


def cuda_home() -> Path | None:
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "bin" / "nvcc").exists():
            return Path(candidate)
    nvcc = shutil.which("nvcc")
    if nvcc:
        resolved = Path(os.path.realpath(nvcc)).parent.parent
        if (resolved / "bin" / "nvcc").exists() and (resolved / "include" / "cuda_runtime.h").exists():
            return resolved
    return None


def cuda_build_decision() -> tuple[Path | None, str]:
    """The toolkit to build the CUDA module with, or None and the reason why not."""
    wanted = os.environ.get("SMAT_BUILD_CUDA", "").strip()
    home = cuda_home()
    if wanted == "0":
        return None, "SMAT_BUILD_CUDA=0"
    if home is None:
        if wanted == "1":
            raise RuntimeError("SMAT_BUILD_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to the toolkit "
                               "(the folder with bin/nvcc), or unset SMAT_BUILD_CUDA to build without CUDA.")
        return None, "no nvcc found (set CUDA_HOME to build the CUDA module)"
    if not relative_sources("csrc/cuda", "*.cu"):
        return None, "no CUDA sources in csrc/cuda"
    return home, ""


CPU_FLAGS = [
    "-O3",
    "-fopenmp",
    "-fno-math-errno",  # lets GCC call glibc's vector expf/logf (see csrc/cpu/cpu_common.h)
    "-ffp-contract=off",  # a·b + c rounds twice, as in the reference
    "-DSMAT_USE_LIBMVEC",
    "-mprefer-vector-width=512",  # where AVX-512 exists; ignored elsewhere
    f"-march={os.environ.get('SMAT_CPU_ARCH', 'native')}",
]


class BuildWithCuda(build_ext):
    """build_ext that compiles .cu files with nvcc and builds in parallel."""

    def build_extensions(self):
        jobs = int(os.environ.get("MAX_JOBS", os.cpu_count() or 1))
        if jobs > 1 and len(self.extensions) > 1:
            with ThreadPoolExecutor(jobs) as pool:
                list(pool.map(self.build_extension, self.extensions))
        else:
            super().build_extensions()

    def build_extension(self, ext):
        if getattr(ext, "cuda_home", None) is not None:
            self.build_cuda_extension(ext)
        else:
            super().build_extension(ext)

    def build_cuda_extension(self, ext):
        home: Path = ext.cuda_home
        nvcc = str(home / "bin" / "nvcc")
        build_dir = Path(self.build_temp) / "cuda"
        build_dir.mkdir(parents=True, exist_ok=True)
        archs = os.environ.get("SMAT_CUDA_ARCHS", "90").split(";")
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a]
        gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
        import sysconfig

        import pybind11

        includes = [f"-I{INCLUDE}", f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
                    f"-I{home / 'include'}"]

        def compile_one(source: str) -> str:
            obj = str(build_dir / (Path(source).name + ".o"))
            if source.endswith(".cu"):
                cmd = [nvcc, "-c", source, "-o", obj, "-O3", "-std=c++17", "--expt-relaxed-constexpr",
                       "--fmad=false",  # a·b + c rounds twice, as in the reference and the CPU build
                       "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden", *gencode, *includes]
            else:
                cmd = [self.compiler.compiler_so[0], "-c", source, "-o", obj, "-O3", "-std=c++17", "-fPIC",
                       "-fvisibility=hidden", *includes]
            subprocess.run(cmd, check=True)
            return obj

        jobs = int(os.environ.get("MAX_JOBS", os.cpu_count() or 1))
        with ThreadPoolExecutor(jobs) as pool:
            objects = list(pool.map(compile_one, ext.sources))
        output = self.get_ext_fullpath(ext.name)
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        link = [self.compiler.compiler_so[0].replace("gcc", "g++") if "gcc" in self.compiler.compiler_so[0] else "g++",
                "-shared", *objects, "-o", output, f"-L{home / 'lib64'}", f"-L{home / 'lib'}",
                "-lcudart_static", "-ldl", "-lrt", "-lpthread"]
        subprocess.run(link, check=True)


def extensions():
    cpu = Pybind11Extension(
        "smat_kernels._cpu",
        relative_sources("csrc/cpu", "*.cpp"),
        include_dirs=[str(INCLUDE)],
        extra_compile_args=CPU_FLAGS,
        extra_link_args=["-fopenmp"],
        cxx_std=17,
    )
    result = [cpu]
    home, reason = cuda_build_decision()
    if home is None:
        print(f"smat: building without the CUDA module: {reason}", file=sys.stderr)
    else:
        cuda = Pybind11Extension("smat_kernels._cuda", relative_sources("csrc/cuda", "*.cu")
                                 + relative_sources("csrc/cuda", "*.cpp"))
        cuda.cuda_home = home
        result.append(cuda)
    return result


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildWithCuda})
