// CUDA kernels of the merge op: θ[b] = θ_pre + θ_δ ⊙ Σ_m α[b, m] z[b, :, m]
// and its backward to θ_pre, θ_δ, log_α and α.
//
// Launch configuration and why:
// * forward: one thread per chunk of kWidth = 4 consecutive elements (one
//   16-byte load of θ_pre and of θ_δ and one 16-byte store per task row in
//   fp32, 8-byte ones in bf16/fp16; element by element at a misaligned or
//   partial chunk), 256 threads per block, ceil(N / 4 / 256) blocks, 64-bit
//   indices. 8 bf16 per thread would make 16-byte accesses but doubles the
//   registers held per thread (ptxas: ~160 forward, 255 with spills backward),
//   which costs more occupancy than the wider access gains. Tasks are taken
//   kTaskTile at a time so that expert_factor(log_α) of an (element, expert)
//   pair is computed once and reused by the tasks of the tile (all of them for
//   B ≤ 4) while the tile's weights stay in registers; log_α is read one float4
//   per expert group of four when M % 4 == 0.
// * backward: the same chunks, but a grid-stride loop over a grid capped at
//   kMaxBackwardBlocks blocks of 256 threads (enough to fill an H100). ∂θ_pre,
//   ∂θ_δ and ∂log_α are written per element by the thread that owns it (no
//   atomics). ∂α[b, m] is a sum over all elements: each warp sums its lanes
//   with a shuffle butterfly, lane 0 adds the sum into that warp's own row of
//   shared memory, the block adds its warp rows in order into row `block` of a
//   [blocks, B, M] scratch buffer, and sum_partials_kernel adds the rows in
//   order. No float atomics and no [B, N, M] buffer: ∂α repeats bit for bit
//   run to run. A B·M too large for 48 KiB of shared memory is processed in
//   slices of tasks, each launch adding to the gradients of the previous one.
// * Masks are recomputed from their Philox key in the backward, not saved.
#include "merge.h"

#include <algorithm>

#include "cuda_common.cuh"

namespace smat::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWidth = 4;  // elements per thread
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kTaskTile = 4;
constexpr int kGroup = kWordsPerPhiloxCall;  // experts per Philox call
constexpr int64_t kMaxBackwardBlocks = 2048;
constexpr int64_t kSharedBytesLimit = 48 * 1024;

struct MergeParams {
  const float* log_alpha;
  const float* alpha;
  int64_t batch;
  int64_t n;
  int64_t num_experts;
  int64_t groups;
  uint64_t seed;
  uint64_t offset;
  HardConcrete hc;
  bool vector_rows;  // M % 4 == 0 and every [N, M] buffer 16-byte aligned: one float4 per expert group
};

MergeParams merge_params(const MergeArgs& args, const float* grad_log_alpha) {
  const bool aligned = reinterpret_cast<uintptr_t>(args.log_alpha) % kVectorBytes == 0 &&
                       reinterpret_cast<uintptr_t>(grad_log_alpha) % kVectorBytes == 0;
  return MergeParams{args.log_alpha,
                     args.alpha,
                     args.batch,
                     args.n,
                     args.num_experts,
                     philox_groups(args.num_experts),
                     args.seed,
                     args.offset,
                     hard_concrete(args.mode, args.beta, args.gamma, args.zeta),
                     args.num_experts % kGroup == 0 && aligned};
}

// The kGroup entries of expert group `group` in row `element` of an fp32
// [N, M] buffer; zeros for experts past M or elements past the chunk.
__device__ __forceinline__ void load_group(float (&values)[kGroup], const float* rows, const MergeParams& p,
                                           int64_t element, bool valid, int64_t group) {
  const float* row = rows + element * p.num_experts + group * kGroup;
  if (valid && p.vector_rows) {
    // A plain load, not __ldg: grad_log_α is read back by the kernel that writes it.
    const float4 vector = *reinterpret_cast<const float4*>(row);
    values[0] = vector.x;
    values[1] = vector.y;
    values[2] = vector.z;
    values[3] = vector.w;
  } else {
#pragma unroll
    for (int word = 0; word < kGroup; ++word) {
      values[word] = valid && group * kGroup + word < p.num_experts ? row[word] : 0.0f;
    }
  }
}

