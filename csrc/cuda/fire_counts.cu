// CUDA implementations of fastsae::fire_counts and fastsae::fire_counts_dense (schema in csrc/fastsae.cpp,
// definition in fastsae/reference.py). Both run on the current stream with no host synchronisation.
//
// fire_counts: a histogram of B*k feature indices into F bins. Hot features (one feature in every row)
// would serialise plain atomics on one address, so each warp first merges lanes that hold the same
// feature (__match_any_sync) and one lane adds the group's count. Bins live in shared memory as int32;
// when F is larger than one block's shared memory, grid.y splits F into chunks and every block of a
// chunk scans the indices keeping only its chunk. Non-zero bins are flushed to the int64 output with
// one global atomic each.
//
// fire_counts_dense: count of acts > 0 per column of a row-major [B, F] matrix. Each thread owns 16
// contiguous bytes of columns (8 bf16/fp16 or 4 fp32 values), so a warp reads 512 contiguous bytes per
// row; grid.y splits the rows; int32 per-thread counters are flushed with one atomic per column.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "fastsae.h"

namespace fastsae {
namespace {

constexpr int kHistThreads = 512;

// Multiprocessor count of the current device. (Not ATen/cuda/CUDAContext.h: it pulls in cuSPARSE and
// cuBLAS headers that a compile-only toolkit may lack.)
int multiprocessor_count() {
  int device = 0, count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}
constexpr int64_t kMaxSharedBins = 32768;  // 128 KB of int32 bins per block (H100/H200 allow 227 KB)

template <typename index_t, typename value_t>
__global__ void fire_counts_kernel(const index_t* __restrict__ idx, const value_t* __restrict__ vals, int64_t n,
                                   int64_t n_features, int64_t chunk_bins, unsigned long long* __restrict__ out) {
  extern __shared__ int bins[];
  const int64_t lo = static_cast<int64_t>(blockIdx.y) * chunk_bins;
  const int64_t width = min(chunk_bins, n_features - lo);
  for (int64_t b = threadIdx.x; b < width; b += blockDim.x) bins[b] = 0;
  __syncthreads();

  const int lane = threadIdx.x & 31;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  // Every lane runs the same number of iterations so __match_any_sync sees full warps.
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t rounds = (n + stride - 1) / stride;
  for (int64_t r = 0; r < rounds; ++r) {
    const int64_t i = start + r * stride;
    int64_t f = -1;
    if (i < n) {
      f = static_cast<int64_t>(idx[i]);
      CUDA_KERNEL_ASSERT(f >= 0 && f < n_features && "fire_counts: index out of range [0, n_features)");
      const bool fired = vals == nullptr || static_cast<float>(vals[i]) > 0.0f;
      if (!fired || f < lo || f >= lo + width) f = -1;  // out of range is skipped even if asserts are off
    }
    const unsigned same = __match_any_sync(0xffffffffu, f);
    if (f >= 0 && lane == __ffs(same) - 1) atomicAdd(&bins[f - lo], __popc(same));
  }
  __syncthreads();
  for (int64_t b = threadIdx.x; b < width; b += blockDim.x) {
    if (bins[b] != 0) atomicAdd(&out[lo + b], static_cast<unsigned long long>(bins[b]));
  }
}

at::Tensor fire_counts_cuda(const at::Tensor& idx, int64_t n_features, const std::optional<at::Tensor>& vals) {
  check_fire_counts_args(idx, n_features, vals);
  const c10::cuda::CUDAGuard guard(idx.device());
  at::Tensor out = at::zeros({n_features}, idx.options().dtype(at::kLong));
  const int64_t n = idx.numel();
  if (n == 0) return out;
  const at::Tensor idx_c = idx.contiguous();
  const at::Tensor vals_c = vals.has_value() ? vals->contiguous() : at::Tensor();

  const int64_t chunk_bins = std::min(n_features, kMaxSharedBins);
  const int64_t n_chunks = (n_features + chunk_bins - 1) / chunk_bins;
  const int sms = multiprocessor_count();
  // About four entries per thread hides the index loads' latency; more blocks than ~2 per SM only add
  // zeroing and flushing of the chunk's bins (measured: sizing blocks by F left 10 blocks at GPT-2 shape,
  // latency-bound at 1.3x bincount).
  const int64_t by_work = (n + 4 * kHistThreads - 1) / (4 * kHistThreads);
  const int64_t blocks_x = std::max<int64_t>(1, std::min<int64_t>(by_work, (2 * sms + n_chunks - 1) / n_chunks));
  const size_t shared = static_cast<size_t>(chunk_bins) * sizeof(int);
  const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(n_chunks));
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto* out_ptr = reinterpret_cast<unsigned long long*>(out.data_ptr<int64_t>());

