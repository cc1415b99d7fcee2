// pybind11 module smat_kernels._cuda. Takes raw device pointers (as integers),
// sizes, dtype codes and the cudaStream_t to launch on (as an integer, from
// torch.cuda.current_stream().cuda_stream); smat_kernels validates every
// tensor before calling here, so neither torch nor CUDA headers are needed
// (see DESIGN.md). A null pointer (0) skips a gradient, as in smat_kernels._cpu.
// Every call only enqueues work on the stream and returns.
#include <pybind11/pybind11.h>

#include "density.h"
#include "merge.h"
#include "pack.h"
#include "runtime_info.h"
#include "smat/bindings_common.h"

namespace py = pybind11;
using smat::bindings::as_pointer;
using smat::bindings::merge_args;

PYBIND11_MODULE(_cuda, module) {
  module.doc() = "SMAT CUDA kernels. Called by smat_kernels; not a public API.";

  py::dict build_info = smat::bindings::build_info();
  build_info["host_compiler_version"] = __VERSION__;
  module.attr("build_info") = build_info;
  module.def("runtime_version", &smat::cuda::runtime_version,
             "CUDA runtime version linked into this module (1000·major + 10·minor).");
  module.def("driver_version", &smat::cuda::driver_version,
             "Installed CUDA driver version (1000·major + 10·minor), 0 without a driver.");

  module.def(
      "merge_forward",
      [](uintptr_t out, uintptr_t theta_pre, uintptr_t delta, uintptr_t log_alpha, uintptr_t alpha, int64_t batch,
         int64_t n, int64_t num_experts, int dtype, int mode, uint64_t seed, uint64_t offset, float beta, float gamma,
         float zeta, uintptr_t stream) {
        py::gil_scoped_release release;
        smat::cuda::merge_forward(
            merge_args(log_alpha, alpha, batch, n, num_experts, dtype, mode, seed, offset, beta, gamma, zeta, stream),
            as_pointer<void>(out), as_pointer<const void>(theta_pre), as_pointer<const void>(delta));
      });

  module.def("merge_backward_partial_rows", &smat::cuda::merge_backward_partial_rows,
             "Rows of the fp32 [rows, B, M] scratch buffer of merge_backward.");

  module.def(
      "merge_backward",
      [](uintptr_t grad_out, uintptr_t delta, uintptr_t log_alpha, uintptr_t alpha, uintptr_t grad_pre,
         uintptr_t grad_delta, uintptr_t grad_log_alpha, uintptr_t grad_alpha, uintptr_t alpha_partials,
         int64_t batch, int64_t n, int64_t num_experts, int dtype, int mode, uint64_t seed, uint64_t offset,
         float beta, float gamma, float zeta, uintptr_t stream) {
        py::gil_scoped_release release;
        smat::cuda::merge_backward(
            merge_args(log_alpha, alpha, batch, n, num_experts, dtype, mode, seed, offset, beta, gamma, zeta, stream),
            as_pointer<const void>(grad_out), as_pointer<const void>(delta), as_pointer<void>(grad_pre),
            as_pointer<void>(grad_delta), as_pointer<float>(grad_log_alpha), as_pointer<float>(grad_alpha),
            as_pointer<float>(alpha_partials));
      });

  module.def("uniforms", [](uintptr_t out, uint64_t seed, uint64_t offset, int64_t batch, int64_t n,
                            int64_t num_experts, uintptr_t stream) {
    py::gil_scoped_release release;
    smat::cuda::uniforms(as_pointer<float>(out), seed, offset, batch, n, num_experts, stream);
  });

  module.def("density_partial_rows", &smat::cuda::density_partial_rows,
             "Rows of the fp64 [rows, M] scratch buffer of the density reductions.");

  module.def("expected_density", [](uintptr_t out, uintptr_t partials, uintptr_t log_alpha, int64_t n,
                                    int64_t num_experts, float beta, float gamma, float zeta, uintptr_t stream) {
    py::gil_scoped_release release;
    smat::cuda::expected_density(as_pointer<float>(out), as_pointer<double>(partials),
                                 as_pointer<const float>(log_alpha), n, num_experts, beta, gamma, zeta, stream);
  });

  module.def("expected_density_backward",
             [](uintptr_t grad_log_alpha, uintptr_t grad_out, uintptr_t log_alpha, int64_t n, int64_t num_experts,
                float beta, float gamma, float zeta, uintptr_t stream) {
               py::gil_scoped_release release;
               smat::cuda::expected_density_backward(as_pointer<float>(grad_log_alpha),
                                                     as_pointer<const float>(grad_out),
                                                     as_pointer<const float>(log_alpha), n, num_experts, beta, gamma,
                                                     zeta, stream);
             });

  module.def("hard_density", [](uintptr_t out, uintptr_t partials, uintptr_t log_alpha, int64_t n, int64_t num_experts,
                                float gamma, float zeta, uintptr_t stream) {
    py::gil_scoped_release release;
    smat::cuda::hard_density(as_pointer<float>(out), as_pointer<double>(partials), as_pointer<const float>(log_alpha),
                             n, num_experts, gamma, zeta, stream);
  });

  module.def("pack_support", [](uintptr_t bitmap, uintptr_t word_counts, uintptr_t rounded, uintptr_t log_alpha,
                                int64_t n, int64_t num_experts, float gamma, float zeta, uintptr_t stream) {
    py::gil_scoped_release release;
    smat::cuda::pack_support(as_pointer<int32_t>(bitmap), as_pointer<int64_t>(word_counts),
                             as_pointer<int64_t>(rounded), as_pointer<const float>(log_alpha), n, num_experts, gamma,
                             zeta, stream);
  });

  module.def("pack_scatter", [](uintptr_t expert_bits, int bits_dtype, uintptr_t packed_delta, uintptr_t delta,
                                int dtype, uintptr_t word_offsets, uintptr_t log_alpha, int64_t n, int64_t num_experts,
                                float gamma, float zeta, uintptr_t stream) {
    py::gil_scoped_release release;
    smat::cuda::pack_scatter(as_pointer<void>(expert_bits), bits_dtype, as_pointer<void>(packed_delta),
                             as_pointer<const void>(delta), dtype, as_pointer<const int64_t>(word_offsets),
                             as_pointer<const float>(log_alpha), n, num_experts, gamma, zeta, stream);
  });

  module.def("packed_merge", [](uintptr_t out, uintptr_t theta_pre, int dtype, uintptr_t bitmap, uintptr_t word_offsets,
                                uintptr_t expert_bits, int bits_dtype, uintptr_t packed_delta, uintptr_t alpha,
                                int64_t batch, int64_t n, int64_t num_experts, uintptr_t stream) {
    py::gil_scoped_release release;
    smat::cuda::packed_merge(as_pointer<void>(out), as_pointer<const void>(theta_pre), dtype,
                             as_pointer<const int32_t>(bitmap), as_pointer<const int64_t>(word_offsets),
                             as_pointer<const void>(expert_bits), bits_dtype, as_pointer<const void>(packed_delta),
                             as_pointer<const float>(alpha), batch, n, num_experts, stream);
  });
}
