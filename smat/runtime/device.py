"""Device, precision and task parallelism: chosen once here for training, evaluation and analysis."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from ..config import Config, ConfigError


def resolve_device(choice: str, local_rank: int = 0) -> torch.device:
    """``auto``: this process's GPU where one is visible, else the CPU; anything else as torch reads it."""
    if choice == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(choice)
    except RuntimeError:
        raise ConfigError(f"device={choice!r} is not a device torch knows; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA GPU is visible; use device=cpu or device=auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device={choice!r} but {torch.cuda.device_count()} CUDA GPU(s) are visible "
                          f"(cuda:0 to cuda:{torch.cuda.device_count() - 1}); use one of them, or device=auto")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device={choice!r}: smat runs on cpu or cuda; use device=auto, cpu or cuda")
    return device


def precision_dtype(config: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.precision`` on ``device``; None: fp32 (no autocast)."""
    choice = config.train.precision
    if choice == "fp32" or (choice == "auto" and device.type != "cuda"):
        return None
    if choice == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[choice]


def autocast_to(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on ``device``; a no-op for None (fp32)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def autocast(config: Config | None, device: torch.device):
    """The run's mixed-precision context on ``device`` (a no-op in fp32 or without a config)."""
    return autocast_to(device, precision_dtype(config, device) if config is not None else None)


def task_parallel(config: Config) -> str:
    """How the backbones of a meta-batch's tasks run: 'loop' or 'vmap'.

    ``auto`` is the loop: benchmarks/test_bench_train.py measured torch.func.vmap no faster on the CPU
    (1.0× at one thread; slower at two, as PyTorch has no vmap rule for CPU attention). ``vmap`` stays
    available (it needs tasks of equal shapes: the fixed protocol)."""
    choice = config.train.task_parallel
    return "loop" if choice == "auto" else choice
