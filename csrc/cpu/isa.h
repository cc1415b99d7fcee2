// The instruction-set paths of the CPU kernels and the run-time choice of one.
//
// One build serves every x86-64 machine at its best: the kernels whose inner
// loops need intrinsics (the merge's Philox) are compiled once per path, each
// with its own -march (setup.py), and the path is chosen here at run time
// from what the CPU reports (cpuid), not from the flags of the build. So a
// wheel built with SMAT_CPU_ARCH=x86-64-v3 still runs AVX-512 where it
// exists, and a -march=native build on an AVX-512 machine can run AVX2.
//
// SMAT_CPU_ISA=avx512|avx2|portable forces a path (auto or unset: the best
// one); a path this CPU cannot run, or one this build lacks, is an error at
// the first kernel call, never a silent fallback. All paths give the same bits.
#pragma once

#include <string>
#include <vector>

namespace smat::cpu {

enum class Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

constexpr const char* kIsaEnvironmentVariable = "SMAT_CPU_ISA";

const char* isa_name(Isa isa);

// Paths compiled into this module, and those of them this CPU can run; best last.
std::vector<Isa> compiled_isas();
std::vector<Isa> runnable_isas();

// The path the kernels use now: chosen on first use from SMAT_CPU_ISA, or
// set by select_isa. Throws std::invalid_argument naming the reason when the
// requested path cannot run here.
Isa active_isa();

// Choose a path by name ("auto" or "" for the best); throws as active_isa.
Isa select_isa(const std::string& name);

}  // namespace smat::cpu
