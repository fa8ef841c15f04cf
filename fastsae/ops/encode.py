"""Fused encoder kernels: outlier-aware pre-activation with TopK, ReLU or JumpReLU epilogues.

    pre = (x - b_dec) @ W_enc + b_enc          x [B, d], W_enc [d, F], b_enc [F], b_dec [d]

Each x tile is centred in fp32 and only then cast to the weights' dtype for the tensor cores, so an
outlier dimension with |mean| >> std keeps its per-token signal; products accumulate in fp32.

TopK (`reference.encode_topk`): vals, idx = topk(pre, k) per row, values post-ReLU, plus optionally
the top k_aux among features flagged dead (AuxK). Four routes (`topk_routes`), picked per shape by
the tuner: "row_filter", threshold-first over cuBLAS pre-activations of bounded row chunks
(`filter.py`, the default without tuning, where F holds k of its groups); "filter", the same
threshold inside the GEMM (`filter.py`); "dense",
cuBLAS pre-activations of bounded row chunks and torch.topk, which is what eager PyTorch computes, so
the tuner never picks a route slower than it; and "sweep", this file's single-pass kernel, which also
recomputes the rows the filters flag. None writes the whole [B, F] pre-activation.

The sweep: a program owns BLOCK_M rows and sweeps its share of the features in BLOCK_N tiles. Each
row keeps a threshold (the KEEP-th largest key seen so far, KEEP = k rounded up to a power of two) and
appends only tile entries above it to a per-row scratch buffer of CAP slots; when a buffer could
overflow, the program compacts it to its KEEP largest keys with an exact bitonic top-k, which also
raises the threshold. A key packs (value, feature) into one int64 that orders like the value (ties by
feature), so selection is exact. Small batches split the features over programs (grid.y) to fill the
GPU; a finishing kernel merges the splits' candidates and decodes the keys (with one split the sweep
writes its codes itself). With ONLY_FLAGGED, row blocks without a flagged row return at once.

ReLU / JumpReLU (`reference.encode_relu`): a tiled GEMM whose epilogue adds b_enc and applies
`pre > threshold` (threshold 0 for ReLU), writing dense codes [B, F].
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import reference
from . import cutlass_gemm
from .decode import decode_sparse
from .filter import (
    EMPTY_KEY,
    PRE_ACTIVATION_CHUNK,
    cutlass_filter_configs,
    filter_configs,
    filter_topk,
    group_max_configs,
    grouped_tile,
    key_value,
    pre_activation_chunks,
    row_filter_configs,
    row_filter_topk,
    store_codes,
    to_key,
)
from .launch import INTERPRET, bucket, cdiv, dot_dtype, input_precision, next_power_of_2, only_asked, sm_count, tuned
from .scatter import feature_sums

MAX_KEEP = 2048  # largest k (and k_aux, both rounded up to powers of two) the kernels keep; beyond: dense route
MERGE_ELEMENTS = 4096  # candidates per row the finishing kernel merges (n_split x KEEP) in registers
SORT_ELEMENTS = 1024  # keys sorted at once in a compaction (rows x CAP): bounds registers and compile time
MIN_KEEP = 32  # k and k_aux round up to at least this, so few kernel variants get compiled


@triton.jit
def _pre_activation_tile(
    x_ptr, w_ptr, b_enc_ptr, b_dec_ptr, row_start, col_start, B, D, F,
    stride_xm, stride_xd, stride_wd, stride_wf,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    """(x[rows] - b_dec) @ W_enc[:, cols] + b_enc[cols] -> fp32 [BLOCK_M, BLOCK_N] for the tile at
    (row_start, col_start), centring in fp32 before the cast to the matmul dtype."""
    local_rows = tl.arange(0, BLOCK_M)
    local_cols = tl.arange(0, BLOCK_N)
    row_valid = (row_start + local_rows) < B
    col_valid = (col_start + local_cols) < F
    ks = tl.arange(0, BLOCK_K)
    # 64-bit scalar bases and 32-bit offsets within the tile: tiles of 64-bit addresses cost registers.
    x_ptrs = (x_ptr + row_start.to(tl.int64) * stride_xm) + (local_rows[:, None] * stride_xm + ks[None, :] * stride_xd)
    w_ptrs = (w_ptr + col_start.to(tl.int64) * stride_wf) + (ks[:, None] * stride_wd + local_cols[None, :] * stride_wf)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_K):
        k_valid = (d0 + ks) < D
        x = tl.load(x_ptrs, mask=row_valid[:, None] & k_valid[None, :], other=0.0).to(tl.float32)
        center = tl.load(b_dec_ptr + d0 + ks, mask=k_valid, other=0.0).to(tl.float32)
        xc = (x - center[None, :]).to(DOT_DTYPE)  # the outlier-aware step: subtract in fp32, then cast
        w = tl.load(w_ptrs, mask=k_valid[:, None] & col_valid[None, :], other=0.0).to(DOT_DTYPE)
        acc = tl.dot(xc, w, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xd
        w_ptrs += BLOCK_K * stride_wd
    return acc + tl.load(b_enc_ptr + col_start + local_cols, mask=col_valid, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _append(val_ptr, idx_ptr, buf_row0, stride_buf, values, cols, candidate, count):
    """Store the `candidate` entries of `values` [BLOCK_M, BLOCK_N] (value and feature, in two arrays:
    no int64 tile in registers) after each row's `count` filled slots; returns the new counts."""
    flags = candidate.to(tl.int32)
    slots = count[:, None] + tl.cumsum(flags, axis=1) - 1  # [BLOCK_M, BLOCK_N]
    # One 64-bit base for the program's rows and 32-bit offsets inside them (BLOCK_M * CAP < 2^31):
    # a [BLOCK_M, BLOCK_N] tile of 64-bit addresses would not fit in registers.
    row_offset = buf_row0.to(tl.int64) * stride_buf
    offsets = tl.arange(0, values.shape[0])[:, None] * stride_buf + slots
    tl.store(val_ptr + row_offset + offsets, values, mask=candidate)
    tl.store(idx_ptr + row_offset + offsets, tl.broadcast_to(cols[None, :], values.shape), mask=candidate)
    return count + tl.sum(flags, axis=1)


