// CPU kernels of the sparsity measures: the expected density (the L0 term of
// the Lagrangian) and the hard density of the deterministic masks.
#include "density.h"

#include <omp.h>

#include <cmath>
#include <vector>

#include "cpu_common.h"

namespace smat::cpu {
namespace {

// Sums value(j, m) over elements into fp64 [M], per thread then in thread
// order, so that the result repeats run to run.
template <typename Value>
std::vector<double> column_sums(int64_t n, int64_t num_experts, Value&& value) {
  const int threads = omp_get_max_threads();
  std::vector<double> partials(static_cast<size_t>(threads) * num_experts, 0.0);
#pragma omp parallel
  {
    double* mine = partials.data() + static_cast<size_t>(omp_get_thread_num()) * num_experts;
    std::vector<float> row_sums(num_experts);
    constexpr int64_t kChunk = 4096;  // fp32 sums of short runs, fp64 across them
#pragma omp for schedule(static)
    for (int64_t chunk = 0; chunk < (n + kChunk - 1) / kChunk; ++chunk) {
      std::fill(row_sums.begin(), row_sums.end(), 0.0f);
      const int64_t end = std::min(n, (chunk + 1) * kChunk);
      for (int64_t j = chunk * kChunk; j < end; ++j) {
        for (int64_t m = 0; m < num_experts; ++m) row_sums[m] += value(j * num_experts + m);
      }
      for (int64_t m = 0; m < num_experts; ++m) mine[m] += row_sums[m];
    }
  }
  std::vector<double> totals(num_experts, 0.0);
  for (int thread = 0; thread < threads; ++thread) {
    for (int64_t m = 0; m < num_experts; ++m) totals[m] += partials[static_cast<size_t>(thread) * num_experts + m];
  }
  return totals;
}

float log_ratio_times_beta(float beta, float gamma, float zeta) { return beta * std::log(-gamma / zeta); }

}  // namespace

void expected_density(float* out, const float* log_alpha, int64_t n, int64_t num_experts, float beta, float gamma,
                      float zeta) {
  const float shift = log_ratio_times_beta(beta, gamma, zeta);
  const std::vector<double> sums =
      column_sums(n, num_experts, [&](int64_t index) { return nonzero_probability(log_alpha[index], shift); });
  for (int64_t m = 0; m < num_experts; ++m) out[m] = static_cast<float>(sums[m] / static_cast<double>(n));
}

void expected_density_backward(float* grad_log_alpha, const float* grad_out, const float* log_alpha, int64_t n,
                               int64_t num_experts, float beta, float gamma, float zeta) {
  const float shift = log_ratio_times_beta(beta, gamma, zeta);
  std::vector<float> scale(num_experts);
  for (int64_t m = 0; m < num_experts; ++m) scale[m] = grad_out[m] / static_cast<float>(n);
  const int64_t total = n * num_experts;
#pragma omp parallel for simd schedule(static)
  for (int64_t index = 0; index < total; ++index) {
    const float p = nonzero_probability(log_alpha[index], shift);
    grad_log_alpha[index] = scale[index % num_experts] * (p * (1.0f - p));
  }
}

void hard_density(float* out, const float* log_alpha, int64_t n, int64_t num_experts, float gamma, float zeta) {
  const HardConcrete hc = hard_concrete(kDeterministic, 1.0f, gamma, zeta);
  const std::vector<double> counts = column_sums(
      n, num_experts, [&](int64_t index) { return mask_value(1.0f, expert_factor(log_alpha[index], 1.0f), hc) > 0.0f ? 1.0f : 0.0f; });
  for (int64_t m = 0; m < num_experts; ++m) out[m] = static_cast<float>(counts[m] / static_cast<double>(n));
}

}  // namespace smat::cpu
