"""Checkpoints of a run: written atomically, read without executing code.

``<run>/checkpoints/step-<step>/`` holds ``trainable.safetensors`` (θ_δ,
log_α, the hypernetwork and λ), ``optimizer.pt`` (optimiser and schedule
states; read with ``weights_only=True``) and ``state.json`` (step, counters,
best validation accuracy). A checkpoint folder is built under a temporary
name and renamed when complete; the pointer files ``latest`` and ``best``
are replaced atomically afterwards. A failure at any point leaves every
earlier checkpoint intact. θ_pre is saved once per run, as
``<run>/backbone.safetensors``.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .io import atomic_directory, atomic_path, atomic_write_text

STEP_DIR = re.compile(r"^step-(\d+)$")


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
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                  str(temporary / "trainable.safetensors"))
        torch.save(optimizer_state, temporary / "optimizer.pt")
        (temporary / "state.json").write_text(json.dumps(state, indent=2) + "\n")
    atomic_write_text(checkpoint_dir(run) / "latest", folder.name + "\n")
    if best:
        atomic_write_text(checkpoint_dir(run) / "best", folder.name + "\n")
    _prune(run, keep)
    return folder


def resolve(path: Path, which: str = "latest") -> Path:
    """A checkpoint folder from a run folder (its ``latest`` or ``best``), or a checkpoint folder itself."""
    path = Path(path).expanduser()
    if (path / "state.json").is_file():
        return path
    pointer = checkpoint_dir(path) / which
    if not pointer.is_file():
        raise CheckpointError(f"{path} has no {which} checkpoint (expected {pointer}); give a run folder "
                              f"written by `python -m smat.train` or a checkpoints/step-… folder")
    folder = checkpoint_dir(path) / pointer.read_text().strip()
    if not (folder / "state.json").is_file():
        raise CheckpointError(f"{pointer} points at {folder}, which is missing or incomplete")
    return folder


def load(folder: Path, map_location="cpu") -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(tensors, optimizer_state, state) of a checkpoint folder; nothing in it is executed."""
    try:
        tensors = load_file(str(folder / "trainable.safetensors"), device=str(map_location))
        state = json.loads((folder / "state.json").read_text())
        optimizer_file = folder / "optimizer.pt"
        optimizer_state = (torch.load(optimizer_file, map_location=map_location, weights_only=True)
                           if optimizer_file.is_file() else {})
    # a damaged file: safetensors and torch.load(weights_only=True) raise their own error types
    except (OSError, ValueError, RuntimeError, SafetensorError, pickle.UnpicklingError) as error:
        raise CheckpointError(f"cannot read checkpoint {folder}: {error}") from None
    return tensors, optimizer_state, state


def save_backbone(run: Path, state_dict: dict[str, torch.Tensor]) -> Path:
    path = Path(run) / "backbone.safetensors"
    with atomic_path(path) as temporary:
        save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(temporary))
    return path


def _prune(run: Path, keep: int) -> None:
    folder = checkpoint_dir(run)
    pinned = {(folder / name).read_text().strip() for name in ("latest", "best") if (folder / name).is_file()}
    steps = sorted(p for p in folder.iterdir() if STEP_DIR.match(p.name))
    for old in steps[:-keep] if keep > 0 else steps:
        if old.name not in pinned:
            shutil.rmtree(old, ignore_errors=True)
