"""The compiled CPU backend (smat_kernels._cpu, OpenMP): thin calls that
hand data pointers of validated tensors to csrc/cpu."""

from __future__ import annotations

import torch

from ..packed import PackedExperts, bitmap_words, expert_bits_dtype
from .base import BITS_DTYPE_CODES, DTYPE_CODES, Backend

try:
    from .. import _cpu

    IMPORT_ERROR: str | None = None
except ImportError as error:  # nothing compiled: the package falls back to the reference
    _cpu = None
    IMPORT_ERROR = f"{type(error).__name__}: {error}"


ISA_ENVIRONMENT_VARIABLE = "SMAT_CPU_ISA"


def isa() -> dict[str, object]:
    """The kernels' instruction-set paths (csrc/cpu/isa.h): ``compiled`` into
    the module, ``runnable`` on this CPU, ``requested`` by SMAT_CPU_ISA (None
    when unset) and ``active``. Raises ValueError when SMAT_CPU_ISA asks for a
    path that cannot run here."""
    return dict(_cpu.isa())


def select_isa(name: str) -> str:
    """Use path `name` ("avx512", "avx2", "portable" or "auto") from now on
    in this process; ValueError if it cannot run here. For tests and benchmarks:
    users set SMAT_CPU_ISA."""
    return _cpu.select_isa(name)


def _threads() -> None:
    # Follow torch's intra-op thread setting so that torch.set_num_threads
    # governs smat's kernels too.
    _cpu.set_num_threads(torch.get_num_threads())


class CpuBackend(Backend):
    name = "cpu"

    def __init__(self):
        if _cpu is not None:
            # A SMAT_CPU_ISA this CPU cannot run is the user's explicit request:
            # an error at the first op, not a silent fallback to the reference.
            isa()

    def variant(self):
        return f"{isa()['active']} path" if _cpu is not None else ""

    def unavailable_reason(self):
        if _cpu is None:
            return f"the compiled module smat_kernels._cpu could not be imported ({IMPORT_ERROR})"
        return None

    def unsupported_reason(self, device):
        return None if device.type == "cpu" else f"runs CPU tensors only, got a {device.type} tensor"

    def merge(self, theta_pre, delta, log_alpha, alpha, mode, seed, offset, beta, gamma, zeta):
        batch, num_experts = alpha.shape
        out = torch.empty(batch, theta_pre.shape[0], dtype=theta_pre.dtype)
        _threads()
        _cpu.merge_forward(out.data_ptr(), theta_pre.data_ptr(), delta.data_ptr(), log_alpha.data_ptr(),
                           alpha.data_ptr(), batch, theta_pre.shape[0], num_experts, DTYPE_CODES[theta_pre.dtype],
                           mode, seed, offset, beta, gamma, zeta)
        return out

    def uniforms(self, seed, offset, batch, n, num_experts, device):
        out = torch.empty(batch, n, num_experts, dtype=torch.float32)
        _threads()
        _cpu.uniforms(out.data_ptr(), seed, offset, batch, n, num_experts)
        return out

    def merge_backward(self, grad, theta_pre, delta, log_alpha, alpha, mode, seed, offset, beta, gamma, zeta, needs):
        batch, num_experts = alpha.shape
        n = theta_pre.shape[0]
        grad = grad.to(theta_pre.dtype).contiguous()
        outputs = (
            torch.empty(n, dtype=theta_pre.dtype) if needs[0] else None,
            torch.empty(n, dtype=theta_pre.dtype) if needs[1] else None,
            torch.empty(n, num_experts, dtype=torch.float32) if needs[2] else None,
            torch.empty(batch, num_experts, dtype=torch.float32) if needs[3] else None,
        )
        _threads()
        _cpu.merge_backward(grad.data_ptr(), delta.data_ptr(), log_alpha.data_ptr(), alpha.data_ptr(),
                            *(0 if t is None else t.data_ptr() for t in outputs), batch, n, num_experts,
                            DTYPE_CODES[theta_pre.dtype], mode, seed, offset, beta, gamma, zeta)
        return outputs

    def expected_density(self, log_alpha, beta, gamma, zeta):
        out = torch.empty(log_alpha.shape[1], dtype=torch.float32)
        _threads()
        _cpu.expected_density(out.data_ptr(), log_alpha.data_ptr(), *log_alpha.shape, beta, gamma, zeta)
        return out

    def expected_density_backward(self, grad, log_alpha, beta, gamma, zeta):
        grad = grad.to(torch.float32).contiguous()
        out = torch.empty_like(log_alpha)
        _threads()
        _cpu.expected_density_backward(out.data_ptr(), grad.data_ptr(), log_alpha.data_ptr(), *log_alpha.shape,
                                       beta, gamma, zeta)
        return out

    def hard_density(self, log_alpha, gamma, zeta):
        out = torch.empty(log_alpha.shape[1], dtype=torch.float32)
        _threads()
        _cpu.hard_density(out.data_ptr(), log_alpha.data_ptr(), *log_alpha.shape, gamma, zeta)
        return out

    def pack(self, delta, log_alpha, gamma, zeta):
        n, num_experts = log_alpha.shape
        words = bitmap_words(n)
        bitmap = torch.empty(words, dtype=torch.int32)
        counts = torch.empty(words, dtype=torch.int64)
        _threads()
        rounded = _cpu.pack_support(bitmap.data_ptr(), counts.data_ptr(), log_alpha.data_ptr(), n, num_experts,
                                    gamma, zeta)
        word_offsets = torch.zeros(words + 1, dtype=torch.int64)
        torch.cumsum(counts, dim=0, out=word_offsets[1:])
        support = int(word_offsets[-1])
        bits = torch.empty(support, dtype=expert_bits_dtype(num_experts))
        packed_delta = torch.empty(support, dtype=delta.dtype)
        _cpu.pack_scatter(bits.data_ptr(), BITS_DTYPE_CODES[bits.dtype], packed_delta.data_ptr(), delta.data_ptr(),
                          DTYPE_CODES[delta.dtype], word_offsets.data_ptr(), log_alpha.data_ptr(), n, num_experts,
                          gamma, zeta)
        return PackedExperts(n, num_experts, bitmap, word_offsets, bits, packed_delta, int(rounded))

    def packed_merge(self, theta_pre, packed, alpha):
        batch, num_experts = alpha.shape
        out = torch.empty(batch, packed.n, dtype=theta_pre.dtype)
        _threads()
        _cpu.packed_merge(out.data_ptr(), theta_pre.data_ptr(), DTYPE_CODES[theta_pre.dtype],
                          packed.support_bitmap.data_ptr(), packed.word_offsets.data_ptr(),
                          packed.expert_bits.data_ptr(), BITS_DTYPE_CODES[packed.expert_bits.dtype],
                          packed.delta.data_ptr(), alpha.data_ptr(), batch, packed.n, num_experts)
        return out
