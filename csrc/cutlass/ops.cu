// The experimental CUTLASS ops (sm_90a: H100 and H200), fastsae_cutlass::gemm_bias_group_max and
// fastsae_cutlass::gemm_bias_filter: their schemas, operand checks and the dispatch to the variant asked for
// (group_max_gemm.cuh and filter_gemm.cuh say what each computes); and the schema of
// fastsae_cutlass::select_topk_group_max, the TopK select over the first op's maxima (group_max_select.cu).
// Built only where CUTLASS's headers are found (setup.py, the `cutlass` extra); fastsae/ops/cutlass_gemm.py
// calls them.
#include <torch/library.h>

#include "filter_gemm.cuh"
#include "group_max_gemm.cuh"
#include "group_max_select.cuh"

namespace fastsae_cutlass {
namespace {

void check_operand(const char* op, const at::Tensor& t, const char* name, int64_t dim, at::ScalarType dtype,
                   const at::Tensor& xc) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == xc.device(), op, ": ", name, " must be on xc's device ", xc.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must have ", dim, " dimensions, got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// The GEMM operands both ops take: xc [B, d], W_enc [d, F] and b_enc [F], bf16, contiguous, on one GPU.
void check_gemm_operands(const char* op, const at::Tensor& xc, const at::Tensor& W_enc, const at::Tensor& b_enc) {
  check_operand(op, xc, "xc", 2, at::kBFloat16, xc);
  check_operand(op, W_enc, "W_enc", 2, at::kBFloat16, xc);
  check_operand(op, b_enc, "b_enc", 1, at::kBFloat16, xc);
  const int64_t B = xc.size(0), d = xc.size(1), F = W_enc.size(1);
  TORCH_CHECK(W_enc.size(0) == d, op, ": W_enc must be [", d, ", F], got ", W_enc.sizes());
  TORCH_CHECK(b_enc.size(0) == F, op, ": b_enc must have ", F, " entries, got ", b_enc.size(0));
  TORCH_CHECK(d % 8 == 0 && F % 8 == 0, op, ": d and F must be multiples of 8 (16-byte rows for TMA), got d = ", d,
              ", F = ", F);
  TORCH_CHECK(B >= 1 && B < (int64_t(1) << 31) && F < (int64_t(1) << 31) && d < (int64_t(1) << 31), op,
              ": B, d and F must be in [1, 2^31), got ", B, ", ", d, ", ", F);
}

}  // namespace

GemmResult gemm_bias_group_max(const at::Tensor& xc, const at::Tensor& W_enc, const at::Tensor& b_enc,
                               int64_t variant) {
  check_gemm_operands("gemm_bias_group_max", xc, W_enc, b_enc);
  switch (variant) {
    case 0: return gemm_cooperative_128x128(xc, W_enc, b_enc);
    case 1: return gemm_pingpong_128x128(xc, W_enc, b_enc);
    case 2: return gemm_cooperative_256x128(xc, W_enc, b_enc);
    case 3: return gemm_pingpong_128x128_cluster2(xc, W_enc, b_enc);
    case 4: return gemm_cooperative_128x256_cluster2(xc, W_enc, b_enc);
    case 5: return gemm_cooperative_128x128_groups64(xc, W_enc, b_enc);
    case 6: return gemm_pingpong_128x128_groups64(xc, W_enc, b_enc);
    default: TORCH_CHECK(false, "gemm_bias_group_max: variant must be in [0, 7), got ", variant);
  }
}

void gemm_bias_filter(const at::Tensor& xc, const at::Tensor& W_enc, const at::Tensor& b_enc, const at::Tensor& tau,
                      at::Tensor& count, at::Tensor& key_buf, int64_t variant) {
  const char* op = "gemm_bias_filter";
  check_gemm_operands(op, xc, W_enc, b_enc);
  check_operand(op, tau, "tau", 1, at::kFloat, xc);
  check_operand(op, count, "count", 1, at::kInt, xc);
  check_operand(op, key_buf, "key_buf", 2, at::kLong, xc);
  const int64_t B = xc.size(0);
  TORCH_CHECK(tau.size(0) == B && count.size(0) == B && key_buf.size(0) == B, op,
              ": tau, count and key_buf must have xc's ", B, " rows, got ", tau.size(0), ", ", count.size(0), ", ",
              key_buf.size(0));
  TORCH_CHECK(key_buf.size(1) >= 1 && key_buf.size(1) < (int64_t(1) << 31), op,
              ": key_buf must have between 1 and 2^31 - 1 slots a row, got ", key_buf.size(1));
  switch (variant) {
    case 0: return filter_pingpong_128x128(xc, W_enc, b_enc, tau, count, key_buf);
    case 1: return filter_cooperative_128x128(xc, W_enc, b_enc, tau, count, key_buf);
    default: TORCH_CHECK(false, op, ": variant must be 0 or 1, got ", variant);
  }
}

}  // namespace fastsae_cutlass

TORCH_LIBRARY(fastsae_cutlass, m) {
  m.def("gemm_bias_group_max(Tensor xc, Tensor W_enc, Tensor b_enc, int variant=0) -> (Tensor, Tensor)");
  m.def(
      "gemm_bias_filter(Tensor xc, Tensor W_enc, Tensor b_enc, Tensor tau, Tensor(a!) count, Tensor(b!) key_buf, "
      "int variant=0) -> ()");
  m.def(
      "select_topk_group_max(Tensor pre, Tensor maxima, int group, int k, Tensor(a!) vals, Tensor(b!) idx, "
      "Tensor(c!) flags, bool raise_by_count=False) -> ()");
}

TORCH_LIBRARY_IMPL(fastsae_cutlass, CUDA, m) {
  m.impl("gemm_bias_group_max", &fastsae_cutlass::gemm_bias_group_max);
  m.impl("gemm_bias_filter", &fastsae_cutlass::gemm_bias_filter);
  m.impl("select_topk_group_max", &fastsae_cutlass::select_topk_group_max);
}
