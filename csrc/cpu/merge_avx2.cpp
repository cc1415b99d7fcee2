// The merge kernels (merge_kernels.h) of the avx2 path: compiled with
// -march=x86-64-v3 (AVX2, FMA, BMI2), Philox in AVX2 intrinsics (flags: setup.py's ISA_SOURCES).
#define SMAT_CPU_ISA avx2
#define SMAT_CPU_ISA_AVX2 1
#include "merge_kernels.h"
