// The merge kernels (merge_kernels.h) of the portable path: compiled with
// the build's own -march (SMAT_CPU_ARCH), no intrinsics (flags: setup.py's ISA_SOURCES).
#define SMAT_CPU_ISA portable
#define SMAT_CPU_ISA_PORTABLE 1
#include "merge_kernels.h"
