"""smat_kernels: the kernel library of SMAT (Sparse MetA-Tuning).

Ops (see each docstring for shapes and dtypes):
    merge             θ[b] = θ_pre + θ_δ ⊙ Σ_m α[b, m] z[b, :, m], differentiable
    expected_density  mean P(z ≠ 0) per expert (the L0 term), differentiable
    hard_density      fraction of deterministic masks > 0 per expert
    pack              binarised experts on their union support (deployment)
    packed_merge      the merge from packed experts

Backends: ``reference`` (plain PyTorch), ``cpu`` (C++/OpenMP), ``cuda`` and
``triton``; chosen by device, or forced with ``backend=`` or the
``SMAT_BACKEND`` environment variable. ``backends()`` tells which can run here.
A compiled backend serves no call on a device before it has passed its
self-test there (``selftest.py``; ``SMAT_SELFTEST=0`` turns it off), and
``python -m smat_kernels.check`` reports the whole stack.
"""

from __future__ import annotations

import warnings

from . import backends, reference
from .dispatch import rejection
from .ops import expected_density, hard_density, merge, pack, packed_merge
from .packed import PackedExperts
from .reference import BETA, GAMMA, MODES, ZETA, counters_per_call

__all__ = [
    "BETA",
    "GAMMA",
    "MODES",
    "ZETA",
    "PackedExperts",
    "backends",
    "counters_per_call",
    "expected_density",
    "hard_density",
    "merge",
    "pack",
    "packed_merge",
    "reference",
]

_cpu_problem = rejection("cpu")
if _cpu_problem is not None:
    warnings.warn(f"smat_kernels: the compiled CPU kernels are not available ({_cpu_problem}); falling back to "
                  f"the slow reference implementation. Reinstall with `pip install .` from the smat source tree "
                  f"to build them.", RuntimeWarning, stacklevel=2)
