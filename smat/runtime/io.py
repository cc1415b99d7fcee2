"""Atomic file writes: a temporary file in the destination folder, then ``os.replace``.

A crash, a full disk or a kill in the middle of a write leaves the previous
file as it was; readers never see a partial file. Every write failure becomes
an :class:`OutputError` that names the path and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..config import Config, to_yaml


class OutputError(OSError):
    """The output folder cannot be written (missing permission, full disk, …)."""


def describe_os_error(error: OSError, path: Path) -> str:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the device holding {path}; free some space or choose another output folder"
    if error.errno == errno.EFBIG:
        return (f"{path} grew past the largest file this process may write (ulimit -f or the file system's "
                f"limit); raise the limit or choose another output folder")
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write to {path} (permission denied or read-only); choose a writable output folder"
    return f"cannot write {path}: {error.strerror or error}"


def current_umask() -> int:
    """The process's umask, read without changing it where Linux tells it (os.umask can only be read by
    setting it, which would race with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def ensure_writable_dir(path: str | Path) -> Path:
    """Create ``path`` if needed and check that a file can be written there, before any long work."""
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as error:
        raise OutputError(describe_os_error(error, path)) from None
    return path


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp"):
    """Yield a temporary path next to ``path``; on success it replaces ``path`` in one step."""
    path = Path(path)
    if path.exists() and not (path.is_file() or path.is_dir()):  # a folder: os.replace's own error below
        raise OutputError(f"{path} is not a regular file (a pipe, device or socket), which a file written in its "
                          f"place would replace; give the path of a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
        os.close(handle)
    except OSError as error:
        raise OutputError(describe_os_error(error, path)) from None
    try:
        yield Path(temporary)
        # mkstemp makes 0600 (and so does safetensors, which replaces the file): a run's files are as any other
        os.chmod(temporary, 0o666 & ~current_umask())
        os.replace(temporary, path)
    except OSError as error:
        Path(temporary).unlink(missing_ok=True)
        raise OutputError(describe_os_error(error, path)) from None
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text)


def atomic_write_json(path: str | Path, value) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | Path):
    """Yield a temporary folder next to ``path``; on success it is renamed to ``path``.

    ``path`` must not exist yet (checkpoint folders are never overwritten).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        os.chmod(temporary, 0o777 & ~current_umask())  # mkdtemp makes 0700
    except OSError as error:
        raise OutputError(describe_os_error(error, path)) from None
    try:
        yield temporary
        os.replace(temporary, path)
    except OSError as error:
        shutil.rmtree(temporary, ignore_errors=True)
        raise OutputError(describe_os_error(error, path)) from None
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def holds_run(path: Path) -> bool:
    """Whether ``path`` is a training run's folder (its config with checkpoints, θ_pre or a log; or its lock)."""
    path = Path(path)
    if (path / ".lock").exists():
        return True
    markers = ("checkpoints", "metrics.jsonl") if (path / "export.json").is_file() else (
        "checkpoints", "metrics.jsonl", "backbone.safetensors")  # an export holds a config and θ_pre too
    return (path / "config.yaml").is_file() and any((path / name).exists() for name in markers)


def check_output_folder(path: str | Path, own=(), overwrite: bool = False, flag: str = "--overwrite") -> Path:
    """Refuse ``path`` as a command's output folder where writing there could overwrite what the command did
    not create: a training run (always: a run is never an output), an export or other files (unless
    ``overwrite``, the command's ``flag``). Names in ``own`` are the command's own outputs of an earlier
    call, replaced without asking. Returns the path; nothing is created."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputError(f"output folder {path} is a file; choose a folder")
    inside = next((p for p in (path, *path.absolute().parents) if p.name == "checkpoints" and holds_run(p.parent)),
                  None)
    if inside is not None:  # even with --overwrite: a step folder is the run's own
        raise OutputError(f"{path} is inside the checkpoints of the run {inside.parent}; choose an output folder "
                          f"outside it")
    if not path.is_dir():
        return path
    if holds_run(path):
        raise OutputError(f"{path} holds a training run, which an output would overwrite; choose another output "
                          f"folder")
    if overwrite:
        return path
    others = sorted(p.name for p in path.iterdir() if p.name not in own)
    if others:
        kind = "an export, which this would replace" if (path / "export.json").is_file() else "other files"
        shown = ", ".join(others[:5]) + (f", … ({len(others)})" if len(others) > 5 else "")
        raise OutputError(f"{path} already holds {kind} ({shown}); choose another output folder, or give {flag} "
                          f"to write into it anyway")
    return path


def save_config(config: Config, path: str | Path) -> None:
    """Write ``config`` as YAML, atomically (a run's ``config.yaml``)."""
    atomic_write_text(path, to_yaml(config))
