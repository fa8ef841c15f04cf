// The encoder GEMM with group maxima (fastsae::gemm_bias_group_max's variants, group_max_gemm.cu): pre =
// xc @ W_enc + b_enc rounded to bf16, written as cuBLAS's addmm writes it, and in the same epilogue the
// maximum of each row's features over every group of adjacent ones (the CTA tile's width, or with
// GroupsPerTile = 2 each half of it), so that the TopK row filter (fastsae/ops/filter.py) can start from
// the maxima instead of reading the whole pre-activation once more. fastsae/reference.py defines the op
// (`gemm_bias_group_max`).
//
// The GEMM is encoder_gemm.cuh's. The epilogue is a visitor tree: acc +
// b_enc (a row broadcast), rounded to bf16 and stored by TMA, and its column reduction (max over each row of
// the tile, or of one group of the tile's columns each) left per tile, unreduced across tiles
// (FinalReduction false). The maxima are of the rounded values, so they are exactly the maxima of the
// stored pre-activation.
// Each variant is instantiated in a translation unit of its own (group_max_gemm_*.cu): a minute or so of
// nvcc each, built in parallel.
#pragma once

#include <tuple>

#include "encoder_gemm.cuh"

namespace fastsae_cutlass {

using GemmResult = std::tuple<at::Tensor, at::Tensor>;

// The variants, by the `variant` argument of the op (fastsae/ops/group_max_gemm.py VARIANTS mirrors it).
GemmResult gemm_cooperative_128x128(const at::Tensor& xc, const at::Tensor& W_enc, const at::Tensor& b_enc);
GemmResult gemm_pingpong_128x128(const at::Tensor& xc, const at::Tensor& W_enc, const at::Tensor& b_enc);
GemmResult gemm_cooperative_256x128(const at::Tensor& xc, const at::Tensor& W_enc, const at::Tensor& b_enc);
GemmResult gemm_pingpong_128x128_cluster2(const at::Tensor& xc, const at::Tensor& W_enc, const at::Tensor& b_enc);
GemmResult gemm_cooperative_128x256_cluster2(const at::Tensor& xc, const at::Tensor& W_enc, const at::Tensor& b_enc);
GemmResult gemm_cooperative_128x128_groups64(const at::Tensor& xc, const at::Tensor& W_enc, const at::Tensor& b_enc);
GemmResult gemm_pingpong_128x128_groups64(const at::Tensor& xc, const at::Tensor& W_enc, const at::Tensor& b_enc);

// The maximum over each row of a CTA tile's columns, left per tile (a [ceil(F / TileN), rows] fp32 buffer):
// CUTLASS's column reduction, unreduced across tiles.
template <int TileM, int TileN>
using TileRowMax = cutlass::epilogue::fusion::Sm90ColReduction<
    cutlass::maximum, cutlass::maximum, cutlass::maximum, 0, TileShape<TileM, TileN>, float, float,
    cutlass::FloatRoundStyle::round_to_nearest, cute::Stride<cute::_1, cute::_0, int64_t>, 4, true,
    /*FinalReduction=*/false>;

// TileRowMax over the columns of one group of a tile, group `Group` of its TileN / GroupN: the epilogue
// visits the tile in subtiles of EpiN columns (32 for these kernels), and those that lie in other groups
// pass through unreduced. Each group's maxima go to a buffer of their own ([ceil(F / TileN), rows], as
// TileRowMax's); groups past F are left at the reduction's identity, -inf. Where the tile is one group
// this is TileRowMax.
template <int TileM, int TileN, int GroupN, int Group>
struct GroupRowMax : TileRowMax<TileM, TileN> {
  using Base = TileRowMax<TileM, TileN>;
  using Base::Base;
  static_assert(TileN % GroupN == 0 && 0 <= Group && Group < TileN / GroupN, "a group of the tile's columns");

  template <class BaseCallbacks, int EpiN>
  struct ConsumerStoreCallbacks : BaseCallbacks {
    static_assert(GroupN % EpiN == 0, "each epilogue subtile lies in one group");
    CUTLASS_DEVICE ConsumerStoreCallbacks(BaseCallbacks&& base) : BaseCallbacks(cute::move(base)) {}

