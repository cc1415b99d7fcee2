// CPU kernels of the merge op: θ[b] = θ_pre + θ_δ ⊙ Σ_m α[b, m] z[b, :, m]
// and its backward to θ_pre, θ_δ, log_α and α. The kernels themselves are in
// merge_kernels.h, compiled once per instruction-set path; these entry points
// call the path that isa.h chose for this CPU.
#include "merge.h"

#include "isa.h"

namespace smat::cpu {

#define SMAT_DECLARE_MERGE_KERNELS(isa)                                                                             \
  namespace isa {                                                                                                   \
  void merge_forward(const MergeArgs& args, void* out, const void* theta_pre, const void* delta);                   \
  void merge_backward(const MergeArgs& args, const void* grad_out, const void* delta, void* grad_pre,               \
                      void* grad_delta, float* grad_log_alpha, float* grad_alpha);                                  \
  void uniforms(float* out, uint64_t seed, uint64_t offset, int64_t batch, int64_t n, int64_t num_experts);        \
  }

SMAT_DECLARE_MERGE_KERNELS(portable)
#if defined(SMAT_CPU_ISA_KERNELS)
SMAT_DECLARE_MERGE_KERNELS(avx2)
SMAT_DECLARE_MERGE_KERNELS(avx512)
#endif
#undef SMAT_DECLARE_MERGE_KERNELS

namespace {

struct MergeKernels {
  decltype(&portable::merge_forward) forward;
  decltype(&portable::merge_backward) backward;
  decltype(&portable::uniforms) uniforms;
};

MergeKernels kernels() {
  switch (active_isa()) {
#if defined(SMAT_CPU_ISA_KERNELS)
    case Isa::kAvx512:
      return {avx512::merge_forward, avx512::merge_backward, avx512::uniforms};
    case Isa::kAvx2:
      return {avx2::merge_forward, avx2::merge_backward, avx2::uniforms};
#endif
    default:
      return {portable::merge_forward, portable::merge_backward, portable::uniforms};
  }
}

}  // namespace

void uniforms(float* out, uint64_t seed, uint64_t offset, int64_t batch, int64_t n, int64_t num_experts) {
  kernels().uniforms(out, seed, offset, batch, n, num_experts);
}

void merge_forward(const MergeArgs& args, void* out, const void* theta_pre, const void* delta) {
  kernels().forward(args, out, theta_pre, delta);
}

void merge_backward(const MergeArgs& args, const void* grad_out, const void* delta, void* grad_pre, void* grad_delta,
                    float* grad_log_alpha, float* grad_alpha) {
  kernels().backward(args, grad_out, delta, grad_pre, grad_delta, grad_log_alpha, grad_alpha);
}

}  // namespace smat::cpu
