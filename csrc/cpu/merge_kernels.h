// The merge kernels of one instruction-set path, compiled once per path:
// merge_portable.cpp (the build's -march), merge_avx2.cpp (x86-64-v3) and
// merge_avx512.cpp (x86-64-v4), each defining SMAT_CPU_ISA as its namespace.
// merge.cpp chooses one at run time (isa.h). All paths give the same bits:
// integer Philox, IEEE basic operations without contraction (-ffp-contract=off),
// exp/log written out in elementwise.h, and reductions summed in a fixed
// order whatever the vector width.
//
// Elements are processed in tiles of kLanes so that the per-lane loops
// vectorise (Philox and the hard-concrete transform run kLanes-wide); tiles
// are split over OpenMP threads. Masks are recomputed from their Philox key in
// the backward instead of being saved: that saves a [B, N, M] buffer.
//
// No std:: container here: an inline function that the compiler emits out of
// line in two paths' objects is merged by the linker into one copy, which may
// be the AVX-512 one; everything here is in the path's own namespace, and the
// helpers of cpu_common.h/elementwise.h are always inlined.
#pragma once

#ifndef SMAT_CPU_ISA
#error "define SMAT_CPU_ISA (portable, avx2 or avx512) before including merge_kernels.h"
#endif

#include <omp.h>

#if defined(SMAT_CPU_ISA_AVX2) || defined(SMAT_CPU_ISA_AVX512)
#include <immintrin.h>
#endif

#include <algorithm>
#include <memory>

#include "cpu_common.h"
#include "merge.h"

namespace smat::cpu::SMAT_CPU_ISA {
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
  // Transpose log_α's [lanes, M] rows to [M, kLanes] first, so that the exp
  // below runs kLanes-wide on contiguous lanes.
  for (int lane = 0; lane < kLanes; ++lane) {
    const bool valid = lane < tile.lanes;
    tile.delta[lane] = valid ? to_float(delta[start + lane]) : 0.0f;
    for (int64_t m = 0; m < num_experts; ++m) {
      tile.expert[m][lane] = valid ? log_alpha[(start + lane) * num_experts + m] : 0.0f;
    }
  }
  for (int64_t m = 0; m < num_experts; ++m) {
#pragma omp simd
    for (int lane = 0; lane < kLanes; ++lane) tile.expert[m][lane] = expert_factor(tile.expert[m][lane], hc.inv_temperature);
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

#if defined(SMAT_CPU_ISA_AVX512)
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
#elif defined(SMAT_CPU_ISA_AVX2)
// The same 16 Philox calls with AVX2 intrinsics, one call per 64-bit lane:
// each state word lives in the low half of its lane, where vpmuludq reads it
// and writes the whole 64-bit product, hi word above lo word. The hi word is
// one shift away, and the lo word needs no extraction at all: the garbage in a
// lane's high half is never read (vpmuludq ignores it, xor keeps halves
// apart). Per round and 4 calls: 2 multiplies, 2 shifts, 4 xors, against 2
// multiplies, 3 shifts, 2 blends and 2 xors per 4 calls in the packed
// 8 × 32-bit layout of the AVX-512 path. Measured on a Zen 4 EPYC
// (benchmarks/results/cpu_2026-12-07.md, N = 22M, M = 8, B = 4): forward 0.98 s
// on this path against 0.66 s on the AVX-512 one, 716 M against 1,070 M mask samples/s.
// Bit-identical to philox4x32_10 (tested against the reference).
inline __m256i low_halves(__m256i first, __m256i second) {
  // [f0 f1 f2 f3], [s0 s1 s2 s3] (64-bit lanes) → [f0 f1 f2 f3 s0 s1 s2 s3] (their low 32 bits)
  const __m256 interleaved =
      _mm256_shuffle_ps(_mm256_castsi256_ps(first), _mm256_castsi256_ps(second), _MM_SHUFFLE(2, 0, 2, 0));
  return _mm256_permute4x64_epi64(_mm256_castps_si256(interleaved), _MM_SHUFFLE(3, 1, 2, 0));
}

inline void draw_group(uint32_t words[kWordsPerPhiloxCall][kLanes], uint64_t seed, uint64_t first_counter,
                       int64_t groups) {
  constexpr int kVectors = kLanes / 4;
  static_assert(kVectors % 2 == 0, "pairs of 4-lane vectors make one 8-lane store");
  __m256i c0[kVectors], c1[kVectors], c2[kVectors], c3[kVectors];
  const __m256i stride = _mm256_set1_epi64x(4 * groups);
  __m256i counter = _mm256_add_epi64(_mm256_set1_epi64x(static_cast<int64_t>(first_counter)),
                                     _mm256_set_epi64x(3 * groups, 2 * groups, groups, 0));
  for (int v = 0; v < kVectors; ++v) {
    c0[v] = counter;
    c1[v] = _mm256_srli_epi64(counter, 32);
    c2[v] = c3[v] = _mm256_setzero_si256();
    counter = _mm256_add_epi64(counter, stride);
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const __m256i round_a = _mm256_set1_epi64x(kPhiloxRoundA), round_b = _mm256_set1_epi64x(kPhiloxRoundB);
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const __m256i key0 = _mm256_set1_epi32(static_cast<int>(k0)), key1 = _mm256_set1_epi32(static_cast<int>(k1));
    for (int v = 0; v < kVectors; ++v) {
      const __m256i product_b = _mm256_mul_epu32(c2[v], round_b);
      const __m256i product_a = _mm256_mul_epu32(c0[v], round_a);
      c0[v] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(product_b, 32), c1[v]), key0);
      c2[v] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(product_a, 32), c3[v]), key1);
      c1[v] = product_b;
      c3[v] = product_a;
    }
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  for (int v = 0; v < kVectors; v += 2) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(words[0] + 4 * v), low_halves(c0[v], c0[v + 1]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(words[1] + 4 * v), low_halves(c1[v], c1[v + 1]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(words[2] + 4 * v), low_halves(c2[v], c2[v + 1]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(words[3] + 4 * v), low_halves(c3[v], c3[v + 1]));
  }
}
#else
inline void draw_group(uint32_t words[kWordsPerPhiloxCall][kLanes], uint64_t seed, uint64_t first_counter,
                       int64_t groups) {
  draw_group_portable(words, seed, first_counter, groups);
}
#endif

