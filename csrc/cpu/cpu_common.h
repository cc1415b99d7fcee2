// CPU-only helpers: storage types of θ, their float conversions, and the
// vector math declarations that let GCC call glibc's libmvec from the
// `omp simd` loops of the kernels.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>

#include "smat/elementwise.h"

// Vector variants of the transcendental functions used by elementwise.h.
// glibc only declares them under -ffast-math, which would also break the
// infinities the hard-concrete transform relies on (log 0 = −inf), so they are
// declared here; -fno-math-errno is enough to let GCC use them.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(SMAT_USE_LIBMVEC)
extern "C" {
__attribute__((simd("notinbranch"))) float expf(float) noexcept;
__attribute__((simd("notinbranch"))) float logf(float) noexcept;
__attribute__((simd("notinbranch"))) float log1pf(float) noexcept;
}
#endif

namespace smat::cpu {

enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
enum BitsDType : int { kUInt8 = 0, kInt16 = 1, kInt32 = 2 };

struct bfloat16 {
  uint16_t bits;
};

inline float to_float(float value) { return value; }
inline float to_float(_Float16 value) { return static_cast<float>(value); }
inline float to_float(bfloat16 value) {
  uint32_t widened = static_cast<uint32_t>(value.bits) << 16;
  float result;
  std::memcpy(&result, &widened, sizeof(result));
  return result;
}

template <typename T>
inline T from_float(float value);

template <>
inline float from_float<float>(float value) {
  return value;
}

template <>
inline _Float16 from_float<_Float16>(float value) {
  return static_cast<_Float16>(value);
}

// Round to nearest even, as torch does; NaN stays a quiet NaN.
template <>
inline bfloat16 from_float<bfloat16>(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return bfloat16{static_cast<uint16_t>((bits >> 16) | 0x0040u)};
  const uint32_t rounding = 0x7FFFu + ((bits >> 16) & 1u);
  return bfloat16{static_cast<uint16_t>((bits + rounding) >> 16)};
}

// Calls fn with a typed null pointer of the θ storage type named by `dtype`.
template <typename Fn>
void dispatch_theta_dtype(int dtype, Fn&& fn) {
  switch (dtype) {
    case kFloat32:
      fn(static_cast<float*>(nullptr));
      break;
    case kBFloat16:
      fn(static_cast<bfloat16*>(nullptr));
      break;
    case kFloat16:
      fn(static_cast<_Float16*>(nullptr));
      break;
    default:
      throw std::invalid_argument("smat._cpu: unknown theta dtype code");
  }
}

template <typename Fn>
void dispatch_bits_dtype(int dtype, Fn&& fn) {
  switch (dtype) {
    case kUInt8:
      fn(static_cast<uint8_t*>(nullptr));
      break;
    case kInt16:
      fn(static_cast<int16_t*>(nullptr));
      break;
    case kInt32:
      fn(static_cast<int32_t*>(nullptr));
      break;
    default:
      throw std::invalid_argument("smat._cpu: unknown expert-bits dtype code");
  }
}

inline HardConcrete hard_concrete(int mode, float beta, float gamma, float zeta) {
  return HardConcrete{mode == kDeterministic ? 1.0f : 1.0f / beta, gamma, zeta - gamma};
}

}  // namespace smat::cpu
