// The kernels of fastsae_cutlass::select_topk_group_max (group_max_select.cuh): the TopK select of a row
// chunk from the pre-activation and the group maxima that gemm_bias_group_max (group_max_gemm.cuh) leaves,
// one warp per row. It does what the Triton row filter (fastsae/ops/filter.py, `_row_filter_kernel` with
// MAXIMA_GIVEN) does, without that program's chain of block-wide reductions, barriers and global atomics:
// every step is a warp's registers, ballots and its own slice of shared memory, and many rows are in
// flight on each SM.
//
// Per row:
// 1. The row's group maxima (fp32, exactly the maxima of the stored bf16 values) as the 16-bit
//    order-preserving keys of those bf16 values, kGroupsPerLane a lane. A NaN maximum counts as the largest
//    key, so its group is read.
// 2. The bound: the k-th largest group maximum, bit by bit from the top (16 warp sums). k groups reach
//    it, each with an entry at or above it, so the row's k largest entries are all at or above it.
// 3. The groups that reach the bound, listed in shared memory, are read again (kBatch at a time, one
//    vector load a lane each) and their entries at or above the bound (NaN never) become keys in the
//    warp's buffer of kCapacity slots. A key is the bf16 value's order-preserving 16 bits over the
//    feature's 32: larger value first, ties to the larger feature, as the Triton kernels order them.
//    The hot groups hold k * group entries, of which few pass (about 60 of 4096 at k = 32 on Gaussian
//    rows), so each pair of entries is first compared with the bound as packed bf16 (one instruction),
//    and only a lane's pairs that pass, all of them in one loop, build keys and take slots (a
//    shared-memory atomic).
// 4. Where the buffer fills (the row's largest values share groups, as a trained SAE's features with
//    nearly equal encoder columns do, or tie in bf16, or k is large against the groups: at AlphaFold3's
//    shape with k = 128 about 690 entries of Gaussian rows reach the first bound), the bound is raised
//    to the largest key that k of the buffer's keys reach (by a sort of the buffer; with kRaiseByCount
//    by counting, over values, then features where many tie), the keys below it cut, and the pass goes
//    on: the row is read once whatever its values, and the select is exact whatever the maxima were
//    (any bound that k of the row's entries reach keeps the row's k largest); a row that kept fewer than
//    k (NaN entries) is flagged. Before (b5e6806), the bound was raised by counting passes over the hot
//    groups, 16 and more a row.
// 5. A bitonic sort of the buffer in registers, descending, exchanges between lanes by shuffles; its
//    first k keys are the row's codes (post-ReLU values).
// How it got here (ncu and CUDA events on an H100, AlphaFold3's shape (384, 16384, 16384, 32), times as a
// fraction of the cuBLAS GEMM's): a first version that built every hot entry's key and took a ballot for
// it, 0.46x (cab2aa6); the packed compare first, 0.32x (9a190cf), 4,532 warp instructions a row of which
// 1,860 handled the passing pairs (a loop for each group, one lane active) and 997 sorted in shared
// memory; the loop a lane and the sort in registers, 0.23x (b5e6806; 0.11x at GPT-2's shape), about
// 2,000 warp instructions a row, where it waits on its loads (62% of the DRAM's bandwidth, 1.9
// instructions a cycle an SM).
// A row whose bound is -inf (fewer than k groups with a finite maximum: a NaN row) or that kept fewer than
// k is flagged and left unwritten: the caller recomputes it exactly (fastsae/ops/encode.py's fallback).
//
// The kernels, one per group width, groups a lane, way of raising the bound and output dtype, are most of
// the extension's build time: each group width is instantiated in a translation unit of its own
// (group_max_select_groups*.cu), which nvcc builds in parallel beside the GEMMs'.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>

#include <cstdint>
#include <type_traits>

#include "group_max_select.cuh"

