"""Device choices (smat.runtime.device.resolve_device): every impossible one is one ConfigError naming the fix."""

from __future__ import annotations

import pytest
import torch

from smat.config import ConfigError
from smat.runtime.device import resolve_device


def test_auto_and_cpu():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize(("choice", "message"), [
    ("bogus", "not a device torch knows"),
    ("mps", "smat runs on cpu or cuda"),
])
def test_unknown_devices_are_one_error(choice, message):
    with pytest.raises(ConfigError, match=message):
        resolve_device(choice)


def test_cuda_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA GPU is visible; use device=cpu"):
        resolve_device("cuda")


def test_a_gpu_index_that_does_not_exist(monkeypatch):
    """cuda:N past the visible GPUs is named before anything runs on it (issue 22)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"device='cuda:2' but 2 CUDA GPU\(s\) are visible \(cuda:0 to cuda:1\)"):
        resolve_device("cuda:2")
