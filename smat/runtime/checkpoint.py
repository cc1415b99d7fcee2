"""Checkpoints of a run: written atomically, read without executing code.

``<run>/checkpoints/step-<step>/`` holds ``trainable.safetensors`` (θ_δ,
log_α, the hypernetwork and λ), ``optimizer.pt`` (optimiser and schedule
states; read with ``weights_only=True``) and ``state.json`` (step, counters,
best validation accuracy, the SHA-256 of the other two files, and the
run's config as trained, see :func:`config_record`). Reading checks every
part, so that a damaged, truncated or foreign file is one
:class:`CheckpointError` naming it, never a traceback or a silent
evaluation of garbage. A checkpoint folder is built under a temporary
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

import hashlib
import json
import math
import os
import re
import shutil
import warnings
from io import BytesIO
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import Config, flatten_keys
from .io import OutputError, atomic_directory, atomic_path, atomic_write_text, current_umask, describe_os_error

STEP_DIR = re.compile(r"^step-(\d+)$")
TENSORS, OPTIMIZER, STATE, BACKBONE = "trainable.safetensors", "optimizer.pt", "state.json", "backbone.safetensors"
OS_ERROR_CODE = re.compile(r"os error (\d+)")


# what a resume may change: where and how fast it runs, and what its evaluation does, never what it trains
# (a key ending in '.' stands for its whole section); config_files records the YAML files of the start
RESUMABLE = ("device", "output", "data.num_workers", "keep_checkpoints", "evaluate.", "config_files")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or from another run's config."""


class RecoveryWarning(UserWarning):
    """A damaged part of a run folder was worked around (a lost pointer, a partial last log line)."""


PACKAGE = Path(__file__).resolve().parent.parent  # smat/


def _format_warning(message, category, filename, lineno, line=None, _default=warnings.formatwarning):
    """smat's warnings (a RecoveryWarning, a skipped image) read as the commands' other lines do ("warning: …"),
    not as a source location and line, which look like a crash; other libraries' keep Python's format."""
    ours = isinstance(category, type) and issubclass(category, RecoveryWarning)
    try:
        ours = ours or Path(filename).resolve().is_relative_to(PACKAGE)
    except (OSError, ValueError, TypeError):
        pass
    return f"warning: {message}\n" if ours else _default(message, category, filename, lineno, line)


warnings.formatwarning = _format_warning


def checkpoint_dir(run: Path) -> Path:
    return Path(run) / "checkpoints"


def save(run: Path, step: int, tensors: dict[str, torch.Tensor], optimizer_state: dict, state: dict,
         best: bool = False, keep: int = 2) -> Path:
    """Write checkpoint ``step`` of ``run`` (its files' SHA-256 recorded in ``state.json``), then its pointers."""
    folder = checkpoint_dir(run) / f"step-{step:07d}"
    if folder.exists():
        shutil.rmtree(folder)  # a checkpoint of this step from an earlier, interrupted attempt
    with atomic_directory(folder) as temporary:
        save_tensors(tensors, temporary / TENSORS, folder)
        # serialised in memory, then written as bytes: torch's zip writer reports a full disk as a RuntimeError
        # ("enforce fail at inline_container.cc"), a plain write as the OSError it is
        buffer = BytesIO()
        torch.save(optimizer_state, buffer)
        (temporary / OPTIMIZER).write_bytes(buffer.getbuffer())
        digests = {name: file_digest(temporary / name) for name in (TENSORS, OPTIMIZER)}
        if (Path(run) / BACKBONE).is_file():
            digests[BACKBONE] = file_digest(Path(run) / BACKBONE)
        (temporary / STATE).write_text(json.dumps({**state, "files": digests}, indent=2) + "\n")
    atomic_write_text(checkpoint_dir(run) / "latest", folder.name + "\n")
    if best:
        atomic_write_text(checkpoint_dir(run) / "best", folder.name + "\n")
    _prune(run, keep)
    return folder


def config_record(config: Config) -> dict:
    """{dotted key: value} of everything in ``config`` that a resume may not change: a checkpoint's state.json
    keeps it, so that a config.yaml that was damaged, truncated or replaced is noticed when the run is read."""
    flat = flatten_keys(json.loads(json.dumps(config.to_dict())))
    return {key: value for key, value in flat.items() if not resumable(key)}


