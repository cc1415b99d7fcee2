"""The tolerances of the kernel tests: the one table of
smat_kernels/tolerances.py, which the backends' self-test uses too."""

from __future__ import annotations

import torch

from smat_kernels.tolerances import TOLERANCES, Tolerance, mismatch, normalised_error

__all__ = ["TOLERANCES", "Tolerance", "assert_close", "normalised_error"]


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor, *,
                 low_precision: torch.Tensor | None = None, where: torch.Tensor | None = None) -> None:
    """Check a kernel result against the fp32 reference ``expected``
    (arguments as smat_kernels.tolerances.mismatch)."""
    failure = mismatch(name, actual, expected, scale, low_precision=low_precision, where=where)
    assert failure is None, failure
