// Entry points of the CUDA merge kernels (see merge.cu). Plain C++ types only,
// so that bindings.cpp compiles without CUDA or torch headers; every pointer
// is a device pointer and `stream` a cudaStream_t passed as an integer.
#pragma once

#include <cstdint>

#include "smat/merge_args.h"

namespace smat::cuda {

using smat::MergeArgs;

// out: [B, N] θ-typed.
void merge_forward(const MergeArgs& args, void* out, const void* theta_pre, const void* delta);

// Rows of the fp32 [rows, B, M] scratch buffer that merge_backward needs for ∂α.
int64_t merge_backward_partial_rows(int64_t n);

// grad_out: [B, N]; any gradient pointer may be null to skip it.
// grad_pre, grad_delta: [N] θ-typed; grad_log_alpha: fp32 [N, M]; grad_alpha:
// fp32 [B, M]; alpha_partials: fp32 [merge_backward_partial_rows, B, M]
// scratch (may be null when grad_alpha is).
void merge_backward(const MergeArgs& args, const void* grad_out, const void* delta, void* grad_pre, void* grad_delta,
                    float* grad_log_alpha, float* grad_alpha, float* alpha_partials);

// The uniforms u of one sampled merge, fp32 [B, N, M], drawn exactly as the
// merge kernels draw them (for tests of bit identity with the reference).
void uniforms(float* out, uint64_t seed, uint64_t offset, int64_t batch, int64_t n, int64_t num_experts,
              uintptr_t stream);

}  // namespace smat::cuda
