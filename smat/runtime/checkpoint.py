"""Checkpoints of a run: written atomically, read without executing code.

``<run>/checkpoints/step-<step>/`` holds ``trainable.safetensors`` (θ_δ,
log_α, the hypernetwork and λ), ``optimizer.pt`` (optimiser and schedule
states; read with ``weights_only=True``) and ``state.json`` (step, counters,
best validation accuracy). A checkpoint folder is built under a temporary
name and renamed when complete; the pointer files ``latest`` and ``best``
are replaced atomically afterwards. A failure at any point leaves every
earlier checkpoint intact, and the temporary files and folders of a write
that a kill interrupted are removed at the next start
(:func:`remove_temporaries`). θ_pre is saved once per run, as
``<run>/backbone.safetensors``. Every write failure (a full disk, a
read-only file system, a refused permission) is an
:class:`~smat.runtime.io.OutputError` naming the path and the fix.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .io import OutputError, atomic_directory, atomic_path, atomic_write_text, describe_os_error

STEP_DIR = re.compile(r"^step-(\d+)$")
OS_ERROR_CODE = re.compile(r"os error (\d+)")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or from another run's config."""


def checkpoint_dir(run: Path) -> Path:
    return Path(run) / "checkpoints"


def save(run: Path, step: int, tensors: dict[str, torch.Tensor], optimizer_state: dict, state: dict,
         best: bool = False, keep: int = 2) -> Path:
    folder = checkpoint_dir(run) / f"step-{step:07d}"
    if folder.exists():
        shutil.rmtree(folder)  # a checkpoint of this step from an earlier, interrupted attempt
    with atomic_directory(folder) as temporary:
        _save_tensors(tensors, temporary / "trainable.safetensors", folder)
        # through a file object: torch.save given a path reports a full disk as a RuntimeError, not an OSError
        with (temporary / "optimizer.pt").open("wb") as file:
            torch.save(optimizer_state, file)
        (temporary / "state.json").write_text(json.dumps(state, indent=2) + "\n")
    atomic_write_text(checkpoint_dir(run) / "latest", folder.name + "\n")
    if best:
        atomic_write_text(checkpoint_dir(run) / "best", folder.name + "\n")
    _prune(run, keep)
    return folder


def steps(run: Path) -> list[Path]:
    """The complete checkpoint folders of a run, oldest first (whatever its pointers say)."""
    folder = checkpoint_dir(run)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if STEP_DIR.match(p.name) and (p / "state.json").is_file())


def has_checkpoints(run: Path) -> bool:
    """Whether ``run`` holds any checkpoint or pointer: such a folder belongs to a run, even with its pointers
    deleted, and is never taken for a new one."""
    folder = checkpoint_dir(run)
    return folder.is_dir() and any(STEP_DIR.match(p.name) or p.name in ("latest", "best")
                                   for p in folder.iterdir())


def resolve(path: Path, which: str = "latest") -> Path:
    """A checkpoint folder from a run folder (its ``latest`` or ``best``), or a checkpoint folder itself.

    Without a ``latest`` pointer (deleted, or lost with a disk) the newest complete checkpoint serves."""
    path = Path(path).expanduser()
    if (path / "state.json").is_file():
        return path
    pointer = checkpoint_dir(path) / which
    if not pointer.is_file():
        if which == "latest" and steps(path):
            return steps(path)[-1]
        raise CheckpointError(f"{path} has no {which} checkpoint (expected {pointer}); give a run folder "
                              f"written by `python -m smat.train` or a checkpoints/step-… folder")
    folder = checkpoint_dir(path) / pointer.read_text().strip()
    if not (folder / "state.json").is_file():
        if which == "latest" and steps(path):
            return steps(path)[-1]
        raise CheckpointError(f"{pointer} points at {folder}, which is missing or incomplete")
    return folder


def load(folder: Path, map_location="cpu", optimizer: bool = True) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(tensors, optimizer_state, state) of a checkpoint folder; nothing in it is executed.

    ``optimizer=False`` leaves ``optimizer.pt`` unread (an empty dict in its place): evaluating a checkpoint
    does not need it, so a missing or damaged one does not stop an evaluation."""
    try:
        tensors = load_file(str(folder / "trainable.safetensors"), device=str(map_location))
        state = json.loads((folder / "state.json").read_text())
        optimizer_file = folder / "optimizer.pt"
        optimizer_state = (torch.load(optimizer_file, map_location=map_location, weights_only=True)
                           if optimizer and optimizer_file.is_file() else {})
    # a damaged file: safetensors and torch.load(weights_only=True) raise their own error types
    except (OSError, ValueError, RuntimeError, SafetensorError, pickle.UnpicklingError) as error:
        raise CheckpointError(f"cannot read checkpoint {folder}: {error}") from None
    return tensors, optimizer_state, state


def save_backbone(run: Path, state_dict: dict[str, torch.Tensor]) -> Path:
    path = Path(run) / "backbone.safetensors"
    with atomic_path(path) as temporary:
        _save_tensors(state_dict, temporary, path)
    return path


def remove_temporaries(run: Path) -> list[Path]:
    """Remove what interrupted writes left behind (``.<name>.….tmp`` files and folders in the run folder and
    its checkpoints folder); returns what was removed. Call it only while holding the run's lock: the
    temporaries of a running writer look the same."""
    removed = []
    for folder in (Path(run), checkpoint_dir(run)):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if path.name.startswith(".") and path.name.endswith(".tmp"):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def _save_tensors(tensors: dict[str, torch.Tensor], temporary: Path, destination: Path) -> None:
    """safetensors' save_file, its I/O failures (it raises them as SafetensorError) as OutputError."""
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(temporary))
    except SafetensorError as error:
        code = OS_ERROR_CODE.search(str(error))
        if code is None:
            raise OutputError(f"cannot write {destination}: {error}") from None
        number = int(code.group(1))
        raise OutputError(describe_os_error(OSError(number, os.strerror(number)), destination)) from None


def _prune(run: Path, keep: int) -> None:
    folder = checkpoint_dir(run)
    pinned = {(folder / name).read_text().strip() for name in ("latest", "best") if (folder / name).is_file()}
    steps = sorted(p for p in folder.iterdir() if STEP_DIR.match(p.name))
    for old in steps[:-keep] if keep > 0 else steps:
        if old.name not in pinned:
            shutil.rmtree(old, ignore_errors=True)
