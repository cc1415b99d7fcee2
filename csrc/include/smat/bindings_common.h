// What the pybind11 modules smat_kernels._cpu and smat_kernels._cuda share:
// pointers passed as integers, the merge's arguments, and the build's record.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>

#include "smat/merge_args.h"

// Written by setup.py into the build folder: the compiler, its flags and the
// target (ISA level or SM architectures) of this build. A build by other means
// reports them as unknown.
#if __has_include("smat_build_info.h")
#include "smat_build_info.h"
#else
#define SMAT_BUILD_COMPILER "unknown"
#define SMAT_BUILD_FLAGS "unknown"
#define SMAT_BUILD_TARGET "unknown"
#endif

namespace smat::bindings {

template <typename T>
T* as_pointer(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

inline MergeArgs merge_args(uintptr_t log_alpha, uintptr_t alpha, int64_t batch, int64_t n, int64_t num_experts,
                            int dtype, int mode, uint64_t seed, uint64_t offset, float beta, float gamma, float zeta,
                            uintptr_t stream = 0) {
  return MergeArgs{as_pointer<const float>(log_alpha),
                   as_pointer<const float>(alpha),
                   batch,
                   n,
                   num_experts,
                   dtype,
                   mode,
                   seed,
                   offset,
                   beta,
                   gamma,
                   zeta,
                   stream};
}

// The module's build_info: compiler, flags and target; each module adds its own.
inline pybind11::dict build_info() {
  pybind11::dict info;
  info["compiler"] = SMAT_BUILD_COMPILER;
  info["flags"] = SMAT_BUILD_FLAGS;
  info["target"] = SMAT_BUILD_TARGET;
  return info;
}

}  // namespace smat::bindings
