// See runtime_info.h. Neither call creates a CUDA context.
#include "runtime_info.h"

#include <cuda_runtime.h>

namespace smat::cuda {

int runtime_version() {
  int version = 0;
  return cudaRuntimeGetVersion(&version) == cudaSuccess ? version : 0;
}

int driver_version() {
  int version = 0;
  return cudaDriverGetVersion(&version) == cudaSuccess ? version : 0;
}

}  // namespace smat::cuda
