"""The implementations of smat's ops, one module each: ``reference`` (plain PyTorch, the oracle), ``cpu``
(the compiled C++ module), ``cuda`` and ``triton``, over the interface of ``base``.

The package is also callable: ``smat_kernels.backends()`` tells which backend can run here and why not
(:func:`smat_kernels.dispatch.backends`). It is one object, so that ``import smat_kernels.backends.cpu as
cpu`` and ``smat_kernels.backends()`` both work.
"""

from __future__ import annotations

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from ..dispatch import backends  # dispatch imports this package's modules: imported when called

        return backends(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
