// Host-side dispatch from the dtype and mode codes the Python layer passes to
// compile-time types and constants, shared by the CPU and CUDA modules.
//
// Each module names its own 16-bit float types (bfloat16/_Float16 on the CPU,
// __nv_bfloat16/__half in CUDA) and its name for error messages.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "smat/elementwise.h"

namespace smat {

enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
enum BitsDType : int { kUInt8 = 0, kInt16 = 1, kInt32 = 2 };

inline HardConcrete hard_concrete(int mode, float beta, float gamma, float zeta) {
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
      throw std::invalid_argument(std::string(module) + ": unknown theta dtype code");
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
      throw std::invalid_argument(std::string(module) + ": unknown expert-bits dtype code");
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
      throw std::invalid_argument(std::string(module) + ": unknown mask mode code");
  }
}

}  // namespace smat
