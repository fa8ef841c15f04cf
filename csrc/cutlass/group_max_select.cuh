// fastsae_cutlass::select_topk_group_max (group_max_select.cu): the TopK select of a row chunk from the
// pre-activation [rows, F] (bf16) and the group maxima that gemm_bias_group_max leaves, as fp32 [tiles,
// groups a tile (1 or 2), >= rows] (group g of a row at [g / groups a tile, g % groups a tile]). Writes
// vals [rows, k] (post-ReLU, bf16 or fp32) and idx [rows, k] (int32), largest first, as
// fastsae/reference.py's `topk_activation` selects them (ties to the larger feature), and flags [rows]
// (int8): 1 for a row left unwritten, for the caller to recompute. `raise_by_count`: the version that raises
// the bound over a full candidate buffer by counting instead of sorting (not yet run on a GPU).
#pragma once

#include <ATen/ATen.h>

namespace fastsae_cutlass {

constexpr int64_t kMaxGroups = 1024;  // group maxima a row may have (32 a lane, in registers)
constexpr int64_t kMaxK = 256;        // half the kernel's candidate slots a row

void select_topk_group_max(const at::Tensor& pre, const at::Tensor& maxima, int64_t group, int64_t k,
                           at::Tensor& vals, at::Tensor& idx, at::Tensor& flags, bool raise_by_count);

// The select over groups of kGroup features, operands checked (group_max_select_kernel.cuh): instantiated for
// 64, 128 and 256, each in group_max_select_groups<kGroup>.cu.
template <int kGroup>
void select_in_groups(const at::Tensor& pre, const at::Tensor& maxima, int64_t k, at::Tensor& vals, at::Tensor& idx,
                      at::Tensor& flags, bool raise_by_count);

}  // namespace fastsae_cutlass
