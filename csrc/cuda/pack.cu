// CUDA kernels of the packed sparse storage: pack (two passes around a prefix
// sum that the caller takes with torch.cumsum) and the packed merge, which
// replaces M mask evaluations per element by one table lookup.
//
// Launch configuration and why: one warp per 32-element bitmap word, 256
// threads (8 words) per block, so that a word's bitmap is one __ballot_sync
// and an element's packed slot is its word's offset plus a __popc of the
// support bits below it: no per-element scan.
// * pack_support_kernel: one block per 8 words (64-bit indices). The count of
//   rounded mask entries is summed per warp by shuffles, per block through
//   shared memory in warp order, then added with one 64-bit integer atomicAdd
//   per block: integer addition is associative, so the total is exact and the
//   same run to run.
// * pack_scatter_kernel: the same grid; recomputes each element's bits rather
//   than storing them between the passes (as the CPU backend does).
// * packed_merge_kernel: a grid-stride loop over words with the grid capped at
//   kMaxMergeBlocks, so that the per-block table of Σ_m α[b, m]·bit_m (2^M
//   entries per task in shared memory, built for M ≤ 8 when B·2^M floats fit
//   in 48 KiB) is built once per block and amortised over many words; larger M
//   sums the bits directly, in the same order m = 0 … M−1 as the dense merge,
//   so both give the dense deterministic merge bit for bit on binary masks.
#include "pack.h"

#include <algorithm>

#include "cuda_common.cuh"

namespace smat::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kWordBits = 32;
constexpr int kMaxTableExperts = 8;
constexpr int64_t kMaxMergeBlocks = 4096;
constexpr int64_t kSharedBytesLimit = 48 * 1024;

int64_t bitmap_word_count(int64_t n) { return ceil_div(n, kWordBits); }

// The binarised deterministic masks of one element as a bit word, and how
// many of its entries were fractional.
__device__ __forceinline__ uint32_t element_bits(const float* log_alpha_row, int64_t num_experts,
                                                 const HardConcrete& hc, int* fractional) {
  uint32_t bits = 0u;
  for (int64_t m = 0; m < num_experts; ++m) {
    const float z = mask_value(1.0f, expert_factor(__ldg(log_alpha_row + m), 1.0f), hc);
    *fractional += (z > 0.0f && z < 1.0f) ? 1 : 0;
    bits |= (z >= 0.5f ? 1u : 0u) << m;
  }
  return bits;
}

// Σ_m α_m·bit_m, summed in order m = 0 … M−1 like the dense merge.
__device__ __forceinline__ float bits_weight(uint32_t bits, const float* alpha, int64_t num_experts) {
  float weight = 0.0f;
  for (int64_t m = 0; m < num_experts; ++m) {
    weight = accumulate_weight(weight, __ldg(alpha + m), ((bits >> m) & 1u) ? 1.0f : 0.0f);
  }
  return weight;
}

__device__ __forceinline__ uint32_t lanes_below(int lane) { return (1u << lane) - 1u; }

__device__ __forceinline__ uint32_t expert_mask(int64_t num_experts) {
  return num_experts >= 32 ? 0xFFFFFFFFu : (1u << num_experts) - 1u;
}

// Outputs: bitmap int32 [W], word_counts int64 [W], *rounded += fractional entries.
__global__ void __launch_bounds__(kThreads)
    pack_support_kernel(int32_t* __restrict__ bitmap, int64_t* __restrict__ word_counts, int64_t* rounded,
                        const float* __restrict__ log_alpha, int64_t n, int64_t num_experts, HardConcrete hc) {
  __shared__ int warp_fractional[kWarps];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t word = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  const int64_t element = word * kWordBits + lane;
  int fractional = 0;
  const uint32_t bits = element < n ? element_bits(log_alpha + element * num_experts, num_experts, hc, &fractional) : 0u;
  const uint32_t support = __ballot_sync(kFullWarp, bits != 0u);
  fractional = warp_sum(fractional);
  if (lane == 0) {
    if (word < (n + kWordBits - 1) / kWordBits) {
      bitmap[word] = static_cast<int32_t>(support);
      word_counts[word] = __popc(support);
    }
    warp_fractional[warp] = fractional;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    long long total = 0;
    for (int w = 0; w < kWarps; ++w) total += warp_fractional[w];
    if (total != 0) atomicAdd(reinterpret_cast<unsigned long long*>(rounded), static_cast<unsigned long long>(total));
  }
}

template <typename T, typename Bits>
__global__ void __launch_bounds__(kThreads)
    pack_scatter_kernel(Bits* __restrict__ expert_bits, T* __restrict__ packed_delta, const T* __restrict__ delta,
                        const int64_t* __restrict__ word_offsets, const float* __restrict__ log_alpha, int64_t n,
                        int64_t num_experts, HardConcrete hc) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t word = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize;
  const int64_t element = word * kWordBits + lane;
  int unused = 0;
  const uint32_t bits = element < n ? element_bits(log_alpha + element * num_experts, num_experts, hc, &unused) : 0u;
  const uint32_t support = __ballot_sync(kFullWarp, bits != 0u);
  if (bits == 0u) return;
  const int64_t slot = word_offsets[word] + __popc(support & lanes_below(lane));
  expert_bits[slot] = static_cast<Bits>(bits);
  packed_delta[slot] = delta[element];
}

