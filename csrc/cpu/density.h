// Entry points of the CPU density kernels (see density.cpp).
#pragma once

#include <cstdint>

namespace smat::cpu {

// out: fp32 [M], mean over elements of P(z != 0); log_alpha fp32 [N, M].
void expected_density(float* out, const float* log_alpha, int64_t n, int64_t num_experts, float beta, float gamma,
                      float zeta);

// grad_log_alpha[j, m] = grad_out[m] / N · p(1 − p).
void expected_density_backward(float* grad_log_alpha, const float* grad_out, const float* log_alpha, int64_t n,
                               int64_t num_experts, float beta, float gamma, float zeta);

// out: fp32 [M], fraction of elements whose deterministic mask is > 0.
void hard_density(float* out, const float* log_alpha, int64_t n, int64_t num_experts, float gamma, float zeta);

}  // namespace smat::cpu
