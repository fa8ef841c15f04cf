"""Threshold-first TopK encode: filter the pre-activation inside the GEMM against a per-row lower bound
on its k-th largest value, then select exactly among the few survivors.

    pre = (x - b_dec) @ W_enc + b_enc          x [B, d], W_enc [d, F], b_enc [F], b_dec [d]
    vals, idx = the k largest of pre per row, values post-ReLU       (`reference.encode_topk`)

Four launches; none writes a [B, F] matrix:
1. centre: xc = cast(fp32(x) - fp32(b_dec)) [B, d], once. The subtraction in fp32 before the cast is
   the outlier-aware step; every later GEMM reads xc, so it costs B * d, not B * d per feature tile.
2. threshold: the pre-activation of S features (cuBLAS, in row chunks of bounded size) max-pooled over
   groups of G adjacent features; tau_r is the k-th largest group maximum minus a rounding margin.
   Those k maxima are k distinct features at or above tau_r, so tau_r is a lower bound on the row's
   k-th largest pre-activation, not an estimate: about k * F / S features per row pass it.
3. filter: a persistent GEMM of xc and W_enc (TMA operand tiles, one program per SM) whose epilogue
   adds b_enc and appends every entry > tau_r (value, feature) to its row's buffer of CAP slots, each
   slot taken by an atomic on the row's counter. No sort and no running threshold in the GEMM: a
   compare and a rare store per entry, kept in the accumulator's registers (`_append_survivors`).
4. select: per row (one warp each), the k-th largest survivor value by bisection over order-preserving
   int32 images of the values (about log2(survivors) rounds), then among the values tied with it the
   features that complete k (the larger feature wins), and the k winners sorted by value, as torch.topk
   returns them.
Exactness: when at least k entries of a row pass tau_r, its k largest all pass (whatever tau_r is),
so the selection is exact. A row whose buffer overflowed or that kept fewer than k (a NaN row, or
rounding beyond the margin) is flagged on the device, and the caller recomputes the flagged rows
(`encode.py`'s sweep kernel skips every row block without a flag): no host synchronisation.
AuxK runs the same way with its own threshold over dead features (the first S_aux of them), and the
per-feature counts of positive pre-activations ride in the filter epilogue.

The row filter (`row_filter_topk`) is the same filter and select over pre-activations that cuBLAS
writes in row chunks of at most ROW_FILTER_CHUNK entries (512 MB in bf16): one kernel launch per
chunk, a program per row, bounds the row's k-th largest value by its group maxima taken over the whole
row (not a subset: about k entries pass, not 10 k), reads again only the groups that reach the bound and
selects among their entries, or leaves the select to a launch of one warp per row after it (configurations
with SELECT False; the tuner times both). It writes and reads the chunk once more than the filter GEMM, but the GEMM
runs at cuBLAS's speed: on the H200 the tuner picked it at every shape timed (at the GPT-2 width, the
filter GEMM's epilogue alone costs more than the chunk's write and read); it picks between the two per
shape.
Its pre-activations are rounded to the weights' dtype, as eager PyTorch's are (the centring before the
matmul is still fp32): two features within that rounding of each other at the k-th place tie, and the
larger index wins, where the filter GEMM's fp32 accumulators may order them the other way.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from . import cutlass_gemm
from .launch import INTERPRET, cdiv, input_precision, matmul_dtype, next_power_of_2, sm_count

EMPTY_KEY = tl.constexpr(-(2**63))  # the key of an empty slot: below every (value, feature) key
THRESHOLD_ELEMENTS = 2**25  # pre-activations of the threshold pass held at once (64 MB in bf16)
FILTER_SLOTS = 2**24  # candidate-buffer slots held at once (128 MB of keys): larger batches run in row chunks
MIN_RANK = 32  # the lowest order statistic a threshold is taken from (`thresholds`)
MAX_GROUPS = 2048  # group maxima per row that the threshold kernel selects from in registers
# Relative margin below the k-th group maximum: covers the threshold GEMM's rounding to the weights'
# dtype (2^-9 for bf16) and its different summation order, so that count < k stays an exception.
MARGIN = tl.constexpr(2.0**-7)
# Pre-activations that cuBLAS writes at once for the other routes that take a whole row (the dense route
# and the threshold-first BatchTopK's streaming pass), whatever B and F: 256 MB in bf16. The row filter
# has its own, ROW_FILTER_CHUNK.
PRE_ACTIVATION_CHUNK = 2**27
# The row filter's own chunk, 512 MB in bf16 whatever the batch (FASTSAE_ROW_FILTER_CHUNK, entries, read at
# import, lowers it where memory is short). Larger chunks measured faster at every size tried: one launch
# of cuBLAS and of the row kernel has one tail, where each chunk adds two. Captured SAEAdam step on the
# H200 with each value's own tuned route: 2^24 / 2^25 / 2^27 entries took 1.99 / 1.92 / 1.71 ms at AF3 and
# 2.48 / 2.04 / 1.91 at GPT-2 (a61f7d5); 2^27 / 2^28 with AuxK's row top-k selecting in every row, two
# rounds: 1.443, 1.458 / 1.383, 1.383 ms at AF3 (one chunk of 16384 rows instead of two; peak memory 440
# -> 708 MB, 0.33x eager PyTorch's step) and 1.667, 1.723 / 1.636, 1.637 at GPT-2 (one chunk instead of
# two; 279 -> 489 MB), efba117. Chunks of 32-64 MB that might stay in the L2 cache between cuBLAS's write
# and the row kernel's read were the slowest: a launch of a few thousand rows is mostly its tail.
_chunk_setting = os.environ.get("FASTSAE_ROW_FILTER_CHUNK", str(2 * PRE_ACTIVATION_CHUNK))
if not _chunk_setting.isdigit() or int(_chunk_setting) < 1:
    raise ValueError(f"FASTSAE_ROW_FILTER_CHUNK must be a positive whole number of entries, got {_chunk_setting!r}")
ROW_FILTER_CHUNK = int(_chunk_setting)
# Measured slower and removed: the row filter pipelined with cuBLAS (each chunk filtered on a stream of
# its own while cuBLAS wrote the next into the other of two half-size buffers, leaving the filter 0, 16 or
# 32 SMs through torch's SM carveout). Captured SAEAdam step on the H200, one stream / pipelined at
# 0 / 16 / 32 SMs: 1.385 / 1.464 / 1.393 / 1.492 ms at AlphaFold3's shape, 1.597 / 1.610 / 1.731 / 1.716
# at GPT-2's (3b8a6cc): the filter's blocks, dispatched first, held every SM, and the next GEMM started
# only as their last wave left. With cuBLAS on a high-priority stream: 1.381 / - / 1.504 / 1.508 ms at
# AlphaFold3's (e8d6f4c).
# The row filter: group maxima per warp it selects from (32 per thread), entries it reads at
# once for them (bf16 in 32 registers per thread: fewer dependent reads per row; 8192 measured the same
# and 16384 slower at AF3, H200) and entries of the groups it reads again at once (32 per thread: whole
# EPILOGUE_PACKs, in the registers the appends leave).
ROW_FILTER_GROUPS = 1024
ROW_FILTER_MIN_GROUP = 4  # features per group, at least: a re-read tile gives each thread whole PTX packs
ROW_FILTER_READ = 4096
ROW_FILTER_REREAD = 1024
# Registers do not bound the row filter's speed: its program at the H200's AF3 and GPT-2 picks takes 48 a
# thread (10 programs an SM); capped at 40 (ptxas's maxnreg, 12 programs an SM, no spills) the captured
# step measured the same (AF3 1.7118 against 1.7117 ms, GPT-2 1.9074 against 1.9073, each with its own
# tuned route, cdb226e), and the cap broke the configuration that selects in the row program (misaligned
# address on the H200), so the compiler chooses.
# Where the row kernel waits (ncu on the H200 at AlphaFold3's shape, 3184981: an 8192-row launch takes
# 121 us and reads HBM at 2.5 TB/s, 37.5% occupancy by its 80 registers, an instruction issued every 1.9
# cycles per scheduler): stall samples on the group maxima's reads 23-31%, on the hot groups' gather (the
# line of the appends' atomics, which consume the gathered values) 15-22%, on the bisections' row sums
# 10%. Measured and not adopted: the appends' slots from a prefix sum in the row program (it owns the row)
# instead of an atomic each; in one process against this kernel (do_bench, 2 warps, select launched
# apart) 0.657 -> 0.675 ms at GPT-2's shape, 0.646 -> 0.635 at AlphaFold3's, 0.766 -> 0.738 at GPT-2
# width with k = 128, the tuned encode 0.658 -> 0.664 at GPT-2's and 0.639 -> 0.658 at AlphaFold3's (its
# registers 80 -> 112).
# Measured slower and removed: the group maxima from a launch of their own before the row kernel (a
# streaming read of the chunk, one row's 4096 entries a program, writing the `_ordered` keys into the
# scratch), the row kernel starting from them. Captured SAEAdam step with AuxK's row top-k selecting in
# every row, without / with it, two rounds: 1.373, 1.368 / 1.461, 1.451 ms at AlphaFold3's shape, 1.584,
# 1.650 / 1.687, 1.688 at GPT-2's (6b0133c), as the encode alone had measured before (docs/kernels.md): the row
# kernel's other steps go no faster for starting from the maxima, and the chunk's read no longer overlaps them.


@triton.jit
def _ordered(value):
    """int32 whose signed order is the fp32 `value`'s order (NaN above +inf)."""
    bits = value.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)  # flip the magnitude bits of negatives


