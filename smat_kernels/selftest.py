"""The self-test: no compiled backend serves a call before it has proved
itself on the machine in front of it.

Before a compiled backend (``cpu``, ``cuda``, ``triton``) serves its first
call on a device, :func:`verdict` runs it on small problems chosen to hit
the edges (N = 1 and N not a multiple of any block size, M ∈ {1, 3, 8, 32},
B ∈ {1, 3}, every θ dtype and mask mode, the backward, both densities, pack
and the packed merge) and compares it with ``reference.py``: uniforms bit for
bit, packed layouts and hard densities exactly, values and gradients within
the one tolerance table (:mod:`smat_kernels.tolerances`). The verdict is kept
per process and device. A backend that fails is disabled for the process:
the dispatcher warns once, naming the op, the case and the error, and the
next backend of the order takes over; a forced backend that fails is an
error. ``smat_kernels.backends()`` shows the verdicts.

Why: a GPU architecture, a CPU whose ``-march=native`` build differs from
ours, or a Triton compiler other than the interpreter CI uses can each make
a kernel silently wrong; a mask drawn from the wrong counter looks like a
training run that merely ends a little worse.

``SMAT_SELFTEST=0`` turns it off, ``SMAT_SELFTEST=full`` runs a larger set
(every combination of the shapes, dtypes and modes above).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from . import reference
from .backends.base import Backend
from .packed import PackedExperts
from .tolerances import merge_scales, mismatch

ENVIRONMENT_VARIABLE = "SMAT_SELFTEST"
LEVELS = {"": "quick", "1": "quick", "quick": "quick", "0": "off", "full": "full"}

SEED = 0x2B_5E1F_7E57  # above 2^32: both Philox key words matter
OFFSET = 2**32 - 1500  # the counters of a case cross 2^32
HARD_CONCRETE = (reference.BETA, reference.GAMMA, reference.ZETA)
# Gradients of log_α jump at the clamp's kinks; entries whose stretched value
# lies within this distance of 0 or 1 may fall on either side in two backends.
KINK_MARGIN = 1e-4
# The deterministic mask is 0 below log_α = −log 11; hard densities are
# compared exactly, so no entry may lie this close to that kink.
HARD_DENSITY_KINK = -math.log(11.0)
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class Case:
    """One problem: N elements, M experts, B tasks, θ dtype, mask mode."""

    n: int
    num_experts: int
    batch: int = 1
    dtype: torch.dtype = torch.float32
    mode: str = "sample"

    def __str__(self) -> str:
        return (f"N={self.n}, M={self.num_experts}, B={self.batch}, {DTYPE_NAMES[self.dtype]}, {self.mode}, "
                f"seed={SEED:#x}, offset={OFFSET}")


@dataclass(frozen=True)
class Verdict:
    """The self-test's result for one backend on one device."""

    backend: str
    device: str
    passed: bool
    checks: int = 0
    seconds: float = 0.0
    op: str = ""
    case: str = ""
    error: str = ""
    skipped: bool = False
    variant: str = ""  # the backend's code path that was tested (Backend.variant)

    def __str__(self) -> str:
        where = f"{self.device}, {self.variant}" if self.variant else self.device
        if self.skipped:
            return f"self-test off on {where} ({ENVIRONMENT_VARIABLE}=0)"
        if self.passed:
            return f"self-test passed on {where} ({self.checks} checks, {self.seconds:.2f} s)"
        return f"self-test failed on {where}: {self.failure}"

    @property
    def failure(self) -> str:
        return f"{self.op} ({self.case}): {self.error}"


class Mismatch(Exception):
    """A backend result that disagrees with the reference."""


# --------------------------------------------------------------------------
# The cases
# --------------------------------------------------------------------------

