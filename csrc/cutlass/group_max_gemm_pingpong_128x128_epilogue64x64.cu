// One variant of fastsae::gemm_bias_group_max (group_max_gemm.cuh), in a translation unit of its own: the
// ping-pong 128 x 128 tile with an epilogue sub-tile of 64 x 64 (four visits a tile instead of eight).
#include "group_max_gemm.cuh"

namespace fastsae_cutlass {

GemmResult gemm_pingpong_128x128_epilogue64x64(const at::Tensor& xc, const at::Tensor& W_enc, const at::Tensor& b_enc) {
  return GroupMaxGemm<128, 128, true, 1, cute::Shape<cute::_64, cute::_64>>::run(xc, W_enc, b_enc);
}

}  // namespace fastsae_cutlass
