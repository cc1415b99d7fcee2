// CPU kernels of the merge op: θ[b] = θ_pre + θ_δ ⊙ Σ_m α[b, m] z[b, :, m]
// and its backward to θ_pre, θ_δ, log_α and α.
//
// Elements are processed in tiles of kLanes so that the per-lane loops
// vectorise (Philox and the hard-concrete transform run kLanes-wide); tiles
// are split over OpenMP threads. Masks are recomputed from their Philox key in
// the backward instead of being saved: that saves a [B, N, M] buffer.
#include "merge.h"

#include <omp.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <vector>

#include "cpu_common.h"

namespace smat::cpu {
namespace {

constexpr int kLanes = 16;
constexpr int kMaxExperts = 32;

// Per-tile working set shared by forward and backward.
struct Tile {
  int64_t start;
  int lanes;
  float expert[kMaxExperts][kLanes];  // expert_factor(log_α) per expert and lane
  float delta[kLanes];
};

template <typename T>
void load_tile(Tile& tile, const T* delta, const float* log_alpha, int64_t start, int64_t n, int64_t num_experts,
               const HardConcrete& hc) {
  tile.start = start;
  tile.lanes = static_cast<int>(std::min<int64_t>(kLanes, n - start));
  for (int lane = 0; lane < kLanes; ++lane) {
    const bool valid = lane < tile.lanes;
    tile.delta[lane] = valid ? to_float(delta[start + lane]) : 0.0f;
    for (int64_t m = 0; m < num_experts; ++m) {
      tile.expert[m][lane] = expert_factor(valid ? log_alpha[(start + lane) * num_experts + m] : 0.0f, hc.inv_temperature);
    }
  }
}

// Philox words of one expert group for every lane of a tile: words[k][lane].
inline void draw_group_portable(uint32_t words[kWordsPerPhiloxCall][kLanes], uint64_t seed, uint64_t first_counter,
                                int64_t groups) {
#pragma omp simd
  for (int lane = 0; lane < kLanes; ++lane) {
    const PhiloxWords drawn = philox4x32_10(first_counter + static_cast<uint64_t>(lane * groups), seed);
    words[0][lane] = drawn.w0;
    words[1][lane] = drawn.w1;
    words[2][lane] = drawn.w2;
    words[3][lane] = drawn.w3;
  }
}

#if defined(__AVX512F__)
// The same 16 Philox calls with AVX-512 intrinsics: GCC vectorises the
// header's 32×32→64-bit products as vpmullq, vpmuludq is the instruction made
// for them. Bit-identical to philox4x32_10 (tested against the reference).
struct MulHiLo {
  __m512i hi, lo;
};

inline MulHiLo mul_hi_lo(__m512i a, __m512i constant) {
  const __m512i even = _mm512_mul_epu32(a, constant);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), constant);
  const __mmask16 odd_lanes = 0xAAAA;
  return MulHiLo{_mm512_mask_blend_epi32(odd_lanes, _mm512_srli_epi64(even, 32), odd),
                 _mm512_mask_blend_epi32(odd_lanes, even, _mm512_slli_epi64(odd, 32))};
}

inline void draw_group(uint32_t words[kWordsPerPhiloxCall][kLanes], uint64_t seed, uint64_t first_counter,
                       int64_t groups) {
  static_assert(kLanes == 16, "one AVX-512 register of uint32 lanes");
  const __m512i step = _mm512_set1_epi64(groups);
  const __m512i low_lanes = _mm512_mullo_epi64(_mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0), step);
  const __m512i counters_low = _mm512_add_epi64(_mm512_set1_epi64(static_cast<int64_t>(first_counter)), low_lanes);
  const __m512i counters_high = _mm512_add_epi64(counters_low, _mm512_slli_epi64(step, 3));
  __m512i c0 = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(counters_low)),
                                  _mm512_cvtepi64_epi32(counters_high), 1);
  __m512i c1 = _mm512_inserti64x4(
      _mm512_castsi256_si512(_mm512_cvtepi64_epi32(_mm512_srli_epi64(counters_low, 32))),
      _mm512_cvtepi64_epi32(_mm512_srli_epi64(counters_high, 32)), 1);
  __m512i c2 = _mm512_setzero_si512(), c3 = _mm512_setzero_si512();
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const __m512i round_a = _mm512_set1_epi64(kPhiloxRoundA), round_b = _mm512_set1_epi64(kPhiloxRoundB);
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const MulHiLo product_b = mul_hi_lo(c2, round_b);
    const MulHiLo product_a = mul_hi_lo(c0, round_a);
    c0 = _mm512_xor_si512(_mm512_xor_si512(product_b.hi, c1), _mm512_set1_epi32(static_cast<int>(k0)));
    c2 = _mm512_xor_si512(_mm512_xor_si512(product_a.hi, c3), _mm512_set1_epi32(static_cast<int>(k1)));
    c1 = product_b.lo;
    c3 = product_a.lo;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  _mm512_storeu_si512(words[0], c0);
  _mm512_storeu_si512(words[1], c1);
  _mm512_storeu_si512(words[2], c2);
  _mm512_storeu_si512(words[3], c3);
}
#else
inline void draw_group(uint32_t words[kWordsPerPhiloxCall][kLanes], uint64_t seed, uint64_t first_counter,
                       int64_t groups) {
  draw_group_portable(words, seed, first_counter, groups);
}
#endif