def resumable(key: str) -> bool:
    return key in RESUMABLE or key.startswith(tuple(k for k in RESUMABLE if k.endswith(".")))


def check_config(state: dict, config: Config, folder: Path, config_path: Path) -> None:
    """Raise :class:`CheckpointError` where ``config`` differs from the config the checkpoint was trained with
    (``state['config']``; checkpoints written before it was recorded pass)."""
    recorded = state.get("config")
    if not isinstance(recorded, dict):
        return
    current = config_record(config)
    differing = [f"{key}: {current.get(key)!r} there, {value!r} in the checkpoint" for key, value in recorded.items()
                 if current.get(key, value) != value]
    if differing:
        shown = "; ".join(differing[:4]) + (f"; … ({len(differing)} keys)" if len(differing) > 4 else "")
        raise CheckpointError(f"{config_path} does not match the config checkpoint {folder} was trained with "
                              f"({shown}): it was changed, damaged or comes from another run. Restore it (the "
                              f"values as trained are under 'config' in {folder / STATE})")


def file_digest(path: Path) -> str:
    """SHA-256 of a file, read in blocks (checkpoints reach gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def steps(run: Path) -> list[Path]:
    """The complete checkpoint folders of a run, oldest first (whatever its pointers say)."""
    folder = checkpoint_dir(run)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if STEP_DIR.match(p.name) and (p / STATE).is_file())


def has_checkpoints(run: Path) -> bool:
    """Whether ``run`` holds any checkpoint or pointer: such a folder belongs to a run, even with its pointers
    deleted, and is never taken for a new one."""
    folder = checkpoint_dir(run)
    return folder.is_dir() and any(STEP_DIR.match(p.name) or p.name in ("latest", "best")
                                   for p in folder.iterdir())


def pointed(run: Path, which: str) -> Path | None:
    """The complete checkpoint folder that ``checkpoints/<which>`` names, or None (pointer missing, unreadable,
    not a step name, or naming a folder that is missing or incomplete)."""
    pointer = checkpoint_dir(run) / which
    try:
        name = pointer.read_text().strip()
    except (OSError, ValueError):  # missing, a folder, or bytes that are not text
        return None
    folder = checkpoint_dir(run) / name
    return folder if STEP_DIR.match(name) and (folder / STATE).is_file() else None


def resolve(path: Path, which: str = "latest") -> Path:
    """A checkpoint folder from a run folder (its ``latest`` or ``best``, or a step folder's name such as
    ``step-0000120``), or a checkpoint folder itself.

    A pointer that is missing, damaged or names no complete checkpoint (a kill between a checkpoint's
    rename and its pointer's write, a lost file) is recovered from the complete step folders, with a
    warning: ``latest`` is the newest, ``best`` the one that reached the best validation accuracy."""
    path = Path(path).expanduser()
    if (path / STATE).is_file():
        return path
    if which not in ("latest", "best"):  # a step folder by name
        folder = checkpoint_dir(path) / which
        if (folder / STATE).is_file():
            return folder
        kept = ", ".join(p.name for p in steps(path)) or "none"
        raise CheckpointError(f"{path} has no complete checkpoint {which!r} (complete ones: {kept}); name one of "
                              f"them, 'best' or 'latest'")
    folder = pointed(path, which)
    if folder is not None:
        return folder
    complete = steps(path)
    pointer = checkpoint_dir(path) / which
    if not complete:
        partial = sorted(p.name for p in checkpoint_dir(path).glob("step-*")) if checkpoint_dir(path).is_dir() else []
        if partial:
            raise CheckpointError(f"{path} has no complete checkpoint: {checkpoint_dir(path) / partial[-1]} is "
                                  f"missing or incomplete (no {STATE}); restore it from a backup, or train the "
                                  f"run again into another folder")
        raise CheckpointError(f"{path} has no {which} checkpoint (expected {pointer}); give a run folder "
                              f"written by `python -m smat.train` or a checkpoints/step-… folder")
    recovered = complete[-1] if which == "latest" else _best_of(complete)
    why = "missing" if not pointer.exists() else "damaged or names no complete checkpoint"
    warnings.warn(f"{pointer} is {why}; using {recovered.name}, the "
                  f"{'newest complete' if which == 'latest' else 'best validated'} checkpoint", RecoveryWarning,
                  stacklevel=2)
    return recovered


def repair_pointers(run: Path, latest: Path) -> list[str]:
    """Rewrite the ``latest`` (to ``latest``, the checkpoint a resume restored) and ``best`` pointers of
    ``run`` where they are missing or damaged; returns a line per pointer rewritten."""
    lines = []
    for which, folder in (("latest", latest), ("best", None)):
        if pointed(run, which) is None:
            folder = folder or _best_of(steps(run))
            atomic_write_text(checkpoint_dir(run) / which, folder.name + "\n")
            lines.append(f"restored {checkpoint_dir(run) / which} → {folder.name}")
    return lines


def _best_of(complete: list[Path]) -> Path:
    """The checkpoint that reached the highest validation accuracy: best_val only grows, so it is the oldest
    one whose state.json holds the highest best_val (the newest where no state.json can be read)."""
    values = {}
    for folder in complete:
        try:
            value = json.loads((folder / STATE).read_text()).get("best_val")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, (int, float)) and math.isfinite(value):
            values[folder] = value
    if not values:
        return complete[-1]
    top = max(values.values())
    return next(folder for folder in complete if values.get(folder) == top)


def load(folder: Path, map_location="cpu", optimizer: bool = True) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(tensors, optimizer_state, state) of a checkpoint folder; nothing in it is executed.

    Each file is checked against the SHA-256 its ``state.json`` records (checkpoints written before the
    checksums are read without), every tensor for NaN and ±inf. ``optimizer=False`` leaves
    ``optimizer.pt`` unread (an empty dict in its place): evaluating a checkpoint does not need it, so a
    missing or damaged one does not stop an evaluation. Any problem is a :class:`CheckpointError` naming the
    file and what to do."""
    folder = Path(folder)
    state = read_state(folder)
    digests = state.get("files") if isinstance(state.get("files"), dict) else {}
    tensors = read_tensors(folder / TENSORS, digests.get(TENSORS), map_location)
    optimizer_state = {}
    if optimizer:
        path = folder / OPTIMIZER
        _check_file(path, digests.get(OPTIMIZER), folder / STATE)
        try:
            optimizer_state = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as error:  # noqa: BLE001 - torch.load's decoding failures have no common type
            raise CheckpointError(damaged(path, error)) from None
        if not isinstance(optimizer_state, dict):
            raise CheckpointError(damaged(path, f"holds a {type(optimizer_state).__name__}, not a dict"))
    return tensors, optimizer_state, state


def read_state(folder: Path) -> dict:
    """A checkpoint's state.json: a mapping with an integer step and a numeric best_val."""
    path = Path(folder) / STATE
    if not path.is_file():
        raise CheckpointError(damaged(path, "is missing"))
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(damaged(path, error)) from None
    if not isinstance(state, dict):
        raise CheckpointError(damaged(path, f"holds a {type(state).__name__}, not a mapping"))
    step, best_val = state.get("step"), state.get("best_val", 0.0)
    if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
        raise CheckpointError(damaged(path, f"its step is {step!r}, not a non-negative integer"))
    if not (isinstance(best_val, (int, float)) and not isinstance(best_val, bool)):
        raise CheckpointError(damaged(path, f"its best_val is {best_val!r}, not a number"))
    for key in ("tasks_seen", "total_steps", "nonfinite_total", "nonfinite_run"):
        value = state.get(key, 0)
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            raise CheckpointError(damaged(path, f"its {key} is {value!r}, not a non-negative integer"))
    named = STEP_DIR.match(Path(folder).name)
    if named and int(named.group(1)) != step:
        raise CheckpointError(damaged(path, f"its step is {step}, not the step of its folder (another "
                                            f"checkpoint's state.json?)"))
    return state


def read_tensors(path: Path, digest: str | None = None, map_location="cpu") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, checked against ``digest`` (SHA-256, when known) and for NaN/±inf."""
    _check_file(path, digest, path.parent / STATE)
    try:
        tensors = load_file(str(path), device=str(map_location))
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        raise CheckpointError(damaged(path, error)) from None
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            what = "NaN" if bool(torch.isnan(tensor).any()) else "infinite values"
            raise CheckpointError(f"tensor {name!r} of {path} holds {what}; the checkpoint is damaged or was "
                                  f"saved from a diverged run: {fix(path)}")
    return tensors


def check_backbone(run: Path, state: dict, folder: Path) -> Path:
    """``<run>/backbone.safetensors``, checked against the SHA-256 that the ``state`` of checkpoint ``folder``
    records."""
    path = Path(run) / BACKBONE
    digests = state.get("files") if isinstance(state.get("files"), dict) else {}
    if not path.is_file():
        raise CheckpointError(f"{path} is missing (θ_pre of the run); restore it from a backup, or train the run "
                              f"again into another folder")
    _check_file(path, digests.get(BACKBONE), Path(folder) / STATE)
    return path


def _check_file(path: Path, digest: str | None, recorded_in: Path) -> None:
    if not path.is_file():
        raise CheckpointError(damaged(path, "is missing"))
    if isinstance(digest, str):
        try:
            found = file_digest(path)
        except OSError as error:
            raise CheckpointError(damaged(path, error)) from None
        if found != digest:
            raise CheckpointError(damaged(path, f"its SHA-256 differs from the one recorded in {recorded_in} (the "
                                                f"file was changed, truncated or comes from another run)"))


def damaged(path: Path, detail) -> str:
    """The message for a checkpoint file that is missing or cannot be used, with what to do."""
    text = str(detail).splitlines()[0] if str(detail) else type(detail).__name__
    if text.startswith("is "):
        lead = f"{path} {text}"
    elif text.startswith(("its ", "holds ", "does ")):
        lead = f"{path}: {text}"
    else:
        lead = f"cannot read {path} ({text})"
    where = "" if path.name == BACKBONE else f"checkpoint {path.parent}: "
    return f"cannot read {where}{lead}; {fix(path)}"


def fix(path: Path) -> str:
    folder = path.parent
    if path.name == BACKBONE:
        return "restore it from a backup, or train the run again into another folder"
    earlier = [p for p in steps(folder.parent.parent) if p.name < folder.name] if STEP_DIR.match(folder.name) else []
    if earlier:
        return (f"restore it from a backup, or move {folder} out of the run to fall back on {earlier[-1].name} "
                f"(then resume from there)")
    return "restore it from a backup, or train the run again into another folder"


def save_backbone(run: Path, state_dict: dict[str, torch.Tensor]) -> Path:
    return write_tensors(state_dict, Path(run) / BACKBONE)


def write_tensors(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    """A safetensors file written atomically; a failure is an OutputError naming ``path``."""
    with atomic_path(path) as temporary:
        save_tensors(tensors, temporary, path)
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


def save_tensors(tensors: dict[str, torch.Tensor], temporary: Path, destination: Path) -> None:
    """safetensors' save_file, its I/O failures (it raises them as SafetensorError) as OutputError."""
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(temporary))
        os.chmod(temporary, 0o666 & ~current_umask())  # safetensors writes 0600 whatever the umask
    except OSError as error:
        raise OutputError(describe_os_error(error, destination)) from None
    except SafetensorError as error:
        code = OS_ERROR_CODE.search(str(error))
        if code is None:
            raise OutputError(f"cannot write {destination}: {error}") from None
        number = int(code.group(1))
        raise OutputError(describe_os_error(OSError(number, os.strerror(number)), destination)) from None


def _prune(run: Path, keep: int) -> None:
    """Remove all but the newest ``keep`` step folders, never the ones ``latest`` and ``best`` name (a damaged
    ``best`` pointer pins the checkpoint it would be recovered to)."""
    complete = steps(run)
    best = pointed(run, "best") or (_best_of(complete) if complete else None)
    pinned = {folder.name for folder in (pointed(run, "latest"), best) if folder is not None}
    folders = sorted(p for p in checkpoint_dir(run).iterdir() if STEP_DIR.match(p.name))
    for old in folders[:-keep] if keep > 0 else folders:
        if old.name not in pinned:
            shutil.rmtree(old, ignore_errors=True)
