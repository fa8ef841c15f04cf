// The threshold-first filter GEMM (fastsae_cutlass::gemm_bias_filter's variants, ops.cu): for pre = xc @
// W_enc + b_enc in fp32, every entry above its row's threshold tau[row] is appended to the row's buffer as
// a (value, feature) key, its slot claimed by an atomic on the row's counter; nothing [B, F] is written.
// It is the filter route's Triton GEMM (fastsae/ops/filter.py `_filter_fwd_kernel`, without AuxK and
// positive counts) on encoder_gemm.cuh's warp-specialised kernel, whose ping-pong schedule runs one
// consumer's epilogue (the compares and the rare appends) beside the other's matmul. fastsae/reference.py
// defines what the buffers hold (`gemm_bias_filter`).
#pragma once

#include "encoder_gemm.cuh"

namespace fastsae_cutlass {

// The variants, by the `variant` argument of the op (fastsae/ops/filter_gemm.py VARIANTS mirrors it).
void filter_pingpong_128x128(const at::Tensor& xc, const at::Tensor& W_enc, const at::Tensor& b_enc,
                             const at::Tensor& tau, at::Tensor& count, at::Tensor& key_buf);
void filter_cooperative_128x128(const at::Tensor& xc, const at::Tensor& W_enc, const at::Tensor& b_enc,
                                const at::Tensor& tau, at::Tensor& count, at::Tensor& key_buf);

// Each row's threshold tau[row] beside each of the row's entries: CUTLASS's column broadcast, which loads a
// thread's rows of tau into registers once a tile (rows past the problem are left unloaded: the filter
// checks its survivors' coordinates), one float at a time (alignment 1), so tau may be any contiguous view.
template <int TileM, int TileN>
using RowThresholds = cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape<TileM, TileN>, float, float,
                                                                  cute::Stride<cute::_1, cute::_0, cute::_0>, 1>;

// The visitor node that filters: a root of the tree that stores nothing by TMA (the GEMM's D is void).
// Each entry of its first input (acc + b_enc in fp32) at (row, feature) inside the problem whose value is
// above its second (tau[row], `RowThresholds`) takes slot = atomicAdd(&count[row], 1) and, below `cap`,
// writes key_buf[row * cap + slot] = the key whose high word orders like the value (`_ordered` in
// filter.py) and whose low word is the feature, as filter.py's `to_key` makes it. NaN passes no threshold.
struct FilterAppend {
  using ElementAux = Element;  // a D type for the builder's shared-memory layouts, though D is void

