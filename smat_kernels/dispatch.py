"""The one place that chooses a backend.

Order of precedence: the ``backend=`` argument of an op, then the
``SMAT_BACKEND`` environment variable, then the default order for the
tensors' device below. A backend that cannot run the request is rejected
with its reason; a forced backend that is rejected is an error listing why.

A compiled backend serves no call on a device before it has passed its
self-test there (smat_kernels.selftest, once per process and device). One
that fails is skipped, with one warning, and the next of the order serves.
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch

from . import selftest
from .backends.base import Backend

# name -> "module:class", imported on first use so that a backend whose
# dependencies are missing (triton, a compiled module) reports why instead of
# breaking `import smat_kernels`.
BACKEND_CLASSES = {
    "reference": "smat_kernels.backends.reference:ReferenceBackend",
    "cpu": "smat_kernels.backends.cpu:CpuBackend",
    "cuda": "smat_kernels.backends.cuda:CudaBackend",
    "triton": "smat_kernels.backends.triton:TritonBackend",
}

# Default order per device type: the fastest measured first, the reference
# last (it runs everywhere). README's benchmark tables are the evidence.
DEFAULT_ORDER = {
    "cpu": ("cpu", "reference"),
    "cuda": ("cuda", "triton", "reference"),
}

ENVIRONMENT_VARIABLE = "SMAT_BACKEND"

_instances: dict[str, Backend] = {}
_load_errors: dict[str, str] = {}


def get_backend(name: str) -> Backend | None:
    """The backend instance, or None when its module failed to import."""
    if name not in BACKEND_CLASSES:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_CLASSES)}")
    if name not in _instances and name not in _load_errors:
        module_name, class_name = BACKEND_CLASSES[name].split(":")
        try:
            _instances[name] = getattr(importlib.import_module(module_name), class_name)()
        except ImportError as error:
            _load_errors[name] = f"{type(error).__name__}: {error}"
    return _instances.get(name)


def rejection(name: str, device: torch.device | None = None) -> str | None:
    """Why backend `name` cannot run (on `device`), or None if it can."""
    backend = get_backend(name)
    if backend is None:
        return f"its module failed to import ({_load_errors[name]})"
    reason = backend.unavailable_reason()
    if reason is None and device is not None:
        reason = backend.unsupported_reason(device)
    return reason


def selftest_failure(name: str, device: torch.device) -> str | None:
    """Why backend `name` failed its self-test on `device` (running it on
    first use), or None when it passed or needs none."""
    backend = get_backend(name)
    if not backend.self_tested:
        return None
    verdict = _selftest_verdict(name, device)
    return None if verdict.passed else str(verdict)


# torch.compile calls this at trace time and keeps its result as a constant,
# instead of tracing the self-test's ops into the graph.
@torch.compiler.assume_constant_result
def _selftest_failure_constant(name: str, device: torch.device) -> str:
    return selftest_failure(name, device) or ""


def _selftest_verdict(name: str, device: torch.device) -> selftest.Verdict:
    return selftest.verdict(get_backend(name), device)


def backends() -> dict[str, str]:
    """Every backend and whether it can run here: "available" (with the
    self-test verdicts reached so far, one per device), or why not."""
    report = {}
    for name in BACKEND_CLASSES:
        reason = rejection(name)
        verdicts = selftest.known_verdicts(name) if reason is None else []
        failed = [v for v in verdicts if not v.passed]
        if reason is not None:
            report[name] = reason
        elif failed:
            report[name] = "disabled in this process: " + "; ".join(map(str, failed))
        else:
            report[name] = "; ".join(["available", *map(str, verdicts)])
    return report


def resolve(device: torch.device, requested: str | None = None) -> Backend:
    """The backend for tensors on `device`."""
    name = requested or os.environ.get(ENVIRONMENT_VARIABLE) or None
    if name is not None:
        source = "backend argument" if requested else f"{ENVIRONMENT_VARIABLE}={name}"
        reason = rejection(name, device) or _selftest_failure_constant(name, device) or None
        if reason is not None:
            raise ValueError(f"backend {name!r} (from the {source}) cannot run on {device}: {reason}. "
                             f"Available here: {available_summary(device)}")
        return get_backend(name)
    disabled = []
    for candidate in DEFAULT_ORDER.get(device.type, ("reference",)):
        if rejection(candidate, device) is not None:
            continue
        if _selftest_failure_constant(candidate, device):
            disabled.append(candidate)
            continue
        _warn_disabled(disabled, candidate, device)
        return get_backend(candidate)
    raise ValueError(f"no smat backend runs on {device}: {available_summary(device)}")


_warned: set[tuple[str, str]] = set()


def _warn_disabled(disabled: list[str], chosen: str, device: torch.device) -> None:
    """One warning per backend and device that failed its self-test."""
    for name in disabled:
        verdict = _selftest_verdict(name, device)
        if (name, verdict.device) in _warned:
            continue
        _warned.add((name, verdict.device))
        warnings.warn(f"smat_kernels: the {name!r} backend failed its self-test on {verdict.device} and is disabled "
                      f"in this process; {chosen!r} takes over. Failed: {verdict.op} ({verdict.case}): "
                      f"{verdict.error}. Please report it with the output of `python -m smat_kernels.check`.",
                      RuntimeWarning, stacklevel=4)


def available_summary(device: torch.device) -> str:
    return "; ".join(f"{name}: {rejection(name, device) or _known_failure(name, device) or 'ok'}"
                     for name in BACKEND_CLASSES)


def _known_failure(name: str, device: torch.device) -> str | None:
    """The self-test failure of `name` on `device` if one was reached (runs nothing)."""
    key = selftest.device_key(device)
    return next((str(v) for v in selftest.known_verdicts(name) if v.device == key and not v.passed), None)
