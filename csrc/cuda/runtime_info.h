// Versions of the CUDA runtime this module links (statically) and of the
// installed driver, for `python -m smat_kernels.check`.
#pragma once

namespace smat::cuda {

// CUDA versions as 1000·major + 10·minor (e.g. 12080 for 12.8); 0 when unknown.
int runtime_version();
// 0 when no driver is installed.
int driver_version();

}  // namespace smat::cuda
