// Host-side dispatch from the dtype and mode codes the Python layer passes to
// compile-time types and constants, shared by the CPU and CUDA modules.
//
// Each module names its own 16-bit float types (bfloat16/_Float16 on the CPU,
// __nv_bfloat16/__half in CUDA) and its name for error messages.
#pragma once

#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <type_traits>

#include "smat/elementwise.h"

namespace smat {

// Formats into a char buffer: the CPU module compiles these templates once
// per ISA path (csrc/cpu/isa.h), and a string constructor instantiated there
// would be one out-of-line copy that the linker shares between all paths.
[[noreturn]] static inline void throw_unknown_code(const char* module, const char* what) {
  char message[128];
  std::snprintf(message, sizeof(message), "%s: unknown %s code", module, what);
  throw std::invalid_argument(message);
}

enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
enum BitsDType : int { kUInt8 = 0, kInt16 = 1, kInt32 = 2 };

SMAT_HD HardConcrete hard_concrete(int mode, float beta, float gamma, float zeta) {
  return HardConcrete{mode == kDeterministic ? 1.0f : 1.0f / beta, gamma, zeta - gamma};
}

// Calls fn with a typed null pointer of the θ storage type named by `dtype`.
template <typename BFloat16, typename Float16, typename Fn>
void dispatch_theta_dtype(int dtype, const char* module, Fn&& fn) {
  switch (dtype) {
    case kFloat32:
      fn(static_cast<float*>(nullptr));
      break;
    case kBFloat16:
      fn(static_cast<BFloat16*>(nullptr));
      break;
    case kFloat16:
      fn(static_cast<Float16*>(nullptr));
      break;
    default:
      throw_unknown_code(module, "theta dtype");
  }
}

// Calls fn with a typed null pointer of the packed expert-bits type named by `dtype`.
template <typename Fn>
void dispatch_bits_dtype(int dtype, const char* module, Fn&& fn) {
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
      throw_unknown_code(module, "expert-bits dtype");
  }
}

// Calls fn(mode, default_temperature) with both as compile-time constants.
// Deterministic masks do not depend on the temperature: one instantiation.
template <typename Fn>
void dispatch_mode(int mode, float beta, const char* module, Fn&& fn) {
  const bool default_temperature = is_default_temperature(1.0f / beta);
  auto with_temperature = [&](auto mode_constant) {
    if constexpr (decltype(mode_constant)::value == kDeterministic) {
      fn(mode_constant, std::false_type{});
    } else if (default_temperature) {
      fn(mode_constant, std::true_type{});
    } else {
      fn(mode_constant, std::false_type{});
    }
  };
  switch (mode) {
    case kDeterministic:
      with_temperature(std::integral_constant<int, kDeterministic>{});
      break;
    case kSample:
      with_temperature(std::integral_constant<int, kSample>{});
      break;
    case kNearNoiseless:
      with_temperature(std::integral_constant<int, kNearNoiseless>{});
      break;
    default:
      throw_unknown_code(module, "mask mode");
  }
}

}  // namespace smat
