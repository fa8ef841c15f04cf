// The encoder GEMM xc @ W_enc with an epilogue visitor tree (`Fusion`), as CUTLASS's Hopper TMA
// warp-specialised persistent kernel: a producer warp feeds a shared-memory ring of operand tiles, and
// the consumer warpgroups are cooperative (two on one tile) or ping-pong (each on a tile of its own, one's
// epilogue beside the other's matmul). The experimental ops (group_max_gemm.cuh, filter_gemm.cuh) differ
// only in their epilogue: what `Fusion` computes from each accumulator and what it writes.
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

namespace fastsae_cutlass {

using Element = cutlass::bfloat16_t;
template <int TileM, int TileN>
using TileShape = cute::Shape<cute::Int<TileM>, cute::Int<TileN>, cute::_64>;

// `ElementD` is what the epilogue stores by TMA ([B, F] row-major), or void for an epilogue that stores
// nothing itself (its visitor nodes write what they write). `ClusterM` CTAs along the rows form a cluster
// that shares each W_enc tile by TMA multicast (one load from L2 for all of them).
template <int TileM, int TileN, bool Pingpong, int ClusterM, class Fusion, class ElementD>
struct EncoderGemm {
  using Tile = TileShape<TileM, TileN>;
  using ClusterShape = cute::Shape<cute::Int<ClusterM>, cute::_1, cute::_1>;
  static constexpr int kAlign = 16 / sizeof(Element);  // TMA: 16-byte rows
  using KernelSchedule = std::conditional_t<Pingpong, cutlass::gemm::KernelTmaWarpSpecializedPingpong,
                                            cutlass::gemm::KernelTmaWarpSpecializedCooperative>;
  using EpilogueSchedule = std::conditional_t<Pingpong, cutlass::epilogue::TmaWarpSpecialized,
                                              cutlass::epilogue::TmaWarpSpecializedCooperative>;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, cutlass::layout::RowMajor, kAlign,  // no source operand C
      ElementD, cutlass::layout::RowMajor, kAlign, EpilogueSchedule, Fusion>::CollectiveOp;

  // B is W_enc [d, F] row-major, i.e. features contiguous (an MN-major operand for the tensor cores).
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, cutlass::layout::RowMajor, kAlign, Element,
      cutlass::layout::RowMajor, kAlign, float, Tile, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, Mainloop, Epilogue,
                                                      cutlass::gemm::PersistentScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using Arguments = typename Gemm::Arguments;
  using StoredD = std::conditional_t<std::is_void_v<ElementD>, Element, ElementD>;

  // The arguments for xc [B, d] @ W_enc [d, F] (operands checked by the op before this runs), the result
  // stored at `d_out` (nullptr where ElementD is void); the caller fills in `args.epilogue.thread`.
  static Arguments arguments(const at::Tensor& xc, const at::Tensor& W_enc, StoredD* d_out) {
    const int M = static_cast<int>(xc.size(0)), K = static_cast<int>(xc.size(1)), N = static_cast<int>(W_enc.size(1));
    auto stride_a = cutlass::make_cute_packed_stride(typename Kernel::StrideA{}, {M, K, 1});
    auto stride_b = cutlass::make_cute_packed_stride(typename Kernel::StrideB{}, {N, K, 1});
    auto stride_d = cutlass::make_cute_packed_stride(typename Kernel::StrideD{}, {M, N, 1});
    Arguments args{cutlass::gemm::GemmUniversalMode::kGemm,
                   {M, N, K, 1},
                   {reinterpret_cast<const Element*>(xc.data_ptr()), stride_a,
                    reinterpret_cast<const Element*>(W_enc.data_ptr()), stride_b},
                   {{}, nullptr, stride_d, d_out, stride_d}};
    args.hw_info.device_id = xc.get_device();
    args.hw_info.sm_count = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(xc.get_device());
    return args;
  }

  // Launches the kernel on the current stream; `op` names the op in errors.
  static void run(const Arguments& args, const at::Tensor& xc, const char* op) {
    const c10::cuda::CUDAGuard guard(xc.device());
    Gemm gemm;
    TORCH_CHECK(gemm.can_implement(args) == cutlass::Status::kSuccess, op, ": CUTLASS cannot run this problem (B = ",
                xc.size(0), ", d = ", xc.size(1), ")");
    at::Tensor workspace =
        at::empty({static_cast<int64_t>(Gemm::get_workspace_size(args))}, xc.options().dtype(at::kByte));
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    TORCH_CHECK(gemm.initialize(args, workspace.data_ptr(), stream) == cutlass::Status::kSuccess, op,
                ": CUTLASS could not initialise the kernel");
    TORCH_CHECK(gemm.run(stream) == cutlass::Status::kSuccess, op, ": the kernel launch failed: ",
                cudaGetErrorString(cudaGetLastError()));
  }
};

// acc + b_enc[feature] as `ElementOut` (rounded to nearest): the visitor tree's first node in both ops.
template <int TileM, int TileN, class ElementOut>
using AddBias = cutlass::epilogue::fusion::Sm90EVT<
    cutlass::epilogue::fusion::Sm90Compute<cutlass::plus, ElementOut, float, cutlass::FloatRoundStyle::round_to_nearest>,
    cutlass::epilogue::fusion::Sm90AccFetch,
    cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape<TileM, TileN>, Element, float>>;

}  // namespace fastsae_cutlass