@triton.jit
def _load_keys(val_ptr, idx_ptr, offsets, mask):
    """Keys of buffer slots; an empty slot (feature -1) gets EMPTY_KEY."""
    feature = tl.load(idx_ptr + offsets, mask=mask, other=-1)
    value = tl.load(val_ptr + offsets, mask=mask, other=0.0)
    return tl.where(feature < 0, EMPTY_KEY, to_key(value, feature))


@triton.jit
def _compact(
    val_ptr, idx_ptr, tau_ptr, buf_row0, stride_buf,
    BLOCK_M: tl.constexpr, CAP: tl.constexpr, KEEP: tl.constexpr, SORT_ROWS: tl.constexpr,
):  # fmt: skip
    """Shrink each of the program's BLOCK_M buffers to its KEEP largest entries, sorted, in slots
    [0, KEEP) (the rest empty), and write each row's KEEP-th largest value to tau (the threshold for
    later appends; -inf while a row holds fewer than KEEP entries)."""
    tl.debug_barrier()  # every thread's appends are visible before any thread reads the buffers
    slots = tl.arange(0, CAP)
    kept = tl.arange(0, KEEP)
    for r0 in range(0, BLOCK_M, SORT_ROWS):  # a loop, not unrolled: compile time
        buf_rows = (buf_row0 + r0 + tl.arange(0, SORT_ROWS)).to(tl.int64)
        offsets = buf_rows[:, None] * stride_buf + slots[None, :]  # [SORT_ROWS, CAP]
        top = tl.topk(_load_keys(val_ptr, idx_ptr, offsets, slots[None, :] < CAP), KEEP)  # [SORT_ROWS, KEEP]
        tl.debug_barrier()  # all reads of these rows are done before they are overwritten
        tl.store(idx_ptr + offsets, tl.full([SORT_ROWS, CAP], -1, tl.int32), mask=slots[None, :] >= KEEP)
        kept_offsets = buf_rows[:, None] * stride_buf + kept[None, :]
        tl.store(val_ptr + kept_offsets, key_value(top))
        tl.store(idx_ptr + kept_offsets, tl.where(top == EMPTY_KEY, -1, (top & 0xFFFFFFFF).to(tl.int32)))
        kth = tl.min(top, axis=1)
        tl.store(tau_ptr + buf_rows, tl.where(kth == EMPTY_KEY, float("-inf"), key_value(kth)))
    tl.debug_barrier()


@triton.jit
def _clear(val_ptr, idx_ptr, buf_row0, stride_buf, BLOCK_M: tl.constexpr, CAP: tl.constexpr,
           SORT_ROWS: tl.constexpr):  # fmt: skip
    """Mark every slot of the program's buffers empty (feature -1, value 0). The value is written too:
    `_load_keys` reads every slot's value and discards an empty one's, and a read of memory never
    written is what compute-sanitizer's initcheck reports (masking that load by the feature instead
    made the sweep kernel spill)."""
    slots = tl.arange(0, CAP)
    for r0 in range(0, BLOCK_M, SORT_ROWS):  # a loop, not unrolled: compile time
        buf_rows = (buf_row0 + r0 + tl.arange(0, SORT_ROWS)).to(tl.int64)
        offsets = buf_rows[:, None] * stride_buf + slots[None, :]
        tl.store(idx_ptr + offsets, tl.full([SORT_ROWS, CAP], -1, tl.int32))
        tl.store(val_ptr + offsets, tl.zeros([SORT_ROWS, CAP], val_ptr.dtype.element_ty))


