// fastsae_cutlass::select_topk_group_max over groups of 64 features (group_max_select_kernel.cuh), in a
// translation unit of its own.
#include "group_max_select_kernel.cuh"

namespace fastsae_cutlass {

template void select_in_groups<64>(const at::Tensor& pre, const at::Tensor& maxima, int64_t k, at::Tensor& vals,
                                   at::Tensor& idx, at::Tensor& flags, bool raise_by_count);

}  // namespace fastsae_cutlass
