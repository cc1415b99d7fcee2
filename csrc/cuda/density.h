// Entry points of the CUDA density kernels (see density.cu). Device pointers;
// `stream` is a cudaStream_t passed as an integer.
#pragma once

#include <cstdint>

namespace smat::cuda {

// Rows of the fp64 [rows, M] scratch buffer that the two reductions need.
int64_t density_partial_rows(int64_t n, int64_t num_experts);

// out: fp32 [M], mean over elements of P(z != 0); log_alpha fp32 [N, M];
// partials: fp64 [density_partial_rows, M] scratch.
void expected_density(float* out, double* partials, const float* log_alpha, int64_t n, int64_t num_experts,
                      float beta, float gamma, float zeta, uintptr_t stream);

// grad_log_alpha[j, m] = grad_out[m] / N · p(1 − p).
void expected_density_backward(float* grad_log_alpha, const float* grad_out, const float* log_alpha, int64_t n,
                               int64_t num_experts, float beta, float gamma, float zeta, uintptr_t stream);

// out: fp32 [M], fraction of elements whose deterministic mask is > 0.
void hard_density(float* out, double* partials, const float* log_alpha, int64_t n, int64_t num_experts, float gamma,
                  float zeta, uintptr_t stream);

}  // namespace smat::cuda
