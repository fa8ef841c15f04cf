// fastsae::gemm_bias_group_max (experimental, sm_90a): pre = xc @ W_enc + b_enc rounded to bf16, written as
// cuBLAS's addmm writes it, and in the same epilogue the maximum of each row's features in every group of
// GROUP adjacent ones (the CTA tile's width), so that the TopK row filter (fastsae/ops/filter.py) can start
// from the maxima instead of reading the whole pre-activation once more. Built only where CUTLASS's headers
// are found (setup.py, the `cutlass` extra); fastsae/reference.py defines the op (`gemm_bias_group_max`).
//
// The GEMM is CUTLASS's Hopper TMA warp-specialised cooperative kernel (two consumer warpgroups on one
// 128 x 128 tile, a producer warp feeding a shared-memory ring, persistent over the tiles); the epilogue is
// a visitor tree: acc + b_enc (a row broadcast), rounded to bf16 and stored by TMA, and its column reduction
// (max over each row of the tile) left per tile, unreduced across tiles (FinalReduction false). The maxima
// are of the rounded values, so they are exactly the maxima of the stored pre-activation.
#include <torch/library.h>
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
namespace {

using namespace cute;
namespace fusion = cutlass::epilogue::fusion;

using Element = cutlass::bfloat16_t;
constexpr int kGroup = 128;  // features per group: the tile's width
using TileShape = Shape<_128, Int<kGroup>, _64>;
using ClusterShape = Shape<_1, _1, _1>;
constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;
constexpr int kAlign = 16 / sizeof(Element);  // TMA: 16-byte rows

// acc + b_enc[feature], rounded to bf16 (the node's output type) ...
using Bias = fusion::Sm90RowBroadcast<0, TileShape, Element, float>;
using AddBias = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::plus, Element, float, kRound>, fusion::Sm90AccFetch, Bias>;
// ... and the maximum of those rounded values over each row of the tile, written per tile: an fp32 tensor
// [ceil(F / kGroup), round_up(B, 128)], rows contiguous. The node passes its input through to the store.
using GroupMax = fusion::Sm90ColReduction<cutlass::maximum, cutlass::maximum, cutlass::maximum, 0, TileShape, float,
                                          float, kRound, Stride<_1, _0, int64_t>, 4, true, /*FinalReduction=*/false>;
using Fusion = fusion::Sm90EVT<GroupMax, AddBias>;

using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, float, float,
    void, cutlass::layout::RowMajor, kAlign,  // no source operand C
    Element, cutlass::layout::RowMajor, kAlign, cutlass::epilogue::TmaWarpSpecializedCooperative,
    Fusion>::CollectiveOp;

// B is W_enc [d, F] row-major, i.e. features contiguous (an MN-major operand for the tensor cores).
using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, cutlass::layout::RowMajor, kAlign, Element,
    cutlass::layout::RowMajor, kAlign, float, TileShape, ClusterShape,
    cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
    cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;

using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue,
                                                    cutlass::gemm::PersistentScheduler>;
using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

void check_operand(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.is_cuda(), "gemm_bias_group_max: ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kBFloat16, "gemm_bias_group_max: ", name, " must be bfloat16, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == dim, "gemm_bias_group_max: ", name, " must have ", dim, " dimensions, got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "gemm_bias_group_max: ", name, " must be contiguous");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gemm_bias_group_max(const at::Tensor& xc, const at::Tensor& W_enc,
                                                       const at::Tensor& b_enc) {
  check_operand(xc, "xc", 2);
  check_operand(W_enc, "W_enc", 2);
  check_operand(b_enc, "b_enc", 1);
  const int64_t B = xc.size(0), d = xc.size(1), F = W_enc.size(1);
  TORCH_CHECK(W_enc.size(0) == d, "gemm_bias_group_max: W_enc must be [", d, ", F], got ", W_enc.sizes());
  TORCH_CHECK(b_enc.size(0) == F, "gemm_bias_group_max: b_enc must have ", F, " entries, got ", b_enc.size(0));
  TORCH_CHECK(d % kAlign == 0 && F % kAlign == 0, "gemm_bias_group_max: d and F must be multiples of ", kAlign,
              " (16-byte rows for TMA), got d = ", d, ", F = ", F);
  TORCH_CHECK(B >= 1 && B < (int64_t(1) << 31) && F < (int64_t(1) << 31) && d < (int64_t(1) << 31),
              "gemm_bias_group_max: B, d and F must be in [1, 2^31), got ", B, ", ", d, ", ", F);
  TORCH_CHECK(xc.device() == W_enc.device() && xc.device() == b_enc.device(),
              "gemm_bias_group_max: xc, W_enc and b_enc must be on one device");
  const c10::cuda::CUDAGuard guard(xc.device());
  const int M = static_cast<int>(B), N = static_cast<int>(F), K = static_cast<int>(d);
  at::Tensor pre = at::empty({B, F}, xc.options());
  const int64_t rows = (B + 127) / 128 * 128;  // the reduction's rows: whole tiles
  at::Tensor maxima = at::empty({(F + kGroup - 1) / kGroup, rows}, xc.options().dtype(at::kFloat));

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
      {{}, {reinterpret_cast<const Element*>(b_enc.data_ptr())}, {}},  // acc + b_enc
      {maxima.data_ptr(), -INFINITY, {_1{}, _0{}, int64_t(0)}}};     // the group maxima
  args.hw_info.device_id = xc.get_device();
  args.hw_info.sm_count = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(xc.get_device());

  Gemm gemm;
  TORCH_CHECK(gemm.can_implement(args) == cutlass::Status::kSuccess,
              "gemm_bias_group_max: CUTLASS cannot run this problem (B = ", B, ", d = ", d, ", F = ", F, ")");
  at::Tensor workspace = at::empty({static_cast<int64_t>(Gemm::get_workspace_size(args))},
                                   xc.options().dtype(at::kByte));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  TORCH_CHECK(gemm.initialize(args, workspace.data_ptr(), stream) == cutlass::Status::kSuccess,
              "gemm_bias_group_max: CUTLASS could not initialise the kernel");
  TORCH_CHECK(gemm.run(stream) == cutlass::Status::kSuccess, "gemm_bias_group_max: the kernel launch failed: ",
              cudaGetErrorString(cudaGetLastError()));
  return {pre, maxima};
}

}  // namespace fastsae_cutlass

TORCH_LIBRARY(fastsae_cutlass, m) {
  m.def("gemm_bias_group_max(Tensor xc, Tensor W_enc, Tensor b_enc) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastsae_cutlass, CUDA, m) {
  m.impl("gemm_bias_group_max", &fastsae_cutlass::gemm_bias_group_max);
}
