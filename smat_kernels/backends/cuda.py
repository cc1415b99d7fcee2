"""The compiled CUDA backend (smat_kernels._cuda): thin calls that hand data
pointers of validated CUDA tensors, and the current stream of their device,
to csrc/cuda. Outputs and scratch buffers are allocated here with torch, so
they come from torch's caching allocator and live on the caller's stream.

Nothing touches CUDA at import time: the compiled module is imported on first
use and ``torch.cuda.is_available()`` is asked only by ``unavailable_reason``.
"""

from __future__ import annotations

import contextlib
import importlib

import torch

from ..packed import PackedExperts, bitmap_words, expert_bits_dtype
from .base import BITS_DTYPE_CODES, DTYPE_CODES, Backend

_module = None
_import_error: str | None = None


def _cuda():
    """smat_kernels._cuda, imported on first use (None when it cannot be)."""
    global _module, _import_error
    if _module is None and _import_error is None:
        try:
            _module = importlib.import_module("smat_kernels._cuda")
        except ImportError as error:
            _import_error = f"{type(error).__name__}: {error}"
    return _module


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """Makes `device` current, so that the kernels launch on it."""
    return torch.cuda.device(device)


def _pointer(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.data_ptr()


class CudaBackend(Backend):
    name = "cuda"

    def unavailable_reason(self):
        if _cuda() is None:
            return (f"the compiled module smat_kernels._cuda could not be imported ({_import_error}); "
                    f"rebuild with a CUDA toolkit: SMAT_BUILD_CUDA=1 pip install .")
        if not torch.cuda.is_available():
            return "torch.cuda.is_available() is False (no CUDA device, or a CPU-only torch build)"
        return None

    def unsupported_reason(self, device):
        return None if device.type == "cuda" else f"runs CUDA tensors only, got a {device.type} tensor"

    def merge(self, theta_pre, delta, log_alpha, alpha, mode, seed, offset, beta, gamma, zeta):
        batch, num_experts = alpha.shape
        n = theta_pre.shape[0]
        device = theta_pre.device
        with _on(device):
            out = torch.empty(batch, n, dtype=theta_pre.dtype, device=device)
            _cuda().merge_forward(out.data_ptr(), theta_pre.data_ptr(), delta.data_ptr(), log_alpha.data_ptr(),
                                  alpha.data_ptr(), batch, n, num_experts, DTYPE_CODES[theta_pre.dtype], mode, seed,
                                  offset, beta, gamma, zeta, _stream(device))
        return out

    def merge_backward(self, grad, theta_pre, delta, log_alpha, alpha, mode, seed, offset, beta, gamma, zeta, needs):
        batch, num_experts = alpha.shape
        n = theta_pre.shape[0]
        device = theta_pre.device
        module = _cuda()
        with _on(device):
            grad = grad.to(theta_pre.dtype).contiguous()
            outputs = (
                torch.empty(n, dtype=theta_pre.dtype, device=device) if needs[0] else None,
                torch.empty(n, dtype=theta_pre.dtype, device=device) if needs[1] else None,
                torch.empty(n, num_experts, dtype=torch.float32, device=device) if needs[2] else None,
                torch.empty(batch, num_experts, dtype=torch.float32, device=device) if needs[3] else None,
            )
            # ∂α is summed per block into this scratch, then over blocks in a fixed order.
            partials = (torch.empty(module.merge_backward_partial_rows(n), batch, num_experts, dtype=torch.float32,
                                    device=device) if needs[3] else None)
            module.merge_backward(grad.data_ptr(), delta.data_ptr(), log_alpha.data_ptr(), alpha.data_ptr(),
                                  *(_pointer(t) for t in outputs), _pointer(partials), batch, n, num_experts,
                                  DTYPE_CODES[theta_pre.dtype], mode, seed, offset, beta, gamma, zeta,
                                  _stream(device))
        return outputs

    def _density_scratch(self, log_alpha):
        n, num_experts = log_alpha.shape
        return torch.empty(_cuda().density_partial_rows(n, num_experts), num_experts, dtype=torch.float64,
                           device=log_alpha.device)

    def expected_density(self, log_alpha, beta, gamma, zeta):
        device = log_alpha.device
        with _on(device):
            out = torch.empty(log_alpha.shape[1], dtype=torch.float32, device=device)
            partials = self._density_scratch(log_alpha)
            _cuda().expected_density(out.data_ptr(), partials.data_ptr(), log_alpha.data_ptr(), *log_alpha.shape,
                                     beta, gamma, zeta, _stream(device))
        return out

    def expected_density_backward(self, grad, log_alpha, beta, gamma, zeta):
        device = log_alpha.device
        with _on(device):
            grad = grad.to(torch.float32).contiguous()
            out = torch.empty_like(log_alpha)
            _cuda().expected_density_backward(out.data_ptr(), grad.data_ptr(), log_alpha.data_ptr(),
                                              *log_alpha.shape, beta, gamma, zeta, _stream(device))
        return out

    def hard_density(self, log_alpha, gamma, zeta):
        device = log_alpha.device
        with _on(device):
            out = torch.empty(log_alpha.shape[1], dtype=torch.float32, device=device)
            partials = self._density_scratch(log_alpha)
            _cuda().hard_density(out.data_ptr(), partials.data_ptr(), log_alpha.data_ptr(), *log_alpha.shape,
                                 gamma, zeta, _stream(device))
        return out

    def pack(self, delta, log_alpha, gamma, zeta):
        n, num_experts = log_alpha.shape
        device = delta.device
        module = _cuda()
        words = bitmap_words(n)
        with _on(device):
            stream = _stream(device)
            bitmap = torch.empty(words, dtype=torch.int32, device=device)
            counts = torch.empty(words, dtype=torch.int64, device=device)
            rounded = torch.zeros((), dtype=torch.int64, device=device)
            module.pack_support(bitmap.data_ptr(), counts.data_ptr(), rounded.data_ptr(), log_alpha.data_ptr(), n,
                                num_experts, gamma, zeta, stream)
            word_offsets = torch.zeros(words + 1, dtype=torch.int64, device=device)
            torch.cumsum(counts, dim=0, out=word_offsets[1:])
            support = int(word_offsets[-1])  # the packed sizes must be known on the host: one synchronisation
            bits = torch.empty(support, dtype=expert_bits_dtype(num_experts), device=device)
            packed_delta = torch.empty(support, dtype=delta.dtype, device=device)
            module.pack_scatter(bits.data_ptr(), BITS_DTYPE_CODES[bits.dtype], packed_delta.data_ptr(),
                                delta.data_ptr(), DTYPE_CODES[delta.dtype], word_offsets.data_ptr(),
                                log_alpha.data_ptr(), n, num_experts, gamma, zeta, stream)
        return PackedExperts(n, num_experts, bitmap, word_offsets, bits, packed_delta, int(rounded))

    def packed_merge(self, theta_pre, packed, alpha):
        batch, num_experts = alpha.shape
        device = theta_pre.device
        with _on(device):
            out = torch.empty(batch, packed.n, dtype=theta_pre.dtype, device=device)
            _cuda().packed_merge(out.data_ptr(), theta_pre.data_ptr(), DTYPE_CODES[theta_pre.dtype],
                                 packed.support_bitmap.data_ptr(), packed.word_offsets.data_ptr(),
                                 packed.expert_bits.data_ptr(), BITS_DTYPE_CODES[packed.expert_bits.dtype],
                                 packed.delta.data_ptr(), alpha.data_ptr(), batch, packed.n, num_experts,
                                 _stream(device))
        return out

    def uniforms(self, seed: int, offset: int, batch: int, n: int, num_experts: int,
                 device: torch.device) -> torch.Tensor:
        """The mask uniforms of one sampled merge, fp32 [B, N, M], drawn by the
        kernels' own Philox path (to test bit identity with the reference)."""
        with _on(device):
            out = torch.empty(batch, n, num_experts, dtype=torch.float32, device=device)
            _cuda().uniforms(out.data_ptr(), seed, offset, batch, n, num_experts, _stream(device))
        return out