@triton.jit
def _encode_topk_fwd_kernel(
    x_ptr, w_ptr, b_enc_ptr, b_dec_ptr, dead_ptr,
    val_buf_ptr, idx_buf_ptr, tau_ptr, aux_val_buf_ptr, aux_idx_buf_ptr, aux_tau_ptr, positive_ptr, flag_ptr,
    vals_ptr, idx_ptr, aux_vals_ptr, aux_idx_ptr, k, k_aux,
    B, D, F, padded_rows, tiles_per_split,
    stride_xm, stride_xd, stride_wd, stride_wf, stride_buf, stride_aux_buf,
    stride_vm, stride_im, stride_avm, stride_aim,
    HAS_AUX: tl.constexpr, COUNT_POSITIVE: tl.constexpr, ONLY_FLAGGED: tl.constexpr, FINISH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    CAP: tl.constexpr, KEEP: tl.constexpr, SORT_ROWS: tl.constexpr,
    AUX_CAP: tl.constexpr, AUX_KEEP: tl.constexpr, AUX_SORT_ROWS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    row_block = tl.program_id(0)
    split = tl.program_id(1)
    if ONLY_FLAGGED:  # the fallback of the filter route: only row blocks holding a flagged row work
        block_rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
        if tl.max(tl.load(flag_ptr + block_rows, mask=block_rows < B, other=0).to(tl.int32), axis=0) == 0:
            return
    # This program's scratch rows: buffers are [n_split * padded_rows, CAP], so no row needs a mask.
    buf_row0 = split * padded_rows + row_block * BLOCK_M
    buf_rows = buf_row0 + tl.arange(0, BLOCK_M)
    f_begin = split * tiles_per_split * BLOCK_N

    _clear(val_buf_ptr, idx_buf_ptr, buf_row0, stride_buf, BLOCK_M, CAP, SORT_ROWS)
    tau = tl.full([BLOCK_M], float("-inf"), tl.float32)
    count = tl.zeros([BLOCK_M], dtype=tl.int32)
    if HAS_AUX:
        _clear(aux_val_buf_ptr, aux_idx_buf_ptr, buf_row0, stride_aux_buf, BLOCK_M, AUX_CAP, AUX_SORT_ROWS)
        aux_tau = tl.full([BLOCK_M], float("-inf"), tl.float32)
        aux_count = tl.zeros([BLOCK_M], dtype=tl.int32)
    tl.debug_barrier()

    for tile in range(0, tiles_per_split):  # (a plain argument as bound: the interpreter needs one)
        cols = f_begin + tile * BLOCK_N + tl.arange(0, BLOCK_N)
        col_valid = cols < F
        pre = _pre_activation_tile(  # [BLOCK_M, BLOCK_N]
            x_ptr, w_ptr, b_enc_ptr, b_dec_ptr, row_block * BLOCK_M, f_begin + tile * BLOCK_N, B, D, F,
            stride_xm, stride_xd, stride_wd, stride_wf,
            BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE, INPUT_PRECISION,
        )  # fmt: skip

        if COUNT_POSITIVE:  # tokens whose pre-activation is > 0, per feature (death classification)
            positive = (pre > 0) & ((row_block * BLOCK_M + tl.arange(0, BLOCK_M)) < B)[:, None]
            tl.atomic_add(positive_ptr + cols, tl.sum(positive.to(tl.int32), axis=0), mask=col_valid, sem="relaxed")
        candidate = col_valid[None, :] & (pre > tau[:, None])
        count = _append(val_buf_ptr, idx_buf_ptr, buf_row0, stride_buf, pre, cols, candidate, count)
        if HAS_AUX:
            dead = tl.load(dead_ptr + cols, mask=col_valid, other=0) != 0
            aux_candidate = dead[None, :] & (pre > aux_tau[:, None])
            aux_count = _append(
                aux_val_buf_ptr, aux_idx_buf_ptr, buf_row0, stride_aux_buf, pre, cols, aux_candidate, aux_count
            )

        # Compact after the appends, once the tile is dead (its registers free for the sort), whenever the
        # next tile's append could overflow a buffer.
        if tl.max(count, axis=0) > CAP - BLOCK_N:
            _compact(val_buf_ptr, idx_buf_ptr, tau_ptr, buf_row0, stride_buf, BLOCK_M, CAP, KEEP, SORT_ROWS)
            tau = tl.load(tau_ptr + buf_rows)
            count = tl.full([BLOCK_M], KEEP, tl.int32)
        if HAS_AUX:
            if tl.max(aux_count, axis=0) > AUX_CAP - BLOCK_N:
                _compact(
                    aux_val_buf_ptr, aux_idx_buf_ptr, aux_tau_ptr, buf_row0, stride_aux_buf,
                    BLOCK_M, AUX_CAP, AUX_KEEP, AUX_SORT_ROWS,
                )  # fmt: skip
                aux_tau = tl.load(aux_tau_ptr + buf_rows)
                aux_count = tl.full([BLOCK_M], AUX_KEEP, tl.int32)

    _compact(val_buf_ptr, idx_buf_ptr, tau_ptr, buf_row0, stride_buf, BLOCK_M, CAP, KEEP, SORT_ROWS)
    if HAS_AUX:
        _compact(
            aux_val_buf_ptr, aux_idx_buf_ptr, aux_tau_ptr, buf_row0, stride_aux_buf,
            BLOCK_M, AUX_CAP, AUX_KEEP, AUX_SORT_ROWS,
        )  # fmt: skip
    if FINISH:  # one feature split: the compacted buffers are the rows' answers, sorted; no finishing kernel
        _write_compacted(val_buf_ptr, idx_buf_ptr, stride_buf, vals_ptr, idx_ptr, k, stride_vm, stride_im,
                         row_block * BLOCK_M, B, flag_ptr, ONLY_FLAGGED, BLOCK_M, KEEP, SORT_ROWS)  # fmt: skip
        if HAS_AUX:
            _write_compacted(
                aux_val_buf_ptr, aux_idx_buf_ptr, stride_aux_buf, aux_vals_ptr, aux_idx_ptr, k_aux, stride_avm,
                stride_aim, row_block * BLOCK_M, B, flag_ptr, ONLY_FLAGGED, BLOCK_M, AUX_KEEP, AUX_SORT_ROWS,
            )  # fmt: skip


@triton.jit
def _write_compacted(
    val_buf_ptr, idx_buf_ptr, stride_buf, vals_ptr, idx_ptr, k, stride_vm, stride_im, row_start, B, flag_ptr,
    ONLY_FLAGGED: tl.constexpr, BLOCK_M: tl.constexpr, KEEP: tl.constexpr, SORT_ROWS: tl.constexpr,
):  # fmt: skip
    """The codes of the BLOCK_M rows from row_start, from their compacted buffers (the KEEP largest keys,
    sorted: what `_compact` leaves), SORT_ROWS rows at a time."""
    for r0 in range(0, BLOCK_M, SORT_ROWS):
        rows = row_start + r0 + tl.arange(0, SORT_ROWS)
        offsets = rows.to(tl.int64)[:, None] * stride_buf + tl.arange(0, KEEP)[None, :]
        keys = _load_keys(val_buf_ptr, idx_buf_ptr, offsets, (rows < B)[:, None])
        store_codes(keys, rows, _rows_to_write(rows, B, flag_ptr, ONLY_FLAGGED), vals_ptr, idx_ptr, k,
                     stride_vm, stride_im)  # fmt: skip


@triton.jit
def _rows_to_write(rows, B, flag_ptr, ONLY_FLAGGED: tl.constexpr):
    """The `rows` in the batch, and with ONLY_FLAGGED only those flagged (the others are the filter's)."""
    valid = rows < B
    if ONLY_FLAGGED:
        valid = valid & (tl.load(flag_ptr + rows, mask=valid, other=0) != 0)
    return valid


@triton.jit
def _topk_finish_kernel(
    val_buf_ptr, idx_buf_ptr, vals_ptr, idx_ptr, flag_ptr, B, k, padded_rows, stride_buf, stride_vm, stride_im,
    N_SPLIT: tl.constexpr, KEEP: tl.constexpr, BLOCK_M: tl.constexpr, ONLY_FLAGGED: tl.constexpr,
):  # fmt: skip
    """Merge the sorted KEEP entries of each feature split into the row's top k: post-ReLU values in
    vals' dtype and int32 features (an empty slot, possible for AuxK, gives value 0 and feature 0).
    ONLY_FLAGGED: write the flagged rows only (the sweep skipped the others)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = _rows_to_write(rows, B, flag_ptr, ONLY_FLAGGED)
    j = tl.arange(0, N_SPLIT * KEEP)
    buf_rows = (j // KEEP)[None, :] * padded_rows + rows[:, None]  # [BLOCK_M, N_SPLIT * KEEP]
    offsets = buf_rows.to(tl.int64) * stride_buf + (j % KEEP)[None, :]
    keys = _load_keys(val_buf_ptr, idx_buf_ptr, offsets, row_valid[:, None])
    if N_SPLIT > 1:
        keys = tl.topk(keys, KEEP)  # [BLOCK_M, KEEP], descending
    store_codes(keys, rows, row_valid, vals_ptr, idx_ptr, k, stride_vm, stride_im)


@functools.cache  # the filters' fallback asks for it on every call
def _sweep_config(k: int, k_aux: int) -> dict:
    """The sweep's tile shape. Wider row blocks reuse each W_enc tile for more rows (less L2 traffic);
    large k needs narrow row blocks so a compaction's sort fits in registers. 64 x 128 with 8 warps is
    the largest that compiles without register spills for k <= 64 (sm_90)."""
    keep = max(MIN_KEEP, next_power_of_2(k))
    aux_keep = max(MIN_KEEP, next_power_of_2(k_aux))
    if INTERPRET:  # small tiles for numpy; the interpreter's time goes to each compaction's many steps,
        # so 64 features a tile (half the compactions of 32) took a test of the filters' fallback 66 s, not 165
        block_m, block_n, block_k, warps, stages = 16, 64, 32, 4, 1
    elif keep <= 64:
        block_m, block_n, block_k, warps, stages = 64, 128, 64, 8, 3
    elif keep <= 256:
        block_m, block_n, block_k, warps, stages = 32, 128, 64, 4, 3
    else:
        block_m, block_n, block_k, warps, stages = 16, 128, 64, 4, 3
    cap = next_power_of_2(keep + block_n)
    aux_cap = next_power_of_2(aux_keep + block_n)
    return dict(
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
        KEEP=keep, CAP=cap, SORT_ROWS=max(1, min(block_m, SORT_ELEMENTS // cap)),
        AUX_KEEP=aux_keep, AUX_CAP=aux_cap, AUX_SORT_ROWS=max(1, min(block_m, SORT_ELEMENTS // aux_cap)),
    )  # fmt: skip


def _n_split(n_row_blocks: int, n_features: int, block_n: int, n_sms: int, keep: int) -> int:
    """Feature splits (a power of two) so that row blocks x splits fill the GPU's SMs, as long as the
    finishing merge of n_split x keep candidates per row stays within MERGE_ELEMENTS."""
    split = 1
    while n_row_blocks * split < n_sms and (split * 2) * block_n <= n_features and (split * 2) * keep <= MERGE_ELEMENTS:
        split *= 2
    return split


@functools.cache  # built once per shape: building them costs the host more than a kernel launch
def topk_routes(
    k: int, k_aux: int, n_features: int, cutlass: bool = False, counting: bool = False
) -> tuple[tuple[str, dict], ...]:
    """The ways to compute a TopK encode, as (route, configuration) candidates for the tuner:
    "row_filter" (threshold-first over cuBLAS pre-activations of row chunks, where F allows; flagged rows
    recomputed by the sweep), "filter" (the same filter inside the GEMM, `filter.py`), "sweep" (this
    file's single-pass kernel) and "dense" (cuBLAS pre-activations of bounded row chunks + torch.topk:
    what a user would write, so the tuner never picks a path slower than it). The first is the default:
    the row filter, which the tuner picked at every shape timed on the H200. With `cutlass` (operands
    that `cutlass_gemm` takes, its extension built), also the routes over CUTLASS's GEMMs: the row filter
    over group maxima (`filter.group_max_configs`, unless cutlass_gemm.ROUTE is off) and, unless `counting`
    positive pre-activations, the filter route (`filter.cutlass_filter_configs`, experimental: only with
    cutlass_gemm.FILTER_ROUTE on)."""
    if max(k, k_aux) > MAX_KEEP:  # beyond the sweep's buffers (the filter's fallback)
        return (("dense", {}),)
    routes = [("row_filter", cfg) for cfg in row_filter_configs(k, k_aux, n_features)]
    if cutlass:
        routes += [("row_filter", cfg) for cfg in group_max_configs(k, k_aux, n_features)]
        if not counting:
            routes += [("filter", cfg) for cfg in cutlass_filter_configs(k, k_aux, n_features)]
    routes += [("filter", cfg) for cfg in filter_configs(k, k_aux, n_features, INTERPRET)]
    routes.append(("sweep", _sweep_config(k, k_aux)))  # compiled anyway as the filter's fallback
    routes.append(("dense", {}))
    return tuple(routes)


def encode_topk(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    k: int,
    k_aux: int,
    dead_mask: Tensor | None,
    route: tuple[str, dict] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """TopK encode; same contract as `reference.encode_topk` (arguments checked by
    `fastsae.functional.encode_topk`). `route` (one of `topk_routes`) bypasses the tuner."""
    return _encode_topk(x, W_enc, b_enc, b_dec, k, k_aux, dead_mask, None, route)


def encode_topk_positive_counts(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int, route: tuple[str, dict] | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """TopK encode and, in the same pass, per-feature counts of tokens with a positive
    pre-activation; same contract as `reference.encode_topk_positive_counts`."""
    positive_counts = x.new_empty(W_enc.shape[1], dtype=torch.int32)
    vals, idx, _, _ = _encode_topk(x, W_enc, b_enc, b_dec, k, 0, None, positive_counts, route)
    return vals, idx, positive_counts.long()


def _encode_topk(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    k: int,
    k_aux: int,
    dead_mask: Tensor | None,
    positive_counts: Tensor | None,
    route: tuple[str, dict] | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The TopK launcher: runs `route`, or the tuner's fastest of `topk_routes` for this shape.
    `positive_counts` (int32 [F], or None) receives the per-feature counts of tokens whose
    pre-activation is > 0."""
    if W_enc.dtype == torch.float64:
        if positive_counts is not None:
            vals, idx, counts = reference.encode_topk_positive_counts(x, W_enc, b_enc, b_dec, k)
            positive_counts.copy_(counts)
            return vals, idx, vals[:, :0], idx[:, :0]
        return reference.encode_topk(x, W_enc, b_enc, b_dec, k, k_aux, dead_mask)
    B, D = x.shape
    F = W_enc.shape[1]
    has_aux = k_aux > 0
    outputs = (
        x.new_empty(B, k, dtype=W_enc.dtype),
        x.new_empty(B, k, dtype=torch.int32),
        x.new_empty(B, k_aux, dtype=W_enc.dtype),
        x.new_empty(B, k_aux, dtype=torch.int32),
    )
    dead = dead_mask if has_aux else None

    def run(candidate: tuple[str, dict]) -> None:
        name, cfg = candidate
        if positive_counts is not None:
            positive_counts.zero_()  # the tuner runs candidates one after another into the same counts
        if name == "dense":
            _dense_topk(x, W_enc, b_enc, b_dec, k, k_aux, dead, positive_counts, outputs)
        elif name == "sweep":
            _sweep_topk(x, W_enc, b_enc, b_dec, k, k_aux, dead, positive_counts, outputs, cfg, flags=None)
        else:
            topk = filter_topk if name == "filter" else row_filter_topk
            flags = topk(x, W_enc, b_enc, b_dec, k, k_aux, dead, positive_counts, outputs, cfg)
            _sweep_topk(x, W_enc, b_enc, b_dec, k, k_aux, dead, None, outputs, _sweep_config(k, k_aux), flags=flags)

    if route is None:
        key = ("encode_topk", D, F, bucket(B), k, k_aux, x.dtype, W_enc.dtype, positive_counts is not None)
        routes = topk_routes(k, k_aux, F, cutlass_gemm.takes(x, W_enc), positive_counts is not None)
        route = tuned(key, routes, run)
    run(route)
    return outputs


def _dense_topk(x, W_enc, b_enc, b_dec, k, k_aux, dead_mask, positive_counts, outputs) -> None:
    """The dense route, what a user would write but in row chunks of at most PRE_ACTIVATION_CHUNK
    pre-activations (torch.topk over smaller chunks measured up to 1.4x slower on the H200 at k = 512)
    from `pre_activation_chunks`, torch.topk, ReLU on the k winners only; AuxK over the dead-masked copy. A NaN
    pre-activation may be selected here, so its value is zeroed: never fired."""
    vals, idx, aux_vals, aux_idx = outputs
    rows_per_chunk = max(1, PRE_ACTIVATION_CHUNK // W_enc.shape[1])
    for rows, pre in pre_activation_chunks(x, W_enc, b_enc, b_dec, rows_per_chunk, positive_counts):
        top = pre.topk(k, dim=1)
        vals[rows] = top.values.clamp_min(0).nan_to_num_(nan=0.0)
        idx[rows] = top.indices
        if aux_vals.shape[1]:
            aux = pre.masked_fill_(~dead_mask, float("-inf")).topk(aux_vals.shape[1], dim=1)
            aux_vals[rows] = aux.values.clamp_min(0).nan_to_num_(nan=0.0)
            aux_idx[rows] = aux.indices


def _sweep_topk(x, W_enc, b_enc, b_dec, k, k_aux, dead_mask, positive_counts, outputs, cfg, flags) -> None:
    """The sweep route (`_encode_topk_fwd_kernel`), for every row or, given int8 `flags` [B], only for
    the rows flagged non-zero (the filters' fallback: unflagged row blocks return at once). The
    fallback runs one feature split, so that it is one launch on every call (flagged rows are rare)."""
    vals, idx, aux_vals, aux_idx = outputs
    keep, aux_keep = cfg["KEEP"], cfg["AUX_KEEP"]
    B, D = x.shape
    F = W_enc.shape[1]
    has_aux = k_aux > 0
    b_enc, b_dec = b_enc.contiguous(), b_dec.contiguous()  # the kernel reads vectors with unit stride
    dead = dead_mask.contiguous().view(torch.uint8) if has_aux else idx  # any pointer when AuxK is off
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    n_row_blocks = cdiv(B, block_m)
    padded_rows = n_row_blocks * block_m
    if flags is None:
        n_split = _n_split(n_row_blocks, F, block_n, sm_count(x.device), max(keep, aux_keep if has_aux else 1))
    else:
        n_split = 1
    tiles_per_split = cdiv(cdiv(F, n_split), block_n)
    buf_rows = n_split * padded_rows
    val_buf, idx_buf = _scratch(x, buf_rows, cfg["CAP"])
    tau = x.new_empty(buf_rows, dtype=torch.float32)
    aux_cap = cfg["AUX_CAP"] if has_aux else 1
    if has_aux:
        aux_val_buf, aux_idx_buf = _scratch(x, buf_rows, aux_cap)
        aux_tau = x.new_empty(buf_rows, dtype=torch.float32)
    else:  # any pointers: the kernel does not touch them
        aux_val_buf, aux_idx_buf, aux_tau = val_buf, idx_buf, tau
    _encode_topk_fwd_kernel[(n_row_blocks, n_split)](
        x, W_enc, b_enc, b_dec, dead, val_buf, idx_buf, tau, aux_val_buf, aux_idx_buf, aux_tau,
        positive_counts if positive_counts is not None else idx,  # any pointer when not counting
        flags if flags is not None else idx,  # any pointer when every row is computed
        vals, idx, aux_vals, aux_idx, k, k_aux,
        B, D, F, padded_rows, tiles_per_split,
        x.stride(0), x.stride(1), W_enc.stride(0), W_enc.stride(1), val_buf.stride(0), aux_val_buf.stride(0),
        vals.stride(0), idx.stride(0), aux_vals.stride(0), aux_idx.stride(0),
        HAS_AUX=has_aux, COUNT_POSITIVE=positive_counts is not None, ONLY_FLAGGED=flags is not None,
        FINISH=n_split == 1, DOT_DTYPE=dot_dtype(W_enc.dtype), INPUT_PRECISION=input_precision(W_enc.dtype),
        **{**cfg, "AUX_KEEP": aux_keep if has_aux else 1, "AUX_CAP": aux_cap},
    )  # fmt: skip
    if n_split > 1:
        _finish(val_buf, idx_buf, vals, idx, padded_rows, n_split, keep, flags)
        if has_aux:
            _finish(aux_val_buf, aux_idx_buf, aux_vals, aux_idx, padded_rows, n_split, aux_keep, flags)


def _scratch(x: Tensor, rows: int, cap: int) -> tuple[Tensor, Tensor]:
    """Per-row candidate buffers: fp32 values and int32 features, [rows, cap] each."""
    return x.new_empty(rows, cap, dtype=torch.float32), x.new_empty(rows, cap, dtype=torch.int32)


def _finish(
    val_buf: Tensor,
    idx_buf: Tensor,
    vals: Tensor,
    idx: Tensor,
    padded_rows: int,
    n_split: int,
    keep: int,
    flags: Tensor | None,
) -> None:
    B, k = vals.shape
    block_m = max(1, min(64, SORT_ELEMENTS // (n_split * keep)))
    _topk_finish_kernel[(cdiv(B, block_m),)](
        val_buf, idx_buf, vals, idx, flags if flags is not None else idx,
        B, k, padded_rows, val_buf.stride(0), vals.stride(0), idx.stride(0),
        N_SPLIT=n_split, KEEP=keep, BLOCK_M=block_m, ONLY_FLAGGED=flags is not None,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# ReLU / JumpReLU


@triton.jit
def _encode_relu_fwd_kernel(
    x_ptr, w_ptr, b_enc_ptr, b_dec_ptr, threshold_ptr, out_ptr,
    B, D, F,
    stride_xm, stride_xd, stride_wd, stride_wf, stride_om, stride_of,
    HAS_THRESHOLD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    row_block, col_block = grouped_tile(tl.program_id(0), B, F, BLOCK_M, BLOCK_N, GROUP_M)

    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_valid, col_valid = rows < B, cols < F
    pre = _pre_activation_tile(  # [BLOCK_M, BLOCK_N]
        x_ptr, w_ptr, b_enc_ptr, b_dec_ptr, row_block * BLOCK_M, col_block * BLOCK_N, B, D, F,
        stride_xm, stride_xd, stride_wd, stride_wf,
        BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE, INPUT_PRECISION,
    )  # fmt: skip
    if HAS_THRESHOLD:
        cut = tl.load(threshold_ptr + cols, mask=col_valid, other=0.0).to(tl.float32)[None, :]
    else:
        cut = 0.0
    acts = tl.where(pre > cut, pre, 0.0)
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols.to(tl.int64)[None, :] * stride_of
    tl.store(out_ptrs, acts.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & col_valid[None, :])


_RELU_CANDIDATES = [
    dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8, num_warps=w, num_stages=s)
    for m, n, k, w, s in [
        (128, 256, 64, 8, 3),
        (128, 128, 64, 4, 4),
        (64, 256, 64, 4, 4),
    ]
]


def encode_relu(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, threshold: Tensor | None) -> Tensor:
    """Fused ReLU / JumpReLU encode; same contract as `reference.encode_relu`."""
    if W_enc.dtype == torch.float64:
        return reference.encode_relu(x, W_enc, b_enc, b_dec, threshold)
    B, D = x.shape
    F = W_enc.shape[1]
    b_enc, b_dec = b_enc.contiguous(), b_dec.contiguous()  # the kernel reads vectors with unit stride
    threshold = None if threshold is None else threshold.contiguous()
    out = x.new_empty(B, F, dtype=W_enc.dtype)

    def run(cfg: dict) -> None:
        grid = (cdiv(B, cfg["BLOCK_M"]) * cdiv(F, cfg["BLOCK_N"]),)
        _encode_relu_fwd_kernel[grid](
            x, W_enc, b_enc, b_dec, threshold if threshold is not None else b_enc, out,
            B, D, F,
            x.stride(0), x.stride(1), W_enc.stride(0), W_enc.stride(1), out.stride(0), out.stride(1),
            HAS_THRESHOLD=threshold is not None,
            DOT_DTYPE=dot_dtype(W_enc.dtype), INPUT_PRECISION=input_precision(W_enc.dtype),
            **cfg,
        )  # fmt: skip

    run(tuned(("encode_relu", D, F, bucket(B), x.dtype, W_enc.dtype), _RELU_CANDIDATES, run))
    return out


# ---------------------------------------------------------------------------------------------------
# TopK backward: d pre has k (+ k_aux) non-zeros per row, so every gradient is a sum over codes


def encode_topk_backward(
    grad_vals: Tensor,
    grad_aux_vals: Tensor,
    x: Tensor,
    W_enc: Tensor,
    b_dec: Tensor,
    vals: Tensor,
    idx: Tensor,
    aux_vals: Tensor,
    aux_idx: Tensor,
    x_requires_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dW_enc, db_enc, db_dec) of `encode_topk`; same contract as `reference.encode_topk_backward`
    except that dx is an empty tensor unless `x_requires_grad`. No [B, F] matrix: dW_enc^T and db_enc are
    per-feature sums over the codes (scatter.feature_sums, deterministic when torch's deterministic
    algorithms are on), db_dec = -W_enc @ db_enc (the centering's gradient summed over tokens), and dx
    gathers the selected encoder columns."""
    if W_enc.dtype == torch.float64:
        grads = reference.encode_topk_backward(grad_vals, grad_aux_vals, x, W_enc, b_dec, vals, idx, aux_vals, aux_idx)
        return only_asked(grads, (x_requires_grad, True, True, True))
    # The ReLU passes gradient only where the code fired.
    coef = torch.where(vals > 0, grad_vals, 0)
    if aux_idx.shape[1]:  # (no AuxK codes: the module's few-dead path, or none: no copy)
        aux_coef = torch.where(aux_vals > 0, grad_aux_vals, 0)
        coef, idx = torch.cat([coef, aux_coef], dim=1), torch.cat([idx, aux_idx], dim=1)
    dW_enc, db_enc, weighted = feature_sums(
        x, coef, idx, W_enc.shape[1], center=b_dec, dtype=W_enc.dtype, transposed=True, weight=W_enc
    )
    db_dec = -weighted  # the centring's gradient, -W_enc @ db_enc, from the sums
    if x_requires_grad:
        dx = decode_sparse(coef, idx, W_enc.t(), None).to(x.dtype)  # rows of W_enc^T: strided gathers
    else:
        dx = x.new_empty(0)
    return dx, dW_enc, db_enc.to(W_enc.dtype), db_dec.to(b_dec.dtype)