namespace fastsae_cutlass {
namespace {

constexpr int kWarps = 4;              // rows a block, a warp each
constexpr int kCapacity = 512;         // candidate keys a row keeps
static_assert(kMaxK <= kCapacity / 2, "a full buffer is cut to at most half its slots (`raise_bound`)");
constexpr int kBatch = 8;              // hot groups whose loads are in flight together
constexpr unsigned kAllLanes = 0xffffffffu;
// 16-bit value keys (`value_key`): -inf's, and the one a NaN group maximum gets (above +inf's, 0xff80, and
// every other value's); 0 is no group at all.
constexpr uint32_t kMinusInfinityKey = 0x007fu;
constexpr uint32_t kNaNKey = 0xffffu;

// The 16 bits whose unsigned order is the bf16 value's (`bits`, not NaN): negatives' bits flipped,
// positives' sign bit set.
__device__ __forceinline__ uint32_t value_key(uint32_t bits) {
  return (bits & 0x8000u) ? (~bits & 0xffffu) : (bits | 0x8000u);
}

__device__ __forceinline__ bool is_nan(uint32_t bits) { return (bits & 0x7fffu) > 0x7f80u; }

// The key of a bf16 entry (`bits`) of `feature`: its order-preserving 16 bits over the feature; 0 for NaN,
// below every other key.
__device__ __forceinline__ uint64_t entry_key(uint32_t bits, uint32_t feature) {
  if (is_nan(bits)) return 0;
  return (static_cast<uint64_t>(value_key(bits)) << 32) | feature;
}

// The fp32 value of an `entry_key`.
__device__ __forceinline__ float key_value(uint64_t key) {
  const uint32_t value_key = static_cast<uint32_t>(key >> 32);
  const uint32_t bits = (value_key & 0x8000u) ? (value_key & 0x7fffu) : (~value_key & 0xffffu);
  return __uint_as_float(bits << 16);
}

// The lanes below this one, for a lane's position among a ballot's.
__device__ __forceinline__ unsigned lanes_below(int lane) { return (1u << lane) - 1u; }

// A lane's bf16 pairs of each group it loads (kGroup / 32 entries a lane), and of a batch of groups.
template <int kGroup>
constexpr int kWordsPerGroup = kGroup / 64;
template <int kGroup>
using HotWords = uint32_t[kBatch][kWordsPerGroup<kGroup>];

// The row's hot groups h .. h + kBatch - 1: a lane's kGroup / 32 entries of each, as bf16 pairs in
// words[j], and the feature of the first of them in first[j] (n_features past the last hot group, its
// words 0): one vector load a lane per group, all kBatch in flight together.
template <int kGroup>
__device__ __forceinline__ void load_hot_batch(const uint16_t* row_pre, const uint16_t* hot, int h, int n_hot,
                                               int n_features, int lane, HotWords<kGroup>& words,
                                               int (&first)[kBatch]) {
  constexpr int kPerLane = kGroup / 32;
  using Vector = std::conditional_t<kPerLane == 2, uint32_t, std::conditional_t<kPerLane == 4, uint2, uint4>>;
#pragma unroll
  for (int j = 0; j < kBatch; ++j) {
    first[j] = h + j < n_hot ? hot[h + j] * kGroup + lane * kPerLane : n_features;
    Vector loaded{};
    if (first[j] < n_features) loaded = __ldg(reinterpret_cast<const Vector*>(row_pre + first[j]));
    const uint32_t* as_words = reinterpret_cast<const uint32_t*>(&loaded);
#pragma unroll
    for (int w = 0; w < kWordsPerGroup<kGroup>; ++w) words[j][w] = as_words[w];
  }
}

// Gives each entry of the bf16 pair `word` (features `feature` and `feature` + 1) whose key is at or above
// `lower` a slot of `keys` from `kept`, the warp's counter in shared memory (the caller leaves room).
__device__ __forceinline__ void keep_pair(uint32_t word, int feature, uint64_t lower, uint64_t* keys, int* kept) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const uint64_t key = entry_key(half ? word >> 16 : word & 0xffffu, feature + half);
    if (key >= lower) keys[atomicAdd(kept, 1)] = key;
  }
}

// Sorts the warp's 32 * kPerLane keys descending, key r * 32 + lane in keys[r]: a bitonic network whose
// exchanges between lanes are shuffles and whose exchanges within a lane (strides of 32 and more) are
// register swaps (the same network over shared memory was about a fifth of the kernel's instructions,
// most of them address arithmetic and barriers).
template <int kPerLane>
__device__ __forceinline__ void sort_descending(uint64_t (&keys)[kPerLane], int lane) {
  constexpr int kLogSize = 5 + (kPerLane >= 2) + (kPerLane >= 4) + (kPerLane >= 8) + (kPerLane >= 16);
  static_assert(32 * kPerLane == 1 << kLogSize, "kPerLane is a power of two up to 16");
#pragma unroll
  for (int log_block = 1; log_block <= kLogSize; ++log_block) {
    const int block = 1 << log_block;  // sorted runs of `block` keys, alternately descending and ascending
#pragma unroll
    for (int log_stride = log_block - 1; log_stride >= 0; --log_stride) {
      const int stride = 1 << log_stride;
#pragma unroll
      for (int r = 0; r < kPerLane; ++r) {
        const int key_index = r * 32 + lane;
        const bool descending = (key_index & block) == 0;
        if (stride >= 32) {  // the partner is keys[r ^ (stride / 32)] of this lane: the lower r swaps both
          const int partner = r ^ (stride / 32);
          if (partner > r && (descending ? keys[r] < keys[partner] : keys[r] > keys[partner])) {
            const uint64_t swapped = keys[r];
            keys[r] = keys[partner];
            keys[partner] = swapped;
          }
        } else {  // the partner is keys[r] of lane ^ stride: the lower index of the two keeps the larger key
          const uint64_t mine = keys[r];
          const uint64_t other = __shfl_xor_sync(kAllLanes, static_cast<unsigned long long>(mine), stride);
          const bool keeps_larger = ((lane & stride) == 0) == descending;
          keys[r] = keeps_larger == (mine > other) ? mine : other;
        }
      }
    }
  }
}

