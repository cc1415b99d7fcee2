// CPU-only helpers: storage types of θ, their float conversions, and the
// vector math declarations that let GCC call glibc's libmvec from the
// `omp simd` loops of the kernels.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>

#include "smat/dispatch.h"
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

// Helpers are always inlined (SMAT_HD): the ISA paths compile this header with
// different -march flags, and an out-of-line copy would be shared by all of
// them through the linker (see merge_kernels.h).

struct bfloat16 {
  uint16_t bits;
};

SMAT_HD float to_float(float value) { return value; }
SMAT_HD float to_float(_Float16 value) { return static_cast<float>(value); }
SMAT_HD float to_float(bfloat16 value) {
  uint32_t widened = static_cast<uint32_t>(value.bits) << 16;
  float result;
  std::memcpy(&result, &widened, sizeof(result));
  return result;
}

template <typename T>
T from_float(float value);

template <>
SMAT_HD float from_float<float>(float value) {
  return value;
}

template <>
SMAT_HD _Float16 from_float<_Float16>(float value) {
  return static_cast<_Float16>(value);
}

// Round to nearest even, as torch does; NaN stays a quiet NaN.
template <>
SMAT_HD bfloat16 from_float<bfloat16>(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return bfloat16{static_cast<uint16_t>((bits >> 16) | 0x0040u)};
  const uint32_t rounding = 0x7FFFu + ((bits >> 16) & 1u);
  return bfloat16{static_cast<uint16_t>((bits + rounding) >> 16)};
}

template <typename Fn>
void dispatch_theta_dtype(int dtype, Fn&& fn) {
  smat::dispatch_theta_dtype<bfloat16, _Float16>(dtype, "smat._cpu", fn);
}

template <typename Fn>
void dispatch_bits_dtype(int dtype, Fn&& fn) {
  smat::dispatch_bits_dtype(dtype, "smat._cpu", fn);
}

}  // namespace smat::cpu
