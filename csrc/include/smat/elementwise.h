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
// exp and log of the CPU kernels. Written in basic IEEE operations (no FMA,
// no table, no library call) so that the scalar code and GCC's vectors of any
// width (SSE, AVX2, AVX-512) round identically: the CPU module runs one ISA
// path per machine (csrc/cpu/isa.h) and all paths must give the same bits,
// which glibc's expf and libmvec's per-width variants do not. Error ≤ 2 ulp
// (Cephes' polynomials). The GPU keeps its own expf/logf.
// ---------------------------------------------------------------------------

SMAT_HD float bits_to_float(uint32_t bits) {
  union {
    uint32_t u;
    float f;
  } value{bits};
  return value.f;
}

SMAT_HD uint32_t float_to_bits(float x) {
  union {
    float f;
    uint32_t u;
  } value{x};
  return value.u;
}

SMAT_HD float exp_f32(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  // x = n·ln 2 + r with |r| ≤ ln2/2; ln 2 split in two so that n·ln2_high is exact.
  const float clamped = x > 88.8f ? 88.8f : (x >= -104.0f ? x : -104.0f);  // NaN → −104, replaced below
  const float n = floorf(clamped * 1.44269504088896341f + 0.5f);
  float r = clamped - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  const float r2 = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r2 + r + 1.0f;
  // 2^n in two factors, so that results down to the subnormals and up to the overflow stay finite in between.
  const int32_t exponent = static_cast<int32_t>(n);
  const int32_t half = exponent / 2;
  const float result = y * bits_to_float(static_cast<uint32_t>(half + 127) << 23) *
                       bits_to_float(static_cast<uint32_t>(exponent - half + 127) << 23);
  return x != x ? x : (x > 88.8f ? INFINITY : (x < -104.0f ? 0.0f : result));
#endif
}

SMAT_HD float log_f32(float x) {
#if defined(__CUDA_ARCH__)
  return logf(x);
#else
  // x = 2^e·m with m in [√½, √2); subnormals are scaled up by 2^25 first.
  const bool subnormal = x < 1.17549435e-38f;
  const float scaled = subnormal ? x * 33554432.0f : x;
  const uint32_t bits = float_to_bits(scaled);
  int32_t e = static_cast<int32_t>((bits >> 23) & 0xFFu) - 126;
  float m = bits_to_float((bits & 0x007FFFFFu) | 0x3F000000u);  // in [0.5, 1)
  const bool low = m < 0.707106781186547524f;
  e = low ? e - 1 : e;
  m = low ? m + m - 1.0f : m - 1.0f;
  const float fe = static_cast<float>(e) - (subnormal ? 25.0f : 0.0f);
  const float z = m * m;
  float p = 7.0376836292e-2f;
  p = p * m + -1.1514610310e-1f;
  p = p * m + 1.1676998740e-1f;
  p = p * m + -1.2420140846e-1f;
  p = p * m + 1.4249322787e-1f;
  p = p * m + -1.6668057665e-1f;
  p = p * m + 2.0000714765e-1f;
  p = p * m + -2.4999993993e-1f;
  p = p * m + 3.3333331174e-1f;
  float y = p * m * z;
  y = y + fe * -2.12194440e-4f;
  y = y + -0.5f * z;
  const float result = m + y + fe * 0.693359375f;
  // log 0 = −inf, log of a negative = NaN, log inf = inf, NaN stays NaN.
  return x == 0.0f ? -INFINITY : (x < 0.0f ? NAN : (x == INFINITY || x != x ? x : result));
#endif
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
  return exp_f32(inv_temperature * log_f32(ratio));
}

SMAT_HD bool is_default_temperature(float inv_temperature) { return inv_temperature == 1.5f; }

SMAT_HD float expert_factor(float log_alpha, float inv_temperature) { return exp_f32(-log_alpha * inv_temperature); }

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
  // Both arms computed, then selected: a product under a condition is not
  // evaluated speculatively (-ftrapping-math), and GCC left the backward's
  // loop scalar around it.
  const bool inside = (stretched >= 0.0f) & (stretched <= 1.0f);
  const float derivative = hc.stretch * (s * (1.0f - s)) * hc.inv_temperature;
  *dz_dlog_alpha = inside ? derivative : 0.0f;
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
