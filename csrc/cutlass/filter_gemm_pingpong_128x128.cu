// One variant of fastsae_cutlass::gemm_bias_filter (filter_gemm.cuh), in a translation unit of its own.
#include "filter_gemm.cuh"

namespace fastsae_cutlass {

void filter_pingpong_128x128(const at::Tensor& xc, const at::Tensor& W_enc, const at::Tensor& b_enc, const at::Tensor& tau,
                  at::Tensor& count, at::Tensor& key_buf) {
  FilterGemm<128, 128, true>::run(xc, W_enc, b_enc, tau, count, key_buf);
}

}  // namespace fastsae_cutlass
