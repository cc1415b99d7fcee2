// Entry points of the CPU merge kernels (see merge.cpp).
#pragma once

#include <cstdint>

#include "smat/merge_args.h"

namespace smat::cpu {

using smat::MergeArgs;

// out: [B, N] θ-typed.
void merge_forward(const MergeArgs& args, void* out, const void* theta_pre, const void* delta);

// grad_out: [B, N]; any gradient pointer may be null to skip it.
// grad_pre, grad_delta: [N] θ-typed; grad_log_alpha: fp32 [N, M]; grad_alpha: fp32 [B, M].
void merge_backward(const MergeArgs& args, const void* grad_out, const void* delta, void* grad_pre, void* grad_delta,
                    float* grad_log_alpha, float* grad_alpha);

// The uniforms u of one sampled merge, fp32 [B, N, M], drawn exactly as the
// merge kernels draw them (for the self-test's bit-identity check).
void uniforms(float* out, uint64_t seed, uint64_t offset, int64_t batch, int64_t n, int64_t num_experts);

}  // namespace smat::cpu
