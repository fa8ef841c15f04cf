// The encoder GEMM with group maxima (fastsae::gemm_bias_group_max's variants, group_max_gemm.cu): pre =
// xc @ W_enc + b_enc rounded to bf16, written as cuBLAS's addmm writes it, and in the same epilogue the
// maximum of each row's features over every group of adjacent ones (a group is the CTA tile's width), so
// that the TopK row filter (fastsae/ops/filter.py) can start from the maxima instead of reading the whole
// pre-activation once more. fastsae/reference.py defines the op (`gemm_bias_group_max`).
//
// The GEMM is CUTLASS's Hopper TMA warp-specialised kernel (a producer warp feeding a shared-memory ring,
// persistent over the tiles): cooperative (two consumer warpgroups on one tile) or ping-pong (each consumer
// on a tile of its own, one's epilogue beside the other's matmul). The epilogue is a visitor tree: acc +
// b_enc (a row broadcast), rounded to bf16 and stored by TMA, and its column reduction (max over each row of
// the tile) left per tile, unreduced across tiles (FinalReduction false). The maxima are of the rounded
// values, so they are exactly the maxima of the stored pre-activation.
// Each variant is instantiated in a translation unit of its own (group_max_gemm_*.cu): a minute or so of
// nvcc each, built in parallel.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cutlass/cutlass.h>
#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp>
#include <cutlass/util/packed_stride.hpp>

#include <tuple>

namespace fastsae_cutlass {

using GemmResult = std::tuple<at::Tensor, at::Tensor>;

// The variants, by the `variant` argument of the op (fastsae/ops/group_max_gemm.py VARIANTS mirrors it).
GemmResult gemm_cooperative_128x128(const at::Tensor& xc, const at::Tensor& W_enc, const at::Tensor& b_enc);
GemmResult gemm_cooperative_128x64(const at::Tensor& xc, const at::Tensor& W_enc, const at::Tensor& b_enc);
GemmResult gemm_pingpong_128x128(const at::Tensor& xc, const at::Tensor& W_enc, const at::Tensor& b_enc);
GemmResult gemm_pingpong_64x128(const at::Tensor& xc, const at::Tensor& W_enc, const at::Tensor& b_enc);

template <int TileM, int TileN, bool Pingpong>
struct GroupMaxGemm {
  using Element = cutlass::bfloat16_t;
  using TileShape = cute::Shape<cute::Int<TileM>, cute::Int<TileN>, cute::_64>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  static constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;
  static constexpr int kAlign = 16 / sizeof(Element);  // TMA: 16-byte rows
  using KernelSchedule = std::conditional_t<Pingpong, cutlass::gemm::KernelTmaWarpSpecializedPingpong,
                                            cutlass::gemm::KernelTmaWarpSpecializedCooperative>;
  using EpilogueSchedule = std::conditional_t<Pingpong, cutlass::epilogue::TmaWarpSpecialized,
                                              cutlass::epilogue::TmaWarpSpecializedCooperative>;

  // acc + b_enc[feature], rounded to bf16 (the node's output type) ...
  using Bias = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, Element, float>;
  using AddBias = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::plus, Element, float, kRound>,
      cutlass::epilogue::fusion::Sm90AccFetch, Bias>;
  // ... and the maximum of those rounded values over each row of the tile, written per tile: an fp32 tensor
  // [ceil(F / TileN), round_up(B, TileM)], rows contiguous. The node passes its input on to the store.
  using GroupMax = cutlass::epilogue::fusion::Sm90ColReduction<
      cutlass::maximum, cutlass::maximum, cutlass::maximum, 0, TileShape, float, float, kRound,
      cute::Stride<cute::_1, cute::_0, int64_t>, 4, true, /*FinalReduction=*/false>;
  using Fusion = cutlass::epilogue::fusion::Sm90EVT<GroupMax, AddBias>;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, cutlass::layout::RowMajor, kAlign,  // no source operand C
      Element, cutlass::layout::RowMajor, kAlign, EpilogueSchedule, Fusion>::CollectiveOp;

  // B is W_enc [d, F] row-major, i.e. features contiguous (an MN-major operand for the tensor cores).
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, cutlass::layout::RowMajor, kAlign, Element,
      cutlass::layout::RowMajor, kAlign, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, Mainloop, Epilogue,
                                                      cutlass::gemm::PersistentScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  // Operands checked by the op (group_max_gemm.cu) before this runs.
  static GemmResult run(const at::Tensor& xc, const at::Tensor& W_enc, const at::Tensor& b_enc) {
    const c10::cuda::CUDAGuard guard(xc.device());
    const int M = static_cast<int>(xc.size(0)), K = static_cast<int>(xc.size(1)), N = static_cast<int>(W_enc.size(1));
    at::Tensor pre = at::empty({M, N}, xc.options());
    const int64_t rows = (M + TileM - 1) / TileM * TileM;  // the reduction's rows: whole tiles
    at::Tensor maxima = at::empty({(N + TileN - 1) / TileN, rows}, xc.options().dtype(at::kFloat));

    auto stride_a = cutlass::make_cute_packed_stride(typename Gemm::GemmKernel::StrideA{}, {M, K, 1});
    auto stride_b = cutlass::make_cute_packed_stride(typename Gemm::GemmKernel::StrideB{}, {N, K, 1});
    auto stride_d = cutlass::make_cute_packed_stride(typename Gemm::GemmKernel::StrideD{}, {M, N, 1});
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {M, N, K, 1},
        {reinterpret_cast<const Element*>(xc.data_ptr()), stride_a,
         reinterpret_cast<const Element*>(W_enc.data_ptr()), stride_b},
        {{}, nullptr, stride_d, reinterpret_cast<Element*>(pre.data_ptr()), stride_d}};
    args.epilogue.thread = {
        {{}, {reinterpret_cast<const Element*>(b_enc.data_ptr())}, {}},      // acc + b_enc
        {maxima.data_ptr(), -INFINITY, {cute::_1{}, cute::_0{}, int64_t(0)}}};  // the group maxima
    args.hw_info.device_id = xc.get_device();
    args.hw_info.sm_count = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(xc.get_device());

    Gemm gemm;
    TORCH_CHECK(gemm.can_implement(args) == cutlass::Status::kSuccess,
                "gemm_bias_group_max: CUTLASS cannot run this problem (B = ", M, ", d = ", K, ", F = ", N, ")");
    at::Tensor workspace =
        at::empty({static_cast<int64_t>(Gemm::get_workspace_size(args))}, xc.options().dtype(at::kByte));
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    TORCH_CHECK(gemm.initialize(args, workspace.data_ptr(), stream) == cutlass::Status::kSuccess,
                "gemm_bias_group_max: CUTLASS could not initialise the kernel");
    TORCH_CHECK(gemm.run(stream) == cutlass::Status::kSuccess, "gemm_bias_group_max: the kernel launch failed: ",
                cudaGetErrorString(cudaGetLastError()));
    return {pre, maxima};
  }
};

}  // namespace fastsae_cutlass
