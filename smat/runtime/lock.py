"""One training process per run folder: an exclusive ``fcntl.flock`` on ``<run>/.lock``.

The lock file holds its owner's PID, host and start time, so that a second
process refused the folder can say who holds it. The kernel drops a flock
when its process dies, however it dies, so a lock file left behind by a
killed process is never held: the next process takes it over and says whose
it was. The holder unlinks the file before it unlocks; a process that locked
the old, unlinked file notices (the path no longer names the inode it holds)
and tries again, so two processes can never both believe they hold the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from .io import OutputError, describe_os_error

LOCK_NAME = ".lock"


class LockError(OutputError):
    """The run folder is in use by another process."""


class RunLock:
    """The exclusive lock of one run folder, held from :meth:`acquire` to :meth:`release`."""

    def __init__(self, run: str | Path):
        self.path = Path(run) / LOCK_NAME
        self._fd: int | None = None
        self.previous: dict | None = None  # the owner of a stale lock taken over, for the log

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`LockError` naming its holder; a stale lock is taken over."""
        while self._fd is None:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_owner(fd)
                os.close(fd)
                raise LockError(f"{self.path.parent} is in use by {_describe(holder)} (lock file {self.path}); "
                                f"wait for it to finish, or train into another folder with output=PATH") from None
            if not _same_file(fd, self.path):  # its holder unlinked it between our open and our lock
                os.close(fd)
                continue
            self.previous = _read_owner(fd) or None
            self._fd = fd
        self._write_owner()
        return self

    def release(self) -> None:
        """Unlink the lock file, then unlock (in this order: see the module docstring)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._fd)  # closing the last descriptor drops the flock
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as error:
            raise OutputError(describe_os_error(error, self.path)) from None

    def _write_owner(self) -> None:
        owner = {"pid": os.getpid(), "host": socket.gethostname(),
                 "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, (json.dumps(owner) + "\n").encode(), 0)
            os.fsync(self._fd)
        except OSError as error:
            self.release()
            raise OutputError(describe_os_error(error, self.path)) from None


def describe_stale(owner: dict) -> str:
    """The log line for a stale lock that was taken over."""
    return f"took over the stale lock of {_describe(owner)}, which no longer runs"


def _read_owner(fd: int) -> dict:
    try:
        owner = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _describe(owner: dict) -> str:
    if not owner:
        return "another process"
    since = f", since {owner['started']}" if owner.get("started") else ""
    return f"process {owner.get('pid', '?')} on {owner.get('host', '?')}{since}"


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False