# N: a single element, and sizes that are multiples of no block size (the
# CPU's 16 lanes, 32-bit bitmap words, Triton's 256–1024 and the CUDA
# merge's 1024 elements per block): 1031 spans two CUDA blocks and three of
# Triton's interpreter.
SIZES = (1, 97, 1031)
NUM_EXPERTS = (1, 3, 8, 32)
BATCHES = (1, 3)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# The quick set: every dtype × mode once, every M in sample mode, every N, B
# and M several times; chosen so that the cpu backend's self-test stays well
# under a second (benchmarks/test_bench_selftest.py).
QUICK_MERGE = (
    Case(1031, 8, 3, torch.float32, "sample"),
    Case(20011, 3, 1, torch.float32, "sample"),  # reductions over 20 GPU blocks
    Case(97, 1, 1, torch.float32, "sample"),
    Case(1, 32, 3, torch.float32, "deterministic"),
    Case(97, 3, 3, torch.float32, "near_noiseless"),
    Case(97, 32, 1, torch.bfloat16, "sample"),
    Case(1031, 3, 1, torch.bfloat16, "deterministic"),
    Case(1, 8, 3, torch.bfloat16, "near_noiseless"),
    Case(1, 3, 1, torch.float16, "sample"),
    Case(97, 8, 3, torch.float16, "deterministic"),
    Case(1031, 3, 3, torch.float16, "near_noiseless"),
)
QUICK_UNIFORMS = (Case(1031, 32, 3), Case(97, 3, 1), Case(1, 1, 1), Case(1, 8, 3))
QUICK_DENSITY = (Case(1031, 8), Case(1, 1), Case(97, 32), Case(1031, 3))
# Pack: uint8 words with the 2^M table (M ≤ 8), int16 and int32 words with the direct sum.
QUICK_PACK = (
    Case(1031, 8, 3, torch.float32),
    Case(1, 3, 1, torch.bfloat16),
    Case(97, 12, 3, torch.float16),
    Case(1031, 32, 1, torch.bfloat16),
)


@dataclass(frozen=True)
class CaseSet:
    merge: tuple[Case, ...]
    uniforms: tuple[Case, ...]
    density: tuple[Case, ...]
    pack: tuple[Case, ...]


def case_set(level: str) -> CaseSet:
    """The problems of a level: ``quick`` (the default) or ``full``."""
    if level == "quick":
        return CaseSet(QUICK_MERGE, QUICK_UNIFORMS, QUICK_DENSITY, QUICK_PACK)
    if level != "full":
        raise ValueError(f"unknown self-test level {level!r}; choose quick or full")
    shapes = list(itertools.product(SIZES, NUM_EXPERTS))
    merge = tuple(Case(n, m, b, dtype, mode) for (n, m), b, dtype, mode
                  in itertools.product(shapes, BATCHES, DTYPES, reference.MODES))
    pack = tuple(Case(n, m, b, dtype) for (n, m), b, dtype
                 in itertools.product(list(itertools.product(SIZES, (*NUM_EXPERTS, 12))), BATCHES, DTYPES))
    return CaseSet(merge, tuple(Case(n, m, b) for (n, m), b in itertools.product(shapes, BATCHES)),
                   tuple(Case(n, m) for n, m in shapes), pack)


# --------------------------------------------------------------------------
# Inputs and the reference's answers (computed once per process, on the CPU)
# --------------------------------------------------------------------------


