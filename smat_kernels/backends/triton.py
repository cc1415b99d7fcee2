"""The Triton backend: the kernels of smat_kernels/triton behind the Backend
API. Runs CUDA tensors, and CPU tensors when Triton's interpreter is on
(TRITON_INTERPRET=1 before smat_kernels is imported; how CI tests it)."""

from __future__ import annotations

from .base import Backend

try:
    import triton  # noqa: F401

    IMPORT_ERROR: str | None = None
except ImportError as error:  # triton is optional: the dispatcher reports why this backend is out
    IMPORT_ERROR = f"{type(error).__name__}: {error}"


def _kernels():
    # Imported on first use: a kernel module fixes, when it is imported,
    # whether its kernels compile or run in the interpreter.
    from .. import triton as kernels
    from ..triton import density, merge, pack

    return kernels, merge, density, pack


class TritonBackend(Backend):
    name = "triton"

    def unavailable_reason(self):
        if IMPORT_ERROR is not None:
            return f"triton could not be imported ({IMPORT_ERROR}); install it with `pip install triton`"
        return None

    def unsupported_reason(self, device):
        if device.type == "cuda":
            return None
        if device.type == "cpu":
            kernels = _kernels()[0]
            if kernels.INTERPRET:
                return None
            return ("runs CPU tensors only in Triton's interpreter, which needs TRITON_INTERPRET=1 set before "
                    "smat_kernels' Triton kernels are first imported")
        return f"runs CUDA tensors (and CPU tensors under TRITON_INTERPRET=1), got a {device.type} tensor"

    def merge(self, theta_pre, delta, log_alpha, alpha, mode, seed, offset, beta, gamma, zeta):
        return _kernels()[1].merge(theta_pre, delta, log_alpha, alpha, mode, seed, offset, beta, gamma, zeta)

    def uniforms(self, seed, offset, batch, n, num_experts, device):
        return _kernels()[1].uniforms(seed, offset, batch, n, num_experts, device)

    def merge_backward(self, grad, theta_pre, delta, log_alpha, alpha, mode, seed, offset, beta, gamma, zeta, needs):
        return _kernels()[1].merge_backward(grad, theta_pre, delta, log_alpha, alpha, mode, seed, offset, beta,
                                            gamma, zeta, needs)

    def expected_density(self, log_alpha, beta, gamma, zeta):
        return _kernels()[2].expected_density(log_alpha, beta, gamma, zeta)

    def expected_density_backward(self, grad, log_alpha, beta, gamma, zeta):
        return _kernels()[2].expected_density_backward(grad, log_alpha, beta, gamma, zeta)

    def hard_density(self, log_alpha, gamma, zeta):
        return _kernels()[2].hard_density(log_alpha, gamma, zeta)

    def pack(self, delta, log_alpha, gamma, zeta):
        return _kernels()[3].pack(delta, log_alpha, gamma, zeta)

    def packed_merge(self, theta_pre, packed, alpha):
        return _kernels()[3].packed_merge(theta_pre, packed, alpha)
