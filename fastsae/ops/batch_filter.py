"""Threshold-first BatchTopK: sparse codes of the batch's B * k largest post-ReLU pre-activations from
one filtering pass against an estimate of the batch's threshold, with no per-row top-k.

    pre = (x - b_dec) @ W_enc + b_enc                                   x [B, d], W_enc [d, F]
    codes = the batch's B * k largest values of relu(pre)       (`reference.batch_topk` over whole rows)

A training batch's threshold (the smallest code BatchTopK keeps) sits close to the last batch's, which
a BatchTopK SAE keeps. Given such an estimate t:
1. filter: every entry above floor = (1 - FLOOR_MARGIN) * t is appended, as a (value, feature) key, to its
   row's buffer of CAP slots (`filter.filter_gemm`'s epilogue, or a streaming pass over the pre-activation
   that cuBLAS writes in row chunks; the tuner times both). No [B, F] tensor, no per-row selection.
2. sort: each row's buffer sorted in descending (value, feature) order, so that a row's kept codes are a
   prefix of it and ties within a row go to the larger feature; a histogram of the survivors' top 16
   value bits over the batch.
3. threshold: the bin that holds the batch's (B * k)-th largest survivor (one program scans the
   histogram), then a histogram of the low 16 bits of that bin's members gives its exact value; of the
   entries equal to it (16-bit pre-activations tie often), the earlier rows' are kept first.
4. codes: each row's kept survivors, CODES_PER_K x k wide, value 0 after them on features spread over
   the dictionary. (With every empty slot on feature 0, the backward's blocked per-feature sums gave
   that one feature all of them: 33 ms a step at GPT-2's shape on the H200, 0a6f244. Those sums now
   leave codes with a zero coefficient out of their sort, `scatter.sort_by_feature`, as the atomic
   route skips them, so the spread no longer matters to them; whether the sparse decode reads the
   empty slots' W_dec rows faster spread or all on feature 0 has not been measured.)
Exact whatever t is, when every row's survivors fit its buffer and at least B * k entries pass the
floor: then the batch's B * k largest are all survivors. Otherwise (t too high, a row with more than CAP
survivors or more kept codes than the codes' width, or a non-finite input, which the filter cannot
rank as the reference does) the launcher returns None after one host synchronisation
(`batchtopk.exact`: a capture's checkpoint takes the check instead), and the caller takes another
route; so does an estimate t <= 0 or NaN, which lets nothing through the filter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .batchtopk import exact
from .filter import (
    EMPTY_KEY,
    PRE_ACTIVATION_CHUNK,
    _append_survivors,
    center,
    filter_gemm,
    filter_tiles,
    key_value,
    pre_activation_chunks,
    tma_operand,
)
from .launch import INTERPRET, cdiv, matmul_dtype, may_synchronize, needs_tuning, next_power_of_2, tuned

# The filter keeps entries above (1 - FLOOR_MARGIN) x the estimate. In a Gaussian-like tail a small
# step in value is a large one in count (at GPT-2's k / F, 0.75 x the threshold passes 9x the codes, 0.9 x
# about 2.7x), so the margin is narrow: a batch whose threshold falls further below the estimate (early
# in training, when it moves fast) takes the caller's other route. As training goes on, entries pile up
# just below the threshold, unevenly across rows, and rows outgrow their SLOTS_PER_K x k slots though they
# keep few codes (docs/kernels.md: fp32 rerun of the benchmark's training at GPT-2's width, from step 20 on; by
# step 64 the fullest row held 432 entries within 10% of the estimate and 161 within 1%, keeping at most
# 48): per-row buffers are what limits this route in training, not the margin.
FLOOR_MARGIN = 0.1
# Survivors per row: SLOTS_PER_K x k buffer slots, at least MIN_SLOTS (a power of two); a row keeps k codes
# on average (their spread across rows is wider at small k), so the codes are CODES_PER_K x k wide.
SLOTS_PER_K = 8
MIN_SLOTS = 64
CODES_PER_K = 4
MAX_SLOTS = 2**25  # B x CAP buffer slots at most (256 MB of keys); larger batches take the other route
BINS = 2**16  # each pass's histogram: 16 bits of the survivors' values
# Fields of the int32 state the kernels share.
OVERFLOWED, CUT_HIGH, NEED_HIGH, CUT_LOW, NEED, OK, TOO_WIDE = (tl.constexpr(field) for field in range(7))


def buffer_slots(k: int, n_features: int) -> int:
    """Buffer slots per row (CAP)."""
    return next_power_of_2(min(n_features, max(MIN_SLOTS, SLOTS_PER_K * k)))


def codes_width(k: int, n_features: int) -> int:
    """The codes' width: a row keeping more codes than this is handed back."""
    return min(buffer_slots(k, n_features), next_power_of_2(CODES_PER_K * k))


