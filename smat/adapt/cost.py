"""What a mode costs per task: wall-clock seconds and peak memory (the paper's Table 5).

Peak memory is measured two ways, and every record says which:

- on a GPU, ``torch.cuda.max_memory_allocated`` after resetting the peak: every tensor alive at the
  peak, model weights included (what Table 5 reports);
- on the CPU, the increase of the process's resident set size over its value at the start, polled by a
  background thread every few milliseconds (psutil where installed, else ``/proc/self/statm``). Freed
  memory is handed back to the system first (``malloc_trim``, glibc) so that a mode measured after
  another one is not flattered by memory the allocator kept; peaks shorter than the poll period can
  be missed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import threading
import time

import torch

CUDA_KIND = "cuda max_memory_allocated"
CPU_KIND = "cpu peak RSS increase"


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a timer read afterwards covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int | None:
    try:
        import psutil  # optional: the portable way to read RSS; /proc below otherwise

        return psutil.Process().memory_info().rss
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _release_free_memory() -> None:
    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass  # not glibc: the allocator keeps what it keeps


class PeakMemory:
    """Context manager: ``bytes`` (int or None where nothing can be measured) and ``kind`` afterwards."""

    def __init__(self, device: torch.device, poll_seconds: float = 0.005):
        self.device, self.poll_seconds = device, poll_seconds
        self.kind = CUDA_KIND if device.type == "cuda" else CPU_KIND
        self.bytes: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = self._peak = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        _release_free_memory()
        start = _rss_bytes()
        if start is not None:
            self._start = self._peak = start
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            self._peak = max(self._peak, _rss_bytes() or 0)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.bytes = int(torch.cuda.max_memory_allocated(self.device))
            return
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, _rss_bytes() or 0)
            self.bytes = self._peak - self._start


class Stopwatch:
    """Accumulates seconds over several ``with`` blocks; the device is synchronised at both ends."""

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, 0.0

    def __enter__(self) -> Stopwatch:
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.seconds += time.perf_counter() - self._start
