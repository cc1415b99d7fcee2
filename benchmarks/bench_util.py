"""Measuring helpers shared by the benchmarks (imported by conftest.py)."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

# SMAT_BENCH_RESULTS_DIR sends a trial run's results elsewhere (a quick check
# that a benchmark runs must not add its timings to the committed files).
RESULTS_DIR = Path(os.environ.get("SMAT_BENCH_RESULTS_DIR") or Path(__file__).parent / "results")
GB = 1e9


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory of a block above what was allocated when it started.

    CUDA: torch.cuda.max_memory_allocated. CPU: the resident set size polled
    every millisecond by a thread (torch has no CPU allocator statistics);
    large tensors are mmap-backed, so their allocation and release show up in
    the RSS at once."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.peak_bytes = 0

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
            return self
        self._start = _rss_bytes()
        self._peak = self._start
        self._running = True
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while self._running:
            self._peak = max(self._peak, _rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated() - self._start
            return
        self._running = False
        self._thread.join()
        self._peak = max(self._peak, _rss_bytes())
        self.peak_bytes = self._peak - self._start


def measure_copy_bandwidth(device: str = "cpu", nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """GB/s of tensor.copy_ over a buffer far larger than the caches,
    counting the bytes read and written; the median of `repeats`."""
    source = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    times = []
    for _ in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        target.copy_(source)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    median = sorted(times[1:])[len(times[1:]) // 2]
    return 2 * nbytes / median / GB


def machine_info() -> dict:
    info = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_id": _cpu_id(),
        "cpu_vector_flags": _cpu_vector_flags(),
        "cpu_kernel_isa": _cpu_kernel_isa(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda_runtime"] = torch.version.cuda
    return info


def _cpu_vector_flags() -> list[str]:
    """The CPU's SIMD flags from /proc/cpuinfo (sse4_2, avx, avx2, fma, avx512*, …)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return sorted(f for f in flags if f.startswith(("sse", "ssse", "avx", "fma", "f16c", "amx")))
    except OSError:
        pass
    return []


def _cpu_kernel_isa() -> dict | None:
    """The CPU kernels' instruction-set paths: active, runnable, compiled."""
    try:
        from smat_kernels.backends import cpu

        return cpu.isa() if cpu._cpu is not None else None
    except (ImportError, ValueError) as error:
        return {"error": str(error)}


def isa_summary(info: dict) -> str:
    """The CPU's widest vector ISA and the kernels' active path, e.g. 'AVX-512; kernels: avx512 path'."""
    flags = set(info.get("cpu_vector_flags") or ())
    widest = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2" if flags else "ISA unknown"
    paths = info.get("cpu_kernel_isa") or {}
    return f"{widest}; kernels: {paths['active']} path" if "active" in paths else widest


def _cpu_id() -> dict:
    """Family, model and clock from /proc/cpuinfo: what names the generation where a VM calls its CPU
    only "AMD EPYC" (family 25 model 1 is Zen 3, model 17 Zen 4)."""
    fields = {"cpu family": "family", "model": "model", "stepping": "stepping", "cpu MHz": "mhz"}
    found = {}
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() in fields and fields[key.strip()] not in found:
                    found[fields[key.strip()]] = float(value) if key.strip() == "cpu MHz" else value.strip()
                if not line.strip() and found:  # the first processor's block is enough
                    break
    except (OSError, ValueError):
        pass
    return found


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


