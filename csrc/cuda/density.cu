// CUDA kernels of the sparsity measures: the expected density (the L0 term of
// the Lagrangian, and its backward) and the hard density of the deterministic
// masks.
//
// Launch configuration and why:
// * column sums (both densities): blocks of 256 threads read log_α [N, M] as
//   the flat array it is, floor(256 / M) rows per block step, so that a warp
//   reads consecutive addresses and thread t always sees column t % M. The grid
//   is capped at kMaxBlocks and strides over the rows; every thread keeps one
//   fp64 sum. The block adds the sums of each column in thread order through
//   shared memory into row `block` of an fp64 [blocks, M] scratch buffer, and
//   finish_mean_kernel adds the rows in order: no atomics, so the result
//   repeats bit for bit run to run. The grid depends on N and M only, not on
//   the GPU, so two GPUs give the same sums too.
// * expected-density backward: element-wise over the N·M entries, one thread
//   per entry, 256 per block, 64-bit indices.
#include "density.h"

#include <algorithm>
#include <cmath>

#include "cuda_common.cuh"

namespace smat::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1024;

struct ExpectedDensityValue {
  float shift;  // β·log(−γ/ζ)
  __device__ __forceinline__ float operator()(float log_alpha) const { return nonzero_probability(log_alpha, shift); }
};

struct HardDensityValue {
  HardConcrete hc;
  __device__ __forceinline__ float operator()(float log_alpha) const {
    return mask_value(1.0f, expert_factor(log_alpha, 1.0f), hc) > 0.0f ? 1.0f : 0.0f;
  }
};

int64_t rows_per_step(int64_t num_experts) { return kThreads / num_experts; }

// partials[blockIdx.x, m] = Σ value(log_α[j, m]) over the rows j of this block.
template <typename Value>
__global__ void __launch_bounds__(kThreads)
    column_partials_kernel(double* __restrict__ partials, const float* __restrict__ log_alpha, int64_t n,
                           int64_t num_experts, Value value) {
  __shared__ double thread_sums[kThreads];
  const int64_t rows_per_block = kThreads / num_experts;
  const int64_t column = threadIdx.x % num_experts;
  const int64_t row_in_step = threadIdx.x / num_experts;
  double sum = 0.0;
  if (row_in_step < rows_per_block) {
    for (int64_t row = blockIdx.x * rows_per_block + row_in_step; row < n; row += gridDim.x * rows_per_block) {
      sum += value(__ldg(log_alpha + row * num_experts + column));
    }
  }
  thread_sums[threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.x < num_experts) {
    double total = 0.0;
    for (int64_t row = 0; row < rows_per_block; ++row) total += thread_sums[row * num_experts + threadIdx.x];
    partials[blockIdx.x * num_experts + threadIdx.x] = total;
  }
}

// out[m] = (Σ_r partials[r, m]) / N, rows added in order.
__global__ void finish_mean_kernel(float* __restrict__ out, const double* __restrict__ partials, int64_t rows,
                                   int64_t n, int64_t num_experts) {
  const int64_t column = threadIdx.x;
  if (column >= num_experts) return;
  double total = 0.0;
  for (int64_t row = 0; row < rows; ++row) total += partials[row * num_experts + column];
  out[column] = static_cast<float>(total / static_cast<double>(n));
}

__global__ void __launch_bounds__(kThreads)
    expected_density_backward_kernel(float* __restrict__ grad_log_alpha, const float* __restrict__ grad_out,
                                     const float* __restrict__ log_alpha, int64_t n, int64_t num_experts,
                                     float shift) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= n * num_experts) return;
  const float scale = __ldg(grad_out + index % num_experts) / static_cast<float>(n);
  const float p = nonzero_probability(__ldg(log_alpha + index), shift);
  grad_log_alpha[index] = scale * (p * (1.0f - p));
}

float log_ratio_times_beta(float beta, float gamma, float zeta) { return beta * std::log(-gamma / zeta); }

template <typename Value>
void column_mean(float* out, double* partials, const float* log_alpha, int64_t n, int64_t num_experts, Value value,
                 cudaStream_t stream) {
  if (num_experts < 1 || num_experts > kThreads) throw std::invalid_argument("smat._cuda: M must be in [1, 256]");
  const int64_t blocks = density_partial_rows(n, num_experts);
  column_partials_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(partials, log_alpha, n, num_experts,
                                                                                value);
  check_launch("column_partials_kernel");
  finish_mean_kernel<<<1, kThreads, 0, stream>>>(out, partials, blocks, n, num_experts);
  check_launch("finish_mean_kernel");
}

}  // namespace

int64_t density_partial_rows(int64_t n, int64_t num_experts) {
  return std::max<int64_t>(1, std::min(kMaxBlocks, ceil_div(n, rows_per_step(num_experts))));
}

void expected_density(float* out, double* partials, const float* log_alpha, int64_t n, int64_t num_experts,
                      float beta, float gamma, float zeta, uintptr_t stream) {
  column_mean(out, partials, log_alpha, n, num_experts, ExpectedDensityValue{log_ratio_times_beta(beta, gamma, zeta)},
              as_stream(stream));
}

void expected_density_backward(float* grad_log_alpha, const float* grad_out, const float* log_alpha, int64_t n,
                               int64_t num_experts, float beta, float gamma, float zeta, uintptr_t stream) {
  const int64_t total = n * num_experts;
  if (total == 0) return;
  expected_density_backward_kernel<<<static_cast<unsigned>(ceil_div(total, kThreads)), kThreads, 0,
                                     as_stream(stream)>>>(grad_log_alpha, grad_out, log_alpha, n, num_experts,
                                                          log_ratio_times_beta(beta, gamma, zeta));
  check_launch("expected_density_backward_kernel");
}

void hard_density(float* out, double* partials, const float* log_alpha, int64_t n, int64_t num_experts, float gamma,
                  float zeta, uintptr_t stream) {
  column_mean(out, partials, log_alpha, n, num_experts,
              HardDensityValue{hard_concrete(kDeterministic, 1.0f, gamma, zeta)}, as_stream(stream));
}

}  // namespace smat::cuda
