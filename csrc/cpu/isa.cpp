// Run-time choice of the CPU kernels' instruction-set path (see isa.h).
#include "isa.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

namespace smat::cpu {
namespace {

constexpr int kUnresolved = -1;
std::atomic<int> active{kUnresolved};

bool cpu_supports(Isa isa) {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  // The micro-architecture levels that the paths are compiled for (setup.py);
  // libgcc also checks that the OS saves the vector registers (XCR0).
  switch (isa) {
    case Isa::kAvx512:
      return __builtin_cpu_supports("x86-64-v4");
    case Isa::kAvx2:
      return __builtin_cpu_supports("x86-64-v3");
    case Isa::kPortable:
      return true;
  }
  return false;
#else
  return isa == Isa::kPortable;
#endif
}

std::string names(const std::vector<Isa>& isas) {
  std::string text;
  for (Isa isa : isas) text += (text.empty() ? "" : ", ") + std::string(isa_name(isa));
  return text.empty() ? "none" : text;
}

Isa resolve(const std::string& requested) {
  const std::vector<Isa> runnable = runnable_isas();
  if (requested.empty() || requested == "auto") return runnable.back();
  for (Isa isa : compiled_isas()) {
    if (requested != isa_name(isa)) continue;
    for (Isa candidate : runnable) {
      if (candidate == isa) return isa;
    }
    throw std::invalid_argument(std::string(kIsaEnvironmentVariable) + "=" + requested +
                                ": this CPU cannot run the " + requested + " path (it runs: " + names(runnable) +
                                "); unset " + kIsaEnvironmentVariable + " to use the best of them");
  }
  throw std::invalid_argument(std::string(kIsaEnvironmentVariable) + "=" + requested + ": not a path of this build " +
                              "(built: " + names(compiled_isas()) + "; this CPU runs: " + names(runnable) + ")");
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kPortable:
      return "portable";
  }
  return "unknown";
}

std::vector<Isa> compiled_isas() {
#if defined(SMAT_CPU_ISA_KERNELS)
  return {Isa::kPortable, Isa::kAvx2, Isa::kAvx512};
#else
  return {Isa::kPortable};
#endif
}

std::vector<Isa> runnable_isas() {
  std::vector<Isa> runnable;
  for (Isa isa : compiled_isas()) {
    if (cpu_supports(isa)) runnable.push_back(isa);
  }
  return runnable;
}

Isa active_isa() {
  const int current = active.load(std::memory_order_acquire);
  if (current != kUnresolved) return static_cast<Isa>(current);
  const char* requested = std::getenv(kIsaEnvironmentVariable);
  return select_isa(requested ? requested : "");
}

Isa select_isa(const std::string& name) {
  const Isa isa = resolve(name);
  active.store(static_cast<int>(isa), std::memory_order_release);
  return isa;
}

}  // namespace smat::cpu
