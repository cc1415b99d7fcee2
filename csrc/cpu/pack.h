// Entry points of the CPU packed-storage kernels (see pack.cpp and
// smat_kernels/packed.py for the format).
#pragma once

#include <cstdint>

namespace smat::cpu {

// Pass 1 of pack: bitmap int32 [W] of the union support and the number of
// support elements in each bitmap word, int64 [W]. Returns how many mask
// entries were neither 0 nor 1 (and so were rounded).
int64_t pack_support(int32_t* bitmap, int64_t* word_counts, const float* log_alpha, int64_t n, int64_t num_experts,
                     float gamma, float zeta);

// Pass 2 of pack: writes expert bits and θ_δ of the support elements at
// word_offsets (the exclusive prefix sum of word_counts).
void pack_scatter(void* expert_bits, int bits_dtype, void* packed_delta, const void* delta, int dtype,
                  const int64_t* word_offsets, const float* log_alpha, int64_t n, int64_t num_experts, float gamma,
                  float zeta);

// out [B, N] = θ_pre + θ_δ · Σ_m α[b, m]·bit_m on the support, θ_pre elsewhere.
void packed_merge(void* out, const void* theta_pre, int dtype, const int32_t* bitmap, const int64_t* word_offsets,
                  const void* expert_bits, int bits_dtype, const void* packed_delta, const float* alpha, int64_t batch,
                  int64_t n, int64_t num_experts);

}  // namespace smat::cpu
