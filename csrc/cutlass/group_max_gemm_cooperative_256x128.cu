// One variant of fastsae::gemm_bias_group_max (group_max_gemm.cuh), in a translation unit of its own.
#include "group_max_gemm.cuh"

namespace fastsae_cutlass {

GemmResult gemm_cooperative_256x128(const at::Tensor& xc, const at::Tensor& W_enc, const at::Tensor& b_enc) {
  return GroupMaxGemm<256, 128, false>::run(xc, W_enc, b_enc);
}

}  // namespace fastsae_cutlass
