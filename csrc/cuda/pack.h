// Entry points of the CUDA packed-storage kernels (see pack.cu and
// smat_kernels/packed.py for the format). Device pointers; `stream` is a
// cudaStream_t passed as an integer.
#pragma once

#include <cstdint>

namespace smat::cuda {

// Pass 1 of pack: bitmap int32 [W] of the union support, the number of
// support elements of each bitmap word, int64 [W], and (added to *rounded,
// an int64 on the device that the caller zeroes) how many mask entries were
// neither 0 nor 1.
void pack_support(int32_t* bitmap, int64_t* word_counts, int64_t* rounded, const float* log_alpha, int64_t n,
                  int64_t num_experts, float gamma, float zeta, uintptr_t stream);

// Pass 2 of pack: writes expert bits and θ_δ of the support elements at
// word_offsets (the exclusive prefix sum of word_counts).
void pack_scatter(void* expert_bits, int bits_dtype, void* packed_delta, const void* delta, int dtype,
                  const int64_t* word_offsets, const float* log_alpha, int64_t n, int64_t num_experts, float gamma,
                  float zeta, uintptr_t stream);

// out [B, N] = θ_pre + θ_δ · Σ_m α[b, m]·bit_m on the support, θ_pre elsewhere.
void packed_merge(void* out, const void* theta_pre, int dtype, const int32_t* bitmap, const int64_t* word_offsets,
                  const void* expert_bits, int bits_dtype, const void* packed_delta, const float* alpha, int64_t batch,
                  int64_t n, int64_t num_experts, uintptr_t stream);

}  // namespace smat::cuda