__device__ __forceinline__ void store_group(float* rows, const float (&values)[kGroup], const MergeParams& p,
                                            int64_t element, int64_t group) {
  float* row = rows + element * p.num_experts + group * kGroup;
  if (p.vector_rows) {
    *reinterpret_cast<float4*>(row) = make_float4(values[0], values[1], values[2], values[3]);
  } else {
#pragma unroll
    for (int word = 0; word < kGroup; ++word) {
      if (group * kGroup + word < p.num_experts) row[word] = values[word];
    }
  }
}

// expert_factor(log_α) of the experts of `group` for the elements of a chunk.
__device__ __forceinline__ void load_expert_factors(float (&expert)[kGroup][kWidth], const MergeParams& p,
                                                    int64_t start, int count, int64_t group) {
#pragma unroll
  for (int lane = 0; lane < kWidth; ++lane) {
    float log_alpha[kGroup];
    load_group(log_alpha, p.log_alpha, p, start + lane, lane < count, group);
#pragma unroll
    for (int word = 0; word < kGroup; ++word) expert[word][lane] = expert_factor(log_alpha[word], p.hc.inv_temperature);
  }
}

// Noise factors of the experts of `group` for one (task, element): one
// Philox call at the counter of the shared map; ones in deterministic mode.
template <int Mode, bool kDefaultTemperature>
__device__ __forceinline__ void draw_noise(float (&noise)[kGroup], const MergeParams& p, int64_t task,
                                           int64_t element, int64_t group) {
  if constexpr (Mode == kDeterministic) {
#pragma unroll
    for (int word = 0; word < kGroup; ++word) noise[word] = 1.0f;
  } else {
    const PhiloxWords words = philox4x32_10(philox_counter(p.offset, task, element, group, p.n, p.groups), p.seed);
#pragma unroll
    for (int word = 0; word < kGroup; ++word) {
      noise[word] =
          noise_factor<kDefaultTemperature>(uint32_to_uniform(philox_word(words, word)), Mode, p.hc.inv_temperature);
    }
  }
}

__device__ __forceinline__ int chunk_count(int64_t start, int64_t n, int width) {
  return start >= n ? 0 : (n - start < width ? static_cast<int>(n - start) : width);
}

// Inputs: θ_pre, θ_δ [N] of type T; log_α fp32 [N, M] and α fp32 [B, M] in p.
// Output: out [B, N] of type T.
template <typename T, int Mode, bool kDefaultTemperature>
__global__ void __launch_bounds__(kThreads)
    merge_forward_kernel(MergeParams p, T* __restrict__ out, const T* __restrict__ theta_pre,
                         const T* __restrict__ delta) {
  const int64_t start = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kWidth;
  const int count = chunk_count(start, p.n, kWidth);
  if (count == 0) return;
  float pre[kWidth], delta_values[kWidth];
  load_chunk(theta_pre + start, count, pre);
  load_chunk(delta + start, count, delta_values);
  for (int64_t first_task = 0; first_task < p.batch; first_task += kTaskTile) {
    float weight[kTaskTile][kWidth] = {};
    for (int64_t group = 0; group < p.groups; ++group) {
      float expert[kGroup][kWidth];
      load_expert_factors(expert, p, start, count, group);
#pragma unroll
      for (int tile = 0; tile < kTaskTile; ++tile) {
        const int64_t task = first_task + tile;
        if (task >= p.batch) break;
#pragma unroll
        for (int lane = 0; lane < kWidth; ++lane) {
          float noise[kGroup];
          draw_noise<Mode, kDefaultTemperature>(noise, p, task, start + lane, group);
#pragma unroll
          for (int word = 0; word < kGroup; ++word) {
            const int64_t m = group * kGroup + word;
            if (m >= p.num_experts) break;
            const float z = mask_value(noise[word], expert[word][lane], p.hc);
            weight[tile][lane] = accumulate_weight(weight[tile][lane], __ldg(p.alpha + task * p.num_experts + m), z);
          }
        }
      }
    }
#pragma unroll
    for (int tile = 0; tile < kTaskTile; ++tile) {
      const int64_t task = first_task + tile;
      if (task >= p.batch) break;
      float merged[kWidth];
#pragma unroll
      for (int lane = 0; lane < kWidth; ++lane) merged[lane] = merge_element(pre[lane], delta_values[lane], weight[tile][lane]);
      store_chunk(out + task * p.n + start, count, merged);
    }
  }
}