def _generator(case: Case, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(hash((case.n, case.num_experts, case.batch, salt)) % 2**31)


@functools.cache
def merge_inputs(case: Case) -> dict[str, torch.Tensor]:
    """θ_pre, θ_δ and the output gradient drawn in fp32 and rounded to the
    case's dtype, so that the fp32 reference sees the kernel's input values;
    log_α spans both clamps and the open interval between them."""
    generator = _generator(case, 1)
    return {
        "theta_pre": torch.randn(case.n, generator=generator).to(case.dtype),
        "delta": torch.randn(case.n, generator=generator).to(case.dtype),
        "log_alpha": 2.0 * torch.randn(case.n, case.num_experts, generator=generator),
        "alpha": torch.randn(case.batch, case.num_experts, generator=generator),
        "grad": torch.randn(case.batch, case.n, generator=generator).to(case.dtype),
    }


def _key(case: Case) -> tuple[int, str, int, int]:
    return reference.MODES.index(case.mode), case.mode, SEED, OFFSET


@functools.cache
def merge_expected(case: Case) -> dict[str, object]:
    """The reference's output and gradients in fp32 (and in the case's dtype
    for bf16/fp16), the scales Σ |terms| of every entry, and the entries of
    ∂log_α that are clear of the clamp's kinks."""
    inputs = merge_inputs(case)
    _, mode, seed, offset = _key(case)

    def run(cast):
        theta_pre, delta, grad = cast(inputs["theta_pre"]), cast(inputs["delta"]), cast(inputs["grad"])
        settings = (mode, seed, offset, *HARD_CONCRETE)
        out = reference.merge(theta_pre, delta, inputs["log_alpha"], inputs["alpha"], *settings)
        return out, reference.merge_backward(grad, theta_pre, delta, inputs["log_alpha"], inputs["alpha"], *settings)

    exact = run(lambda t: t.float())
    low = run(lambda t: t.to(case.dtype)) if case.dtype != torch.float32 else None
    return {"exact": exact, "low": low, "scales": merge_scales(inputs, case.mode),
            "kink_free": _off_kinks(inputs["log_alpha"], case)}


def _off_kinks(log_alpha: torch.Tensor, case: Case) -> torch.Tensor:
    """[N, M] True where no task's stretched mask value lies within KINK_MARGIN of 0 or 1."""
    s = reference.masks(log_alpha, case.batch, case.mode, SEED, OFFSET, reference.BETA, 0.0, 1.0)
    stretched = s * (reference.ZETA - reference.GAMMA) + reference.GAMMA
    near = (stretched.abs() < KINK_MARGIN) | ((stretched - 1).abs() < KINK_MARGIN)
    return ~(near if near.dim() == 2 else near.any(dim=0))


@functools.cache
def density_inputs(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """log_α clear of the hard-density kink, and an output gradient [M]."""
    generator = _generator(case, 2)
    log_alpha = 3.0 * torch.randn(case.n, case.num_experts, generator=generator)
    log_alpha = torch.where((log_alpha - HARD_DENSITY_KINK).abs() < 1e-3, log_alpha + 2e-3, log_alpha)
    return log_alpha, torch.randn(case.num_experts, generator=generator)


@functools.cache
def pack_inputs(case: Case) -> dict[str, torch.Tensor]:
    """Binary masks (|log_α| ≥ 5: z is exactly 0 or 1) with some entries pulled
    into (0, 1) so that the pack rounds them and reports it."""
    generator = _generator(case, 3)
    on = torch.rand(case.n, case.num_experts, generator=generator) < 0.3
    magnitude = 5 + 3 * torch.rand(case.n, case.num_experts, generator=generator)
    log_alpha = torch.where(on, magnitude, -magnitude)
    soft = torch.rand(case.n, case.num_experts, generator=generator) < 0.05
    log_alpha = torch.where(soft, torch.randn(case.n, case.num_experts, generator=generator).clamp(-1, 1) + 0.1,
                            log_alpha)
    return {"theta_pre": torch.randn(case.n, generator=generator).to(case.dtype),
            "delta": torch.randn(case.n, generator=generator).to(case.dtype), "log_alpha": log_alpha,
            "alpha": torch.randn(case.batch, case.num_experts, generator=generator)}


# --------------------------------------------------------------------------
# The checks: each raises Mismatch, or whatever the backend raised
# --------------------------------------------------------------------------


def _check(failure: str | None) -> None:
    if failure is not None:
        raise Mismatch(failure)


def _on(device: torch.device, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.to(device) for name, t in tensors.items()}


@functools.cache
def uniforms_expected(case: Case) -> torch.Tensor:
    return reference.uniforms(SEED, OFFSET, case.batch, case.n, case.num_experts)


def check_uniforms(backend: Backend, case: Case, device: torch.device) -> None:
    drawn = backend.uniforms(SEED, OFFSET, case.batch, case.n, case.num_experts, device).cpu()
    expected = uniforms_expected(case)
    if drawn.shape != expected.shape or drawn.dtype != torch.float32:
        raise Mismatch(f"uniforms: got {drawn.dtype} {tuple(drawn.shape)}, expected float32 {tuple(expected.shape)}")
    differ = drawn.view(torch.int32) != expected.view(torch.int32)
    if differ.any():
        first = tuple(int(i) for i in differ.nonzero()[0])
        raise Mismatch(f"{int(differ.sum())} of {differ.numel()} uniforms are not bit-identical to the reference's; "
                       f"first at (task, element, expert) = {first}: {float(drawn[first])!r} instead of "
                       f"{float(expected[first])!r}")


def check_merge(backend: Backend, case: Case, device: torch.device) -> None:
    inputs, expected = _on(device, merge_inputs(case)), merge_expected(case)
    mode_code, _, seed, offset = _key(case)
    out = backend.merge(inputs["theta_pre"], inputs["delta"], inputs["log_alpha"], inputs["alpha"], mode_code, seed,
                        offset, *HARD_CONCRETE)
    if out.dtype != case.dtype or out.device != device:
        raise Mismatch(f"out: {out.dtype} on {out.device}, expected {case.dtype} on {device}")
    low = expected["low"][0] if expected["low"] is not None else None
    _check(mismatch("out", out, expected["exact"][0], expected["scales"]["out"], low_precision=low))


GRADIENT_NAMES = ("theta_pre", "delta", "log_alpha", "alpha")


def check_merge_backward(backend: Backend, case: Case, device: torch.device,
                         needs: tuple[bool, ...] = (True, True, True, True)) -> None:
    inputs, expected = _on(device, merge_inputs(case)), merge_expected(case)
    mode_code, _, seed, offset = _key(case)
    grads = backend.merge_backward(inputs["grad"], inputs["theta_pre"], inputs["delta"], inputs["log_alpha"],
                                   inputs["alpha"], mode_code, seed, offset, *HARD_CONCRETE, needs)
    lows = expected["low"][1] if expected["low"] is not None else (None,) * 4
    for name, need, grad, exact, low in zip(GRADIENT_NAMES, needs, grads, expected["exact"][1], lows):
        if not need:
            continue
        if grad is None or grad.dtype != inputs[name].dtype:
            raise Mismatch(f"∂{name}: got {None if grad is None else grad.dtype}, expected {inputs[name].dtype}")
        where = expected["kink_free"] if name == "log_alpha" else None
        _check(mismatch(f"∂{name}", grad, exact, expected["scales"][name],
                        low_precision=low if grad.dtype != torch.float32 else None, where=where))


@functools.cache
def density_expected(case: Case) -> dict[str, torch.Tensor]:
    log_alpha, grad = density_inputs(case)
    return {"density": reference.expected_density(log_alpha.double(), *HARD_CONCRETE),
            "grad": reference.expected_density_backward(grad, log_alpha, *HARD_CONCRETE),
            "hard": reference.hard_density(log_alpha, reference.GAMMA, reference.ZETA)}


def check_densities(backend: Backend, case: Case, device: torch.device) -> None:
    (log_alpha, grad), expected = density_inputs(case), density_expected(case)
    exact = expected["density"]
    density = backend.expected_density(log_alpha.to(device), *HARD_CONCRETE)
    _check(mismatch("expected density", density, exact, exact))  # a mean of probabilities: its own scale
    grad_log_alpha = backend.expected_density_backward(grad.to(device), log_alpha.to(device), *HARD_CONCRETE)
    _check(mismatch("∂log_alpha of the expected density", grad_log_alpha, expected["grad"],
                    (grad.abs() / case.n / 4).expand(case.n, case.num_experts)))
    hard = backend.hard_density(log_alpha.to(device), reference.GAMMA, reference.ZETA).cpu()
    expected_hard = expected["hard"]
    if not torch.equal(hard, expected_hard):
        raise Mismatch(f"hard density {hard.tolist()} != the reference's {expected_hard.tolist()}")


PACKED_FIELDS = ("support_bitmap", "word_offsets", "expert_bits", "delta")


@functools.cache
def pack_expected(case: Case) -> dict[str, object]:
    """The reference's packed experts, and its packed merge in fp32 (and in
    the case's dtype), with the scale Σ |terms| of every entry."""
    inputs = pack_inputs(case)
    packed = reference.pack(inputs["delta"], inputs["log_alpha"], reference.GAMMA, reference.ZETA)

    def with_delta(delta: torch.Tensor) -> PackedExperts:
        return PackedExperts(packed.n, packed.num_experts, packed.support_bitmap, packed.word_offsets,
                             packed.expert_bits, delta, packed.rounded)

    theta_pre, alpha = inputs["theta_pre"], inputs["alpha"]
    return {"packed": packed,
            "exact": reference.packed_merge(theta_pre.float(), with_delta(packed.delta.float()), alpha),
            "low": reference.packed_merge(theta_pre, packed, alpha) if case.dtype != torch.float32 else None,
            "scale": reference.packed_merge(theta_pre.float().abs(), with_delta(packed.delta.float().abs()),
                                            alpha.abs())}


def check_pack(backend: Backend, case: Case, device: torch.device) -> None:
    inputs, expected = pack_inputs(case), pack_expected(case)["packed"]
    packed = backend.pack(inputs["delta"].to(device), inputs["log_alpha"].to(device), reference.GAMMA, reference.ZETA)
    if (packed.n, packed.num_experts, packed.rounded) != (expected.n, expected.num_experts, expected.rounded):
        raise Mismatch(f"(n, num_experts, rounded) = {(packed.n, packed.num_experts, packed.rounded)}, expected "
                       f"{(expected.n, expected.num_experts, expected.rounded)}")
    for name in PACKED_FIELDS:
        actual, wanted = getattr(packed, name).cpu(), getattr(expected, name)
        if actual.dtype != wanted.dtype or not torch.equal(actual, wanted):
            raise Mismatch(f"packed {name} differs from the reference's ({actual.dtype} {tuple(actual.shape)} vs "
                           f"{wanted.dtype} {tuple(wanted.shape)})")


def check_packed_merge(backend: Backend, case: Case, device: torch.device) -> None:
    """The reference's packed experts through the backend's packed merge."""
    inputs, expected = pack_inputs(case), pack_expected(case)
    out = backend.packed_merge(inputs["theta_pre"].to(device), expected["packed"].to(device),
                               inputs["alpha"].to(device))
    if out.dtype != case.dtype:
        raise Mismatch(f"out: {out.dtype}, expected {case.dtype}")
    _check(mismatch("out", out, expected["exact"], expected["scale"], low_precision=expected["low"]))


Check = Callable[[Backend, Case, torch.device], None]


def checks(level: str) -> Iterator[tuple[str, Case, Check, Callable[[Case], object]]]:
    """(op, case, check, the reference's answer) of a level, most basic
    first: the uniforms before anything drawn from them."""
    cases = case_set(level)
    for case in cases.uniforms:
        yield "uniforms", case, check_uniforms, uniforms_expected
    for case in cases.merge:
        yield "merge", case, check_merge, merge_expected
        yield "merge backward", case, check_merge_backward, merge_expected
    # The backward with some gradients not requested (their outputs are skipped).
    first = cases.merge[0]
    yield ("merge backward, ∂θ_δ and ∂α only", first,
           functools.partial(check_merge_backward, needs=(False, True, False, True)), merge_expected)
    for case in cases.density:
        yield "densities", case, check_densities, density_expected
    for case in cases.pack:
        yield "pack", case, check_pack, pack_expected
        yield "packed merge", case, check_packed_merge, pack_expected


# --------------------------------------------------------------------------
# Running and caching
# --------------------------------------------------------------------------


def level_from_environment() -> str:
    value = os.environ.get(ENVIRONMENT_VARIABLE, "").strip().lower()
    if value not in LEVELS:
        raise ValueError(f"{ENVIRONMENT_VARIABLE}={value!r} is not understood: use 0 (off), 1 (the default) or full")
    return LEVELS[value]


def device_key(device: torch.device) -> str:
    """'cpu', or 'cuda:<index>' with the current device filled in."""
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def run(backend: Backend, device: torch.device, level: str = "quick") -> Verdict:
    """Run the self-test of `backend` on `device` now (not cached)."""
    key = device_key(device)
    device = torch.device(key)
    variant = backend.variant()
    start = time.perf_counter()
    count = 0
    items = list(checks(level))
    # The user's autocast, grad mode or default dtype must not change what the kernels are asked.
    with torch.no_grad(), torch.autocast(device.type, enabled=False), _default_dtype(torch.float32):
        # The reference's answers first, on one thread: its tensors are small,
        # and on a loaded machine parallel regions interleaved with the
        # kernels' cost up to 20 times more (measured: 1.5 s against 0.08 s).
        with _torch_threads(1):
            for _, case, _, expected in items:
                expected(case)
        for op, case, check, _ in items:
            try:
                check(backend, case, device)
            except Exception as error:  # noqa: BLE001 - a backend that raises fails, whatever it raised
                message = str(error) if isinstance(error, Mismatch) else f"{type(error).__name__}: {error}"
                return Verdict(backend.name, key, False, count, time.perf_counter() - start, op, str(case), message,
                               variant=variant)
            count += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return Verdict(backend.name, key, True, count, time.perf_counter() - start, variant=variant)


@contextlib.contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


_verdicts: dict[tuple[str, str], Verdict] = {}
_lock = threading.RLock()


def verdict(backend: Backend, device: torch.device) -> Verdict:
    """The verdict on `backend` for `device`: run once per process and device."""
    key = (backend.name, device_key(device))
    with _lock:
        if key not in _verdicts:
            level = level_from_environment()
            _verdicts[key] = (Verdict(backend.name, key[1], True, skipped=True, variant=backend.variant())
                              if level == "off"
                              else run(backend, device, level))
        return _verdicts[key]


def known_verdicts(name: str) -> list[Verdict]:
    """The verdicts reached so far on backend `name`, one per device."""
    with _lock:
        return [v for (backend, _), v in sorted(_verdicts.items()) if backend == name]


def forget() -> None:
    """Drop every verdict and the reference's cached answers: the next call
    of each backend tests it again, from scratch."""
    with _lock:
        _verdicts.clear()
        for cached in (merge_inputs, merge_expected, uniforms_expected, density_inputs, density_expected,
                       pack_inputs, pack_expected):
            cached.cache_clear()
