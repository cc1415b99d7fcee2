// Entry points of the CPU merge kernels (see merge.cpp).
#pragma once

#include <cstdint>

namespace smat::cpu {

// Shapes, mode and key of one merge. Pointers to θ-typed buffers travel
// separately as void*; log_α is fp32 [N, M] and α fp32 [B, M].
struct MergeArgs {
  const float* log_alpha;
  const float* alpha;
  int64_t batch;
  int64_t n;
  int64_t num_experts;
  int dtype;
  int mode;
  uint64_t seed;
  uint64_t offset;
  float beta;
  float gamma;
  float zeta;
};

// out: [B, N] θ-typed.
void merge_forward(const MergeArgs& args, void* out, const void* theta_pre, const void* delta);

// grad_out: [B, N]; any gradient pointer may be null to skip it.
// grad_pre, grad_delta: [N] θ-typed; grad_log_alpha: fp32 [N, M]; grad_alpha: fp32 [B, M].
void merge_backward(const MergeArgs& args, const void* grad_out, const void* delta, void* grad_pre, void* grad_delta,
                    float* grad_log_alpha, float* grad_alpha);

}  // namespace smat::cpu
