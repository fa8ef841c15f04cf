// fastsae_cutlass::select_topk_group_max (group_max_select.cuh): its operand checks and the dispatch to the
// select of the group width asked for (the kernels: group_max_select_kernel.cuh).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>

#include "group_max_select.cuh"

namespace fastsae_cutlass {

void select_topk_group_max(const at::Tensor& pre, const at::Tensor& maxima, int64_t group, int64_t k,
                           at::Tensor& vals, at::Tensor& idx, at::Tensor& flags, bool raise_by_count) {
  // fastsae/ops/cutlass_gemm.py checks the operands before it calls this (a failed check here has crashed
  // the process at its second failure); these guard the kernel's memory accesses all the same.
  const char* op = "select_topk_group_max";
  TORCH_CHECK(pre.is_cuda() && pre.scalar_type() == at::kBFloat16 && pre.dim() == 2 && pre.stride(1) == 1 &&
                  pre.stride(0) % 8 == 0 && reinterpret_cast<uintptr_t>(pre.data_ptr()) % 16 == 0,
              op, ": pre must be a bf16 CUDA matrix of 16-byte aligned contiguous rows");
  TORCH_CHECK(group == 64 || group == 128 || group == 256, op, ": group must be 64, 128 or 256, got ", group);
  const int64_t rows = pre.size(0), n_features = pre.size(1), n_groups = (n_features + group - 1) / group;
  TORCH_CHECK(n_features % 8 == 0 && rows < (int64_t(1) << 31) && n_groups <= kMaxGroups, op,
              ": pre must have fewer than 2^31 rows and a multiple of 8 features in at most ", kMaxGroups, " groups");
  TORCH_CHECK(k >= 1 && k <= kMaxK && k <= n_groups, op, ": k must be in [1, min(", kMaxK, ", groups)], got ", k);
  TORCH_CHECK(maxima.device() == pre.device() && maxima.scalar_type() == at::kFloat && maxima.dim() == 3 &&
                  (maxima.size(1) == 1 || maxima.size(1) == 2) &&
                  maxima.size(0) == (n_groups + maxima.size(1) - 1) / maxima.size(1) && maxima.size(2) >= rows &&
                  maxima.stride(2) == 1,
              op, ": maxima must be fp32 [tiles, 1 or 2 groups a tile, >= rows] on pre's device");
  const bool bf16_or_fp32 = vals.scalar_type() == at::kBFloat16 || vals.scalar_type() == at::kFloat;
  TORCH_CHECK(vals.device() == pre.device() && bf16_or_fp32 && vals.dim() == 2 && vals.size(0) == rows &&
                  vals.size(1) == k && vals.stride(1) == 1,
              op, ": vals must be bf16 or fp32 [rows, k] on pre's device, rows contiguous");
  TORCH_CHECK(idx.device() == pre.device() && idx.scalar_type() == at::kInt && idx.dim() == 2 &&
                  idx.size(0) == rows && idx.size(1) == k && idx.stride(1) == 1,
              op, ": idx must be int32 [rows, k] on pre's device, rows contiguous");
  TORCH_CHECK(flags.device() == pre.device() && flags.scalar_type() == at::kChar && flags.dim() == 1 &&
                  flags.size(0) == rows && flags.is_contiguous(),
              op, ": flags must be int8 [rows] on pre's device");
  if (rows == 0) return;
  const c10::cuda::CUDAGuard guard(pre.device());
  if (group == 64) return select_in_groups<64>(pre, maxima, k, vals, idx, flags, raise_by_count);
  if (group == 128) return select_in_groups<128>(pre, maxima, k, vals, idx, flags, raise_by_count);
  return select_in_groups<256>(pre, maxima, k, vals, idx, flags, raise_by_count);
}

}  // namespace fastsae_cutlass