  struct SharedStorage {};
  struct Arguments {
    int* count = nullptr;
    uint64_t* key_buf = nullptr;
    int cap = 0;
  };
  using Params = Arguments;

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args, void*) {
    return args;
  }
  template <class ProblemShape>
  static bool can_implement(ProblemShape const&, Arguments const& args) {
    return args.count != nullptr && args.key_buf != nullptr && args.cap > 0;
  }
  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&) {
    return 0;
  }
  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*, cudaStream_t,
                                              cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }

  CUTLASS_HOST_DEVICE FilterAppend() {}
  CUTLASS_HOST_DEVICE FilterAppend(Params const& params, SharedStorage const&) : params(params) {}
  Params params;

  CUTLASS_DEVICE bool is_producer_load_needed() const { return false; }
  CUTLASS_DEVICE bool is_C_load_needed() const { return false; }

  template <class... Args>
  CUTLASS_DEVICE auto get_producer_load_callbacks(cutlass::epilogue::fusion::ProducerLoadArgs<Args...> const&) {
    return cutlass::epilogue::fusion::EmptyProducerLoadCallbacks{};
  }

  template <class CoordTensor, class Residue>
  struct ConsumerStoreCallbacks : cutlass::epilogue::fusion::EmptyConsumerStoreCallbacks {
    // tCcD: this thread's entries' coordinates relative to its first one; `residue` = problem shape - that
    // first entry's coordinates, so an entry is inside the problem where its coordinates are below it.
    CUTLASS_DEVICE ConsumerStoreCallbacks(CoordTensor tCcD, Residue residue, int first_row, int first_feature,
                                          Params const& params)
        : tCcD(tCcD), residue(residue), first_row(first_row), first_feature(first_feature), params(params) {}

    CoordTensor tCcD;  // (CPY, CPY_M, CPY_N, EPI_M, EPI_N)
    Residue residue;
    int first_row, first_feature;
    Params params;

    // The common case is the compares alone, with tau in registers: an entry's coordinates are worked out
    // only where it passes (the first version loaded tau[row] and tested the coordinates of every entry).
    // The survivors' claims are issued together before any is used, since an atomic's slot takes a round
    // trip to L2 (claiming and storing each survivor in turn made the GEMM 2.7-4x slower than the Triton
    // filter GEMM on the H100, 40eb821).
    template <typename ElementAccumulator, typename ElementInput, typename ElementTau, int FragmentSize>
    CUTLASS_DEVICE cutlass::Array<ElementInput, FragmentSize> visit(
        cutlass::Array<ElementAccumulator, FragmentSize> const&, int epi_v, int epi_m, int epi_n,
        cutlass::Array<ElementInput, FragmentSize> const& frg_input,
        cutlass::Array<ElementTau, FragmentSize> const& frg_tau) {
      bool passes[FragmentSize];
      bool any = false;
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < FragmentSize; ++i) {
        passes[i] = static_cast<float>(frg_input[i]) > static_cast<float>(frg_tau[i]);
        any |= passes[i];
      }
      if (!any) return frg_input;
      auto tCcD_mn = tCcD(cute::_, cute::_, cute::_, epi_m, epi_n);
      int rows[FragmentSize], features[FragmentSize], slots[FragmentSize];
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < FragmentSize; ++i) {  // the claims of the survivors inside the problem
        const auto coord = tCcD_mn(epi_v * FragmentSize + i);
        rows[i] = first_row + static_cast<int>(cute::get<0>(coord));
        features[i] = first_feature + static_cast<int>(cute::get<1>(coord));
        const bool claims = passes[i] && cute::elem_less(coord, residue);
        slots[i] = claims ? atomicAdd(params.count + rows[i], 1) : params.cap;
      }
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < FragmentSize; ++i) {  // the keys of the survivors that have a slot
        if (slots[i] < params.cap) {
          const int bits = __float_as_int(static_cast<float>(frg_input[i]));
          const uint32_t ordered = static_cast<uint32_t>(bits ^ ((bits >> 31) & 0x7FFFFFFF));
          params.key_buf[static_cast<int64_t>(rows[i]) * params.cap + slots[i]] =
              (static_cast<uint64_t>(ordered) << 32) | static_cast<uint32_t>(features[i]);
        }
      }
      return frg_input;
    }
  };

  template <bool ReferenceSrc, class... Args>
  CUTLASS_DEVICE auto get_consumer_store_callbacks(
      cutlass::epilogue::fusion::ConsumerStoreArgs<Args...> const& args) {
    auto [M, N, K, L] = args.problem_shape_mnkl;
    const int first_row = static_cast<int>(M) - static_cast<int>(cute::get<0>(args.residue_tCcD));
    const int first_feature = static_cast<int>(N) - static_cast<int>(cute::get<1>(args.residue_tCcD));
    return ConsumerStoreCallbacks<decltype(args.tCcD), decltype(args.residue_tCcD)>(
        args.tCcD, args.residue_tCcD, first_row, first_feature, params);
  }
};

template <int TileM, int TileN, bool Pingpong>
struct FilterGemm {
  using Fusion =
      cutlass::epilogue::fusion::Sm90EVT<FilterAppend, AddBias<TileM, TileN, float>, RowThresholds<TileM, TileN>>;
  using Gemm = EncoderGemm<TileM, TileN, Pingpong, 1, Fusion, void>;

  // Operands checked by the op (ops.cu) before this runs.
  static void run(const at::Tensor& xc, const at::Tensor& W_enc, const at::Tensor& b_enc, const at::Tensor& tau,
                  at::Tensor& count, at::Tensor& key_buf) {
    auto args = Gemm::arguments(xc, W_enc, nullptr);
    args.epilogue.thread = {
        {{}, {reinterpret_cast<const Element*>(b_enc.data_ptr())}, {}},  // acc + b_enc, in fp32
        {tau.data_ptr<float>()},                                         // tau[row]
        {count.data_ptr<int>(), reinterpret_cast<uint64_t*>(key_buf.data_ptr<int64_t>()),
         static_cast<int>(key_buf.size(1))}};
    Gemm::run(args, xc, "gemm_bias_filter");
  }
};

}  // namespace fastsae_cutlass
