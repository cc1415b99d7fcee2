"""``python -m smat_kernels.check``: the whole kernel stack on this machine,
in one report to paste into a bug report.

Sections: versions (Python, torch, Triton, the CUDA runtime and driver, the
compiler, flags and targets each compiled module was built with), the
devices, each backend's availability and self-test verdict per device, and
one speed line per backend (merge forward + backward at a medium size,
against the reference). Exits with status 1 if the backend forced with
``SMAT_BACKEND`` cannot run here or fails its self-test, else 0.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import platform
import statistics
import sys
import time

import torch

from . import dispatch, selftest

SECTIONS = ("versions", "devices", "backends", "speed")
# The medium problem of the speed line: about a ViT-Tiny's parameters on a
# GPU; fewer on the CPU, where the reference then takes about a second.
SPEED_SIZES = {"cpu": 2**16, "cuda": 2**22}
SPEED_EXPERTS, SPEED_TASKS = 8, 4


def heading(name: str) -> None:
    print(f"\n== {name} ==")


def line(label: str, value: object) -> None:
    print(f"{label + ':':<26} {value}")


def version_of(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cuda_version(code: int) -> str:
    return f"{code // 1000}.{code % 1000 // 10}" if code else "none"


def compiled_module(name: str):
    try:
        return importlib.import_module(f"smat_kernels.{name}"), None
    except ImportError as error:
        return None, f"{type(error).__name__}: {error}"


def print_versions() -> None:
    heading("versions")
    line("python", f"{platform.python_version()} ({sys.executable})")
    line("smat", version_of("smat"))
    line("torch", f"{torch.__version__} (built with CUDA {torch.version.cuda or 'none'})")
    line("triton", version_of("triton"))
    line("triton mode", "interpreter (TRITON_INTERPRET=1)" if os.environ.get("TRITON_INTERPRET") == "1"
         else "compiled")
    for name in ("_cpu", "_cuda"):
        module, error = compiled_module(name)
        if module is None:
            line(f"smat_kernels.{name}", f"not importable ({error})")
            continue
        info = getattr(module, "build_info", {})
        line(f"smat_kernels.{name}", module.__file__)
        for key in ("compiler", "flags", "target", "vector_instructions"):
            if key in info:
                line(f"  {key}", info[key])
        if name == "_cpu" and hasattr(module, "isa"):
            line("  ISA path", isa_summary(module))
        if name == "_cuda":
            line("  CUDA runtime (linked)", cuda_version(module.runtime_version()))
            line("  CUDA driver", cuda_version(module.driver_version()))
    for variable in (dispatch.ENVIRONMENT_VARIABLE, selftest.ENVIRONMENT_VARIABLE, "SMAT_CPU_ISA", "TRITON_INTERPRET",
                     "CUDA_VISIBLE_DEVICES"):
        line(variable, os.environ.get(variable, "(unset)"))


def isa_summary(module) -> str:
    """The CPU kernels' instruction-set path: the active one and the others."""
    try:
        paths = module.isa()
    except ValueError as error:
        return f"none: {error}"
    return (f"{paths['active']} (runnable here: {', '.join(paths['runnable'])}; "
            f"built: {', '.join(paths['compiled'])}; SMAT_CPU_ISA forces one)")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for text in cpuinfo:
                if text.startswith("model name"):
                    return text.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_has_avx512() -> bool | None:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return " avx512f" in cpuinfo.read()
    except OSError:
        return None


def devices() -> list[torch.device]:
    found = [torch.device("cpu")]
    if torch.cuda.is_available():
        found += [torch.device("cuda", index) for index in range(torch.cuda.device_count())]
    return found


def print_devices() -> None:
    heading("devices")
    line("cpu", f"{cpu_name()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}")
    module, _ = compiled_module("_cpu")
    if module is not None and getattr(module, "build_info", {}).get("vector_instructions") == "AVX-512" \
            and cpu_has_avx512() is False:
        line("  warning", "smat_kernels._cpu was built with AVX-512 but this CPU has none: rebuild here "
                          "(pip install .) or with SMAT_CPU_ARCH=x86-64-v2")
    if not torch.cuda.is_available():
        line("cuda", "none (torch.cuda.is_available() is False)")
        return
    cuda, _ = compiled_module("_cuda")
    target = getattr(cuda, "build_info", {}).get("target", "") if cuda is not None else ""
    for device in devices()[1:]:
        properties = torch.cuda.get_device_properties(device)
        arch = f"sm_{properties.major}{properties.minor}"
        covered = "" if not target or arch in target else f"; smat_kernels._cuda was compiled for {target}"
        line(str(device), f"{properties.name}, {arch}, {properties.total_memory / 2**30:.0f} GiB, "
                          f"{properties.multi_processor_count} SMs{covered}")


def usable_devices(name: str) -> tuple[list[torch.device], list[str]]:
    """The devices backend `name` runs on here, and why not on the others."""
    usable, reasons = [], []
    for device in devices():
        reason = dispatch.rejection(name, device)
        (reasons.append(f"{device}: {reason}") if reason else usable.append(device))
    return usable, reasons


