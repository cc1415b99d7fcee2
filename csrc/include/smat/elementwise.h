// Per-element math of SMAT, shared by the CPU kernels (csrc/cpu) and the CUDA
// kernels (csrc/cuda) so that the CPU build exercises the math that runs on
// the GPU. smat_kernels/reference.py is the readable specification of every
// function here; keep the two in step.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define SMAT_HD __host__ __device__ __forceinline__
#else
#define SMAT_HD inline __attribute__((always_inline))
#endif

namespace smat {

// ---------------------------------------------------------------------------
// Philox4x32-10, bit-identical to Triton's tl.randint4x(seed, counter).
// ---------------------------------------------------------------------------

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr int kPhiloxRounds = 10;
constexpr int kWordsPerPhiloxCall = 4;

struct PhiloxWords {
  uint32_t w0, w1, w2, w3;
};

SMAT_HD PhiloxWords philox4x32_10(uint64_t counter, uint64_t seed) {
  uint32_t c0 = static_cast<uint32_t>(counter);
  uint32_t c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0u, c3 = 0u;
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint64_t product_b = static_cast<uint64_t>(kPhiloxRoundB) * c2;
    const uint64_t product_a = static_cast<uint64_t>(kPhiloxRoundA) * c0;
    const uint32_t next_c0 = static_cast<uint32_t>(product_b >> 32) ^ c1 ^ k0;
    const uint32_t next_c2 = static_cast<uint32_t>(product_a >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(product_b);
    c3 = static_cast<uint32_t>(product_a);
    c0 = next_c0;
    c2 = next_c2;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return PhiloxWords{c0, c1, c2, c3};
}

// tl.rand's conversion: the word read as int32, negatives folded by bitwise
// not, scaled in float32 by the largest s with (2^31 - 1)·s < 1.
SMAT_HD float uint32_to_uniform(uint32_t word) {
  int32_t folded = static_cast<int32_t>(word);
  folded = folded < 0 ? ~folded : folded;
  return static_cast<float>(folded) * 4.6566127342e-10f;
}

SMAT_HD uint32_t philox_word(const PhiloxWords& words, int index) {
  return index == 0 ? words.w0 : index == 1 ? words.w1 : index == 2 ? words.w2 : words.w3;
}

// The one map from (task, element, expert group) to a Philox counter; see
// smat_kernels/reference.py::philox_counter. Expert m uses group m / 4 and
// word m % 4.
SMAT_HD int64_t philox_groups(int64_t num_experts) {
  return (num_experts + kWordsPerPhiloxCall - 1) / kWordsPerPhiloxCall;
}

SMAT_HD uint64_t philox_counter(uint64_t offset, int64_t task, int64_t element, int64_t group,
                                int64_t n, int64_t groups) {
  return offset + static_cast<uint64_t>((task * n + element) * groups + group);
}

// ---------------------------------------------------------------------------
// Hard-concrete masks (Louizos et al. 2018).
// ---------------------------------------------------------------------------

enum MaskMode : int { kDeterministic = 0, kSample = 1, kNearNoiseless = 2 };

constexpr float kNearNoiselessLow = static_cast<float>(0.5 - 1e-6);
constexpr float kNearNoiselessWidth = 2e-6f;

struct HardConcrete {
  float inv_temperature;  // 1/β when sampling, 1 in deterministic mode
  float gamma;
  float stretch;  // ζ − γ
};

// The hard-concrete sample s = sigmoid((log u − log(1 − u) + log_α)/T) is
// evaluated as s = 1 / (1 + noise_factor · expert_factor) with
//   noise_factor  = ((1 − u)/u)^(1/T)   (per task, element and expert)
//   expert_factor = exp(−log_α/T)       (per element and expert: shared by the
//                                        B tasks, so computed once)
// which replaces a log, a log1p and an exp per sample by a division and a
// square root at the default β = 2/3. Mode-dependent rescaling of u happens
// here so that every backend applies it identically.
// kDefaultTemperature: 1/T = 1.5 (β = 2/3), where x^(1/T) = x·sqrt(x).
template <bool kDefaultTemperature>
SMAT_HD float noise_factor(float u, int mode, float inv_temperature) {
  if (mode == kDeterministic) return 1.0f;
  if (mode == kNearNoiseless) u = kNearNoiselessLow + u * kNearNoiselessWidth;
  const float ratio = (1.0f - u) / u;  // +inf at u = 0: s = 0, as log(0) = −inf gives
  if (kDefaultTemperature) return ratio * sqrtf(ratio);
  return expf(inv_temperature * logf(ratio));
}

SMAT_HD bool is_default_temperature(float inv_temperature) { return inv_temperature == 1.5f; }

SMAT_HD float expert_factor(float log_alpha, float inv_temperature) { return expf(-log_alpha * inv_temperature); }

// One mask entry and its derivative with respect to log_α:
//   z = clamp(s·(ζ − γ) + γ, 0, 1),
//   dz/dlog_α = (ζ − γ)·s·(1 − s)/T inside the clamp's closed range, else 0
// (the closed range matches torch.clamp's gradient).
SMAT_HD float mask_entry(float noise, float expert, const HardConcrete& hc, float* dz_dlog_alpha) {
  // u = 0 gives an infinite noise factor, which wins even over an expert
  // factor that underflowed to 0 (inf · 0 would be NaN).
  const float product = noise == INFINITY ? noise : noise * expert;
  const float s = 1.0f / (1.0f + product);
  const float stretched = s * hc.stretch + hc.gamma;
  const bool inside = stretched >= 0.0f && stretched <= 1.0f;
  *dz_dlog_alpha = inside ? hc.stretch * (s * (1.0f - s)) * hc.inv_temperature : 0.0f;
  // Comparisons instead of fminf/fmaxf: they vectorise, and NaN propagates as in torch.clamp.
  return stretched < 0.0f ? 0.0f : (stretched > 1.0f ? 1.0f : stretched);
}

SMAT_HD float mask_value(float noise, float expert, const HardConcrete& hc) {
  float unused;
  return mask_entry(noise, expert, hc, &unused);
}

// P(z != 0) = sigmoid(log_α − β·log(−γ/ζ)); its derivative is p(1 − p).
SMAT_HD float nonzero_probability(float log_alpha, float log_ratio_times_beta) {
  return 1.0f / (1.0f + expf(-(log_alpha - log_ratio_times_beta)));
}

// ---------------------------------------------------------------------------
// The merge of one element: θ = θ_pre + θ_δ · w with w = Σ_m α_m z_m summed
// in order m = 0 … M−1 (the packed merge relies on that order).
// ---------------------------------------------------------------------------

SMAT_HD float accumulate_weight(float weight, float alpha, float z) { return weight + alpha * z; }

SMAT_HD float merge_element(float theta_pre, float delta, float weight) { return theta_pre + delta * weight; }

}  // namespace smat
