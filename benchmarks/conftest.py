"""Shared measuring tools of the benchmarks: the copy-bandwidth baseline,
peak-memory tracking, byte counts and the results file.

Every benchmark records, next to pytest-benchmark's timings, the bytes it
moves (explicit counts, see `bytes_*` in bench_util.py), GB/s, the ratio to a
copy bandwidth measured in the same run, and peak memory above its inputs.
At the end of the session the rows go to benchmarks/results/ as JSON (with
machine, date and versions) and as a markdown table.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import pytest
import torch
from bench_util import ResultsTable, measure_copy_bandwidth


def _allocations_straight_from_the_os() -> None:
    """Make glibc serve every allocation above 64 KiB with mmap and return it
    on free, so that the RSS-based peak memory of the CPU benchmarks sees
    each temporary tensor (by default glibc raises that threshold after the
    first large free and then recycles heap pages the RSS cannot see)."""
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        m_mmap_threshold = -3
        ctypes.CDLL(libc_name).mallopt(m_mmap_threshold, 64 * 1024)


def pytest_configure(config):
    _allocations_straight_from_the_os()
    config._smat_results = ResultsTable()


@pytest.fixture(scope="session")
def results(request) -> ResultsTable:
    return request.config._smat_results


@pytest.fixture(scope="session")
def copy_bandwidth(results) -> dict:
    """Host copy bandwidth (GB/s, read + write counted) measured once per run."""
    baseline = measure_copy_bandwidth("cpu")
    results.baselines["cpu_copy_gbps"] = baseline
    return baseline


@pytest.fixture(scope="session")
def cuda_copy_bandwidth(results) -> float:
    """Device-to-device copy bandwidth (GB/s, read + write counted), once per run."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    baseline = measure_copy_bandwidth("cuda", nbytes=2 * 2**30)
    results.baselines["cuda_copy_gbps"] = baseline
    return baseline


def pytest_sessionfinish(session, exitstatus):
    table: ResultsTable = session.config._smat_results
    if table.rows:
        paths = table.write()
        print(f"\nsmat benchmark results: {', '.join(str(p) for p in paths)}")