def print_backends(level: str) -> dict[tuple[str, str], selftest.Verdict]:
    """Availability and self-test verdicts; runs the self-tests not yet run."""
    heading("backends")
    line("self-test level", level if level != "off" else "quick (SMAT_SELFTEST=0 turns off only the automatic one)")
    verdicts = {}
    for name in dispatch.BACKEND_CLASSES:
        usable, reasons = usable_devices(name)
        if not usable:
            line(name, "not available here: " + "; ".join(reasons))
            continue
        backend = dispatch.get_backend(name)
        for device in usable:
            if not backend.self_tested:
                line(f"{name} on {device}", "available (the oracle: not self-tested)")
                continue
            verdict = (selftest.verdict(backend, device) if level == selftest.level_from_environment()
                       else selftest.run(backend, device, "quick" if level == "off" else level))
            verdicts[(name, str(device))] = verdict
            state = "available, " if verdict.passed else "DISABLED, "
            line(f"{name} on {device}", state + str(verdict))
    return verdicts


def merge_step_seconds(name: str, device: torch.device, n: int, repeats: int) -> float:
    """Median seconds of one merge forward + backward (sample mode, fp32)."""
    generator = torch.Generator().manual_seed(0)
    theta_pre = torch.randn(n, generator=generator).to(device)
    delta = torch.randn(n, generator=generator).to(device).requires_grad_()
    log_alpha = torch.randn(n, SPEED_EXPERTS, generator=generator).to(device).requires_grad_()
    alpha = torch.randn(SPEED_TASKS, SPEED_EXPERTS, generator=generator).to(device).requires_grad_()
    grad = torch.randn(SPEED_TASKS, n, generator=generator).to(device)
    from . import ops

    def step() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = ops.merge(theta_pre, delta, log_alpha, alpha, mode="sample", seed=1, offset=0, backend=name)
        torch.autograd.grad(out, (delta, log_alpha, alpha), grad)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    step()  # first call: compilation, autotuning, allocation
    return statistics.median(step() for _ in range(repeats))


def print_speed(verdicts: dict[tuple[str, str], selftest.Verdict], repeats: int) -> None:
    heading("speed")
    print(f"merge forward + backward, sample mode, fp32, M = {SPEED_EXPERTS}, B = {SPEED_TASKS}; "
          f"median of {repeats}")
    reference_seconds: dict[str, float] = {}
    for name in dispatch.BACKEND_CLASSES:
        if name == "reference":
            continue
        for device in usable_devices(name)[0]:
            verdict = verdicts.get((name, str(device)))
            if verdict is not None and not verdict.passed:
                line(f"{name} on {device}", "not measured: it failed its self-test")
                continue
            n = SPEED_SIZES.get(device.type, SPEED_SIZES["cpu"])
            try:
                seconds = merge_step_seconds(name, device, n, repeats)
                key = str(device)
                if key not in reference_seconds:
                    reference_seconds[key] = merge_step_seconds("reference", device, n, 1)
            except Exception as error:  # noqa: BLE001 - reported, not raised: the rest of the report still helps
                line(f"{name} on {device}", f"failed: {type(error).__name__}: {error}")
                continue
            baseline = reference_seconds[key]
            line(f"{name} on {device}", f"N = {n}: {seconds * 1e3:.2f} ms, reference {baseline * 1e3:.1f} ms: "
                                        f"{baseline / seconds:.1f}x the reference")


def forced_backend_problem(verdicts: dict[tuple[str, str], selftest.Verdict]) -> str | None:
    """Why the backend forced with SMAT_BACKEND is broken here, or None."""
    forced = os.environ.get(dispatch.ENVIRONMENT_VARIABLE)
    if not forced:
        return None
    if forced not in dispatch.BACKEND_CLASSES:
        return f"{dispatch.ENVIRONMENT_VARIABLE}={forced} names no backend (choose one of " \
               f"{', '.join(dispatch.BACKEND_CLASSES)})"
    usable, reasons = usable_devices(forced)
    if not usable:
        return f"{dispatch.ENVIRONMENT_VARIABLE}={forced}, which cannot run here: " + "; ".join(reasons)
    failed = [v for (name, _), v in verdicts.items() if name == forced and not v.passed]
    if failed:
        return f"{dispatch.ENVIRONMENT_VARIABLE}={forced}, which failed its self-test: " + "; ".join(map(str, failed))
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m smat_kernels.check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="run the full self-test (as SMAT_SELFTEST=full)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of the speed line (default 5)")
    parser.add_argument("--no-speed", action="store_true", help="skip the speed section")
    arguments = parser.parse_args(argv)
    level = "full" if arguments.full else selftest.level_from_environment()
    print("smat_kernels check")
    print_versions()
    print_devices()
    verdicts = print_backends(level)
    if not arguments.no_speed:
        print_speed(verdicts, arguments.repeats)
    heading("result")
    problem = forced_backend_problem(verdicts)
    if problem is not None:
        print(f"BROKEN: {problem}")
        return 1
    failed = [v for v in verdicts.values() if not v.passed]
    print(f"ok; {len(failed)} backend(s) disabled by their self-test" if failed else "ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
