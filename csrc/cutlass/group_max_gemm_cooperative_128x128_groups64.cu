// One variant of fastsae::gemm_bias_group_max (group_max_gemm.cuh), in a translation unit of its own: the
// maxima over each half of a tile (groups of 64 features).
#include "group_max_gemm.cuh"

namespace fastsae_cutlass {

GemmResult gemm_cooperative_128x128_groups64(const at::Tensor& xc, const at::Tensor& W_enc, const at::Tensor& b_enc) {
  return GroupMaxGemm<128, 128, false, 1, 2>::run(xc, W_enc, b_enc);
}

}  // namespace fastsae_cutlass