// The tasks [first_task, end_task) handled by one backward launch; `accumulate`
// when an earlier launch already wrote gradients of the earlier tasks.
struct TaskSlice {
  int64_t first_task;
  int64_t end_task;
  bool accumulate;
};

template <typename T>
__device__ __forceinline__ void load_or_zero(const T* source, bool load, int count, float (&values)[kWidth]) {
  if (load) {
    load_chunk(source, count, values);
  } else {
#pragma unroll
    for (int lane = 0; lane < kWidth; ++lane) values[lane] = 0.0f;
  }
}

// Inputs: grad_out [B, N] and θ_δ [N] of type T; log_α, α in p.
// Outputs (each may be null): grad_pre, grad_delta [N] of type T, grad_log_alpha
// fp32 [N, M], alpha_partials fp32 [gridDim.x, B, M] (row blockIdx.x, the
// columns of the slice's tasks).
// At most 128 registers (two blocks per SM): unbounded, ptxas takes ~160 and
// leaves one block of 8 warps per SM to hide the memory latency.
template <typename T, int Mode, bool kDefaultTemperature>
__global__ void __launch_bounds__(kThreads, 2)
    merge_backward_kernel(MergeParams p, TaskSlice slice, const T* __restrict__ grad_out,
                          const T* __restrict__ delta, T* __restrict__ grad_pre, T* __restrict__ grad_delta,
                          float* __restrict__ grad_log_alpha, float* __restrict__ alpha_partials) {
  extern __shared__ float warp_alpha[];  // [kWarps, slice tasks, M]: each warp adds only to its own row
  const int64_t slice_entries = (slice.end_task - slice.first_task) * p.num_experts;
  const int warp = threadIdx.x / kWarpSize;
  const bool lane_zero = threadIdx.x % kWarpSize == 0;
  const bool want_alpha = alpha_partials != nullptr;
  float* my_alpha = warp_alpha + warp * slice_entries;
  if (want_alpha) {
    for (int64_t i = threadIdx.x; i < kWarps * slice_entries; i += blockDim.x) warp_alpha[i] = 0.0f;
    __syncthreads();
  }
  const int64_t chunks = (p.n + kWidth - 1) / kWidth;
  // Block-uniform trip count: every lane reaches the warp shuffles below.
  for (int64_t first_chunk = static_cast<int64_t>(blockIdx.x) * blockDim.x; first_chunk < chunks;
       first_chunk += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t start = (first_chunk + threadIdx.x) * kWidth;
    const int count = chunk_count(start, p.n, kWidth);
    float delta_values[kWidth], grad_pre_sum[kWidth], grad_delta_sum[kWidth];
    load_or_zero(delta + start, count > 0, count, delta_values);
    load_or_zero(grad_pre + start, count > 0 && slice.accumulate && grad_pre != nullptr, count, grad_pre_sum);
    load_or_zero(grad_delta + start, count > 0 && slice.accumulate && grad_delta != nullptr, count, grad_delta_sum);
    for (int64_t first_task = slice.first_task; first_task < slice.end_task; first_task += kTaskTile) {
      const bool first_contribution = !slice.accumulate && first_task == slice.first_task;
      float grad[kTaskTile][kWidth], weight[kTaskTile][kWidth] = {};
#pragma unroll
      for (int tile = 0; tile < kTaskTile; ++tile) {
        const int64_t task = first_task + tile;
        load_or_zero(grad_out + task * p.n + start, count > 0 && task < slice.end_task, count, grad[tile]);
      }
      for (int64_t group = 0; group < p.groups; ++group) {
        float expert[kGroup][kWidth], grad_log_alpha_sum[kGroup][kWidth];
        load_expert_factors(expert, p, start, count, group);
#pragma unroll
        for (int lane = 0; lane < kWidth; ++lane) {
          float previous[kGroup];
          load_group(previous, grad_log_alpha, p, start + lane,
                     grad_log_alpha != nullptr && !first_contribution && lane < count, group);
#pragma unroll
          for (int word = 0; word < kGroup; ++word) grad_log_alpha_sum[word][lane] = previous[word];
        }
#pragma unroll
        for (int tile = 0; tile < kTaskTile; ++tile) {
          const int64_t task = first_task + tile;
          if (task >= slice.end_task) break;
          float grad_alpha_sum[kGroup] = {};
#pragma unroll
          for (int lane = 0; lane < kWidth; ++lane) {
            float noise[kGroup];
            draw_noise<Mode, kDefaultTemperature>(noise, p, task, start + lane, group);
            const float grad_times_delta = grad[tile][lane] * delta_values[lane];
#pragma unroll
            for (int word = 0; word < kGroup; ++word) {
              const int64_t m = group * kGroup + word;
              if (m >= p.num_experts) break;
              const float alpha = __ldg(p.alpha + task * p.num_experts + m);
              float dz;
              const float z = mask_entry(noise[word], expert[word][lane], p.hc, &dz);
              weight[tile][lane] = accumulate_weight(weight[tile][lane], alpha, z);
              grad_log_alpha_sum[word][lane] += grad_times_delta * alpha * dz;
              grad_alpha_sum[word] += grad_times_delta * z;
            }
          }
          if (want_alpha) {
#pragma unroll
            for (int word = 0; word < kGroup; ++word) {
              const int64_t m = group * kGroup + word;
              const float warp_total = warp_sum(grad_alpha_sum[word]);
              if (lane_zero && m < p.num_experts) my_alpha[(task - slice.first_task) * p.num_experts + m] += warp_total;
            }
          }
        }
        if (grad_log_alpha != nullptr) {
#pragma unroll
          for (int lane = 0; lane < kWidth; ++lane) {
            if (lane >= count) break;
            float values[kGroup];
#pragma unroll
            for (int word = 0; word < kGroup; ++word) values[word] = grad_log_alpha_sum[word][lane];
            store_group(grad_log_alpha, values, p, start + lane, group);
          }
        }
      }
#pragma unroll
      for (int tile = 0; tile < kTaskTile; ++tile) {
        if (first_task + tile >= slice.end_task) break;
#pragma unroll
        for (int lane = 0; lane < kWidth; ++lane) {
          grad_delta_sum[lane] += grad[tile][lane] * weight[tile][lane];
          grad_pre_sum[lane] += grad[tile][lane];
        }
      }
    }
    if (count > 0 && grad_pre != nullptr) store_chunk(grad_pre + start, count, grad_pre_sum);
    if (count > 0 && grad_delta != nullptr) store_chunk(grad_delta + start, count, grad_delta_sum);
  }
  if (!want_alpha) return;
  __syncthreads();
  float* block_row = alpha_partials + static_cast<int64_t>(blockIdx.x) * p.batch * p.num_experts +
                     slice.first_task * p.num_experts;
  for (int64_t i = threadIdx.x; i < slice_entries; i += blockDim.x) {
    float total = 0.0f;
    for (int w = 0; w < kWarps; ++w) total += warp_alpha[w * slice_entries + i];
    block_row[i] = total;
  }
}

