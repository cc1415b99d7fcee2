"""The one place that chooses a backend.

Order of precedence: the ``backend=`` argument of an op, then the
``SMAT_BACKEND`` environment variable, then the default order for the
tensors' device below. A backend that cannot run the request is rejected
with its reason; a forced backend that is rejected is an error listing why.
"""

from __future__ import annotations

import importlib
import os

import torch

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


def backends() -> dict[str, str]:
    """Every backend and whether it can run here: "available" or the reason."""
    return {name: rejection(name) or "available" for name in BACKEND_CLASSES}


def resolve(device: torch.device, requested: str | None = None) -> Backend:
    """The backend for tensors on `device`."""
    name = requested or os.environ.get(ENVIRONMENT_VARIABLE) or None
    if name is not None:
        source = "backend argument" if requested else f"{ENVIRONMENT_VARIABLE}={name}"
        reason = rejection(name, device)
        if reason is not None:
            raise ValueError(f"backend {name!r} (from the {source}) cannot run on {device}: {reason}. "
                             f"Available here: {available_summary(device)}")
        return get_backend(name)
    for candidate in DEFAULT_ORDER.get(device.type, ("reference",)):
        if rejection(candidate, device) is None:
            return get_backend(candidate)
    raise ValueError(f"no smat backend runs on {device}: {available_summary(device)}")


def available_summary(device: torch.device) -> str:
    return "; ".join(f"{name}: {rejection(name, device) or 'ok'}" for name in BACKEND_CLASSES)
