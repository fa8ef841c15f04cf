// fastsae_cutlass::gemm_bias_group_max (experimental, sm_90a: H100 and H200): its schema, operand checks and
// the dispatch to the variant asked for (group_max_gemm.cuh says what each computes). Built only where
// CUTLASS's headers are found (setup.py, the `cutlass` extra); fastsae/ops/group_max_gemm.py calls it.
#include <torch/library.h>

#include "group_max_gemm.cuh"

namespace fastsae_cutlass {
namespace {

void check_operand(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.is_cuda(), "gemm_bias_group_max: ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kBFloat16, "gemm_bias_group_max: ", name, " must be bfloat16, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == dim, "gemm_bias_group_max: ", name, " must have ", dim, " dimensions, got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "gemm_bias_group_max: ", name, " must be contiguous");
}

}  // namespace

GemmResult gemm_bias_group_max(const at::Tensor& xc, const at::Tensor& W_enc, const at::Tensor& b_enc,
                               int64_t variant) {
  check_operand(xc, "xc", 2);
  check_operand(W_enc, "W_enc", 2);
  check_operand(b_enc, "b_enc", 1);
  const int64_t B = xc.size(0), d = xc.size(1), F = W_enc.size(1);
  TORCH_CHECK(W_enc.size(0) == d, "gemm_bias_group_max: W_enc must be [", d, ", F], got ", W_enc.sizes());
  TORCH_CHECK(b_enc.size(0) == F, "gemm_bias_group_max: b_enc must have ", F, " entries, got ", b_enc.size(0));
  TORCH_CHECK(d % 8 == 0 && F % 8 == 0,
              "gemm_bias_group_max: d and F must be multiples of 8 (16-byte rows for TMA), got d = ", d, ", F = ", F);
  TORCH_CHECK(B >= 1 && B < (int64_t(1) << 31) && F < (int64_t(1) << 31) && d < (int64_t(1) << 31),
              "gemm_bias_group_max: B, d and F must be in [1, 2^31), got ", B, ", ", d, ", ", F);
  TORCH_CHECK(xc.device() == W_enc.device() && xc.device() == b_enc.device(),
              "gemm_bias_group_max: xc, W_enc and b_enc must be on one device");
  switch (variant) {
    case 0: return gemm_cooperative_128x128(xc, W_enc, b_enc);
    case 1: return gemm_cooperative_128x64(xc, W_enc, b_enc);
    case 2: return gemm_pingpong_128x128(xc, W_enc, b_enc);
    case 3: return gemm_pingpong_64x128(xc, W_enc, b_enc);
    default: TORCH_CHECK(false, "gemm_bias_group_max: variant must be 0, 1, 2 or 3, got ", variant);
  }
}

}  // namespace fastsae_cutlass

TORCH_LIBRARY(fastsae_cutlass, m) {
  m.def("gemm_bias_group_max(Tensor xc, Tensor W_enc, Tensor b_enc, int variant=0) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastsae_cutlass, CUDA, m) {
  m.impl("gemm_bias_group_max", &fastsae_cutlass::gemm_bias_group_max);
}