// Calls body(m, noise[kLanes]) for every expert of task `task`, with the
// noise factors of the mode (ones in deterministic mode).
template <int Mode, bool kDefaultTemperature, typename Body>
inline void for_each_expert_noise(const HardConcrete& hc, uint64_t seed, uint64_t offset, int64_t task, int64_t start,
                                  int64_t n, int64_t num_experts, Body&& body) {
  float noise[kLanes];
  if constexpr (Mode == kDeterministic) {
    for (int lane = 0; lane < kLanes; ++lane) noise[lane] = 1.0f;
    for (int64_t m = 0; m < num_experts; ++m) body(m, noise);
  } else {
    const int64_t groups = philox_groups(num_experts);
    uint32_t words[kWordsPerPhiloxCall][kLanes];
    for (int64_t group = 0; group < groups; ++group) {
      draw_group(words, seed, philox_counter(offset, task, start, group, n, groups), groups);
      for (int word = 0; word < kWordsPerPhiloxCall; ++word) {
        const int64_t m = group * kWordsPerPhiloxCall + word;
        if (m >= num_experts) break;
#pragma omp simd
        for (int lane = 0; lane < kLanes; ++lane) {
          noise[lane] = noise_factor<kDefaultTemperature>(uint32_to_uniform(words[word][lane]), Mode, hc.inv_temperature);
        }
        body(m, noise);
      }
    }
  }
}

template <typename T, int Mode, bool kDefaultTemperature>
void merge_forward_typed(const MergeArgs& args, T* out, const T* theta_pre, const T* delta) {
  const HardConcrete hc = hard_concrete(Mode, args.beta, args.gamma, args.zeta);
  const int64_t n = args.n, num_experts = args.num_experts;
  const int64_t tiles = (n + kLanes - 1) / kLanes;
#pragma omp parallel for schedule(static)
  for (int64_t tile_index = 0; tile_index < tiles; ++tile_index) {
    Tile tile;
    load_tile(tile, delta, args.log_alpha, tile_index * kLanes, n, num_experts, hc);
    float pre[kLanes];
    for (int lane = 0; lane < kLanes; ++lane) pre[lane] = lane < tile.lanes ? to_float(theta_pre[tile.start + lane]) : 0.0f;
    for (int64_t task = 0; task < args.batch; ++task) {
      float weight[kLanes] = {};
      for_each_expert_noise<Mode, kDefaultTemperature>(hc, args.seed, args.offset, task, tile.start, n, num_experts,
                                  [&](int64_t m, const float* noise) {
                                    const float alpha = args.alpha[task * num_experts + m];
#pragma omp simd
                                    for (int lane = 0; lane < kLanes; ++lane) {
                                      const float z = mask_value(noise[lane], tile.expert[m][lane], hc);
                                      weight[lane] = accumulate_weight(weight[lane], alpha, z);
                                    }
                                  });
      T* row = out + task * n + tile.start;
      for (int lane = 0; lane < tile.lanes; ++lane) {
        row[lane] = from_float<T>(merge_element(pre[lane], tile.delta[lane], weight[lane]));
      }
    }
  }
}

