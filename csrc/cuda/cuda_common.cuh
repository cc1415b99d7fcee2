// CUDA-only helpers shared by the kernels of csrc/cuda: θ storage types and
// their float conversions, 16-byte vector loads with a scalar tail, warp
// reductions, launch checks and the compile-time dispatch of dtype and mode.
// The per-element math itself lives in smat/elementwise.h, shared with the CPU.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "smat/dispatch.h"
#include "smat/elementwise.h"

namespace smat::cuda {


constexpr int kWarpSize = 32;
constexpr unsigned kFullWarp = 0xFFFFFFFFu;
constexpr int kVectorBytes = 16;

// The unsigned type of a `bytes`-wide vector load: a chunk of 4 elements is
// one 16-byte load for fp32 and one 8-byte load for bf16/fp16.
template <int bytes>
struct VectorOf;
template <>
struct VectorOf<16> {
  using type = uint4;
};
template <>
struct VectorOf<8> {
  using type = uint2;
};
template <>
struct VectorOf<4> {
  using type = uint32_t;
};

inline cudaStream_t as_stream(uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

// Launch errors (bad configuration, missing kernel image for this GPU) are
// reported by cudaGetLastError right after the launch; pybind11 turns the
// exception into a Python RuntimeError.
inline void check_launch(const char* kernel) {
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) {
    throw std::runtime_error(std::string("smat._cuda: launch of ") + kernel + " failed: " + cudaGetErrorName(error) +
                             ": " + cudaGetErrorString(error));
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

__device__ __forceinline__ float to_float(float value) { return value; }
__device__ __forceinline__ float to_float(__nv_bfloat16 value) { return __bfloat162float(value); }
__device__ __forceinline__ float to_float(__half value) { return __half2float(value); }

template <typename T>
__device__ __forceinline__ T from_float(float value);

template <>
__device__ __forceinline__ float from_float<float>(float value) {
  return value;
}

// Round to nearest even, as torch's conversions do.
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float value) {
  return __float2bfloat16_rn(value);
}

template <>
__device__ __forceinline__ __half from_float<__half>(float value) {
  return __float2half_rn(value);
}

// Reads `count` ≤ kWidth elements as floats (zeros past count): one vector
// load when the chunk is full and aligned, else element by element.
template <int kWidth, typename T>
__device__ __forceinline__ void load_chunk(const T* source, int count, float (&values)[kWidth]) {
  using Vector = typename VectorOf<kWidth * static_cast<int>(sizeof(T))>::type;
  if (count == kWidth && reinterpret_cast<uintptr_t>(source) % sizeof(Vector) == 0) {
    union {
      Vector raw;
      T items[kWidth];
    } vector;
    vector.raw = __ldg(reinterpret_cast<const Vector*>(source));
#pragma unroll
    for (int lane = 0; lane < kWidth; ++lane) values[lane] = to_float(vector.items[lane]);
  } else {
#pragma unroll
    for (int lane = 0; lane < kWidth; ++lane) values[lane] = lane < count ? to_float(source[lane]) : 0.0f;
  }
}

template <int kWidth, typename T>
__device__ __forceinline__ void store_chunk(T* target, int count, const float (&values)[kWidth]) {
  using Vector = typename VectorOf<kWidth * static_cast<int>(sizeof(T))>::type;
  if (count == kWidth && reinterpret_cast<uintptr_t>(target) % sizeof(Vector) == 0) {
    union {
      Vector raw;
      T items[kWidth];
    } vector;
#pragma unroll
    for (int lane = 0; lane < kWidth; ++lane) vector.items[lane] = from_float<T>(values[lane]);
    *reinterpret_cast<Vector*>(target) = vector.raw;
  } else {
#pragma unroll
    for (int lane = 0; lane < kWidth; ++lane) {
      if (lane < count) target[lane] = from_float<T>(values[lane]);
    }
  }
}

// Butterfly sum over the 32 lanes of a warp; every lane must take part. The
// order of additions is fixed, so the result repeats run to run.
template <typename V>
__device__ __forceinline__ V warp_sum(V value) {
#pragma unroll
  for (int width = kWarpSize / 2; width > 0; width /= 2) value += __shfl_xor_sync(kFullWarp, value, width);
  return value;
}

template <typename Fn>
void dispatch_theta_dtype(int dtype, Fn&& fn) {
  smat::dispatch_theta_dtype<__nv_bfloat16, __half>(dtype, "smat._cuda", fn);
}

template <typename Fn>
void dispatch_bits_dtype(int dtype, Fn&& fn) {
  smat::dispatch_bits_dtype(dtype, "smat._cuda", fn);
}

template <typename Fn>
void dispatch_mode(int mode, float beta, Fn&& fn) {
  smat::dispatch_mode(mode, beta, "smat._cuda", fn);
}

}  // namespace smat::cuda