// out[c] = Σ_r partials[r, c] for r = 0 … rows−1 in order, in fp64.
__global__ void sum_partials_kernel(float* __restrict__ out, const float* __restrict__ partials, int64_t rows,
                                    int64_t columns) {
  const int64_t column = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (column >= columns) return;
  double total = 0.0;
  for (int64_t row = 0; row < rows; ++row) total += partials[row * columns + column];
  out[column] = static_cast<float>(total);
}

// out fp32 [B, N, M]: the uniform of every (task, element, expert).
__global__ void uniforms_kernel(float* __restrict__ out, uint64_t seed, uint64_t offset, int64_t batch, int64_t n,
                                int64_t num_experts, int64_t groups) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= batch * n * groups) return;
  const int64_t group = index % groups;
  const int64_t element = (index / groups) % n;
  const int64_t task = index / groups / n;
  const PhiloxWords words = philox4x32_10(philox_counter(offset, task, element, group, n, groups), seed);
  float* row = out + (task * n + element) * num_experts;
#pragma unroll
  for (int word = 0; word < kGroup; ++word) {
    const int64_t m = group * kGroup + word;
    if (m < num_experts) row[m] = uint32_to_uniform(philox_word(words, word));
  }
}

int64_t backward_blocks(int64_t n) {
  const int64_t chunks = ceil_div(n, kWidth);
  return std::max<int64_t>(1, std::min(kMaxBackwardBlocks, ceil_div(chunks, kThreads)));
}

}  // namespace