@triton.jit
def _from_ordered(ordered):
    """The fp32 value of an `_ordered` int32 (the flip is its own inverse)."""
    return (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def to_key(value, feature):
    """int64 key ordering like the fp32 `value`, ties broken by `feature` (non-negative int32)."""
    return (_ordered(value).to(tl.int64) << 32) | feature.to(tl.int64)


@triton.jit
def key_value(key):
    return _from_ordered((key >> 32).to(tl.int32))


@triton.jit
def _kth_largest(keys, present, k, slack=0):
    """Per row of int32 `keys` [BLOCK_M, N] where `present`: the largest t with at least k present keys
    >= t, i.e. the k-th largest key (the row's smallest when it has k or fewer). Bisection keeps
    count(keys >= lo) >= k > count(keys >= hi) and stops as soon as the first count is exactly k: about
    log2(n) rounds, each a compare and a row sum. With `slack`, it stops as soon as that count is at
    most k + slack: a t at or below the k-th largest key, which saves the last rounds where a bound is
    all that is needed (about 5 rounds instead of 8-10 with slack k / 4 over 1024 Gaussian group maxima)."""
    lo = tl.min(tl.where(present, keys, 2**31 - 1), axis=1).to(tl.int64)
    hi = tl.max(tl.where(present, keys, -(2**31)), axis=1).to(tl.int64) + 1
    count = tl.sum(present.to(tl.int32), axis=1)
    done = count <= k + slack
    while tl.sum((~done).to(tl.int32), axis=0) > 0:
        mid = (lo + hi) >> 1
        above = tl.sum((present & (keys >= mid.to(tl.int32)[:, None])).to(tl.int32), axis=1)
        raise_lo = ~done & (above >= k)
        lo = tl.where(raise_lo, mid, lo)
        count = tl.where(raise_lo, above, count)
        hi = tl.where(~done & (above < k), mid, hi)
        done = done | (count <= k + slack) | (hi - lo <= 1)
    return lo.to(tl.int32)


@triton.jit
def grouped_tile(pid, B, F, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column block) of tile `pid` of a GEMM in grouped order: GROUP_M row blocks share each
    W_enc column block while it is in L2."""
    n_row_blocks = tl.cdiv(B, BLOCK_M)
    n_col_blocks = tl.cdiv(F, BLOCK_N)
    first_row_block = pid // (GROUP_M * n_col_blocks) * GROUP_M
    group_rows = tl.minimum(n_row_blocks - first_row_block, GROUP_M)
    row_block = first_row_block + (pid % (GROUP_M * n_col_blocks)) % group_rows
    col_block = (pid % (GROUP_M * n_col_blocks)) // group_rows
    return row_block, col_block


@triton.jit
def _center_kernel(
    x_ptr, b_dec_ptr, out_ptr, B, D, stride_xm, stride_xd, stride_om, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (rows < B)[:, None] & (dims < D)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + rows64 * stride_xm + dims[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    center = tl.load(b_dec_ptr + dims, mask=dims < D, other=0.0).to(tl.float32)
    centred = (x - center[None, :]).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows64 * stride_om + dims[None, :], centred, mask=mask)


@triton.jit
def _threshold_kernel(
    pre_ptr, tau_ptr, B, M, k, stride_pm, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr
):  # fmt: skip
    """tau[r] = (k-th largest of the maxima of the row's M groups of GROUP adjacent pre-activations) -
    margin; -inf when fewer than k groups."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    groups = tl.arange(0, BLOCK_G)
    valid = (rows < B)[:, None] & (groups < M)[None, :]
    # The row's groups as one [BLOCK_M, BLOCK_G, GROUP] load: each thread reads whole groups (16 bytes
    # for 8 bf16), coalesced, where GROUP strided loads would each touch every group's cache line.
    members = (groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :])[None, :, :]
    group_values = tl.load(
        pre_ptr + rows.to(tl.int64)[:, None, None] * stride_pm + members,
        mask=valid[:, :, None], other=float("-inf"),
    ).to(tl.float32)  # fmt: skip
    maxima = tl.max(group_values, axis=2)  # [BLOCK_M, BLOCK_G]
    # Ties do not matter here: any value with at least k maxima at or above it is a lower bound.
    kth = _kth_largest(_ordered(maxima), valid, k)
    value = _from_ordered(kth)
    top = tl.max(tl.where(valid, maxima, float("-inf")), axis=1)
    margin = MARGIN * tl.maximum(tl.abs(value), tl.abs(top))  # -inf or +inf in the row: tau = -inf
    enough = tl.sum(valid.to(tl.int32), axis=1) >= k
    tau = tl.where(enough, value - margin, float("-inf"))
    tl.store(tau_ptr + rows, tau, mask=rows < B)


# Accumulator entries per inline-PTX block in the filter epilogue (`_append_survivors`); the variable
# FASTSAE_EPILOGUE_PACK (1, 2, 4 or 8, read at import) is for measuring the choice.
EPILOGUE_PACK = tl.constexpr(int(os.environ.get("FASTSAE_EPILOGUE_PACK", "4")))
if EPILOGUE_PACK.value not in (1, 2, 4, 8):
    raise ValueError(f"FASTSAE_EPILOGUE_PACK must be 1, 2, 4 or 8, got {EPILOGUE_PACK.value}")


def _packed_ptx(inputs: str, pack: int, guards: str, body: str) -> tuple[str, str]:
    """(asm, constraints) for `tl.inline_asm_elementwise(..., pack=pack)` with one 32-bit output and
    inputs of the PTX register kinds in `inputs` ('l' 64-bit, 'r' 32-bit): output j of the block is $j
    and input i of entry j is ${(1 + i) * pack + j}. `guards` sets the entry's output default and its
    predicate p{j}; `body` is the entry's work, its temporaries unpredicated (a predicated write keeps
    the register's old value live: spills) and only its effect predicated. The whole body is branched
    around when no entry's predicate holds, so the common block costs its compares and one branch.
    Placeholders: {j} the entry, {o} its output, {i<n>} its input n."""

    def fill(text: str, j: int) -> str:
        text = re.sub(r"\{i(\d)\}", lambda m: f"${(1 + int(m.group(1))) * pack + j}", text)
        return text.replace("{o}", f"${j}").replace("{j}", str(j))

    predicates = [f"p{j}" for j in range(pack)]
    lines = [f"{{ .reg .pred {', '.join(predicates)}, any; .reg .b32 b, s; .reg .b64 a;"]
    lines += [fill(guards, j) for j in range(pack)]
    lines += [f"or.pred any, p0, p{min(1, pack - 1)};"] + [f"or.pred any, any, p{j};" for j in range(2, pack)]
    lines += ["@!any bra SKIP;"] + [fill(body, j) for j in range(pack)] + ["SKIP: }"]
    constraints = ["=r"] * pack + [kind for kind in inputs for _ in range(pack)]
    return " ".join(lines), ",".join(constraints)


# Per entry whose value > threshold (fp32 bits): slot = atomicAdd(&count[row], 1) (relaxed, device
# scope), -1 elsewhere. Inputs: count_ptr, row, value bits, threshold bits.
CLAIM_PTX, CLAIM_CONSTRAINTS = (tl.constexpr(text) for text in _packed_ptx(
    "lrrr", EPILOGUE_PACK.value,
    guards="mov.u32 {o}, -1; setp.gt.f32 p{j}, {i2}, {i3};",
    body="mad.wide.s32 a, {i1}, 4, {i0}; @p{j} atom.global.gpu.relaxed.add.u32 {o}, [a], 1;",
))  # fmt: skip
# Per entry whose slot is in [0, cap): tile_base[row_offset + slot] = to_key(value, feature) as an int64
# (high word: `_ordered(value)`, low word: the feature). Inputs: tile_base, row_offset, slot, value bits,
# feature, cap. The output is a dummy 0 (an inline-asm op must have a result).
STORE_PTX, STORE_CONSTRAINTS = (tl.constexpr(text) for text in _packed_ptx(
    "lrrrrr", EPILOGUE_PACK.value,
    guards="mov.u32 {o}, 0; setp.lt.u32 p{j}, {i2}, {i5};",
    body="shr.s32 s, {i3}, 31; and.b32 s, s, 2147483647; xor.b32 b, {i3}, s; "
    "add.s32 s, {i1}, {i2}; mad.wide.s32 a, s, 8, {i0}; @p{j} st.global.v2.b32 [a], {{i4}, b};",
))  # fmt: skip


@triton.jit
def _append_survivors(key_buf_ptr, count_ptr, row_start, rows, features, pre, threshold, cap,
                      INLINE_PTX: tl.constexpr):  # fmt: skip
    """Append the entries of `pre` [BLOCK_M, BLOCK_N] above `threshold` to their rows' buffers as
    (value, feature) keys; `rows`, `features` and `threshold` broadcast to `pre`'s shape (a tile's
    rows [BLOCK_M, 1] and features [1, BLOCK_N]). Each survivor claims its slot with one relaxed atomic on
    its row's counter (one atomic per row and tile plus a prefix sum over the tile measured slower on
    the H200). Slots past `cap` are not stored (the counter still counts them, which flags the row).
    INLINE_PTX: tl.atomic_add and tl.store give their operands the blocked layout Triton picks for
    memory access, so on the accumulator tile they cost five layout conversions through shared memory
    (about 100 barriers per tile); the same atomics and stores as inline PTX stay in the accumulator's
    registers, EPILOGUE_PACK entries per block, which a thread without a survivor among them passes
    with compares and one branch (sm_90, 128 x 128 tile: 537 instructions per thread on that path
    against 1202 with one branch per entry). The interpreter cannot run PTX: it takes the tl.atomic_add path."""
    row_offsets = tl.broadcast_to((rows - row_start) * cap, pre.shape)  # before broadcasting: per row, not per entry
    rows = tl.broadcast_to(rows, pre.shape)
    # One 64-bit base for the tile's rows and 32-bit offsets inside them (BLOCK_M * cap < 2^31): a
    # [BLOCK_M, BLOCK_N] tile of 64-bit addresses costs registers the accumulator needs.
    tile_base = key_buf_ptr + row_start.to(tl.int64) * cap
    features = tl.broadcast_to(features, pre.shape)
    threshold = tl.broadcast_to(threshold, pre.shape)
    if INLINE_PTX:
        value_bits = pre.to(tl.int32, bitcast=True)
        slot = tl.inline_asm_elementwise(
            CLAIM_PTX, CLAIM_CONSTRAINTS,
            [count_ptr, rows, value_bits, threshold.to(tl.int32, bitcast=True)],
            dtype=tl.int32, is_pure=False, pack=EPILOGUE_PACK,
        )  # fmt: skip
        tl.inline_asm_elementwise(
            STORE_PTX, STORE_CONSTRAINTS,
            [tile_base, row_offsets, slot, value_bits, features, cap + tl.zeros(pre.shape, dtype=tl.int32)],
            dtype=tl.int32, is_pure=False, pack=EPILOGUE_PACK,
        )  # fmt: skip
    else:
        take = pre > threshold
        slot = tl.atomic_add(count_ptr + rows, 1, mask=take, sem="relaxed")
        tl.store(tile_base + row_offsets + slot, to_key(pre, features), mask=take & (slot < cap))


@triton.jit
def _filter_fwd_kernel(
    xc_desc, w_desc, b_enc_ptr, tau_ptr, count_ptr, key_buf_ptr,
    dead_ptr, aux_tau_ptr, aux_count_ptr, aux_key_buf_ptr, positive_ptr,
    B, D, F, cap, aux_cap,
    HAS_AUX: tl.constexpr, COUNT_POSITIVE: tl.constexpr, INLINE_PTX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    N_PROGRAMS: tl.constexpr, FLATTEN: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Persistent: N_PROGRAMS programs (one per SM) take the tiles in turn. Operand tiles come through
    TMA descriptors (out-of-range rows and columns read as zeros). FLATTEN fuses the tile and reduction
    loops so the next tile's loads are in flight during this tile's epilogue."""
    n_tiles = tl.cdiv(B, BLOCK_M) * tl.cdiv(F, BLOCK_N)
    for tile in tl.range(tl.program_id(0), n_tiles, N_PROGRAMS, flatten=FLATTEN):
        row_block, col_block = grouped_tile(tile, B, F, BLOCK_M, BLOCK_N, GROUP_M)
        row_start = row_block * BLOCK_M
        col_start = col_block * BLOCK_N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_K):
            xc = xc_desc.load([row_start, d0])
            w = w_desc.load([d0, col_start]).to(xc.dtype)
            acc = tl.dot(xc, w, acc, input_precision=INPUT_PRECISION)
        rows = row_start + tl.arange(0, BLOCK_M)
        cols = col_start + tl.arange(0, BLOCK_N)
        row_valid, col_valid = rows < B, cols < F
        # Out-of-range columns get pre = -inf and out-of-range rows tau = +inf: no entry outside the
        # problem passes a threshold, with no mask in the epilogue.
        pre = acc + tl.load(b_enc_ptr + cols, mask=col_valid, other=float("-inf")).to(tl.float32)[None, :]
        if COUNT_POSITIVE:  # tokens whose pre-activation is > 0, per feature (death classification)
            positive = tl.sum(((pre > 0) & row_valid[:, None]).to(tl.int32), axis=0)
            tl.atomic_add(positive_ptr + cols, positive, mask=col_valid & (positive > 0), sem="relaxed")
        tau = tl.load(tau_ptr + rows, mask=row_valid, other=float("inf"))
        _append_survivors(key_buf_ptr, count_ptr, row_start, rows[:, None], cols[None, :], pre, tau[:, None], cap,
                          INLINE_PTX)  # fmt: skip
        if HAS_AUX:
            dead = tl.load(dead_ptr + cols, mask=col_valid, other=0) != 0
            aux_tau = tl.load(aux_tau_ptr + rows, mask=row_valid, other=float("inf"))
            aux_threshold = tl.where(dead[None, :], aux_tau[:, None], float("inf"))  # live features never pass
            _append_survivors(aux_key_buf_ptr, aux_count_ptr, row_start, rows[:, None], cols[None, :], pre,
                              aux_threshold, aux_cap, INLINE_PTX)  # fmt: skip


@triton.jit
def _row_filter_kernel(
    pre_ptr, stride_pm, F, k, row0, scratch_ptr, count_ptr, key_buf_ptr, vals_ptr, idx_ptr, stride_vm, stride_im,
    flag_ptr, dead_ptr, k_aux, aux_count_ptr, aux_key_buf_ptr, aux_vals_ptr, aux_idx_ptr, stride_avm, stride_aim,
    aux_tau_ptr, maxima_ptr, stride_maxima,
    HAS_AUX: tl.constexpr, MAXIMA_GIVEN: tl.constexpr, INLINE_PTX: tl.constexpr, N_GROUPS: tl.constexpr,
    GROUP: tl.constexpr, CHUNK_GROUPS: tl.constexpr, HOT_GROUPS: tl.constexpr,
    CAP: tl.constexpr, KEEP: tl.constexpr, AUX_CAP: tl.constexpr, AUX_KEEP: tl.constexpr, SELECT: tl.constexpr,
):  # fmt: skip
    """The row filter (`row_filter_topk`): one program per row of `pre` [rows, F], pre-activations that
    cuBLAS wrote for the batch's rows row0 .. row0 + rows. A row's work is a chain of dependent steps,
    so what hides its latency is rows in flight: a program of one warp needs about 155 registers per
    thread (too few rows per SM), one of 2 or 4 warps 40-80 (`row_filter_configs`: measured faster on
    the H200 despite the reductions across warps). The row's `scratch` (global memory: registers
    cannot gather a loop's chunks) holds N_GROUPS int32, twice with AuxK; its count and key buffer are
    reused by the next chunk.
    1. The maxima of the row's N_GROUPS groups (GROUP adjacent features each; a thread reads whole
       groups, coalesced), CHUNK_GROUPS groups at a time, as `_ordered` keys into the scratch.
    2. The threshold: a value that k to k + k / 4 group maxima reach (the k-th largest maximum or a
       little below), so at least k distinct features are at or above it and the row's k largest are
       among them. With the whole row behind the bound about 1.1 k entries pass (the filter GEMM's
       bound from a subset passes about 10 k).
    3. Only the groups whose maximum reaches it can hold a survivor: their indices are compacted into
       the scratch and those groups alone read again, HOT_GROUPS at a time (about k groups, usually
       one read), and their entries at or above the threshold (NaN never) appended to the row's
       buffer as the filter GEMM appends them. Where more than CAP pass, a bisection over those groups
       raises the bound, ties at the k-th value broken by feature, until at most CAP do, and they are
       appended again (`_survivors`): no row overflows.
    4. The select (`_select_rows`) writes the row's codes, or flags the row for the sweep. Without
       SELECT, a launch of its own (`_select_kernel`, one warp a row: its bisections' row sums are warp
       shuffles, where this program's cross warps) does that from the buffers, the counts and (AuxK)
       the threshold this program leaves in `aux_tau`.
    AuxK the same over the dead features, in the second half of the scratch row.
    MAXIMA_GIVEN (no AuxK; `cutlass_gemm`'s route): step 1's maxima come from `maxima` (fp32, group g of
    row r at g * stride_maxima + r), which the GEMM that wrote `pre` left, and the row is read only where
    it is hot."""
    row = tl.program_id(0)
    one = tl.arange(0, 1)
    row_ptr = pre_ptr + row.to(tl.int64) * stride_pm
    scratch_row = scratch_ptr + row.to(tl.int64) * (2 * N_GROUPS if HAS_AUX else N_GROUPS)
    tl.store(count_ptr + row + one, tl.zeros([1], dtype=tl.int32))  # the previous chunk's count
    if HAS_AUX:
        tl.store(aux_count_ptr + row + one, tl.zeros([1], dtype=tl.int32))
    # every_group and holds_features are made in each branch, after the maxima pass in the second: made
    # before that loop they pushed an AuxK configuration past the stack kernel_resources allows (96
    # against 72 bytes, sm_90).
    if MAXIMA_GIVEN:
        every_group = tl.arange(0, N_GROUPS)
        holds_features = every_group * GROUP < F
        given = tl.load(maxima_ptr + every_group.to(tl.int64) * stride_maxima + row, mask=holds_features,
                        other=float("-inf"))  # fmt: skip
        keys = _maximum_key(given[:, None])
        tl.debug_barrier()  # the zeroed counts are visible to every thread
    else:
        # Only the chunks that hold features: the row's width is a power of two (24576 features read as
        # 32768), and the groups past F are masked out of the bound below, so their maxima are not needed.
        for first in range(0, tl.cdiv(F, CHUNK_GROUPS * GROUP) * CHUNK_GROUPS, CHUNK_GROUPS):
            groups = first + tl.arange(0, CHUNK_GROUPS)
            members = groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
            values = tl.load(row_ptr + members, mask=members < F, other=float("-inf"))
            tl.store(scratch_row + groups, _maximum_key(values))
            if HAS_AUX:
                dead = tl.load(dead_ptr + members, mask=members < F, other=0) != 0
                tl.store(scratch_row + N_GROUPS + groups, _maximum_key(tl.where(dead, values, float("-inf"))))
        tl.debug_barrier()  # the maxima (and the zeroed counts) are visible to every thread
        every_group = tl.arange(0, N_GROUPS)
        holds_features = every_group * GROUP < F
        keys = tl.load(scratch_row + every_group, mask=holds_features, other=0)
    # A bound is all the filter needs: the bisection stops once at most k + k / 4 maxima reach it.
    kth = _kth_largest(keys[None, :], holds_features[None, :], k, k // 4)  # [1]
    top = tl.max(keys, axis=0)  # the row's largest value: the maxima die with the compaction below
    if HAS_AUX:
        aux_keys = tl.load(scratch_row + N_GROUPS + every_group, mask=holds_features, other=0)
        aux_kth = _kth_largest(aux_keys[None, :], holds_features[None, :], k_aux, k_aux // 4)
        aux_top = tl.max(aux_keys, axis=0)
        aux_tau = _threshold_below(aux_kth)
    tl.debug_barrier()  # every thread has read the maxima before the scratch is overwritten
    n_hot = _compact_hot_groups(scratch_row, holds_features & (keys >= kth))
    if HAS_AUX:
        aux_n_hot = _compact_hot_groups(scratch_row + N_GROUPS, holds_features & (aux_keys >= aux_kth))
    tl.debug_barrier()  # the hot groups are visible to every thread before they are read back
    n = _survivors(row_ptr, scratch_row, n_hot, F, dead_ptr, kth, top, k, key_buf_ptr, count_ptr,
                   row, False, CAP, GROUP, HOT_GROUPS, INLINE_PTX)  # fmt: skip
    if HAS_AUX:
        aux_n = _survivors(row_ptr, scratch_row + N_GROUPS, aux_n_hot, F, dead_ptr, aux_kth, aux_top,
                           k_aux, aux_key_buf_ptr, aux_count_ptr, row, True, AUX_CAP, GROUP, HOT_GROUPS,
                           INLINE_PTX)  # fmt: skip
    if SELECT:
        batch_row = row0 + row + one
        valid = tl.full([1], True, tl.int1)
        failed = _select_rows(
            key_buf_ptr + row.to(tl.int64) * CAP, n, ~valid, batch_row, valid,
            vals_ptr, idx_ptr, k, stride_vm, stride_im, CAP, KEEP,
        )  # fmt: skip
        if HAS_AUX:
            failed = failed | _select_rows(
                aux_key_buf_ptr + row.to(tl.int64) * AUX_CAP, aux_n, aux_tau == float("-inf"), batch_row, valid,
                aux_vals_ptr, aux_idx_ptr, k_aux, stride_avm, stride_aim, AUX_CAP, AUX_KEEP,
            )  # fmt: skip
        tl.store(flag_ptr + batch_row, failed.to(tl.int8))
    elif HAS_AUX:
        tl.store(aux_tau_ptr + row + one, aux_tau)


@triton.jit
def _survivors(
    row_ptr, hot_list, n_hot, F, dead_ptr, kth, top, k, key_buf_ptr, count_ptr, row,
    DEAD_ONLY: tl.constexpr, CAP: tl.constexpr, GROUP: tl.constexpr, HOT_GROUPS: tl.constexpr,
    INLINE_PTX: tl.constexpr,
):  # fmt: skip
    """Appends the entries of the row's hot groups at or above `_ordered` key `kth` [1] (`DEAD_ONLY`:
    of the dead features only) to its buffer of CAP slots and returns how many passed, [1].
    When more than CAP pass (the row's largest values share groups, as training makes them, or tie, as
    bf16 pre-activations do: on the H200 24 of 8192 GPT-2-width rows had 65-68 entries at or above
    their k-th value after 45 training steps), the bound is raised before the row is given up, over
    the hot groups alone (they hold every entry above kth): a bisection over values between kth and
    `top` (the largest group maximum) finds the largest value that at least k entries reach, and where
    more than CAP still do because they tie at it, a second one over the tied entries' features (ties
    go to the larger feature) finds the smallest feature that completes k. The buffer is filled again
    from that (value, feature) bound: at least k and at most CAP entries, none of the k largest lost.
    Only CAP < k leaves the row overflowing (tests), for the fallback."""
    one = tl.arange(0, 1)
    no_tie = tl.zeros([1], dtype=tl.int32)  # tied entries from feature 0 on: all of them
    _append_hot(row_ptr, hot_list, n_hot, F, dead_ptr, _threshold_below(kth), kth, no_tie, key_buf_ptr, count_ptr,
                row, DEAD_ONLY, CAP, GROUP, HOT_GROUPS, INLINE_PTX)  # fmt: skip
    tl.debug_barrier()  # every append is visible before the count is read
    # The count through L2 (".cg"): the appends' atomics are performed there, not in this SM's L1.
    n = tl.load(count_ptr + row + one, cache_modifier=".cg")
    if tl.max(n, axis=0) > CAP:
        # count(>= lo) = n >= k > count(>= hi) = 0
        lo, hi, count = kth.to(tl.int64), top.to(tl.int64) + 1 + tl.zeros([1], dtype=tl.int64), n
        while tl.max(((count > CAP) & (hi - lo > 1)).to(tl.int32), axis=0) > 0:
            mid = (lo + hi) >> 1
            above = _count_hot(row_ptr, hot_list, n_hot, F, dead_ptr, _threshold_below(mid.to(tl.int32)), kth,
                               no_tie, DEAD_ONLY, GROUP, HOT_GROUPS)  # fmt: skip
            lo = tl.where(above >= k, mid, lo)
            count = tl.where(above >= k, above, count)
            hi = tl.where(above < k, mid, hi)
        bound = lo.to(tl.int32)
        # Entries at value `bound` from feature first_tied on pass: count(from first_tied) >= k >
        # count(from last_tied), where count(from F) is that of the entries above the value alone.
        first_tied, last_tied = no_tie, no_tie + F
        while tl.max(((count > CAP) & (last_tied - first_tied > 1)).to(tl.int32), axis=0) > 0:
            mid = (first_tied + last_tied) >> 1
            above = _count_hot(row_ptr, hot_list, n_hot, F, dead_ptr, _threshold_below(bound), bound, mid, DEAD_ONLY,
                               GROUP, HOT_GROUPS)  # fmt: skip
            first_tied = tl.where(above >= k, mid, first_tied)
            count = tl.where(above >= k, above, count)
            last_tied = tl.where(above < k, mid, last_tied)
        if tl.max(count, axis=0) <= CAP:
            tl.store(count_ptr + row + one, tl.zeros([1], dtype=tl.int32))
            tl.debug_barrier()  # the count is zeroed before any thread appends again
            _append_hot(row_ptr, hot_list, n_hot, F, dead_ptr, _threshold_below(bound), bound, first_tied,
                        key_buf_ptr, count_ptr, row, DEAD_ONLY, CAP, GROUP, HOT_GROUPS, INLINE_PTX)  # fmt: skip
            tl.debug_barrier()
            n = tl.load(count_ptr + row + one, cache_modifier=".cg")
    return n


@triton.jit
def _hot_values(row_ptr, hot_list, first, n_hot, F, dead_ptr, tie, first_tied, DEAD_ONLY: tl.constexpr,
                GROUP: tl.constexpr, HOT_GROUPS: tl.constexpr):  # fmt: skip
    """(features, fp32 values) [HOT_GROUPS, GROUP] of the hot groups first .. first + HOT_GROUPS; -inf
    where there is no feature, (`DEAD_ONLY`) a live one, or an entry whose value is `_ordered` key
    `tie` [1] and whose feature is below `first_tied` [1]: no threshold passes those."""
    members, read = _hot_members(hot_list, first, n_hot, F, GROUP, HOT_GROUPS)
    values = tl.load(row_ptr + members, mask=read, other=float("-inf")).to(tl.float32)
    if DEAD_ONLY:
        dead = tl.load(dead_ptr + members, mask=read, other=0) != 0
        values = tl.where(dead, values, float("-inf"))
    tied_below = (values == _from_ordered(tie)[:, None]) & (members < first_tied[:, None])
    return members, tl.where(tied_below, float("-inf"), values)


@triton.jit
def _append_hot(row_ptr, hot_list, n_hot, F, dead_ptr, threshold, tie, first_tied, key_buf_ptr, count_ptr, row,
                DEAD_ONLY: tl.constexpr, CAP: tl.constexpr, GROUP: tl.constexpr, HOT_GROUPS: tl.constexpr,
                INLINE_PTX: tl.constexpr):  # fmt: skip
    """Appends the hot groups' entries > `threshold` [1] (those `_hot_values` keeps) to the row's
    buffer, HOT_GROUPS at a time."""
    rows = row + tl.zeros([1, 1], dtype=tl.int32)
    for first in range(0, n_hot, HOT_GROUPS):
        members, values = _hot_values(row_ptr, hot_list, first, n_hot, F, dead_ptr, tie, first_tied, DEAD_ONLY,
                                      GROUP, HOT_GROUPS)  # fmt: skip
        _append_survivors(key_buf_ptr, count_ptr, row, rows, members, values, threshold[:, None], CAP, INLINE_PTX)


@triton.jit
def _count_hot(row_ptr, hot_list, n_hot, F, dead_ptr, threshold, tie, first_tied, DEAD_ONLY: tl.constexpr,
               GROUP: tl.constexpr, HOT_GROUPS: tl.constexpr):  # fmt: skip
    """How many of the hot groups' entries `_append_hot` would append (NaN never), [1]."""
    count = tl.zeros([1], dtype=tl.int32)
    for first in range(0, n_hot, HOT_GROUPS):
        _, values = _hot_values(row_ptr, hot_list, first, n_hot, F, dead_ptr, tie, first_tied, DEAD_ONLY, GROUP,
                                HOT_GROUPS)  # fmt: skip
        count += tl.sum(tl.sum((values > threshold[:, None]).to(tl.int32), axis=1), axis=0)
    return count


@triton.jit
def _maximum_key(values):
    """The `_ordered` key of each row's maximum of `values` [groups, GROUP]; a NaN maximum is -inf."""
    maxima = tl.max(values, axis=1).to(tl.float32)
    return _ordered(tl.where(maxima == maxima, maxima, float("-inf")))


@triton.jit
def _threshold_below(kth):
    """The largest fp32 below the value of `_ordered` key `kth` (so that `> threshold` keeps what is at
    or above it), or -inf when that value is -inf (then every finite entry passes)."""
    return tl.where(_from_ordered(kth) == float("-inf"), float("-inf"), _from_ordered(kth - 1))


@triton.jit
def _compact_hot_groups(list_ptr, hot):
    """Writes the indices of the `hot` groups, in order, to `list_ptr`; returns how many."""
    position = tl.cumsum(hot.to(tl.int32), axis=0) - 1
    tl.store(list_ptr + position, tl.arange(0, hot.shape[0]), mask=hot)
    return tl.sum(hot.to(tl.int32), axis=0)


@triton.jit
def _hot_members(list_ptr, first, n_hot, F, GROUP: tl.constexpr, HOT_GROUPS: tl.constexpr):
    """(features [HOT_GROUPS, GROUP], in range) of the hot groups first .. first + HOT_GROUPS."""
    slots = first + tl.arange(0, HOT_GROUPS)
    groups = tl.load(list_ptr + slots, mask=slots < n_hot, other=0)
    members = groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    return members, (slots < n_hot)[:, None] & (members < F)


@triton.jit
def _select_rows(
    key_ptr, n, keeps_fewer, rows, row_valid, vals_ptr, idx_ptr, k, stride_vm, stride_im,
    CAP: tl.constexpr, KEEP: tl.constexpr,
):  # fmt: skip
    """The k largest of the survivors of `rows` [BLOCK_M], whose keys fill the first `n` of CAP slots
    of consecutive buffers from `key_ptr`, sorted descending: post-ReLU values in vals' dtype and int32
    features. Returns the rows that failed (overflowed, or kept fewer than k unless `keeps_fewer`),
    which are left unwritten. `keeps_fewer` (AuxK with an unbounded threshold: every candidate was
    kept) marks rows whose answer is fewer than k codes (the rest empty: value 0 and feature 0). The
    min(n, k) winners are sorted in their own buffers' first slots (a selected row has n <= CAP), so no
    scratch is needed."""
    failed = row_valid & ((n > CAP) | ((n < k) & ~keeps_fewer))
    selecting = row_valid & ~failed
    slots = tl.arange(0, CAP)
    present = selecting[:, None] & (slots[None, :] < n[:, None])
    buffers = tl.arange(0, rows.shape[0])[:, None] * CAP
    keys = tl.load(key_ptr + buffers + slots[None, :], mask=present, other=0)  # [BLOCK_M, CAP]
    ordered = (keys >> 32).to(tl.int32)
    feature = (keys & 0xFFFFFFFF).to(tl.int32)

    # The k-th largest value, then, among the entries equal to it, the features that complete k (ties go
    # to the larger feature, as the sweep's keys order them). A row with fewer than k keeps them all.
    kth = _kth_largest(ordered, present, k)
    greater = present & (ordered > kth[:, None])
    tied = present & (ordered == kth[:, None])
    need = k - tl.sum(greater.to(tl.int32), axis=1)
    win = greater | (tied & (feature >= _kth_largest(feature, tied, need)[:, None]))
    position = tl.cumsum(win.to(tl.int32), axis=1) - 1  # <= the slot it came from: compaction in place
    tl.debug_barrier()  # every key is read before the winners overwrite the buffers' first slots
    tl.store(key_ptr + buffers + position, keys, mask=win)
    tl.debug_barrier()  # the winners are visible to every thread before they are read back to sort
    kept = tl.arange(0, KEEP)
    won = selecting[:, None] & (kept[None, :] < tl.minimum(n, k)[:, None])
    top = tl.load(key_ptr + buffers + kept[None, :], mask=won, other=EMPTY_KEY)
    store_codes(tl.sort(top, dim=1, descending=True), rows, selecting, vals_ptr, idx_ptr, k, stride_vm, stride_im)
    return failed


@triton.jit
def store_codes(keys, rows, row_valid, vals_ptr, idx_ptr, k, stride_vm, stride_im):
    """Writes the first k of each row's keys [BLOCK_M, n] (sorted descending) as the `row_valid` rows'
    codes: post-ReLU values in vals' dtype and int32 features; an empty slot (EMPTY_KEY: possible for
    AuxK, or a row that keeps fewer than k) gives value 0 and feature 0."""
    empty = keys == EMPTY_KEY
    values = tl.where(empty, 0.0, tl.maximum(key_value(keys), 0.0))
    features = tl.where(empty, 0, (keys & 0xFFFFFFFF).to(tl.int32))
    slots = tl.arange(0, keys.shape[1])
    store_mask = row_valid[:, None] & (slots < k)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    tl.store(vals_ptr + rows64 * stride_vm + slots[None, :], values.to(vals_ptr.dtype.element_ty), mask=store_mask)
    tl.store(idx_ptr + rows64 * stride_im + slots[None, :], features, mask=store_mask)


@triton.jit
def _select_kernel(
    key_buf_ptr, count_ptr, tau_ptr, vals_ptr, idx_ptr, flag_ptr,
    B, k, stride_vm, stride_im,
    FEWER_IF_UNBOUNDED: tl.constexpr, OR_FLAGS: tl.constexpr,
    CAP: tl.constexpr, KEEP: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """`_select_rows` over the filter GEMM's buffers, flagging the rows that failed.
    FEWER_IF_UNBOUNDED (AuxK): a row whose threshold was -inf kept every candidate, so fewer than k is
    its answer. OR_FLAGS: add to the flags."""
    row_start = tl.program_id(0) * BLOCK_M
    rows = row_start + tl.arange(0, BLOCK_M)
    row_valid = rows < B
    n = tl.load(count_ptr + rows, mask=row_valid, other=0)
    if FEWER_IF_UNBOUNDED:
        keeps_fewer = tl.load(tau_ptr + rows, mask=row_valid, other=0.0) == float("-inf")
    else:
        keeps_fewer = tl.zeros([BLOCK_M], dtype=tl.int1)
    failed = _select_rows(
        key_buf_ptr + row_start.to(tl.int64) * CAP, n, keeps_fewer, rows, row_valid,
        vals_ptr, idx_ptr, k, stride_vm, stride_im, CAP, KEEP,
    )  # fmt: skip
    if OR_FLAGS:
        failed = failed | (tl.load(flag_ptr + rows, mask=row_valid, other=0) != 0)
    tl.store(flag_ptr + rows, failed.to(tl.int8), mask=row_valid)


def center(x: Tensor, b_dec: Tensor, dtype: torch.dtype) -> Tensor:
    """cast(fp32(x) - fp32(b_dec)) as a [B, d] tensor of `dtype` with unit column stride and rows
    16-byte aligned (a TMA operand for any d), in one pass."""
    B, D = x.shape
    out = x.new_empty(B, _aligned(D, dtype), dtype=dtype)[:, :D]
    block_d = min(256, next_power_of_2(D))
    _center_kernel[(cdiv(B, 16), cdiv(D, block_d))](
        x, b_dec.contiguous(), out, B, D, x.stride(0), x.stride(1), out.stride(0), BLOCK_M=16, BLOCK_D=block_d
    )
    return out


def _aligned(n: int, dtype: torch.dtype) -> int:
    """n rounded up to a whole number of 16-byte units of `dtype` elements."""
    per_unit = 16 // dtype.itemsize
    return cdiv(n, per_unit) * per_unit


def tma_operand(t: Tensor) -> Tensor:
    """`t` [rows, cols] if a TMA descriptor can address it (unit column stride, 16-byte aligned base
    and rows), else a copy of it that can (an odd F, or a transposed or offset view of W_enc)."""
    size = t.element_size()
    if t.stride(1) == 1 and (t.stride(0) * size) % 16 == 0 and t.data_ptr() % 16 == 0:
        return t
    rows, cols = t.shape
    return t.new_empty(rows, _aligned(cols, t.dtype))[:, :cols].copy_(t)


def subset_plan(k: int, n_features: int, cap: int) -> tuple[int, int]:
    """(S, G): the threshold pass reads the pre-activation of S features, max-pooled in groups of G.
    Expected survivors per row are about k * F / S; S is sized so that they fill a third of `cap` (at
    half, rows overflowed on the H200 at the AF3 shape, and each overflowing row costs a sweep). G is as
    large as 8 while at least 4 * k groups remain (then the k largest groups rarely share a group with
    a k-th-largest candidate, and the bound stays close to the subset's own k-th largest value) and at
    most MAX_GROUPS groups are left for the select."""
    size = min(n_features, max(cdiv(3 * k * n_features, cap), k))
    group = 1
    while group < 8 and size // (2 * group) >= 4 * k:
        group *= 2
    while size // group > MAX_GROUPS:
        group *= 2
    size = max(k * group, size // group * group)  # whole groups, and at least k of them
    if size > n_features:  # k groups of G do not fit: single features (k <= F always fits)
        return min(n_features, max(k, size // group)), 1
    return size, group


def thresholds(xc: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, cap: int, columns: Tensor | None = None,
               valid: Tensor | None = None) -> Tensor:  # fmt: skip
    """tau [B] fp32 for rows of centred inputs `xc`: a lower bound on each row's k-th largest
    pre-activation over the features in `columns` that are `valid` (all features when None). The
    bound is the subset's rank-th largest group maximum with rank = k, raised to MIN_RANK where the
    features allow (a lower bound still): rarer order statistics vary more from row to row, and at k = 8
    rows overflowed their buffers on the H200."""
    B = xc.shape[0]
    n_features = W_enc.shape[1] if columns is None else columns.numel()
    rank = max(k, min(MIN_RANK, n_features // 64))
    size, group = subset_plan(rank, n_features, cap)
    if columns is None:
        weights, bias = W_enc[:, :size], b_enc[:size]
    else:
        weights, bias = W_enc.index_select(1, columns[:size]), b_enc.index_select(0, columns[:size])
    weights, bias = weights.to(xc.dtype), bias.to(xc.dtype)
    n_groups = size // group
    tau = xc.new_empty(B, dtype=torch.float32)
    block_g = next_power_of_2(n_groups)
    chunk = max(1, THRESHOLD_ELEMENTS // size)
    for start in range(0, B, chunk):
        rows = slice(start, min(B, start + chunk))
        pre = torch.addmm(bias, xc[rows], weights)  # [rows, S] in the matmul dtype
        if valid is not None:
            pre.masked_fill_(~valid[:size][None, :], float("-inf"))
        _threshold_kernel[(pre.shape[0],)](
            pre, tau[rows], pre.shape[0], n_groups, rank, pre.stride(0),
            # Twice the groups' warps: a warp holding 1024 groups of 8 in registers spilled (sm_90).
            GROUP=group, BLOCK_M=1, BLOCK_G=block_g, num_warps=_row_warps(2 * block_g),
        )  # fmt: skip
    return tau


def filter_tiles(interpret: bool) -> list[dict]:
    """Tile shapes of the filter GEMM. BLOCK_K is for 2-byte operands; fp32 ones take half of it, so that
    the stages fit the same shared memory. PER_SM: persistent programs per SM; with two, one program's
    epilogue can overlap the other's matmul."""
    if interpret:  # numpy runs the kernels element by element: small tiles
        tiles = [(16, 32, 32, 1, 4, 1, 1)]
    else:
        # Spill-free on sm_90; 128 x 256 tiles spill in the epilogue and measured slower at GPT-2 and AF3.
        tiles = [(128, 128, 64, 8, 8, 4, 1), (64, 128, 64, 8, 4, 4, 2), (128, 128, 128, 8, 8, 3, 1)]
    return [
        dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=bk, GROUP_M=g, num_warps=w, num_stages=s, PER_SM=p)
        for m, n, bk, g, w, s, p in tiles
    ]


def filter_configs(k: int, k_aux: int, n_features: int, interpret: bool) -> list[dict]:
    """`filter_tiles` and buffer capacities. A larger buffer lets the threshold pass read fewer features
    but costs the select more; none is above half the features (then filtering keeps most of the row and
    the dense route is the one to take)."""
    widest = max(512, n_features // 2)
    caps = [max(512 * 2**i, next_power_of_2(16 * 2**i * k)) for i in range(3)]
    caps = [cap for cap in caps if cap <= widest]
    aux_cap = max(256, next_power_of_2(8 * k_aux)) if k_aux else 1
    return [dict(tile, CAP=cap, AUX_CAP=aux_cap) for tile in filter_tiles(interpret) for cap in caps]


def cutlass_filter_configs(k: int, k_aux: int, n_features: int) -> list[dict]:
    """The filter route over `cutlass_gemm.gemm_bias_filter` (GEMM "cutlass", each of its FILTER_VARIANTS)
    with `filter_configs`' capacities: no AuxK and no positive counts (its epilogue keeps neither). None
    unless cutlass_gemm.FILTER_ROUTE is on and the CUTLASS extension is built."""
    if k_aux or not (cutlass_gemm.FILTER_ROUTE and cutlass_gemm.available()):
        return []
    caps = sorted({cfg["CAP"] for cfg in filter_configs(k, 0, n_features, interpret=False)})
    return [
        dict(CAP=cap, AUX_CAP=1, GEMM="cutlass", VARIANT=variant)
        for variant in range(len(cutlass_gemm.FILTER_VARIANTS))
        for cap in caps
    ]


def row_filter_configs(k: int, k_aux: int, n_features: int) -> list[dict]:
    """The row filter's configurations: buffer capacities (about k entries pass its bound; a capacity of
    2k rarely overflows and keeps the select short), warps per row (2 measured fastest at k = 32 and 4
    at k = 128 on the H200, GPT-2 and AF3 widths) and groups per row: ROW_FILTER_GROUPS, or that many per
    warp (a tighter bound: fewer groups reach it and fewer entries are read again, which matters at
    large k), over the row rounded up to a power of two, each group of at least ROW_FILTER_MIN_GROUP
    features; the select in the row program or (SELECT False) in a launch of one warp a row after it.
    Tried and left out: 8 warps a row, with 1024 or 8192 groups (4 features each at the GPT-2 width), at
    k = 512: on an H100 the tuner picked 4 warps and 4096 groups over them (45dd7b6). Configurations
    where fewer than k groups would hold features are left out."""
    aux_cap = max(64, next_power_of_2(4 * k_aux)) if k_aux else 1
    caps = sorted({max(64, next_power_of_2(2 * k)), max(64, next_power_of_2(4 * k))})
    configs = []
    for warps in (2, 4):
        for n_groups in sorted({ROW_FILTER_GROUPS, ROW_FILTER_GROUPS * warps}):
            if n_groups > ROW_FILTER_GROUPS and _row_filter_width(n_features, n_groups) > _row_filter_width(
                n_features, ROW_FILTER_GROUPS
            ):  # the extra groups would widen the row with empty ones, not split it finer
                continue
            group = _row_filter_width(n_features, n_groups) // n_groups
            if cdiv(n_features, group) >= max(k, k_aux):
                configs += [
                    dict(CAP=cap, AUX_CAP=aux_cap, GROUP=group, N_GROUPS=n_groups, WARPS=warps, SELECT=select)
                    for select in (True, False)
                    for cap in caps
                ]
    return configs


def pre_activation_chunks(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, rows_per_chunk: int, positive_counts: Tensor | None
) -> Iterator[tuple[slice, Tensor]]:
    """(rows, pre) for the batch in chunks of `rows_per_chunk` rows: pre [rows, F] is the fp32-centred
    input times W_enc plus b_enc on cuBLAS (one addmm, in the weights' dtype as eager PyTorch computes
    it). `positive_counts` (int32 [F], or None) gains each chunk's per-feature counts of pre > 0. Every
    chunk is written into one buffer, after the caller's work on the chunk before (the stream orders
    them): a chunk's worth of memory, where a new tensor per chunk held two while the next was written
    (captured SAEAdam step's peak on the H200: 630 -> 440 MB at AlphaFold3's shape, 438 -> 311 at
    GPT-2's, 880 -> 815 at Llama-8B's, 3247d53 -> e8d6f4c). The caller must be done with a chunk before
    it takes the next."""
    dtype = matmul_dtype(W_enc.dtype)
    weights, bias = W_enc.to(dtype), b_enc.to(dtype)
    xc = center(x, b_dec, dtype)
    B, F = x.shape[0], W_enc.shape[1]
    buffer = x.new_empty(min(B, rows_per_chunk), F, dtype=dtype)
    for start in range(0, B, rows_per_chunk):
        rows = slice(start, min(B, start + rows_per_chunk))
        pre = buffer[: rows.stop - rows.start]
        torch.addmm(bias, xc[rows], weights, out=pre)
        if positive_counts is not None:
            positive_counts += (pre > 0).sum(dim=0, dtype=torch.int32)
        yield rows, pre


def group_max_chunks(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, rows_per_chunk: int, positive_counts: Tensor | None,
    variant: int,
) -> Iterator[tuple[slice, Tensor, Tensor]]:  # fmt: skip
    """`pre_activation_chunks` from `cutlass_gemm`'s `variant` (experimental: CUTLASS, bf16 weights),
    with each chunk's group maxima [groups, rows rounded up], which that GEMM's epilogue leaves. Each
    chunk gets buffers of its own (the op allocates its outputs), so the caller must drop its references
    to a chunk (`del`) before it asks for the next: then one chunk's memory is held at a time, the next
    chunk reusing it in stream order. (Two held at once put the encode at Llama-8B's shape, two chunks of
    512 MB, at 1074 MB of peak memory on an H100, above the benchmark's bound of one chunk's worth.)"""
    xc = center(x, b_dec, W_enc.dtype)
    bias = b_enc.to(W_enc.dtype).contiguous()
    for start in range(0, x.shape[0], rows_per_chunk):
        rows = slice(start, min(x.shape[0], start + rows_per_chunk))
        pre, maxima = cutlass_gemm.gemm_bias_group_max(xc[rows].contiguous(), W_enc, bias, variant)
        if positive_counts is not None:
            positive_counts += (pre > 0).sum(dim=0, dtype=torch.int32)
        yield rows, pre, maxima
        del pre, maxima


def group_max_configs(k: int, k_aux: int, n_features: int) -> list[dict]:
    """The row filter's configurations over `cutlass_gemm`'s maxima (GEMM "cutlass", each of its
    VARIANTS): its groups are the GEMM's, and none holds AuxK (the GEMM pools no dead features' maxima).
    None unless cutlass_gemm.ROUTE is on and the CUTLASS extension is built."""
    if k_aux or not (cutlass_gemm.ROUTE and cutlass_gemm.available()):
        return []
    return over_group_maxima(k, n_features)


def over_group_maxima(k: int, n_features: int) -> list[dict]:
    """`group_max_configs` whether or not the extension is built (their Triton kernels compile without
    it): for each variant with at least k groups, one configuration per capacity, warps and select of
    the Triton row kernel (which reads a group's maxima at one stride: variants with one group a tile),
    and (with cutlass_gemm.SELECT_ROUTE on) one (SELECT "warp") of `cutlass_gemm.select_topk_group_max`
    where its limits allow (it runs on CUDA tensors only)."""
    configs = []
    for variant, kernel in enumerate(cutlass_gemm.VARIANTS):
        group = kernel.group
        n_groups = cdiv(n_features, group)
        if kernel.routed and n_groups >= k:
            if kernel.groups_per_tile == 1:
                configs += [
                    dict(cfg, GROUP=group, N_GROUPS=next_power_of_2(n_groups), GEMM="cutlass", VARIANT=variant)
                    for cfg in row_filter_configs(k, 0, n_features)
                    if cfg["N_GROUPS"] == ROW_FILTER_GROUPS
                ]
            if (
                cutlass_gemm.SELECT_ROUTE
                and group in cutlass_gemm.SELECT_GROUPS
                and n_groups <= cutlass_gemm.SELECT_MAX_GROUPS
                and k <= cutlass_gemm.SELECT_MAX_K
            ):
                configs.append(
                    dict(CAP=1, AUX_CAP=1, GROUP=group, N_GROUPS=n_groups, SELECT="warp", GEMM="cutlass",
                         VARIANT=variant)
                )  # fmt: skip
    return configs


def _row_filter_width(n_features: int, n_groups: int) -> int:
    """Features per row the row filter splits into `n_groups` groups (a power of two, >= n_features)."""
    return max(ROW_FILTER_MIN_GROUP * n_groups, ROW_FILTER_READ, next_power_of_2(n_features))


def row_filter_chunk_rows(n_rows: int, n_features: int, slots: int) -> int:
    """Rows per launch of the row filter: at most ROW_FILTER_CHUNK pre-activations and FILTER_SLOTS
    buffer slots (`slots` per row), in chunks of equal rows, so that no launch is a short tail."""
    most = max(1, min(n_rows, ROW_FILTER_CHUNK // n_features, FILTER_SLOTS // slots))
    return cdiv(n_rows, cdiv(n_rows, most))


def row_filter_topk(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    k: int,
    k_aux: int,
    dead_mask: Tensor | None,
    positive_counts: Tensor | None,
    outputs: tuple[Tensor, Tensor, Tensor, Tensor],
    cfg: dict,
) -> Tensor:
    """The row-filter route: `filter_topk`'s contract (flagged rows left unwritten), with the
    pre-activation of row chunks written by cuBLAS (at most ROW_FILTER_CHUNK entries: what eager
    PyTorch computes, in the weights' dtype) and filtered and selected by `_row_filter_kernel`, one
    launch per chunk. Its scratch is allocated once for the largest chunk and reused by every chunk (the
    launches are ordered on the stream), so a call costs the host few allocations. A `cfg` with GEMM
    "cutlass" (`group_max_configs`) takes its chunks and their group maxima from `group_max_chunks`, and
    the row kernel starts from those maxima; with SELECT "warp", `cutlass_gemm.select_topk_group_max`
    selects from them instead of the row kernel (no AuxK)."""
    B, F = x.shape[0], W_enc.shape[1]
    has_aux = k_aux > 0
    cap, aux_cap = cfg["CAP"], cfg["AUX_CAP"] if has_aux else 1
    group = cfg["GROUP"]
    n_groups = cfg["N_GROUPS"]
    rows_per_chunk = row_filter_chunk_rows(B, F, max(cap, aux_cap))
    vals, idx, aux_vals, aux_idx = outputs
    flags = x.new_empty(B, dtype=torch.int8)
    if cfg["SELECT"] == "warp":  # `cutlass_gemm.select_topk_group_max`: no scratch, no buffers
        for rows, pre, maxima in group_max_chunks(x, W_enc, b_enc, b_dec, rows_per_chunk, positive_counts,
                                                  cfg["VARIANT"]):  # fmt: skip
            cutlass_gemm.select_topk_group_max(
                pre, maxima, group, k, vals[rows], idx[rows], flags[rows], cutlass_gemm.SELECT_RAISE_BY_COUNT
            )
            del pre, maxima  # before the next chunk is made (`group_max_chunks`)
        return flags
    counts = x.new_empty(2, rows_per_chunk, dtype=torch.int32)  # zeroed by the kernel, row by row
    key_buf = x.new_empty(rows_per_chunk, cap, dtype=torch.int64)
    scratch = x.new_empty(rows_per_chunk, n_groups * (2 if has_aux else 1), dtype=torch.int32)
    aux_key_buf = x.new_empty(rows_per_chunk, aux_cap, dtype=torch.int64) if has_aux else key_buf
    aux_tau = x.new_empty(rows_per_chunk, dtype=torch.float32) if has_aux else counts  # any pointer without AuxK
    dead = dead_mask.contiguous().view(torch.uint8) if has_aux else flags  # any pointer when AuxK is off
    if cfg.get("GEMM") == "cutlass":
        chunks = group_max_chunks(x, W_enc, b_enc, b_dec, rows_per_chunk, positive_counts, cfg["VARIANT"])
    else:
        chunks = (
            (rows, pre, None)
            for rows, pre in pre_activation_chunks(x, W_enc, b_enc, b_dec, rows_per_chunk, positive_counts)
        )
    for rows, pre, maxima in chunks:
        _row_filter_kernel[(pre.shape[0],)](
            pre, pre.stride(0), F, k, rows.start, scratch, counts[0], key_buf, vals, idx, vals.stride(0),
            idx.stride(0), flags, dead, k_aux, counts[1], aux_key_buf, aux_vals, aux_idx,
            aux_vals.stride(0), aux_idx.stride(0), aux_tau,
            scratch if maxima is None else maxima, 0 if maxima is None else maxima.stride(0),
            HAS_AUX=has_aux, MAXIMA_GIVEN=maxima is not None, INLINE_PTX=not INTERPRET, N_GROUPS=n_groups,
            GROUP=group,
            CHUNK_GROUPS=max(1, ROW_FILTER_READ // group), HOT_GROUPS=max(1, ROW_FILTER_REREAD // group),
            CAP=cap, KEEP=next_power_of_2(k), AUX_CAP=aux_cap, AUX_KEEP=next_power_of_2(max(1, k_aux)),
            SELECT=cfg["SELECT"], num_warps=max(cfg["WARPS"], _row_warps(max(cap, aux_cap))),
        )  # fmt: skip
        if not cfg["SELECT"]:
            n = pre.shape[0]
            _select(key_buf[:n], counts[0, :n], counts[0, :n], vals[rows], idx[rows], flags[rows], False, False)
            if has_aux:
                _select(
                    aux_key_buf[:n], counts[1, :n], aux_tau[:n], aux_vals[rows], aux_idx[rows], flags[rows], True, True
                )
        del pre, maxima  # before the next chunk is made (`group_max_chunks`)
    return flags


def filter_topk(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    k: int,
    k_aux: int,
    dead_mask: Tensor | None,
    positive_counts: Tensor | None,
    outputs: tuple[Tensor, Tensor, Tensor, Tensor],
    cfg: dict,
    margin_shift: float = 0.0,
) -> Tensor:
    """Writes `outputs` = (vals, idx, aux_vals, aux_idx) as `reference.encode_topk` does, except rows
    flagged in the returned int8 flags [B], left unwritten for the caller to recompute.
    `positive_counts` (int32 [F], zeroed, or None) gets the per-feature counts of positive
    pre-activations. `margin_shift` (tests only) raises every threshold by that much, so that rows keep
    fewer than k survivors. Rows run in chunks of at most FILTER_SLOTS buffer slots."""
    flags = x.new_empty(x.shape[0], dtype=torch.int8)
    if cfg.get("GEMM") != "cutlass":  # (CUTLASS's operands are contiguous: `cutlass_gemm.takes`)
        W_enc = tma_operand(W_enc)  # once for every row chunk (a copy only when TMA cannot address it)
    rows_per_chunk = max(1, FILTER_SLOTS // max(cfg["CAP"], cfg["AUX_CAP"] if k_aux else 1))
    for start in range(0, x.shape[0], rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        _filter_rows(x[rows], W_enc, b_enc, b_dec, k, k_aux, dead_mask, positive_counts,
                     tuple(out[rows] for out in outputs), flags[rows], cfg, margin_shift)  # fmt: skip
    return flags


def _filter_rows(x, W_enc, b_enc, b_dec, k, k_aux, dead_mask, positive_counts, outputs, flags, cfg, margin_shift):
    B, _ = x.shape
    has_aux = k_aux > 0
    cap, aux_cap = cfg["CAP"], cfg["AUX_CAP"] if has_aux else 1
    xc = center(x, b_dec, matmul_dtype(W_enc.dtype))
    tau = thresholds(xc, W_enc, b_enc, k, cap)
    if margin_shift:
        tau += margin_shift
    count = x.new_zeros(B, dtype=torch.int32)
    key_buf = x.new_empty(B, cap, dtype=torch.int64)
    aux = None
    if has_aux:
        # The dead features first (a stable sort keeps feature order), so the AuxK threshold pass reads
        # dead features only whenever there are enough of them; no host synchronisation.
        dead_first = torch.sort(dead_mask.to(torch.uint8), descending=True, stable=True).indices
        aux_tau = thresholds(xc, W_enc, b_enc, k_aux, aux_cap, columns=dead_first, valid=dead_mask[dead_first])
        aux_count = x.new_zeros(B, dtype=torch.int32)
        aux_key_buf = x.new_empty(B, aux_cap, dtype=torch.int64)
        aux = (dead_mask, aux_tau, aux_count, aux_key_buf)
    if cfg.get("GEMM") == "cutlass":
        if aux is not None or positive_counts is not None:
            raise ValueError("the CUTLASS filter GEMM keeps neither AuxK candidates nor positive counts")
        bias = b_enc.to(W_enc.dtype).contiguous()
        cutlass_gemm.gemm_bias_filter(xc.contiguous(), W_enc, bias, tau, count, key_buf, cfg["VARIANT"])
    else:
        filter_gemm(xc, W_enc, b_enc, tau, count, key_buf, aux, positive_counts, cfg)
    vals, idx, aux_vals, aux_idx = outputs
    _select(key_buf, count, tau, vals, idx, flags, fewer_if_unbounded=False, or_flags=False)
    if has_aux:
        _select(aux_key_buf, aux_count, aux_tau, aux_vals, aux_idx, flags, fewer_if_unbounded=True,
                or_flags=True)  # fmt: skip


def filter_gemm(
    xc: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    tau: Tensor,
    count: Tensor,
    key_buf: Tensor,
    aux: tuple[Tensor, Tensor, Tensor, Tensor] | None,
    positive_counts: Tensor | None,
    cfg: dict,
) -> None:
    """The filter GEMM alone (step 3): appends each entry of xc @ W_enc + b_enc above its row's `tau`
    to the row's `key_buf` [B, CAP] (int64 keys), counting in `count` (int32 [B], zeroed); `aux` =
    (dead_mask, aux_tau, aux_count, aux_key_buf) does the same for dead features against their own
    thresholds. W_enc must be a `tma_operand`."""
    B, D = xc.shape
    F = W_enc.shape[1]
    if aux is None:
        dead = aux_tau = aux_count = aux_key_buf = count  # any pointer when AuxK is off
    else:
        dead_mask, aux_tau, aux_count, aux_key_buf = aux
        dead = dead_mask.contiguous().view(torch.uint8)
    block_k = cfg["BLOCK_K"] * 2 // xc.element_size()
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    n_programs = cfg["PER_SM"] * sm_count(xc.device)  # a constant, so batch sizes share one compiled kernel
    _filter_fwd_kernel[(n_programs,)](
        TensorDescriptor.from_tensor(xc, [block_m, block_k]),
        TensorDescriptor.from_tensor(W_enc, [block_k, block_n]),
        b_enc.contiguous(), tau, count, key_buf, dead, aux_tau, aux_count, aux_key_buf,
        positive_counts if positive_counts is not None else count,  # any pointer when not counting
        B, D, F, key_buf.shape[1], aux_key_buf.shape[1] if aux is not None else 1,
        HAS_AUX=aux is not None, COUNT_POSITIVE=positive_counts is not None, INLINE_PTX=not INTERPRET,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=cfg["GROUP_M"], N_PROGRAMS=n_programs,
        # Short reductions gain from overlapping the next tile's loads with this epilogue (H200: d = 384
        # and 768); at d = 4096 the unflattened loop measured faster.
        FLATTEN=cdiv(D, block_k) <= 16,
        INPUT_PRECISION=input_precision(W_enc.dtype), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip


def _select(key_buf, count, tau, vals, idx, flags, fewer_if_unbounded: bool, or_flags: bool) -> None:
    B, k = vals.shape
    cap = key_buf.shape[1]
    _select_kernel[(B,)](
        key_buf, count, tau, vals, idx, flags,
        B, k, vals.stride(0), idx.stride(0),
        FEWER_IF_UNBOUNDED=fewer_if_unbounded, OR_FLAGS=or_flags, CAP=cap, KEEP=next_power_of_2(k),
        BLOCK_M=1, num_warps=_row_warps(cap),
    )  # fmt: skip


def _row_warps(n: int) -> int:
    """Warps for a program that bisects over one row of n elements: one warp up to 1024 elements (so
    the bisection's row sums are warp shuffles, with no barrier), then more to bound registers."""
    return max(1, min(8, n // 1024))