    template <typename ElementAccumulator, typename ElementInput, int FragmentSize>
    CUTLASS_DEVICE auto visit(cutlass::Array<ElementAccumulator, FragmentSize> const& frg_acc, int epi_v, int epi_m,
                              int epi_n, cutlass::Array<ElementInput, FragmentSize> const& frg_input) {
      if (epi_n * EpiN / GroupN != Group) return frg_input;  // a constant where the epilogue's loop unrolls
      return BaseCallbacks::visit(frg_acc, epi_v, epi_m, epi_n, frg_input);
    }
  };

  template <bool ReferenceSrc, class... Args>
  CUTLASS_DEVICE auto get_consumer_store_callbacks(cutlass::epilogue::fusion::ConsumerStoreArgs<Args...> const& args) {
    auto base = Base::template get_consumer_store_callbacks<ReferenceSrc>(args);
    constexpr int EpiN = decltype(cute::size<1>(args.epi_tile))::value;
    return ConsumerStoreCallbacks<decltype(base), EpiN>(cute::move(base));
  }
};

// GroupsPerTile 1: the maxima over each tile's TileN columns, fp32 [ceil(F / TileN), round_up(B, TileM)],
// rows contiguous. GroupsPerTile 2: over each half of a tile, as fp32 [ceil(F / TileN), 2, round_up(B,
// TileM)] (the halves' buffers are two blocks of one tensor, so that view's strides are (rows, ceil(F /
// TileN) * rows, 1)): group g of the row at [g / 2, g % 2].
template <int TileM, int TileN, bool Pingpong, int ClusterM = 1, int GroupsPerTile = 1>
struct GroupMaxGemm {
  static_assert(GroupsPerTile == 1 || GroupsPerTile == 2, "one or two groups a tile");
  // acc + b_enc rounded to bf16, then each group's maximum of those rounded values (a reduction passes its
  // input on to the next node and the store).
  using Fusion = std::conditional_t<
      GroupsPerTile == 1,
      cutlass::epilogue::fusion::Sm90EVT<TileRowMax<TileM, TileN>, AddBias<TileM, TileN, Element>>,
      cutlass::epilogue::fusion::Sm90EVT<
          GroupRowMax<TileM, TileN, TileN / 2, 1>,
          cutlass::epilogue::fusion::Sm90EVT<GroupRowMax<TileM, TileN, TileN / 2, 0>, AddBias<TileM, TileN, Element>>>>;
  using Gemm = EncoderGemm<TileM, TileN, Pingpong, ClusterM, Fusion, Element>;

  // Operands checked by the op (group_max_gemm.cu) before this runs.
  static GemmResult run(const at::Tensor& xc, const at::Tensor& W_enc, const at::Tensor& b_enc) {
    const int64_t M = xc.size(0), N = W_enc.size(1);
    at::Tensor pre = at::empty({M, N}, xc.options());
    const int64_t rows = (M + TileM - 1) / TileM * TileM;  // the reduction's rows: whole tiles
    const int64_t tiles = (N + TileN - 1) / TileN;
    at::Tensor maxima = at::empty({GroupsPerTile, tiles, rows}, xc.options().dtype(at::kFloat));
    auto args = Gemm::arguments(xc, W_enc, reinterpret_cast<Element*>(pre.data_ptr()));
    const typename AddBias<TileM, TileN, Element>::Arguments bias{
        {}, {reinterpret_cast<const Element*>(b_enc.data_ptr())}, {}};
    // Group `group`'s reduction, into its block of `maxima`, from -inf.
    const auto group_maxima = [&maxima](int group) {
      return typename TileRowMax<TileM, TileN>::Arguments{maxima[group].data_ptr<float>(), -INFINITY,
                                                          {cute::_1{}, cute::_0{}, int64_t(0)}};
    };
    if constexpr (GroupsPerTile == 1) {
      args.epilogue.thread = {bias, group_maxima(0)};
    } else {
      args.epilogue.thread = {{bias, group_maxima(0)}, group_maxima(1)};
    }
    Gemm::run(args, xc, "gemm_bias_group_max");
    if constexpr (GroupsPerTile == 1) return {pre, maxima[0]};
    return {pre, maxima.transpose(0, 1)};
  }
};

}  // namespace fastsae_cutlass