void merge_forward(const MergeArgs& args, void* out, const void* theta_pre, const void* delta) {
  if (args.n == 0 || args.batch == 0) return;
  const MergeParams params = merge_params(args, nullptr);
  const cudaStream_t stream = as_stream(args.stream);
  dispatch_theta_dtype(args.dtype, [&](auto* typed) {
    using T = std::remove_pointer_t<decltype(typed)>;
    const int64_t blocks = ceil_div(ceil_div(args.n, kWidth), kThreads);
    dispatch_mode(args.mode, args.beta, [&](auto mode, auto default_temperature) {
      merge_forward_kernel<T, decltype(mode)::value, decltype(default_temperature)::value>
          <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(params, static_cast<T*>(out),
                                                                   static_cast<const T*>(theta_pre),
                                                                   static_cast<const T*>(delta));
    });
  });
  check_launch("merge_forward_kernel");
}

int64_t merge_backward_partial_rows(int64_t n) { return backward_blocks(n); }

void merge_backward(const MergeArgs& args, const void* grad_out, const void* delta, void* grad_pre, void* grad_delta,
                    float* grad_log_alpha, float* grad_alpha, float* alpha_partials) {
  if (args.n == 0 || args.batch == 0) return;
  if (grad_alpha != nullptr && alpha_partials == nullptr) {
    throw std::invalid_argument("smat._cuda.merge_backward: grad_alpha needs the alpha_partials scratch buffer");
  }
  float* partials = grad_alpha != nullptr ? alpha_partials : nullptr;
  const MergeParams params = merge_params(args, grad_log_alpha);
  const cudaStream_t stream = as_stream(args.stream);
  const int64_t row_bytes = kWarps * args.num_experts * static_cast<int64_t>(sizeof(float));
  const int64_t slice_tasks = partials != nullptr ? std::max<int64_t>(1, kSharedBytesLimit / row_bytes) : args.batch;
  dispatch_theta_dtype(args.dtype, [&](auto* typed) {
    using T = std::remove_pointer_t<decltype(typed)>;
    const int64_t blocks = backward_blocks(args.n);
    dispatch_mode(args.mode, args.beta, [&](auto mode, auto default_temperature) {
      for (int64_t first_task = 0; first_task < args.batch; first_task += slice_tasks) {
        const TaskSlice slice{first_task, std::min(args.batch, first_task + slice_tasks), first_task > 0};
        const size_t shared_bytes = partials != nullptr ? (slice.end_task - first_task) * row_bytes : 0;
        merge_backward_kernel<T, decltype(mode)::value, decltype(default_temperature)::value>
            <<<static_cast<unsigned>(blocks), kThreads, shared_bytes, stream>>>(
                params, slice, static_cast<const T*>(grad_out), static_cast<const T*>(delta),
                static_cast<T*>(grad_pre), static_cast<T*>(grad_delta), grad_log_alpha, partials);
        check_launch("merge_backward_kernel");
      }
    });
    if (partials != nullptr) {
      const int64_t columns = args.batch * args.num_experts;
      sum_partials_kernel<<<static_cast<unsigned>(ceil_div(columns, kThreads)), kThreads, 0, stream>>>(
          grad_alpha, partials, blocks, columns);
      check_launch("sum_partials_kernel");
    }
  });
}

void uniforms(float* out, uint64_t seed, uint64_t offset, int64_t batch, int64_t n, int64_t num_experts,
              uintptr_t stream) {
  const int64_t groups = philox_groups(num_experts);
  const int64_t total = batch * n * groups;
  if (total == 0) return;
  uniforms_kernel<<<static_cast<unsigned>(ceil_div(total, kThreads)), kThreads, 0, as_stream(stream)>>>(
      out, seed, offset, batch, n, num_experts, groups);
  check_launch("uniforms_kernel");
}

}  // namespace smat::cuda
