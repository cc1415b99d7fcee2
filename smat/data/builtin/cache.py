"""Where built-in data lives, and atomic writes of its array files."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from ..source import DataError


def cache_dir() -> Path:
    """``$SMAT_CACHE_DIR``, else ``$XDG_CACHE_HOME/smat``, else ``~/.cache/smat``."""
    if os.environ.get("SMAT_CACHE_DIR"):
        return Path(os.environ["SMAT_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "smat"


def cache_origin() -> str:
    """Where :func:`cache_dir` came from, for a message that says what to change."""
    if os.environ.get("SMAT_CACHE_DIR"):
        return "$SMAT_CACHE_DIR"
    return "$XDG_CACHE_HOME/smat" if os.environ.get("XDG_CACHE_HOME") else "the default ~/.cache/smat"


def save_arrays(path: Path, **arrays: np.ndarray) -> None:
    """Write a compressed .npz atomically: a temporary file in the same folder, then rename.

    Concurrent writers (several processes building the same domain) each
    rename a complete file; a reader never sees a partial one.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise DataError(f"cannot write the data cache {path.parent} ({error.strerror or error}); the folder "
                        f"comes from {cache_origin()}: set SMAT_CACHE_DIR to a writable folder") from None
    try:
        with os.fdopen(handle, "wb") as file:
            np.savez_compressed(file, **arrays)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}
