// CPU kernels of the packed sparse storage: pack (two passes) and the packed
// merge, which replaces M mask evaluations per element by one table lookup.
#include "pack.h"

#include <vector>

#include "cpu_common.h"

namespace smat::cpu {
namespace {

constexpr int kWordBits = 32;
constexpr int kMaxTableExperts = 8;  // above this a 2^M table outgrows the cache: sum bits instead

int64_t bitmap_word_count(int64_t n) { return (n + kWordBits - 1) / kWordBits; }

// The binarised deterministic masks of one element as a bit word, and how
// many of its entries were fractional.
inline uint32_t element_bits(const float* log_alpha_row, int64_t num_experts, const HardConcrete& hc,
                             int64_t* fractional) {
  uint32_t bits = 0u;
  for (int64_t m = 0; m < num_experts; ++m) {
    const float z = mask_value(1.0f, expert_factor(log_alpha_row[m], 1.0f), hc);
    *fractional += (z > 0.0f && z < 1.0f) ? 1 : 0;
    bits |= (z >= 0.5f ? 1u : 0u) << m;
  }
  return bits;
}

// Σ_m α_m·bit_m, summed in order m = 0 … M−1 like the dense merge.
inline float bits_weight(uint32_t bits, const float* alpha, int64_t num_experts) {
  float weight = 0.0f;
  for (int64_t m = 0; m < num_experts; ++m) weight = accumulate_weight(weight, alpha[m], ((bits >> m) & 1u) ? 1.0f : 0.0f);
  return weight;
}

template <typename T, typename Bits>
void packed_merge_typed(T* out, const T* theta_pre, const int32_t* bitmap, const int64_t* word_offsets,
                        const Bits* expert_bits, const T* packed_delta, const float* alpha, int64_t batch, int64_t n,
                        int64_t num_experts) {
  const bool use_table = num_experts <= kMaxTableExperts;
  const int64_t table_size = int64_t{1} << (use_table ? num_experts : 0);
  std::vector<float> table(static_cast<size_t>(batch * table_size));
  if (use_table) {
    for (int64_t task = 0; task < batch; ++task) {
      for (int64_t bits = 0; bits < table_size; ++bits) {
        table[task * table_size + bits] = bits_weight(static_cast<uint32_t>(bits), alpha + task * num_experts, num_experts);
      }
    }
  }
  const int64_t words = bitmap_word_count(n);
#pragma omp parallel for schedule(static)
  for (int64_t word = 0; word < words; ++word) {
    const uint32_t support = static_cast<uint32_t>(bitmap[word]);
    const int64_t first = word * kWordBits;
    const int lanes = static_cast<int>(std::min<int64_t>(kWordBits, n - first));
    for (int64_t task = 0; task < batch; ++task) {
      T* row = out + task * n + first;
      const float* task_alpha = alpha + task * num_experts;
      const float* task_table = table.data() + task * table_size;
      int64_t slot = word_offsets[word];
      for (int lane = 0; lane < lanes; ++lane) {
        const float pre = to_float(theta_pre[first + lane]);
        if ((support >> lane) & 1u) {
          const uint32_t bits = static_cast<uint32_t>(expert_bits[slot]) & (num_experts == 32 ? 0xFFFFFFFFu : ((1u << num_experts) - 1u));
          const float weight = use_table ? task_table[bits] : bits_weight(bits, task_alpha, num_experts);
          row[lane] = from_float<T>(merge_element(pre, to_float(packed_delta[slot]), weight));
          ++slot;
        } else {
          row[lane] = theta_pre[first + lane];
        }
      }
    }
  }
}

}  // namespace

int64_t pack_support(int32_t* bitmap, int64_t* word_counts, const float* log_alpha, int64_t n, int64_t num_experts,
                     float gamma, float zeta) {
  const HardConcrete hc = hard_concrete(kDeterministic, 1.0f, gamma, zeta);
  const int64_t words = bitmap_word_count(n);
  int64_t fractional = 0;
#pragma omp parallel for schedule(static) reduction(+ : fractional)
  for (int64_t word = 0; word < words; ++word) {
    uint32_t support = 0u;
    int64_t count = 0;
    const int64_t first = word * kWordBits;
    const int lanes = static_cast<int>(std::min<int64_t>(kWordBits, n - first));
    for (int lane = 0; lane < lanes; ++lane) {
      const uint32_t bits = element_bits(log_alpha + (first + lane) * num_experts, num_experts, hc, &fractional);
      if (bits != 0u) {
        support |= 1u << lane;
        ++count;
      }
    }
    bitmap[word] = static_cast<int32_t>(support);
    word_counts[word] = count;
  }
  return fractional;
}

void pack_scatter(void* expert_bits, int bits_dtype, void* packed_delta, const void* delta, int dtype,
                  const int64_t* word_offsets, const float* log_alpha, int64_t n, int64_t num_experts, float gamma,
                  float zeta) {
  const HardConcrete hc = hard_concrete(kDeterministic, 1.0f, gamma, zeta);
  const int64_t words = bitmap_word_count(n);
  dispatch_theta_dtype(dtype, [&](auto* typed_theta) {
    using T = std::remove_pointer_t<decltype(typed_theta)>;
    dispatch_bits_dtype(bits_dtype, [&](auto* typed_bits) {
      using Bits = std::remove_pointer_t<decltype(typed_bits)>;
      Bits* bits_out = static_cast<Bits*>(expert_bits);
      T* delta_out = static_cast<T*>(packed_delta);
      const T* delta_in = static_cast<const T*>(delta);
#pragma omp parallel for schedule(static)
      for (int64_t word = 0; word < words; ++word) {
        int64_t slot = word_offsets[word];
        int64_t unused = 0;
        const int64_t first = word * kWordBits;
        const int64_t last = std::min<int64_t>(n, first + kWordBits);
        for (int64_t element = first; element < last; ++element) {
          const uint32_t bits = element_bits(log_alpha + element * num_experts, num_experts, hc, &unused);
          if (bits == 0u) continue;
          bits_out[slot] = static_cast<Bits>(bits);
          delta_out[slot] = delta_in[element];
          ++slot;
        }
      }
    });
  });
}

void packed_merge(void* out, const void* theta_pre, int dtype, const int32_t* bitmap, const int64_t* word_offsets,
                  const void* expert_bits, int bits_dtype, const void* packed_delta, const float* alpha, int64_t batch,
                  int64_t n, int64_t num_experts) {
  dispatch_theta_dtype(dtype, [&](auto* typed_theta) {
    using T = std::remove_pointer_t<decltype(typed_theta)>;
    dispatch_bits_dtype(bits_dtype, [&](auto* typed_bits) {
      using Bits = std::remove_pointer_t<decltype(typed_bits)>;
      packed_merge_typed<T, Bits>(static_cast<T*>(out), static_cast<const T*>(theta_pre), bitmap, word_offsets,
                                  static_cast<const Bits*>(expert_bits), static_cast<const T*>(packed_delta), alpha,
                                  batch, n, num_experts);
    });
  });
}

}  // namespace smat::cpu