// Σ of a tile's kLanes values in one fixed order (halving: lane i += lane
// i + width), so that the sum has the same bits whatever vector width the
// compiler picks; an `omp simd reduction` would sum in the width's order.
inline float lane_sum(float values[kLanes]) {
  static_assert((kLanes & (kLanes - 1)) == 0, "halving needs a power of two");
  for (int width = kLanes / 2; width > 0; width /= 2) {
#pragma omp simd
    for (int lane = 0; lane < width; ++lane) values[lane] += values[lane + width];
  }
  return values[0];
}

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
  const std::unique_ptr<double[]> alpha_partials(new double[static_cast<size_t>(threads) * batch * num_experts]());
#pragma omp parallel
  {
    double* my_alpha = alpha_partials.get() + static_cast<size_t>(omp_get_thread_num()) * batch * num_experts;
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
              float grad_alpha_terms[kLanes];
#pragma omp simd
              for (int lane = 0; lane < kLanes; ++lane) {
                float dz;
                const float z = mask_entry(noise[lane], tile.expert[m][lane], hc, &dz);
                weight[lane] = accumulate_weight(weight[lane], alpha, z);
                grad_log_alpha_tile[m][lane] += grad_times_delta[lane] * alpha * dz;
                grad_alpha_terms[lane] = grad_times_delta[lane] * z;
              }
              my_alpha[task * num_experts + m] += lane_sum(grad_alpha_terms);
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
  // The merge kernels' own path, tile by tile: this ISA's draw_group and
  // uint32_to_uniform, so that the self-test checks what they draw.
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

}  // namespace smat::cpu::SMAT_CPU_ISA