template <typename T, int Mode, bool kDefaultTemperature>
void merge_backward_typed(const MergeArgs& args, const T* grad_out, const T* delta, T* grad_pre, T* grad_delta,
                          float* grad_log_alpha, float* grad_alpha) {
  const HardConcrete hc = hard_concrete(Mode, args.beta, args.gamma, args.zeta);
  const int64_t n = args.n, num_experts = args.num_experts, batch = args.batch;
  const int64_t tiles = (n + kLanes - 1) / kLanes;
  const int threads = omp_get_max_threads();
  // ∂α is a reduction over all elements: one double accumulator per thread,
  // summed in thread order afterwards so that results repeat run to run.
  std::vector<double> alpha_partials(static_cast<size_t>(threads) * batch * num_experts, 0.0);
#pragma omp parallel
  {
    double* my_alpha = alpha_partials.data() + static_cast<size_t>(omp_get_thread_num()) * batch * num_experts;
#pragma omp for schedule(static)
    for (int64_t tile_index = 0; tile_index < tiles; ++tile_index) {
      Tile tile;
      load_tile(tile, delta, args.log_alpha, tile_index * kLanes, n, num_experts, hc);
      float grad_log_alpha_tile[kMaxExperts][kLanes] = {};
      float grad_delta_tile[kLanes] = {};
      float grad_pre_tile[kLanes] = {};
      for (int64_t task = 0; task < batch; ++task) {
        float grad[kLanes], grad_times_delta[kLanes], weight[kLanes] = {};
        for (int lane = 0; lane < kLanes; ++lane) {
          grad[lane] = lane < tile.lanes ? to_float(grad_out[task * n + tile.start + lane]) : 0.0f;
          grad_times_delta[lane] = grad[lane] * tile.delta[lane];
        }
        for_each_expert_noise<Mode, kDefaultTemperature>(
            hc, args.seed, args.offset, task, tile.start, n, num_experts, [&](int64_t m, const float* noise) {
              const float alpha = args.alpha[task * num_experts + m];
              float grad_alpha_sum = 0.0f;
#pragma omp simd reduction(+ : grad_alpha_sum)
              for (int lane = 0; lane < kLanes; ++lane) {
                float dz;
                const float z = mask_entry(noise[lane], tile.expert[m][lane], hc, &dz);
                weight[lane] = accumulate_weight(weight[lane], alpha, z);
                grad_log_alpha_tile[m][lane] += grad_times_delta[lane] * alpha * dz;
                grad_alpha_sum += grad_times_delta[lane] * z;
              }
              my_alpha[task * num_experts + m] += grad_alpha_sum;
            });
#pragma omp simd
        for (int lane = 0; lane < kLanes; ++lane) {
          grad_delta_tile[lane] += grad[lane] * weight[lane];
          grad_pre_tile[lane] += grad[lane];
        }
      }
      for (int lane = 0; lane < tile.lanes; ++lane) {
        const int64_t element = tile.start + lane;
        if (grad_delta) grad_delta[element] = from_float<T>(grad_delta_tile[lane]);
        if (grad_pre) grad_pre[element] = from_float<T>(grad_pre_tile[lane]);
        if (grad_log_alpha) {
          for (int64_t m = 0; m < num_experts; ++m) grad_log_alpha[element * num_experts + m] = grad_log_alpha_tile[m][lane];
        }
      }
    }
  }
  if (grad_alpha) {
    for (int64_t i = 0; i < batch * num_experts; ++i) {
      double total = 0.0;
      for (int thread = 0; thread < threads; ++thread) total += alpha_partials[static_cast<size_t>(thread) * batch * num_experts + i];
      grad_alpha[i] = static_cast<float>(total);
    }
  }
}

template <typename Fn>
void dispatch_mode(const MergeArgs& args, Fn&& fn) {
  smat::dispatch_mode(args.mode, args.beta, "smat._cpu", fn);
}

}  // namespace

void uniforms(float* out, uint64_t seed, uint64_t offset, int64_t batch, int64_t n, int64_t num_experts) {
  const int64_t groups = philox_groups(num_experts);
  const int64_t tiles = (n + kLanes - 1) / kLanes;
  // The merge kernels' own path, tile by tile: draw_group (AVX-512 where
  // built) and uint32_to_uniform, so that the self-test checks what they draw.
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t task = 0; task < batch; ++task) {
    for (int64_t tile_index = 0; tile_index < tiles; ++tile_index) {
      const int64_t start = tile_index * kLanes;
      const int lanes = static_cast<int>(std::min<int64_t>(kLanes, n - start));
      uint32_t words[kWordsPerPhiloxCall][kLanes];
      for (int64_t group = 0; group < groups; ++group) {
        draw_group(words, seed, philox_counter(offset, task, start, group, n, groups), groups);
        for (int word = 0; word < kWordsPerPhiloxCall; ++word) {
          const int64_t m = group * kWordsPerPhiloxCall + word;
          if (m >= num_experts) break;
          for (int lane = 0; lane < lanes; ++lane) {
            out[(task * n + start + lane) * num_experts + m] = uint32_to_uniform(words[word][lane]);
          }
        }
      }
    }
  }
}

void merge_forward(const MergeArgs& args, void* out, const void* theta_pre, const void* delta) {
  dispatch_theta_dtype(args.dtype, [&](auto* typed) {
    using T = std::remove_pointer_t<decltype(typed)>;
    dispatch_mode(args, [&](auto mode, auto default_temperature) {
      merge_forward_typed<T, decltype(mode)::value, decltype(default_temperature)::value>(args, static_cast<T*>(out), static_cast<const T*>(theta_pre),
                                                    static_cast<const T*>(delta));
    });
  });
}

void merge_backward(const MergeArgs& args, const void* grad_out, const void* delta, void* grad_pre, void* grad_delta,
                    float* grad_log_alpha, float* grad_alpha) {
  dispatch_theta_dtype(args.dtype, [&](auto* typed) {
    using T = std::remove_pointer_t<decltype(typed)>;
    dispatch_mode(args, [&](auto mode, auto default_temperature) {
      merge_backward_typed<T, decltype(mode)::value, decltype(default_temperature)::value>(args, static_cast<const T*>(grad_out), static_cast<const T*>(delta),
                                                     static_cast<T*>(grad_pre), static_cast<T*>(grad_delta),
                                                     grad_log_alpha, grad_alpha);
    });
  });
}

}  // namespace smat::cpu
