// The merge kernels (merge_kernels.h) of the avx512 path: compiled with
// -march=x86-64-v4 (AVX-512 F/BW/CD/DQ/VL), Philox in AVX-512 intrinsics (flags: setup.py's ISA_SOURCES).
#define SMAT_CPU_ISA avx512
#define SMAT_CPU_ISA_AVX512 1
#include "merge_kernels.h"