// How many of the warp's buffer's first n keys are at or above `lower` (every lane gets the count).
__device__ __forceinline__ int count_from(const uint64_t* keys, int n, uint64_t lower, int lane) {
  unsigned count = 0;
#pragma unroll
  for (int r = 0; r < kCapacity / 32; ++r) count += r * 32 + lane < n && keys[r * 32 + lane] >= lower;
  return static_cast<int>(__reduce_add_sync(kAllLanes, count));
}

// (kRaiseByCount, the op's `raise_by_count`: compiled for sm_90a and checked by an emulation, not yet
// run on a GPU.) Raises the bound over the warp's full buffer (`kept` keys of the row, kept > kCapacity -
// 64 >= k) and keeps only the buffer's keys at or above it, at most kCapacity / 2: the largest key that
// at least k of them reach, bit by bit, over the 16 bits of the values (each lane's values two to a
// register, compared as pairs of 16 bits), then, only where more than kCapacity / 2 keys tie at the
// value found, over the feature's `feature_bits`. At least k of the row's keys reach it, so it is at or
// below the row's k-th largest and nothing the row needs is cut. About 700 instructions a lane, where
// sorting the buffer to take its k largest (`keep_largest`) is about 6,000.
__device__ __forceinline__ uint64_t raise_bound(uint64_t* keys, int* kept, int k, int feature_bits, int lane) {
  constexpr int kPerLane = kCapacity / 32;
  __syncwarp();
  const int n = *kept;
  uint32_t values[kPerLane / 2];  // the value keys of keys r * 32 + lane: key 2i in the low half of values[i]
#pragma unroll
  for (int i = 0; i < kPerLane / 2; ++i) {
    const int low = 2 * i * 32 + lane, high = low + 32;
    values[i] = (low < n ? static_cast<uint32_t>(keys[low] >> 32) : 0u) |
                (high < n ? static_cast<uint32_t>(keys[high] >> 32) << 16 : 0u);  // 0: no key
  }
  uint32_t value = 0;
  int reach = n;  // keys at or above the bits found so far
  for (int bit = 15; bit >= 0; --bit) {
    const uint32_t trial = value | (1u << bit);
    unsigned count = 0;  // 16 a half that reaches the trial
#pragma unroll
    for (int i = 0; i < kPerLane / 2; ++i) count += __popc(__vcmpgeu2(values[i], trial * 0x10001u));
    const int trial_reach = static_cast<int>(__reduce_add_sync(kAllLanes, count)) / 16;
    if (trial_reach >= k) {
      value = trial;
      reach = trial_reach;
    }
  }
  uint64_t bound = static_cast<uint64_t>(value) << 32;
  for (int bit = feature_bits - 1; bit >= 0 && reach > kCapacity / 2; --bit) {  // ties at the value
    const uint64_t trial = bound | (uint64_t(1) << bit);
    const int trial_reach = count_from(keys, n, trial, lane);
    if (trial_reach >= k) {
      bound = trial;
      reach = trial_reach;
    }
  }
  // The keys at or above the bound moved to the front, in place: a step's writes land at or below the
  // slots it reads, which every lane has read before any writes.
  int moved = 0;
#pragma unroll
  for (int r = 0; r < kPerLane; ++r) {
    const uint64_t key = r * 32 + lane < n ? keys[r * 32 + lane] : 0;
    const bool keep = key >= bound;
    const unsigned ballot = __ballot_sync(kAllLanes, keep);
    if (keep) keys[moved + __popc(ballot & lanes_below(lane))] = key;
    moved += __popc(ballot);
  }
  if (lane == 0) *kept = moved;
  __syncwarp();  // the count and the moved keys, before the buffer fills again
  return bound;
}

