// The encoder GEMM with group maxima (fastsae::gemm_bias_group_max's variants, group_max_gemm.cu): pre =
// xc @ W_enc + b_enc rounded to bf16, written as cuBLAS's addmm writes it, and in the same epilogue the
// maximum of each row's features over every group of adjacent ones (a group is the CTA tile's width), so
// that the TopK row filter (fastsae/ops/filter.py) can start from the maxima instead of reading the whole
// pre-activation once more. fastsae/reference.py defines the op (`gemm_bias_group_max`).
//
// The GEMM is encoder_gemm.cuh's. The epilogue is a visitor tree: acc +
// b_enc (a row broadcast), rounded to bf16 and stored by TMA, and its column reduction (max over each row of
// the tile) left per tile, unreduced across tiles (FinalReduction false). The maxima are of the rounded
// values, so they are exactly the maxima of the stored pre-activation.
// Each variant is instantiated in a translation unit of its own (group_max_gemm_*.cu): a minute or so of
// nvcc each, built in parallel.
#pragma once

#include <tuple>

#include "encoder_gemm.cuh"

namespace fastsae_cutlass {

using GemmResult = std::tuple<at::Tensor, at::Tensor>;

// The variants, by the `variant` argument of the op (fastsae/ops/group_max_gemm.py VARIANTS mirrors it).
GemmResult gemm_cooperative_128x128(const at::Tensor& xc, const at::Tensor& W_enc, const at::Tensor& b_enc);
GemmResult gemm_cooperative_128x64(const at::Tensor& xc, const at::Tensor& W_enc, const at::Tensor& b_enc);
GemmResult gemm_pingpong_128x128(const at::Tensor& xc, const at::Tensor& W_enc, const at::Tensor& b_enc);
GemmResult gemm_pingpong_64x128(const at::Tensor& xc, const at::Tensor& W_enc, const at::Tensor& b_enc);
GemmResult gemm_cooperative_256x128(const at::Tensor& xc, const at::Tensor& W_enc, const at::Tensor& b_enc);
GemmResult gemm_pingpong_128x128_cluster2(const at::Tensor& xc, const at::Tensor& W_enc, const at::Tensor& b_enc);
GemmResult gemm_cooperative_128x256_cluster2(const at::Tensor& xc, const at::Tensor& W_enc, const at::Tensor& b_enc);

template <int TileM, int TileN, bool Pingpong, int ClusterM = 1>
struct GroupMaxGemm {
  // acc + b_enc rounded to bf16, then the maximum of those rounded values over each row of the tile, written
  // per tile: an fp32 tensor [ceil(F / TileN), round_up(B, TileM)], rows contiguous. The reduction passes
  // its input on to the store.
  using GroupMax = cutlass::epilogue::fusion::Sm90ColReduction<
      cutlass::maximum, cutlass::maximum, cutlass::maximum, 0, TileShape<TileM, TileN>, float, float,
      cutlass::FloatRoundStyle::round_to_nearest, cute::Stride<cute::_1, cute::_0, int64_t>, 4, true,
      /*FinalReduction=*/false>;
  using Fusion = cutlass::epilogue::fusion::Sm90EVT<GroupMax, AddBias<TileM, TileN, Element>>;
  using Gemm = EncoderGemm<TileM, TileN, Pingpong, ClusterM, Fusion, Element>;

  // Operands checked by the op (group_max_gemm.cu) before this runs.
  static GemmResult run(const at::Tensor& xc, const at::Tensor& W_enc, const at::Tensor& b_enc) {
    const int64_t M = xc.size(0), N = W_enc.size(1);
    at::Tensor pre = at::empty({M, N}, xc.options());
    const int64_t rows = (M + TileM - 1) / TileM * TileM;  // the reduction's rows: whole tiles
    at::Tensor maxima = at::empty({(N + TileN - 1) / TileN, rows}, xc.options().dtype(at::kFloat));
    auto args = Gemm::arguments(xc, W_enc, reinterpret_cast<Element*>(pre.data_ptr()));
    args.epilogue.thread = {
        {{}, {reinterpret_cast<const Element*>(b_enc.data_ptr())}, {}},      // acc + b_enc
        {maxima.data_ptr<float>(), -INFINITY, {cute::_1{}, cute::_0{}, int64_t(0)}}};  // the group maxima
    Gemm::run(args, xc, "gemm_bias_group_max");
    return {pre, maxima};
  }
};

}  // namespace fastsae_cutlass
