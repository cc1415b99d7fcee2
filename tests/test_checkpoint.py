"""Checkpoints and the output folder: atomic writes that survive a full disk, pruning, pointers, clear
errors for a missing, corrupt or foreign checkpoint, and for an output folder that cannot be written."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from smat.config import load_config
from smat.model import check_compatible
from smat.runtime import checkpoint, io
from smat.runtime.io import OutputError
from smat.train import main


def tensors(step: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return {"delta": torch.randn(97, generator=generator), "log_alpha": torch.randn(97, 3, generator=generator),
            "lambda": torch.rand(3, generator=generator, dtype=torch.float64)}


def optimizer_state(step: int) -> dict:
    return {"optimizers": {"delta": {"state": {0: {"momentum_buffer": torch.full((97,), float(step))}},
                                     "param_groups": [{"lr": 1e-4, "params": [0]}]}}}


def save(run: Path, step: int, best: bool = False, keep: int = 2) -> Path:
    return checkpoint.save(run, step, tensors(step), optimizer_state(step), {"step": step}, best=best, keep=keep)


def assert_checkpoint(folder: Path, step: int) -> None:
    found, optimizer, state = checkpoint.load(folder)
    assert {key: value for key, value in state.items() if key != "files"} == {"step": step}
    assert sorted(state["files"]) == ["optimizer.pt", "trainable.safetensors"]  # their SHA-256, checked on load
    assert sorted(found) == sorted(tensors(step))
    assert all(torch.equal(found[name], value) for name, value in tensors(step).items())
    assert torch.equal(optimizer["optimizers"]["delta"]["state"][0]["momentum_buffer"],
                       optimizer_state(step)["optimizers"]["delta"]["state"][0]["momentum_buffer"])


def leftovers(run: Path) -> list[str]:
    """Temporary files and folders of interrupted writes (their names start with a dot)."""
    return sorted(p.name for p in checkpoint.checkpoint_dir(run).iterdir() if p.name.startswith("."))


def test_round_trip_and_pointers(tmp_path):
    folder = save(tmp_path, 3, best=True)
    assert folder == checkpoint.checkpoint_dir(tmp_path) / "step-0000003"
    assert checkpoint.resolve(tmp_path) == folder == checkpoint.resolve(tmp_path, "best")
    assert checkpoint.resolve(folder) == folder
    assert_checkpoint(folder, 3)
    assert leftovers(tmp_path) == []


def test_pruning_keeps_the_newest_and_the_best(tmp_path):
    save(tmp_path, 1, best=True)
    for step in (2, 3, 4):
        save(tmp_path, step)
    names = sorted(p.name for p in checkpoint.checkpoint_dir(tmp_path).glob("step-*"))
    assert names == ["step-0000001", "step-0000003", "step-0000004"]
    assert checkpoint.resolve(tmp_path).name == "step-0000004"
    assert checkpoint.resolve(tmp_path, "best").name == "step-0000001"


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("failing", ["trainable.safetensors", "optimizer.pt", "latest"])
def test_a_failed_write_leaves_the_earlier_checkpoint_intact(tmp_path, monkeypatch, failing):
    save(tmp_path, 1)
    if failing == "trainable.safetensors":
        monkeypatch.setattr(checkpoint, "save_file", no_space)
    elif failing == "optimizer.pt":
        monkeypatch.setattr(checkpoint.torch, "save", no_space)
    else:
        replace = os.replace
        monkeypatch.setattr(io.os, "replace", lambda source, target: no_space() if Path(target).name == "latest"
                            else replace(source, target))
    with pytest.raises(OutputError) as error:
        save(tmp_path, 2)
    message = str(error.value)
    assert "no space left on the device" in message and "free some space" in message
    assert str(checkpoint.checkpoint_dir(tmp_path)) in message

    monkeypatch.undo()
    assert checkpoint.resolve(tmp_path).name == "step-0000001"
    assert_checkpoint(checkpoint.resolve(tmp_path), 1)
    assert leftovers(tmp_path) == []
    if failing != "latest":
        assert not (checkpoint.checkpoint_dir(tmp_path) / "step-0000002").exists()
    save(tmp_path, 2)  # once there is space again, the same step can be written
    assert_checkpoint(checkpoint.resolve(tmp_path), 2)


def test_missing_and_broken_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="has no latest checkpoint"):
        checkpoint.resolve(tmp_path)
    folder = save(tmp_path, 1)
    for name in ("optimizer.pt", "trainable.safetensors", "state.json"):
        (folder / name).write_bytes(b"damaged")
        with pytest.raises(checkpoint.CheckpointError, match="cannot read checkpoint"):
            checkpoint.load(folder)
    (folder / "state.json").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="missing or incomplete"):
        checkpoint.resolve(tmp_path)


def test_a_checkpoint_of_another_config_is_refused(tmp_path):
    config = load_config(None, ["model.num_experts=4"])
    model = SimpleNamespace(layout=SimpleNamespace(num_elements=97), num_experts=4)
    state = {"method": "smat", "backbone": "builtin", "num_elements": 97, "num_experts": 8}
    with pytest.raises(checkpoint.CheckpointError, match="num_experts: checkpoint 8 vs config 4"):
        check_compatible(state, model, config, tmp_path)
    check_compatible({**state, "num_experts": 4}, model, config, tmp_path)


# --------------------------------------------------------------------------
# the output folder, checked before any work
# --------------------------------------------------------------------------


def test_an_output_folder_under_a_file_exits_with_2(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main([f"output={blocker / 'run'}", "pretrain.epochs=1"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: cannot write") and str(blocker / "run") in error


def test_an_unwritable_output_folder_exits_with_2(tmp_path, capsys, monkeypatch):
    """Permission bits do not stop root, so the test write itself is refused."""
    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(io.tempfile, "NamedTemporaryFile", refused)
    assert main([f"output={tmp_path / 'run'}", "pretrain.epochs=1"]) == 2
    error = capsys.readouterr().err
    assert f"cannot write to {tmp_path / 'run'} (permission denied or read-only)" in error
    assert not (tmp_path / "run" / "config.yaml").exists()