// Cuts the warp's buffer (`kept` keys, k <= kept <= kCapacity) to its k largest and returns the smallest
// of those: a bound at or below the row's k-th largest key, since the buffer holds keys of the row. The
// way the select raised its bound until `raise_bound` (kRaiseByCount) has run on a GPU: a sort of 16 keys
// a lane, about 6,000 instructions a lane (GPU tests and memcheck clean, H100, 6b4640f).
__device__ __forceinline__ uint64_t keep_largest(uint64_t* keys, int* kept, int k, int lane) {
  constexpr int kPerLane = kCapacity / 32;
  __syncwarp();
  const int n = *kept;
  uint64_t held[kPerLane];
#pragma unroll
  for (int r = 0; r < kPerLane; ++r) held[r] = r * 32 + lane < n ? keys[r * 32 + lane] : 0;  // 0: no key
  sort_descending<kPerLane>(held, lane);
  __syncwarp();  // every lane has read its keys
#pragma unroll
  for (int r = 0; r < kPerLane; ++r) {
    if (r * 32 + lane < k) keys[r * 32 + lane] = held[r];
  }
  if (lane == 0) *kept = k;
  __syncwarp();
  const uint64_t smallest = keys[k - 1];
  __syncwarp();  // every lane has read it before the buffer fills again
  return smallest;
}

// Writes into `keys` the keys of the hot groups' entries at or above `lower`, from where the last call
// stopped (batch h, its pairs `passing` not yet kept; h = -kBatch and passing 0 at the start), and returns
// true once every hot group is done, or false where the buffer has fewer free slots than a step of the
// warp may fill (64): the caller then raises `lower` and cuts the buffer to the keys at or above it
// (`keep_largest` or `raise_bound`) and calls again. Each lane compares its pairs of entries with
// `lower`'s value as packed bf16 (NaN never passes; -0 and +0 compare equal, so the test passes a
// superset of the keys at or above `lower`), and only a pair that passes has its keys built, compared
// exactly and given slots from `kept`, the warp's counter in shared memory. The slots' order varies from
// run to run; the sort that follows does not.
template <int kGroup>
__device__ bool collect_from(const uint16_t* row_pre, const uint16_t* hot, int n_hot, int n_features, int lane,
                             uint64_t lower, uint64_t* keys, int* kept, int& h, uint32_t& passing) {
  constexpr int kWords = kWordsPerGroup<kGroup>;
  static_assert(kBatch * kWords <= 32, "a batch's pairs are bits of one word");
  const __nv_bfloat162 floor = __bfloat162bfloat162(__float2bfloat16(key_value(lower)));  // exact: a bf16
  for (;;) {
    // The passing pairs (rare: about two of a hot group's kGroup / 2, seldom two on one lane), all of a
    // lane's in one loop, so that the warp runs as many steps as its busiest lane has pairs; a pair's word
    // is read again (the L1 holds it) rather than chosen among the batch's registers by a run-time index
    // (local memory).
    while (__any_sync(kAllLanes, passing)) {
      __syncwarp();  // the slots taken in the step before are counted
      if (*kept > kCapacity - 64) return false;  // the whole warp reads the same count
      if (passing) {
        const int pair = __ffs(passing) - 1;  // group h + pair / kWords of the hot list, its word pair % kWords
        const int feature = hot[h + pair / kWords] * kGroup + lane * (kGroup / 32) + 2 * (pair % kWords);
        keep_pair(__ldg(reinterpret_cast<const uint32_t*>(row_pre + feature)), feature, lower, keys, kept);
        passing &= passing - 1;
      }
    }
    h += kBatch;
    if (h >= n_hot) return true;
    HotWords<kGroup> words;
    int first[kBatch];
    load_hot_batch<kGroup>(row_pre, hot, h, n_hot, n_features, lane, words, first);
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {  // bit j * kWords + w: a pair of which an entry may reach `lower`
#pragma unroll
      for (int w = 0; w < kWords; ++w) {
        const bool may_pass = __hge2_mask(*reinterpret_cast<const __nv_bfloat162*>(&words[j][w]), floor) != 0;
        if (first[j] < n_features && may_pass) passing |= 1u << (j * kWords + w);
      }
    }
  }
}

