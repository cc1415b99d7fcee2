"""The plain-PyTorch backend: smat_kernels.reference behind the Backend API.
Its backward is the written-out reference.merge_backward."""

from __future__ import annotations

from .. import reference
from .base import Backend


class ReferenceBackend(Backend):
    name = "reference"
    self_tested = False

    def uniforms(self, seed, offset, batch, n, num_experts, device):
        return reference.uniforms(seed, offset, batch, n, num_experts, device)

    def merge(self, theta_pre, delta, log_alpha, alpha, mode, seed, offset, beta, gamma, zeta):
        return reference.merge(theta_pre, delta, log_alpha, alpha, reference.MODES[mode], seed, offset,
                               beta, gamma, zeta)

    def merge_backward(self, grad, theta_pre, delta, log_alpha, alpha, mode, seed, offset, beta, gamma, zeta, needs):
        grads = reference.merge_backward(grad, theta_pre, delta, log_alpha, alpha, reference.MODES[mode], seed,
                                         offset, beta, gamma, zeta)
        return tuple(g if need else None for g, need in zip(grads, needs))

    def expected_density(self, log_alpha, beta, gamma, zeta):
        return reference.expected_density(log_alpha, beta, gamma, zeta)

    def expected_density_backward(self, grad, log_alpha, beta, gamma, zeta):
        return reference.expected_density_backward(grad, log_alpha, beta, gamma, zeta)

    def hard_density(self, log_alpha, gamma, zeta):
        return reference.hard_density(log_alpha, gamma, zeta)

    def pack(self, delta, log_alpha, gamma, zeta):
        return reference.pack(delta, log_alpha, gamma, zeta)

    def packed_merge(self, theta_pre, packed, alpha):
        return reference.packed_merge(theta_pre, packed, alpha)