// Inputs: θ_pre [N] T; bitmap int32 [W]; word_offsets int64 [W + 1]; expert_bits
// Bits [S]; packed_delta T [S]; α fp32 [B, M]. Output: out [B, N] T.
template <typename T, typename Bits, bool kTable>
__global__ void __launch_bounds__(kThreads)
    packed_merge_kernel(T* __restrict__ out, const T* __restrict__ theta_pre, const int32_t* __restrict__ bitmap,
                        const int64_t* __restrict__ word_offsets, const Bits* __restrict__ expert_bits,
                        const T* __restrict__ packed_delta, const float* __restrict__ alpha, int64_t batch, int64_t n,
                        int64_t num_experts) {
  extern __shared__ float table[];  // [B, 2^M] when kTable
  if constexpr (kTable) {
    const int64_t entries = batch << num_experts;
    for (int64_t i = threadIdx.x; i < entries; i += blockDim.x) {
      const int64_t task = i >> num_experts;
      table[i] = bits_weight(static_cast<uint32_t>(i & ((int64_t{1} << num_experts) - 1)), alpha + task * num_experts,
                             num_experts);
    }
    __syncthreads();
  }
  const int lane = threadIdx.x % kWarpSize;
  const int64_t words = (n + kWordBits - 1) / kWordBits;
  const int64_t warps_in_grid = static_cast<int64_t>(gridDim.x) * kWarps;
  const uint32_t mask = expert_mask(num_experts);
  for (int64_t word = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize; word < words;
       word += warps_in_grid) {
    const int64_t element = word * kWordBits + lane;
    if (element >= n) continue;
    const T pre = theta_pre[element];
    const uint32_t support = static_cast<uint32_t>(__ldg(bitmap + word));
    if (((support >> lane) & 1u) == 0u) {
      for (int64_t task = 0; task < batch; ++task) out[task * n + element] = pre;
      continue;
    }
    const int64_t slot = __ldg(word_offsets + word) + __popc(support & lanes_below(lane));
    const uint32_t bits = static_cast<uint32_t>(expert_bits[slot]) & mask;
    const float delta = to_float(packed_delta[slot]);
    for (int64_t task = 0; task < batch; ++task) {
      const float weight =
          kTable ? table[(task << num_experts) + bits] : bits_weight(bits, alpha + task * num_experts, num_experts);
      out[task * n + element] = from_float<T>(merge_element(to_float(pre), delta, weight));
    }
  }
}

}  // namespace

void pack_support(int32_t* bitmap, int64_t* word_counts, int64_t* rounded, const float* log_alpha, int64_t n,
                  int64_t num_experts, float gamma, float zeta, uintptr_t stream) {
  const int64_t words = bitmap_word_count(n);
  if (words == 0) return;
  pack_support_kernel<<<static_cast<unsigned>(ceil_div(words, kWarps)), kThreads, 0, as_stream(stream)>>>(
      bitmap, word_counts, rounded, log_alpha, n, num_experts, hard_concrete(kDeterministic, 1.0f, gamma, zeta));
  check_launch("pack_support_kernel");
}

void pack_scatter(void* expert_bits, int bits_dtype, void* packed_delta, const void* delta, int dtype,
                  const int64_t* word_offsets, const float* log_alpha, int64_t n, int64_t num_experts, float gamma,
                  float zeta, uintptr_t stream) {
  const int64_t words = bitmap_word_count(n);
  if (words == 0) return;
  const HardConcrete hc = hard_concrete(kDeterministic, 1.0f, gamma, zeta);
  dispatch_theta_dtype(dtype, [&](auto* typed_theta) {
    using T = std::remove_pointer_t<decltype(typed_theta)>;
    dispatch_bits_dtype(bits_dtype, [&](auto* typed_bits) {
      using Bits = std::remove_pointer_t<decltype(typed_bits)>;
      pack_scatter_kernel<T, Bits><<<static_cast<unsigned>(ceil_div(words, kWarps)), kThreads, 0, as_stream(stream)>>>(
          static_cast<Bits*>(expert_bits), static_cast<T*>(packed_delta), static_cast<const T*>(delta), word_offsets,
          log_alpha, n, num_experts, hc);
    });
  });
  check_launch("pack_scatter_kernel");
}

void packed_merge(void* out, const void* theta_pre, int dtype, const int32_t* bitmap, const int64_t* word_offsets,
                  const void* expert_bits, int bits_dtype, const void* packed_delta, const float* alpha, int64_t batch,
                  int64_t n, int64_t num_experts, uintptr_t stream) {
  const int64_t words = bitmap_word_count(n);
  if (words == 0 || batch == 0) return;
  const int64_t table_bytes = num_experts <= kMaxTableExperts
                                  ? (batch << num_experts) * static_cast<int64_t>(sizeof(float))
                                  : kSharedBytesLimit + 1;
  const bool use_table = table_bytes <= kSharedBytesLimit;
  const int64_t blocks = std::min(kMaxMergeBlocks, ceil_div(words, kWarps));
  dispatch_theta_dtype(dtype, [&](auto* typed_theta) {
    using T = std::remove_pointer_t<decltype(typed_theta)>;
    dispatch_bits_dtype(bits_dtype, [&](auto* typed_bits) {
      using Bits = std::remove_pointer_t<decltype(typed_bits)>;
      auto launch = [&](auto table_constant) {
        constexpr bool kTable = decltype(table_constant)::value;
        packed_merge_kernel<T, Bits, kTable>
            <<<static_cast<unsigned>(blocks), kThreads, kTable ? table_bytes : 0, as_stream(stream)>>>(
                static_cast<T*>(out), static_cast<const T*>(theta_pre), bitmap, word_offsets,
                static_cast<const Bits*>(expert_bits), static_cast<const T*>(packed_delta), alpha, batch, n,
                num_experts);
      };
      if (use_table) {
        launch(std::true_type{});
      } else {
        launch(std::false_type{});
      }
    });
  });
  check_launch("packed_merge_kernel");
}

}  // namespace smat::cuda
