// pybind11 module smat_kernels._cpu. Takes raw pointers (as integers), sizes
// and dtype codes; smat_kernels validates every tensor before calling here,
// so no torch headers are needed (see DESIGN.md).
#include <omp.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "density.h"
#include "isa.h"
#include "merge.h"
#include "pack.h"
#include "smat/bindings_common.h"

namespace py = pybind11;
using smat::bindings::as_pointer;
using smat::bindings::merge_args;

namespace {

const char* vector_instructions() {
#if defined(__AVX512F__)
  return "AVX-512";
#elif defined(__AVX2__)
  return "AVX2";
#else
  return "portable (no AVX2/AVX-512)";
#endif
}

}  // namespace

PYBIND11_MODULE(_cpu, module) {
  module.doc() = "SMAT CPU kernels (OpenMP). Called by smat_kernels; not a public API.";

  py::dict build_info = smat::bindings::build_info();
  build_info["compiler_version"] = __VERSION__;
  build_info["vector_instructions"] = vector_instructions();
  build_info["openmp"] = _OPENMP;
  module.attr("build_info") = build_info;

  module.def(
      "isa",
      []() {
        py::dict info;
        auto names = [](const std::vector<smat::cpu::Isa>& isas) {
          py::list list;
          for (auto isa : isas) list.append(smat::cpu::isa_name(isa));
          return list;
        };
        info["compiled"] = names(smat::cpu::compiled_isas());
        info["runnable"] = names(smat::cpu::runnable_isas());
        const char* requested = std::getenv(smat::cpu::kIsaEnvironmentVariable);
        info["requested"] = requested ? py::object(py::str(requested)) : py::object(py::none());
        info["active"] = smat::cpu::isa_name(smat::cpu::active_isa());
        return info;
      },
      "The kernels' instruction-set paths: compiled, runnable on this CPU, requested by SMAT_CPU_ISA, active. "
      "Raises ValueError when SMAT_CPU_ISA names a path that cannot run here.");
  module.def(
      "select_isa", [](const std::string& name) { return smat::cpu::isa_name(smat::cpu::select_isa(name)); },
      "Use the named path ('avx512', 'avx2', 'portable' or 'auto') from now on; ValueError if it cannot run here.");

  module.def("set_num_threads", [](int threads) { omp_set_num_threads(threads); });
  module.def("get_num_threads", []() { return omp_get_max_threads(); });

  module.def(
      "merge_forward",
      [](uintptr_t out, uintptr_t theta_pre, uintptr_t delta, uintptr_t log_alpha, uintptr_t alpha, int64_t batch,
         int64_t n, int64_t num_experts, int dtype, int mode, uint64_t seed, uint64_t offset, float beta, float gamma,
         float zeta) {
        py::gil_scoped_release release;
        smat::cpu::merge_forward(
            merge_args(log_alpha, alpha, batch, n, num_experts, dtype, mode, seed, offset, beta, gamma, zeta),
            as_pointer<void>(out), as_pointer<const void>(theta_pre), as_pointer<const void>(delta));
      });

  module.def(
      "merge_backward",
      [](uintptr_t grad_out, uintptr_t delta, uintptr_t log_alpha, uintptr_t alpha, uintptr_t grad_pre,
         uintptr_t grad_delta, uintptr_t grad_log_alpha, uintptr_t grad_alpha, int64_t batch, int64_t n,
         int64_t num_experts, int dtype, int mode, uint64_t seed, uint64_t offset, float beta, float gamma,
         float zeta) {
        py::gil_scoped_release release;
        smat::cpu::merge_backward(
            merge_args(log_alpha, alpha, batch, n, num_experts, dtype, mode, seed, offset, beta, gamma, zeta),
            as_pointer<const void>(grad_out), as_pointer<const void>(delta), as_pointer<void>(grad_pre),
            as_pointer<void>(grad_delta), as_pointer<float>(grad_log_alpha), as_pointer<float>(grad_alpha));
      });

  module.def("uniforms", [](uintptr_t out, uint64_t seed, uint64_t offset, int64_t batch, int64_t n,
                            int64_t num_experts) {
    py::gil_scoped_release release;
    smat::cpu::uniforms(as_pointer<float>(out), seed, offset, batch, n, num_experts);
  });

  module.def("expected_density", [](uintptr_t out, uintptr_t log_alpha, int64_t n, int64_t num_experts, float beta,
                                    float gamma, float zeta) {
    py::gil_scoped_release release;
    smat::cpu::expected_density(as_pointer<float>(out), as_pointer<const float>(log_alpha), n, num_experts, beta, gamma,
                                zeta);
  });

  module.def("expected_density_backward", [](uintptr_t grad_log_alpha, uintptr_t grad_out, uintptr_t log_alpha,
                                             int64_t n, int64_t num_experts, float beta, float gamma, float zeta) {
    py::gil_scoped_release release;
    smat::cpu::expected_density_backward(as_pointer<float>(grad_log_alpha), as_pointer<const float>(grad_out),
                                         as_pointer<const float>(log_alpha), n, num_experts, beta, gamma, zeta);
  });

  module.def("hard_density",
             [](uintptr_t out, uintptr_t log_alpha, int64_t n, int64_t num_experts, float gamma, float zeta) {
               py::gil_scoped_release release;
               smat::cpu::hard_density(as_pointer<float>(out), as_pointer<const float>(log_alpha), n, num_experts,
                                       gamma, zeta);
             });

  module.def("pack_support", [](uintptr_t bitmap, uintptr_t word_counts, uintptr_t log_alpha, int64_t n,
                                int64_t num_experts, float gamma, float zeta) {
    py::gil_scoped_release release;
    return smat::cpu::pack_support(as_pointer<int32_t>(bitmap), as_pointer<int64_t>(word_counts),
                                   as_pointer<const float>(log_alpha), n, num_experts, gamma, zeta);
  });

  module.def("pack_scatter", [](uintptr_t expert_bits, int bits_dtype, uintptr_t packed_delta, uintptr_t delta,
                                int dtype, uintptr_t word_offsets, uintptr_t log_alpha, int64_t n, int64_t num_experts,
                                float gamma, float zeta) {
    py::gil_scoped_release release;
    smat::cpu::pack_scatter(as_pointer<void>(expert_bits), bits_dtype, as_pointer<void>(packed_delta),
                            as_pointer<const void>(delta), dtype, as_pointer<const int64_t>(word_offsets),
                            as_pointer<const float>(log_alpha), n, num_experts, gamma, zeta);
  });

  module.def("packed_merge", [](uintptr_t out, uintptr_t theta_pre, int dtype, uintptr_t bitmap, uintptr_t word_offsets,
                                uintptr_t expert_bits, int bits_dtype, uintptr_t packed_delta, uintptr_t alpha,
                                int64_t batch, int64_t n, int64_t num_experts) {
    py::gil_scoped_release release;
    smat::cpu::packed_merge(as_pointer<void>(out), as_pointer<const void>(theta_pre), dtype,
                            as_pointer<const int32_t>(bitmap), as_pointer<const int64_t>(word_offsets),
                            as_pointer<const void>(expert_bits), bits_dtype, as_pointer<const void>(packed_delta),
                            as_pointer<const float>(alpha), batch, n, num_experts);
  });
}
