"""Shared pytest setup of smat's tests.

GPU tests carry ``@pytest.mark.gpu`` and are skipped here, at setup time,
where there is no CUDA device: nothing asks torch about CUDA at import or
collection time, so collecting the suite never initialises a GPU.
"""

from __future__ import annotations

import pytest


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") is not None:
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA device")