@dataclass
class ResultsTable:
    rows: list[dict] = field(default_factory=list)
    baselines: dict = field(default_factory=dict)

    def add(self, **row) -> dict:
        self.rows.append(row)
        return row

    def write(self, directory: Path = RESULTS_DIR) -> list[Path]:
        directory.mkdir(parents=True, exist_ok=True)
        info = machine_info()
        device = "gpu" if any(r.get("device") == "cuda" for r in self.rows) else "cpu"
        stem = f"{device}_{info['date'][:10]}"
        json_path = directory / f"{stem}.json"
        md_path = directory / f"{stem}.md"
        rows = self.rows + self._earlier_rows(json_path, info)
        payload = {"machine": info, "baselines": self.baselines, "rows": rows}
        _atomic_write(json_path, json.dumps(payload, indent=2))
        _atomic_write(md_path, self.markdown(info, rows))
        return [json_path, md_path]

    def _earlier_rows(self, json_path: Path, info: dict) -> list[dict]:
        """Rows of an earlier run on this machine today that this run did not
        measure again, so that benchmarks run one file at a time add up to one
        table. Each row keeps the copy bandwidth of its own run."""
        if not json_path.exists():
            return []
        earlier = json.loads(json_path.read_text())
        if earlier.get("machine", {}).get("host") != info["host"]:
            return []
        measured = {_row_key(row) for row in self.rows}
        return [row for row in earlier.get("rows", []) if _row_key(row) not in measured]

    def markdown(self, info: dict, rows: list[dict]) -> str:
        cpu_id = info.get("cpu_id") or {}
        generation = f" family {cpu_id['family']} model {cpu_id['model']}" if "family" in cpu_id else ""
        header = (f"Machine: {info['processor']}{generation} ({isa_summary(info)}), {info['cores']} cores, "
                  f"torch {info['torch']}, {info['date'][:10]}. Copy bandwidth: "
                  + ", ".join(f"{k} {v:.1f} GB/s" for k, v in self.baselines.items()) + "\n\n")
        columns = ["op", "impl", "N", "B", "M", "dtype", "seconds", "GB/s", "copy ratio", "speed-up vs eager",
                   "speed-up vs compiled", "peak extra MiB", "[B,N] buffers"]
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for row in sorted(rows, key=lambda r: (r["op"], r["N"], r["B"], r["impl"])):
            eager = _time_of(rows, row, "reference")
            compiled = _time_of(rows, row, "compiled")
            cells = [row["op"], row["impl"], _millions(row["N"]), row["B"], row["M"], row["dtype"],
                     f"{row['seconds']:.4g}", f"{row['gbps']:.2f}", f"{row['copy_ratio']:.2f}",
                     _ratio(eager, row["seconds"]), _ratio(compiled, row["seconds"]),
                     f"{row['peak_extra_bytes'] / 2**20:.0f}", f"{row['peak_in_bn_buffers']:.2f}"]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        return header + "\n".join(lines) + "\n"


def _row_key(row: dict) -> tuple:
    return tuple(row.get(k) for k in ("op", "impl", "device", "N", "B", "M", "dtype"))


def _time_of(rows: list[dict], row: dict, impl: str) -> float | None:
    """Seconds of the `impl` row measured on the same case as `row`."""
    for other in rows:
        if other["impl"] == impl and all(other[k] == row[k] for k in ("op", "N", "B", "M", "dtype")):
            return other["seconds"]
    return None


def _millions(n: int) -> str:
    return f"{n / 1e6:.0f}M" if n >= 1e6 else str(n)


def _ratio(baseline: float | None, seconds: float) -> str:
    return "" if baseline is None else f"{baseline / seconds:.1f}×"


def _atomic_write(path: Path, text: str) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_rows(folder: Path, name: str, rows: list[dict], **machine_extra) -> Path:
    """``<folder>/<name>_<date>.json`` with the machine's description and the rows, written atomically."""
    info = {**machine_info(), **machine_extra}
    path = Path(folder) / f"{name}_{info['date'][:10]}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, json.dumps({"machine": info, "rows": rows}, indent=2))
    return path


def theta_itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def bytes_merge_forward(n: int, batch: int, num_experts: int, dtype: torch.dtype) -> int:
    """Reads θ_pre, θ_δ, log_α, α; writes θ [B, N]."""
    s = theta_itemsize(dtype)
    return 2 * n * s + 4 * n * num_experts + 4 * batch * num_experts + batch * n * s


def bytes_merge_backward(n: int, batch: int, num_experts: int, dtype: torch.dtype) -> int:
    """Reads ∂θ [B, N], θ_δ, log_α, α; writes ∂θ_δ, ∂log_α, ∂α."""
    s = theta_itemsize(dtype)
    return batch * n * s + n * s + 4 * n * num_experts + 4 * batch * num_experts \
        + n * s + 4 * n * num_experts + 4 * batch * num_experts


def run_case(benchmark, results: ResultsTable, copy_gbps: float, *, op: str, impl: str, fn, nbytes: int,
             output_bytes: int, n: int, batch: int, num_experts: int, dtype: torch.dtype, rounds: int,
             warmup_rounds: int = 1, device: str = "cpu") -> dict:
    """Time `fn` with pytest-benchmark, measure its peak memory in one more
    call, and record a row: GB/s from `nbytes`, ratio to the copy bandwidth,
    and the peak memory beyond `output_bytes` in units of one [B, N] buffer."""
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=warmup_rounds)
    with PeakMemory(device) as memory:
        fn()
    seconds = benchmark.stats.stats.median
    gbps = nbytes / seconds / GB
    buffer_bytes = batch * n * theta_itemsize(dtype)
    row = results.add(op=op, impl=impl, device=device, N=n, B=batch, M=num_experts,
                      dtype=str(dtype).replace("torch.", ""), seconds=seconds, bytes=nbytes, gbps=gbps,
                      copy_gbps=copy_gbps, copy_ratio=gbps / copy_gbps, peak_extra_bytes=memory.peak_bytes,
                      peak_in_bn_buffers=max(0, memory.peak_bytes - output_bytes) / buffer_bytes)
    benchmark.extra_info.update(row)
    return row
