"""Build of smat's compiled kernels.

* ``smat_kernels._cpu``: pybind11 + OpenMP, always built.
* ``smat_kernels._cuda``: pybind11 + CUDA, built wherever nvcc is found.

Environment variables:
  SMAT_BUILD_CUDA  0 skips the CUDA module, 1 makes a missing nvcc an error;
                   unset: build it when nvcc is found.
  SMAT_CUDA_ARCHS  semicolon-separated SM versions (default "90": H100/H200;
                   e.g. "80;90" adds A100 at twice the compile time).
  SMAT_CPU_ARCH    value of -march for the CPU module (default "native";
                   set e.g. "x86-64-v3" to build for other machines). On
                   x86-64 the merge kernels are also compiled per ISA path
                   (ISA_SOURCES) and chosen at run time, so such a build still
                   runs AVX-512 where the CPU has it.
  CUDA_HOME        the CUDA toolkit (default: /usr/local/cuda, then nvcc on PATH).
  MAX_JOBS         parallel compile jobs (default: the number of cores).
"""

from __future__ import annotations

import json
import os
import platform
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
    "-fno-trapping-math",  # lets GCC if-convert the selects of the per-lane loops; values are unchanged
    "-ffp-contract=off",  # a·b + c rounds twice, as in the reference
    "-DSMAT_USE_LIBMVEC",
    "-mprefer-vector-width=512",  # where AVX-512 exists; ignored elsewhere
    f"-march={os.environ.get('SMAT_CPU_ARCH', 'native')}",
]

# Kernels compiled once more per instruction-set path, with the -march of
# that path (it follows, and so overrides, SMAT_CPU_ARCH's); csrc/cpu/isa.cpp
# chooses the path at run time from what the CPU reports. x86-64 only: other
# machines build the portable path alone.
ISA_SOURCES = {
    "csrc/cpu/merge_avx2.cpp": ["-march=x86-64-v3", "-mtune=generic"],
    "csrc/cpu/merge_avx512.cpp": ["-march=x86-64-v4", "-mtune=generic", "-mprefer-vector-width=512"],
}


def builds_isa_paths() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def cpu_sources() -> list[str]:
    sources = relative_sources("csrc/cpu", "*.cpp")
    return sources if builds_isa_paths() else [s for s in sources if s not in ISA_SOURCES]


def isa_flags(source: str) -> list[str]:
    """The extra flags of one CPU source: its ISA path's -march, if it has one."""
    relative = Path(source).resolve().relative_to(ROOT.resolve()).as_posix() if Path(source).is_absolute() else \
        Path(source).as_posix()
    return ISA_SOURCES.get(relative, [])


NVCC_FLAGS = [
    "-O3",
    "-std=c++17",
    "--expt-relaxed-constexpr",
    "--fmad=false",  # a·b + c rounds twice, as in the reference and the CPU build
]


def cuda_archs() -> list[str]:
    return [a for a in os.environ.get("SMAT_CUDA_ARCHS", "90").split(";") if a]


def gencode_flags(archs: list[str]) -> list[str]:
    """SASS for every arch, and PTX of the last one for newer GPUs to JIT-compile."""
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    flags.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
    return flags


def first_output_line(command: list[str], pattern: str = "") -> str:
    """The first line of `command`'s output that contains `pattern`, stripped;
    "unknown" if it cannot be run."""
    try:
        output = subprocess.run(command, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return next((line.strip() for line in output.splitlines() if pattern in line and line.strip()), "unknown")


def c_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=True)  # a valid C string literal for ASCII text


class BuildWithCuda(build_ext):
    """build_ext that compiles .cu files with nvcc and builds in parallel."""

    def build_extensions(self):
        for ext in self.extensions:
            self.write_build_info(ext)
        jobs = int(os.environ.get("MAX_JOBS", os.cpu_count() or 1))
        if jobs > 1 and len(self.extensions) > 1:
            with ThreadPoolExecutor(jobs) as pool:
                list(pool.map(self.build_extension, self.extensions))
        else:
            super().build_extensions()

    def write_build_info(self, ext):
        """smat_build_info.h for `ext`: its compiler, flags and target, which
        the module exposes as `build_info` (python -m smat_kernels.check)."""
        home = getattr(ext, "cuda_home", None)
        if home is not None:
            archs = cuda_archs()
            compiler = f"nvcc {first_output_line([str(home / 'bin' / 'nvcc'), '--version'], 'release')}"
            flags = NVCC_FLAGS + gencode_flags(archs)
            target = " ".join(f"sm_{a}" for a in archs) + f" (+ PTX compute_{archs[-1]})"
        else:
            executable = self.compiler.compiler_so[0]
            compiler = f"{executable} ({first_output_line([executable, '--version'])})"
            flags = CPU_FLAGS + ([f"[{Path(source).name}: {' '.join(extra)}]" for source, extra in ISA_SOURCES.items()]
                                 if builds_isa_paths() else [])
            march = next(flag for flag in CPU_FLAGS if flag.startswith("-march="))
            resolved = first_output_line([executable, march, "-Q", "--help=target"], "-march=").split()
            target = f"{march} (resolved: {resolved[-1] if resolved else 'unknown'})"
        folder = Path(self.build_temp) / "build_info" / ext.name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "smat_build_info.h").write_text(
            "// Written by setup.py; see csrc/*/bindings.cpp.\n#pragma once\n"
            f"#define SMAT_BUILD_COMPILER {c_string(compiler)}\n"
            f"#define SMAT_BUILD_FLAGS {c_string(' '.join(flags))}\n"
            f"#define SMAT_BUILD_TARGET {c_string(target)}\n")
        ext.include_dirs.append(str(folder))

    def build_extension(self, ext):
        if getattr(ext, "cuda_home", None) is not None:
            self.build_cuda_extension(ext)
        else:
            self.build_cpu_extension(ext)

    def build_cpu_extension(self, ext):
        """build_ext's own build, with each ISA source's -march appended to
        its compile command (distutils has no per-source flags)."""
        compile_one = self.compiler._compile

        def compile_with_isa_flags(obj, src, ext_name, cc_args, extra_postargs, pp_opts):
            compile_one(obj, src, ext_name, cc_args, [*extra_postargs, *isa_flags(src)], pp_opts)

        self.compiler._compile = compile_with_isa_flags
        try:
            super().build_extension(ext)
        finally:
            del self.compiler._compile

    def build_cuda_extension(self, ext):
        home: Path = ext.cuda_home
        nvcc = str(home / "bin" / "nvcc")
        build_dir = Path(self.build_temp) / "cuda"
        build_dir.mkdir(parents=True, exist_ok=True)
        gencode = gencode_flags(cuda_archs())
        import sysconfig

        import pybind11

        includes = [f"-I{INCLUDE}", f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
                    f"-I{home / 'include'}", *(f"-I{folder}" for folder in ext.include_dirs)]

        def compile_one(source: str) -> str:
            obj = str(build_dir / (Path(source).name + ".o"))
            if source.endswith(".cu"):
                cmd = [nvcc, "-c", source, "-o", obj, *NVCC_FLAGS, "-Xcompiler", "-fPIC", "-Xcompiler",
                       "-fvisibility=hidden", *gencode, *includes]
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
        cpu_sources(),
        include_dirs=[str(INCLUDE)],
        define_macros=[("SMAT_CPU_ISA_KERNELS", "1")] if builds_isa_paths() else [],
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
