"""The tolerances of every comparison with the reference, in one table: the
kernel tests (tests/kernel_tests) and the backends' self-test (selftest.py) both
judge results with :func:`mismatch`.

Every comparison normalises the error of an entry by its ``scale``: the sum
of the absolute values of the terms that make up the entry (for θ = θ_pre +
θ_δ·Σ_m α_m z_m that is |θ_pre| + |θ_δ|·Σ_m |α_m|; for ∂α, a sum over N, it
is Σ_j |g_j θ_δ,j|). A sum of a million terms is then held to the same
relative standard as a single product, and an entry whose terms are all zero
must be exactly zero.

* fp32 results: max normalised error ≤ ``floor``.
* bf16/fp16 θ (flash-attention's rule): the kernel's max normalised error
  against the fp32 reference may be at most ``low_precision_factor`` times the
  max normalised error of the reference itself run in that low precision,
  plus ``floor``.

The floor covers the only legitimate fp32 difference between backends: the
compiled kernels evaluate the hard-concrete sigmoid as 1/(1 + ((1−u)/u)^(1/β)·
exp(−log_α/β)) and the reference as sigmoid((log u − log(1−u) + log_α)/β),
a few float32 ulps apart (measured: below 1e-6 of the scale). A wrong expert,
counter, clamp or gradient term moves the normalised error by 1e-3 or more.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import reference


@dataclass(frozen=True)
class Tolerance:
    floor: float
    low_precision_factor: float | None  # None: compare with the floor alone


TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float32: Tolerance(floor=1e-5, low_precision_factor=None),
    torch.bfloat16: Tolerance(floor=1e-5, low_precision_factor=2.0),
    torch.float16: Tolerance(floor=1e-5, low_precision_factor=2.0),
}


def normalised_error(actual: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """|actual − expected| / scale in float64; an entry with scale 0 must match exactly."""
    difference = (actual.detach().double() - expected.detach().double()).abs()
    return difference / scale.detach().double().clamp_min(1e-300)


def mismatch(name: str, actual: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor, *,
             low_precision: torch.Tensor | None = None, where: torch.Tensor | None = None) -> str | None:
    """Why a kernel result is not within tolerance of the fp32 reference
    ``expected``, or None when it is.

    Args:
        name: what is compared, for the message.
        actual: the kernel's result, in its own dtype (which picks the tolerance).
        expected: the reference computed in float32 from the same input values.
        scale: Σ |terms| of each entry, broadcastable to ``expected``.
        low_precision: for bf16/fp16 results, the reference run in that dtype.
        where: optional boolean mask of the entries to compare (the others are
            excluded, e.g. gradients within rounding of a clamp kink).
    """
    if actual.shape != expected.shape:
        return f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if actual.dtype not in TOLERANCES:
        return f"{name}: unexpected dtype {actual.dtype}"
    tolerance = TOLERANCES[actual.dtype]
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    scale = scale.detach().cpu()
    where = where.cpu() if where is not None else None
    error = normalised_error(actual, expected, scale)
    bound = tolerance.floor
    if tolerance.low_precision_factor is not None:
        if low_precision is None:
            return f"{name}: a {actual.dtype} result needs the low-precision reference"
        if low_precision.dtype != actual.dtype:
            return f"{name}: low-precision reference has dtype {low_precision.dtype}"
        reference_error = normalised_error(low_precision.cpu(), expected, scale)
        if where is not None:
            reference_error = reference_error[where]
        bound += tolerance.low_precision_factor * float(reference_error.max()) if reference_error.numel() else 0.0
    if where is not None:
        error = torch.where(where, error, torch.zeros_like(error))
    if error.numel() == 0:
        return None
    worst = int(torch.nan_to_num(error, nan=float("inf")).argmax())
    worst_error = float(error.flatten()[worst])
    if worst_error <= bound:
        return None
    return (f"{name}: normalised error {worst_error:.3g} > bound {bound:.3g} at flat index {worst}: "
            f"actual {float(actual.flatten()[worst])!r}, expected {float(expected.flatten()[worst])!r}, "
            f"scale {float(torch.broadcast_to(scale, expected.shape).flatten()[worst])!r}")


def merge_scales(inputs: dict[str, torch.Tensor], mode: str) -> dict[str, torch.Tensor]:
    """Σ |terms| of every output entry of a merge and its backward, with |z| ≤ 1 and |dz/dlog_α| ≤ (ζ − γ)/(4T):
    the scale the errors are measured against. ``inputs``: theta_pre, delta, log_alpha, alpha and grad."""
    theta_pre, delta = inputs["theta_pre"].float().abs(), inputs["delta"].float().abs()
    alpha, grad = inputs["alpha"].abs(), inputs["grad"].float().abs()
    alpha_sum = alpha.sum(dim=1, keepdim=True)
    grad_delta = grad * delta
    inverse_temperature = 1.0 if mode == "deterministic" else 1.0 / reference.BETA
    largest_dz = (reference.ZETA - reference.GAMMA) * inverse_temperature / 4
    return {
        "out": theta_pre + delta * alpha_sum,
        "theta_pre": grad.sum(dim=0),
        "delta": (grad * alpha_sum).sum(dim=0),
        "log_alpha": grad_delta.t() @ alpha * largest_dz,
        "alpha": grad_delta.sum(dim=1, keepdim=True).expand_as(inputs["alpha"]),
    }