@triton.jit
def _stream_filter_kernel(
    pre_ptr, stride_pm, n_rows, row0, F, floor_ptr, count_ptr, key_buf_ptr, cap,
    INLINE_PTX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Appends the entries of `pre` [n_rows, F] (the batch's rows row0 ..) above the floor to their
    rows' buffers, as the filter GEMM's epilogue does."""
    local = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = (local < n_rows)[:, None] & (cols < F)[None, :]
    pre = tl.load(pre_ptr + local.to(tl.int64)[:, None] * stride_pm + cols[None, :], mask=inside, other=float("-inf"))
    floor = tl.zeros([BLOCK_M, 1], dtype=tl.float32) + tl.load(floor_ptr)
    row_start = row0 + tl.program_id(0) * BLOCK_M
    _append_survivors(key_buf_ptr, count_ptr, row_start, (row0 + local)[:, None], cols[None, :], pre.to(tl.float32),
                      floor, cap, INLINE_PTX)  # fmt: skip


@triton.jit
def _sorted_survivors(key_ptr, count_ptr, rows, B, CAP: tl.constexpr):
    """(keys [BLOCK_M, CAP] as stored, present [BLOCK_M, CAP], the values' `_ordered` keys) of `rows`: a
    row's first min(count, CAP) slots hold its survivors."""
    valid = rows < B
    n = tl.minimum(tl.load(count_ptr + rows, mask=valid, other=0), CAP)
    slots = tl.arange(0, CAP)
    present = valid[:, None] & (slots[None, :] < n[:, None])
    keys = tl.load(key_ptr + rows.to(tl.int64)[:, None] * CAP + slots[None, :], mask=present, other=EMPTY_KEY)
    return keys, present, (keys >> 32).to(tl.int32)


@triton.jit
def _high(ordered):
    """The histogram bin of the first pass: the top 16 bits of an `_ordered` key, 0 .. BINS - 1."""
    return (ordered >> 16) + 32768


@triton.jit
def _threshold_key(state_ptr):
    """The `_ordered` key of the batch's (B * k)-th largest survivor, from both passes' bins."""
    return ((tl.load(state_ptr + CUT_HIGH) - 32768) << 16) | tl.load(state_ptr + CUT_LOW)


@triton.jit
def _sort_kernel(key_ptr, count_ptr, state_ptr, B, CAP: tl.constexpr, BLOCK_M: tl.constexpr):
    """Sorts each row's survivors in descending (value, feature) order in place (empty slots last), and
    counts the overflowed rows."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    keys, _, _ = _sorted_survivors(key_ptr, count_ptr, rows, B, CAP)
    keys = tl.sort(keys, dim=1, descending=True)
    tl.store(key_ptr + rows.to(tl.int64)[:, None] * CAP + tl.arange(0, CAP)[None, :], keys, mask=(rows < B)[:, None])
    overflowed = tl.load(count_ptr + rows, mask=rows < B, other=0) > CAP
    tl.atomic_add(state_ptr + OVERFLOWED, tl.sum(overflowed.to(tl.int32), axis=0), sem="relaxed")


@triton.jit
def _high_hist_kernel(key_ptr, count_ptr, hist_ptr, B, CAP: tl.constexpr, BLOCK_M: tl.constexpr, WINDOW: tl.constexpr):
    """The first pass's histogram (the survivors' 16 high bits). The program's own histogram over the
    WINDOW bins from its lowest (`tl.histogram`), then an atomic per bin it holds, and one per entry
    beyond the window: an atomic per entry queues the batch's survivors on the few bins they share
    (on the H200 at AlphaFold3's shape, 250 against 30 us)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    _, present, ordered = _sorted_survivors(key_ptr, count_ptr, rows, B, CAP)
    bins = _high(ordered)
    lowest = tl.min(tl.min(tl.where(present, bins, 65536), axis=1), axis=0)
    inside = present & (bins - lowest < WINDOW)
    local = tl.histogram(tl.reshape(tl.where(inside, bins - lowest, 0), [BLOCK_M * CAP]), WINDOW)
    window = tl.arange(0, WINDOW)
    local -= tl.sum(tl.sum((~inside).to(tl.int32), axis=1), axis=0) * (window == 0)  # those counted at bin 0
    tl.atomic_add(hist_ptr + lowest + window, local, mask=(local > 0) & (lowest + window < 65536), sem="relaxed")
    tl.atomic_add(hist_ptr + bins, 1, mask=present & ~inside, sem="relaxed")


@triton.jit
def _cut_bin_kernel(
    hist_ptr, state_ptr, finite_ptr, budget, BINS: tl.constexpr, BLOCK: tl.constexpr, SECOND: tl.constexpr
):
    """One program: the highest bin b with at least `budget` counts in bins >= b (the bin of the
    budget-th largest), and how many of b's entries are needed. The first pass (16 high bits of the
    survivors) writes CUT_HIGH (-1 when fewer than `budget` survived) and NEED_HIGH; the second (16 low
    bits of CUT_HIGH's members, budget NEED_HIGH) writes CUT_LOW and NEED (the entries equal to the
    threshold to keep) and whether the selection is exact (OK)."""
    if SECOND:
        budget = tl.load(state_ptr + NEED_HIGH)
    above = tl.zeros([], dtype=tl.int32)
    cut_bin = tl.full([], -1, dtype=tl.int32)
    need = tl.zeros([], dtype=tl.int32)
    lanes = tl.arange(0, BLOCK)
    for i in range(BINS // BLOCK):  # from the top bins down
        start = BINS - (i + 1) * BLOCK
        h = tl.load(hist_ptr + start + lanes)
        reaching = tl.cumsum(h, axis=0, reverse=True) + above  # counts in bins >= start + lane
        n_reach = tl.sum((reaching >= budget).to(tl.int32), axis=0)  # a prefix of the lanes
        last = n_reach - 1
        above_last = tl.sum(tl.where(lanes == last, reaching - h, 0), axis=0)
        first_found = (cut_bin < 0) & (n_reach > 0)
        cut_bin = tl.where(first_found, start + last, cut_bin)
        need = tl.where(first_found, budget - above_last, need)
        above += tl.sum(h, axis=0)
    if SECOND:
        tl.store(state_ptr + CUT_LOW, cut_bin)
        tl.store(state_ptr + NEED, need)
        ok = (
            (tl.load(state_ptr + CUT_HIGH) >= 0)
            & (tl.load(state_ptr + OVERFLOWED) == 0)
            & (tl.load(finite_ptr) != 0)
        )  # fmt: skip
        tl.store(state_ptr + OK, ok.to(tl.int32))
    else:
        tl.store(state_ptr + CUT_HIGH, cut_bin)
        tl.store(state_ptr + NEED_HIGH, need)


@triton.jit
def _low_hist_kernel(key_ptr, count_ptr, state_ptr, hist_ptr, B, CAP: tl.constexpr, BLOCK_M: tl.constexpr):
    """The second pass's histogram: the low 16 bits of the survivors in bin CUT_HIGH. A program whose
    members all share their low bits (16-bit pre-activations: all zero) adds them in one atomic, where
    an atomic per entry would queue every program's on one address."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    _, present, ordered = _sorted_survivors(key_ptr, count_ptr, rows, B, CAP)
    member = present & (_high(ordered) == tl.load(state_ptr + CUT_HIGH))
    low = ordered & 0xFFFF
    n = tl.sum(tl.sum(member.to(tl.int32), axis=1), axis=0)
    lowest = tl.min(tl.min(tl.where(member, low, 65536), axis=1), axis=0)
    highest = tl.max(tl.max(tl.where(member, low, -1), axis=1), axis=0)
    if lowest == highest:
        tl.atomic_add(hist_ptr + lowest, n, sem="relaxed")
    elif n > 0:
        tl.atomic_add(hist_ptr + low, 1, mask=member, sem="relaxed")


@triton.jit
def _tied_kernel(key_ptr, count_ptr, state_ptr, tied_ptr, B, CAP: tl.constexpr, BLOCK_M: tl.constexpr):
    """Each row's count of survivors equal to the threshold."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    _, present, ordered = _sorted_survivors(key_ptr, count_ptr, rows, B, CAP)
    tied = tl.sum((present & (ordered == _threshold_key(state_ptr))).to(tl.int32), axis=1)
    tl.store(tied_ptr + rows, tied, mask=rows < B)


@triton.jit
def _codes_kernel(
    key_ptr, count_ptr, state_ptr, tied_before_ptr, vals_ptr, idx_ptr, B, F,
    CAP: tl.constexpr, WIDTH: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Each row's codes [WIDTH]: its survivors above the threshold, and of those equal to it the first
    NEED of the batch (earlier rows first, then within a row larger features: the sorted order); value
    0 after them (the kept ones are a prefix of the sorted row), on feature (row x WIDTH + slot) mod F.
    Counts the rows that keep more than WIDTH."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    keys, present, ordered = _sorted_survivors(key_ptr, count_ptr, rows, B, CAP)
    threshold = _threshold_key(state_ptr)
    tied = present & (ordered == threshold)
    tied_before = tl.load(tied_before_ptr + rows, mask=rows < B, other=0)  # in the rows before this one
    tied_taken = tl.maximum(tl.load(state_ptr + NEED) - tied_before, 0)
    tie_rank = tl.cumsum(tied.to(tl.int32), axis=1) - 1
    kept = (present & (ordered > threshold)) | (tied & (tie_rank < tied_taken[:, None]))
    too_wide = tl.sum((tl.sum(kept.to(tl.int32), axis=1) > WIDTH).to(tl.int32), axis=0)
    tl.atomic_add(state_ptr + TOO_WIDE, too_wide, sem="relaxed")
    values = tl.where(kept, tl.maximum(key_value(keys), 0.0), 0.0)
    slots = tl.arange(0, CAP)
    out = rows.to(tl.int64)[:, None] * WIDTH + slots[None, :]
    features = tl.where(kept, (keys & 0xFFFFFFFF).to(tl.int32), (out % F).to(tl.int32))
    written = (rows < B)[:, None] & (slots < WIDTH)[None, :]
    tl.store(vals_ptr + out, values.to(vals_ptr.dtype.element_ty), mask=written)
    tl.store(idx_ptr + out, features, mask=written)


def routes(k: int, n_features: int) -> list[tuple[str, dict]]:
    """The filter's candidates for the tuner: the filter GEMM's tiles, and the streaming pass over cuBLAS
    row chunks (("chunks", tile))."""
    cap = buffer_slots(k, n_features)
    gemm = [("gemm", dict(tile, CAP=cap, AUX_CAP=1)) for tile in filter_tiles(INTERPRET)]
    tiles = [(16, 64)] if INTERPRET else [(8, 512), (16, 256), (4, 1024)]
    return [("chunks", dict(BLOCK_M=m, BLOCK_N=n, CAP=cap)) for m, n in tiles] + gemm


def threshold_first_codes(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int, threshold: Tensor,
    route: tuple[str, dict] | None = None,
) -> tuple[Tensor, Tensor] | None:  # fmt: skip
    """(vals [B, w] in W_enc's dtype, idx [B, w] int32, w = `codes_width`): the batch's B * k largest
    codes, each row's sorted by value (then feature) in descending order, value 0 after them (on
    the features the module docstring says); or None where this route cannot answer exactly (the
    module docstring; one host synchronisation). `threshold`: a 0-dim estimate of the batch's
    threshold on x's device. `route` (one of `routes`) bypasses the tuner."""
    B, D = x.shape
    F = W_enc.shape[1]
    cap = buffer_slots(k, F)
    if B * cap > MAX_SLOTS:
        return None
    key = ("batchtopk_filter", D, F, B, k, x.dtype, W_enc.dtype)
    candidates = routes(k, F) if route is None else [route]
    # The tuner times the routes on this call's filter. Without a positive estimate (a training SAE's
    # first batch) that filter keeps nothing, and the route fastest at keeping nothing need not be the
    # fastest at keeping B x k: such a call hands the batch back before any work (one host read, on the
    # first call for a shape only).
    if needs_tuning(key, candidates) and not (may_synchronize(threshold) and float(threshold) > 0):
        return None
    floor = torch.where(threshold > 0, threshold.float() * (1 - FLOOR_MARGIN), float("inf")).reshape(1)
    count = x.new_empty(B, dtype=torch.int32)
    key_buf = x.new_empty(B, cap, dtype=torch.int64)

    def run(candidate: tuple[str, dict]) -> None:
        name, cfg = candidate
        count.zero_()
        if name == "gemm":
            xc = center(x, b_dec, matmul_dtype(W_enc.dtype))
            floors = floor.expand(B).contiguous()  # the epilogue reads a threshold per row
            filter_gemm(xc, tma_operand(W_enc), b_enc, floors, count, key_buf, None, None, cfg)
            return
        rows_per_chunk = max(1, PRE_ACTIVATION_CHUNK // F)
        for rows, pre in pre_activation_chunks(x, W_enc, b_enc, b_dec, rows_per_chunk, None):
            grid = (cdiv(pre.shape[0], cfg["BLOCK_M"]), cdiv(F, cfg["BLOCK_N"]))
            _stream_filter_kernel[grid](
                pre, pre.stride(0), pre.shape[0], rows.start, F, floor, count, key_buf, cap,
                INLINE_PTX=not INTERPRET, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=4,
            )  # fmt: skip

    run(tuned(key, candidates, run))
    return _select(key_buf, count, B * k, codes_width(k, F), F, torch.isfinite(x).all(), W_enc.dtype)


def _select(
    key_buf: Tensor, count: Tensor, budget: int, width: int, n_features: int, finite: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor] | None:
    """Steps 2-4 over the filled buffers; None where the selection is not exact."""
    B, cap = key_buf.shape
    block_m = max(1, 1024 // cap)
    grid = (cdiv(B, block_m),)
    rows = dict(B=B, CAP=cap, BLOCK_M=block_m, num_warps=4)
    state = count.new_zeros(8)
    hists = count.new_zeros(2, BINS)
    finite = finite.to(torch.int32).reshape(1)
    # One row a program sorts fastest (H200, 256 slots: 79 us at AlphaFold3's shape, 154 with four).
    _sort_kernel[(B,)](key_buf, count, state, B, CAP=cap, BLOCK_M=1, num_warps=max(1, min(8, cap // 128)))
    _high_hist_kernel[grid](key_buf, count, hists[0], **rows, WINDOW=256)
    cut = dict(BINS=BINS, BLOCK=8192, num_warps=16)
    _cut_bin_kernel[(1,)](hists[0], state, finite, budget, **cut, SECOND=False)
    _low_hist_kernel[grid](key_buf, count, state, hists[1], **rows)
    _cut_bin_kernel[(1,)](hists[1], state, finite, budget, **cut, SECOND=True)
    tied = count.new_empty(B)
    _tied_kernel[grid](key_buf, count, state, tied, **rows)
    tied_before = torch.cumsum(tied, 0, dtype=torch.int32) - tied
    vals = key_buf.new_empty(B, width, dtype=dtype)
    idx = key_buf.new_empty(B, width, dtype=torch.int32)
    _codes_kernel[grid](key_buf, count, state, tied_before, vals, idx, F=n_features, WIDTH=width, **rows)
    if not exact((state[OK.value] == 0) | (state[TOO_WIDE.value] != 0)):
        return None
    return vals, idx
