"""Argument checks shared by every op: a bad tensor is a clear Python error
naming the argument and the fix, never a crash inside a kernel."""

from __future__ import annotations

import math
import numbers

import torch

THETA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_EXPERTS = 32
MAX_KEY = 2**63


def check_tensor(name: str, value, *, dims: int, dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.layout != torch.strided:
        raise ValueError(f"{name} must be a dense tensor, got layout {value.layout}; call {name}.to_dense() first")
    if value.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(value.shape)}")
    if value.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {allowed}; got {str(value.dtype).replace('torch.', '')} "
                        f"(convert it with .to(torch.float32) or the θ dtype)")
    if not value.is_contiguous():
        raise ValueError(f"{name} must be contiguous; call {name}.contiguous() first")
    return value


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    first_name, first = next(iter(devices.items()))
    for name, device in devices.items():
        if device != first:
            raise ValueError(f"{name} is on {device} but {first_name} is on {first}: move all inputs to one device")
    return first


def check_num_experts(num_experts: int, name: str = "log_alpha") -> None:
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"{name} has M = {num_experts} experts; smat supports 1 ≤ M ≤ {MAX_EXPERTS}")


def check_theta_pair(theta_pre: torch.Tensor, delta: torch.Tensor) -> int:
    check_tensor("theta_pre", theta_pre, dims=1, dtypes=THETA_DTYPES)
    check_tensor("delta", delta, dims=1, dtypes=THETA_DTYPES)
    if delta.dtype != theta_pre.dtype:
        raise TypeError(f"delta has dtype {delta.dtype} but theta_pre has {theta_pre.dtype}: use one θ dtype")
    if delta.shape != theta_pre.shape:
        raise ValueError(f"delta has shape {tuple(delta.shape)} but theta_pre has {tuple(theta_pre.shape)}: "
                         f"both are the flat [N] parameter buffer")
    return theta_pre.shape[0]


def check_log_alpha(log_alpha: torch.Tensor, n: int | None = None) -> tuple[int, int]:
    check_tensor("log_alpha", log_alpha, dims=2, dtypes=(torch.float32,))
    rows, num_experts = log_alpha.shape
    if n is not None and rows != n:
        raise ValueError(f"log_alpha has {rows} rows but theta has N = {n} elements: log_alpha must be [N, M]")
    check_num_experts(num_experts)
    return rows, num_experts


def check_density_rows(rows: int) -> None:
    if rows == 0:
        raise ValueError("log_alpha has no rows (N = 0): the density of an expert over no elements is undefined; "
                         "give at least one element")


def check_alpha(alpha: torch.Tensor, num_experts: int) -> int:
    check_tensor("alpha", alpha, dims=2, dtypes=(torch.float32,))
    batch, alpha_experts = alpha.shape
    if batch < 1:
        raise ValueError("alpha must hold at least one task: shape [B, M] with B ≥ 1")
    if alpha_experts != num_experts:
        raise ValueError(f"alpha has {alpha_experts} experts per task but there are M = {num_experts}: "
                         f"alpha must be [B, M]")
    return batch


def check_key(seed, offset) -> None:
    for name, value in (("seed", seed), ("offset", offset)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if not 0 <= value < MAX_KEY:
            raise ValueError(f"{name} must be in [0, 2^63), got {value}")


def check_hard_concrete(beta: float, gamma: float, zeta: float) -> None:
    for name, value in (("beta", beta), ("gamma", gamma), ("zeta", zeta)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
    if not beta > 0:
        raise ValueError(f"beta (the hard-concrete temperature) must be > 0, got {beta}")
    if not gamma < 0 < 1 < zeta:
        raise ValueError(f"the stretch interval must satisfy gamma < 0 < 1 < zeta, got gamma={gamma}, zeta={zeta}")
