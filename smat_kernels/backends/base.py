"""What a backend implements. Every method receives validated, contiguous
tensors on one device (see smat_kernels._validation) and returns new tensors.

Mode codes: 0 deterministic, 1 sample, 2 near_noiseless (reference.MODES)."""

from __future__ import annotations

import torch

from ..packed import PackedExperts

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
BITS_DTYPE_CODES = {torch.uint8: 0, torch.int16: 1, torch.int32: 2}


class Backend:
    name = "abstract"
    # Compiled backends prove themselves on the machine before their first
    # call (smat_kernels.selftest); the reference is the oracle they are held to.
    self_tested = True

    def unavailable_reason(self) -> str | None:
        """None when the backend can run here, else why not."""
        return None

    def unsupported_reason(self, device: torch.device) -> str | None:
        """None when the backend runs tensors on `device`, else why not."""
        return None

    def variant(self) -> str:
        """Which of the backend's code paths serves calls now (e.g. the CPU's
        instruction-set path), for reports and self-test verdicts; "" if one."""
        return ""

    def merge(self, theta_pre, delta, log_alpha, alpha, mode: int, seed: int, offset: int,
              beta: float, gamma: float, zeta: float) -> torch.Tensor:
        raise NotImplementedError

    def uniforms(self, seed: int, offset: int, batch: int, n: int, num_experts: int,
                 device: torch.device) -> torch.Tensor:
        """The mask uniforms of one sampled merge, fp32 [B, N, M], drawn by the
        backend's own Philox path (bit-identical to reference.uniforms)."""
        raise NotImplementedError

    def merge_backward(self, grad, theta_pre, delta, log_alpha, alpha, mode: int, seed: int, offset: int,
                       beta: float, gamma: float, zeta: float, needs: tuple[bool, bool, bool, bool]
                       ) -> tuple[torch.Tensor | None, ...]:
        """Gradients to (θ_pre, θ_δ, log_α, α); None where `needs` is False."""
        raise NotImplementedError

    def expected_density(self, log_alpha, beta: float, gamma: float, zeta: float) -> torch.Tensor:
        raise NotImplementedError

    def expected_density_backward(self, grad, log_alpha, beta: float, gamma: float, zeta: float) -> torch.Tensor:
        raise NotImplementedError

    def hard_density(self, log_alpha, gamma: float, zeta: float) -> torch.Tensor:
        raise NotImplementedError

    def pack(self, delta, log_alpha, gamma: float, zeta: float) -> PackedExperts:
        raise NotImplementedError

    def packed_merge(self, theta_pre, packed: PackedExperts, alpha) -> torch.Tensor:
        raise NotImplementedError
