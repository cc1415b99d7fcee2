// Arguments of one merge, shared by the CPU and CUDA entry points. Plain C++
// types only, so that the pybind11 bindings need neither CUDA nor torch
// headers. θ-typed buffers travel separately as void*; log_α is fp32 [N, M]
// and α fp32 [B, M].
#pragma once

#include <cstdint>

namespace smat {

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
  uintptr_t stream = 0;  // cudaStream_t as an integer; unused on the CPU
};

}  // namespace smat