  AT_DISPATCH_INDEX_TYPES(idx_c.scalar_type(), "fire_counts_cuda", [&] {
    if (!vals_c.defined()) {
      auto kernel = fire_counts_kernel<index_t, float>;
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared));
      kernel<<<grid, kHistThreads, shared, stream>>>(idx_c.data_ptr<index_t>(), nullptr, n, n_features,
                                                     chunk_bins, out_ptr);
    } else {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, vals_c.scalar_type(), "fire_counts_cuda_vals", [&] {
        auto kernel = fire_counts_kernel<index_t, scalar_t>;
        C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared));
        kernel<<<grid, kHistThreads, shared, stream>>>(idx_c.data_ptr<index_t>(), vals_c.data_ptr<scalar_t>(), n,
                                                       n_features, chunk_bins, out_ptr);
      });
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

constexpr int kDenseThreads = 256;

// VEC columns per thread, loaded as one 16-byte vector when `aligned`, else element by element.
template <typename scalar_t, int VEC>
__global__ void fire_counts_dense_kernel(const scalar_t* __restrict__ acts, int64_t n_rows, int64_t n_features,
                                         int64_t rows_per_block, bool aligned,
                                         unsigned long long* __restrict__ out) {
  const int64_t col0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (col0 >= n_features) return;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t row_end = min(n_rows, row_begin + rows_per_block);
  int counts[VEC] = {0};
  const bool full = aligned && col0 + VEC <= n_features;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const scalar_t* row = acts + r * n_features + col0;
    if (full) {
      union {
        uint4 raw;
        scalar_t v[VEC];
      } packed;
      packed.raw = *reinterpret_cast<const uint4*>(row);
#pragma unroll
      for (int j = 0; j < VEC; ++j) counts[j] += static_cast<float>(packed.v[j]) > 0.0f;
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        if (col0 + j < n_features) counts[j] += static_cast<float>(row[j]) > 0.0f;
      }
    }
  }
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    if (counts[j] != 0) atomicAdd(&out[col0 + j], static_cast<unsigned long long>(counts[j]));
  }
}

at::Tensor fire_counts_dense_cuda(const at::Tensor& acts) {
  TORCH_CHECK(acts.dim() == 2, "fire_counts_dense: acts must be [B, F], got shape ", acts.sizes());
  TORCH_CHECK(at::isFloatingType(acts.scalar_type()), "fire_counts_dense: acts must be floating point, got ",
              acts.scalar_type());
  const c10::cuda::CUDAGuard guard(acts.device());
  const int64_t n_rows = acts.size(0), n_features = acts.size(1);
  at::Tensor out = at::zeros({n_features}, acts.options().dtype(at::kLong));
  if (n_rows == 0 || n_features == 0) return out;
  const at::Tensor a = acts.contiguous();
  const int sms = multiprocessor_count();
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto* out_ptr = reinterpret_cast<unsigned long long*>(out.data_ptr<int64_t>());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "fire_counts_dense_cuda", [&] {
    constexpr int vec = 16 / sizeof(scalar_t);
    const bool aligned = n_features % vec == 0 && reinterpret_cast<uintptr_t>(a.data_ptr()) % 16 == 0;
    const int64_t col_blocks = (n_features + int64_t(vec) * kDenseThreads - 1) / (int64_t(vec) * kDenseThreads);
    // Enough row splits for ~4 blocks per SM, but at least 8 rows each so the flush stays cheap.
    const int64_t row_splits =
        std::max<int64_t>(1, std::min<int64_t>((4 * sms + col_blocks - 1) / col_blocks, (n_rows + 7) / 8));
    const int64_t rows_per_block = (n_rows + row_splits - 1) / row_splits;
    const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>((n_rows + rows_per_block - 1) / rows_per_block));
    fire_counts_dense_kernel<scalar_t, vec><<<grid, kDenseThreads, 0, stream>>>(
        a.data_ptr<scalar_t>(), n_rows, n_features, rows_per_block, aligned, out_ptr);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace fastsae

TORCH_LIBRARY_IMPL(fastsae, CUDA, m) {
  m.impl("fire_counts", &fastsae::fire_counts_cuda);
  m.impl("fire_counts_dense", &fastsae::fire_counts_dense_cuda);
}