// Writes the largest k of the n keys in `buffer` (n <= 32 * kPerLane, k <= n) as the row's codes, largest
// first: vals the post-ReLU values, idx the features.
template <int kPerLane, typename scalar_t>
__device__ __forceinline__ void write_largest(const uint64_t* buffer, int n, int k, int lane, scalar_t* row_vals,
                                              int32_t* row_idx) {
  uint64_t keys[kPerLane];
#pragma unroll
  for (int r = 0; r < kPerLane; ++r) keys[r] = r * 32 + lane < n ? buffer[r * 32 + lane] : 0;  // 0: no key
  sort_descending<kPerLane>(keys, lane);
#pragma unroll
  for (int r = 0; r < kPerLane; ++r) {
    if (r * 32 + lane < k) {
      row_vals[r * 32 + lane] = static_cast<scalar_t>(fmaxf(key_value(keys[r]), 0.0f));
      row_idx[r * 32 + lane] = static_cast<int32_t>(keys[r] & 0xffffffffu);
    }
  }
}

// At least eight blocks an SM (at most 64 registers a thread): sorting a full buffer inside the collecting
// loop (without kRaiseByCount) takes 72 without the bound, occupancy 7 blocks, for a path most rows never
// take; with it a register or two is spilled, outside the loop.
template <int kGroup, int kGroupsPerLane, bool kRaiseByCount, typename scalar_t>
__global__ void __launch_bounds__(kWarps * 32, 8) select_topk_group_max_kernel(
    const uint16_t* __restrict__ pre, int64_t stride_pre, const float* __restrict__ maxima, int64_t stride_tile,
    int64_t stride_in_tile, int log2_groups_per_tile, int rows, int n_features, int n_groups, int k,
    scalar_t* __restrict__ vals, int64_t stride_vals, int32_t* __restrict__ idx, int64_t stride_idx,
    int8_t* __restrict__ flags) {
  __shared__ uint64_t candidates[kWarps][kCapacity];
  __shared__ uint16_t hot_lists[kWarps][32 * kGroupsPerLane];
  __shared__ int kept_counts[kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row = blockIdx.x * kWarps + warp;
  if (row >= rows) return;  // the whole warp: nothing below syncs the block
  uint64_t* keys = candidates[warp];
  uint16_t* hot = hot_lists[warp];
  // The row's pointer laundered through a register move, so that the compiler holds it instead of
  // recomputing pre + row * stride_pre (a 64-bit multiply and two constant loads) for every hot group's
  // load, as it did without.
  const uint16_t* row_pre = pre + row * stride_pre;
  asm("mov.b64 %0, %0;" : "+l"(row_pre));

  // 1. The group maxima's keys, group i * 32 + lane in slot i (0 where there is no group). A maximum is a
  // bf16 value held in fp32: its top 16 bits. Group g is group g % groups_per_tile of the GEMM's tile g /
  // groups_per_tile.
  uint32_t group_key[kGroupsPerLane];
  const int in_tile_mask = (1 << log2_groups_per_tile) - 1;
#pragma unroll
  for (int i = 0; i < kGroupsPerLane; ++i) {
    const int g = i * 32 + lane;
    const int64_t offset = (g >> log2_groups_per_tile) * stride_tile + (g & in_tile_mask) * stride_in_tile + row;
    const float maximum = g < n_groups ? __ldg(maxima + offset) : 0.0f;
    group_key[i] = g >= n_groups ? 0u : maximum != maximum ? kNaNKey : value_key(__float_as_uint(maximum) >> 16);
  }

  // 2. The largest key that at least k group maxima reach.
  uint32_t bound = 0;
  for (int bit = 15; bit >= 0; --bit) {
    const uint32_t trial = bound | (1u << bit);
    unsigned reach = 0;
#pragma unroll
    for (int i = 0; i < kGroupsPerLane; ++i) reach += group_key[i] >= trial;
    if (__reduce_add_sync(kAllLanes, reach) >= static_cast<unsigned>(k)) bound = trial;
  }
  if (bound <= kMinusInfinityKey || bound == kNaNKey) {  // a NaN row, or k NaN maxima
    if (lane == 0) flags[row] = 1;
    return;
  }

  // 3. The hot groups, in order, then their entries at or above the bound.
  int n_hot = 0;
#pragma unroll
  for (int i = 0; i < kGroupsPerLane; ++i) {
    const bool is_hot = group_key[i] >= bound;
    const unsigned ballot = __ballot_sync(kAllLanes, is_hot);
    if (is_hot) hot[n_hot + __popc(ballot & lanes_below(lane))] = static_cast<uint16_t>(i * 32 + lane);
    n_hot += __popc(ballot);
  }
  int* kept = &kept_counts[warp];
  if (lane == 0) *kept = 0;
  __syncwarp();
  // 4. Where the buffer fills: the bound raised over the buffer, the keys below it cut, and on.
  const int feature_bits = 32 - __clz(n_features - 1);  // every feature is below 2^feature_bits
  uint64_t lower = static_cast<uint64_t>(bound) << 32;
  int h = -kBatch;
  uint32_t passing = 0;
  while (!collect_from<kGroup>(row_pre, hot, n_hot, n_features, lane, lower, keys, kept, h, passing)) {
    lower = kRaiseByCount ? raise_bound(keys, kept, k, feature_bits, lane) : keep_largest(keys, kept, k, lane);
  }
  __syncwarp();
  const int n = *kept;
  if (n < k) {  // NaN entries among the hot groups' largest
    if (lane == 0) flags[row] = 1;
    return;
  }

  // 5. The n keys sorted, their first k written.
  scalar_t* row_vals = vals + row * stride_vals;
  int32_t* row_idx = idx + row * stride_idx;
  if (n <= 32) write_largest<1>(keys, n, k, lane, row_vals, row_idx);
  else if (n <= 64) write_largest<2>(keys, n, k, lane, row_vals, row_idx);
  else if (n <= 128) write_largest<4>(keys, n, k, lane, row_vals, row_idx);
  else if (n <= 256) write_largest<8>(keys, n, k, lane, row_vals, row_idx);
  else write_largest<16>(keys, n, k, lane, row_vals, row_idx);
  if (lane == 0) flags[row] = 0;
}

// vals in bf16 (the encode's codes, in the weights' dtype) or fp32: only those two, since each output dtype is
// another kernel for every group width, groups a lane and way of raising the bound, and nvcc's time.
template <int kGroup, int kGroupsPerLane, bool kRaiseByCount>
void launch(const at::Tensor& pre, const at::Tensor& maxima, int64_t k, at::Tensor& vals, at::Tensor& idx,
            at::Tensor& flags) {
  const int rows = static_cast<int>(pre.size(0)), n_features = static_cast<int>(pre.size(1));
  const int n_groups = (n_features + kGroup - 1) / kGroup;
  const dim3 grid((rows + kWarps - 1) / kWarps);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto launch_into = [&](auto* out) {
    using scalar_t = std::remove_pointer_t<decltype(out)>;
    select_topk_group_max_kernel<kGroup, kGroupsPerLane, kRaiseByCount, scalar_t><<<grid, kWarps * 32, 0, stream>>>(
        reinterpret_cast<const uint16_t*>(pre.data_ptr()), pre.stride(0), maxima.data_ptr<float>(), maxima.stride(0),
        maxima.stride(1), maxima.size(1) == 2 ? 1 : 0, rows, n_features, n_groups, static_cast<int>(k), out,
        vals.stride(0), idx.data_ptr<int32_t>(), idx.stride(0), flags.data_ptr<int8_t>());
  };
  if (vals.scalar_type() == at::kBFloat16) launch_into(vals.data_ptr<at::BFloat16>());
  else launch_into(vals.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int kGroup, bool kRaiseByCount>
void launch_for_groups(const at::Tensor& pre, const at::Tensor& maxima, int64_t k, at::Tensor& vals,
                       at::Tensor& idx, at::Tensor& flags) {
  const int64_t n_groups = (pre.size(1) + kGroup - 1) / kGroup;
  if (n_groups <= 128) return launch<kGroup, 4, kRaiseByCount>(pre, maxima, k, vals, idx, flags);
  if (n_groups <= 256) return launch<kGroup, 8, kRaiseByCount>(pre, maxima, k, vals, idx, flags);
  if (n_groups <= 512) return launch<kGroup, 16, kRaiseByCount>(pre, maxima, k, vals, idx, flags);
  return launch<kGroup, 32, kRaiseByCount>(pre, maxima, k, vals, idx, flags);
}

}  // namespace

template <int kGroup>
void select_in_groups(const at::Tensor& pre, const at::Tensor& maxima, int64_t k, at::Tensor& vals, at::Tensor& idx,
                      at::Tensor& flags, bool raise_by_count) {
  if (raise_by_count) return launch_for_groups<kGroup, true>(pre, maxima, k, vals, idx, flags);
  launch_for_groups<kGroup, false>(pre, maxima, k, vals, idx, flags);
}

}  // namespace fastsae_cutlass
