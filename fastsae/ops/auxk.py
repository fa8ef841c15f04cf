"""The dense AuxK path's selection (`functional.auxk_reconstruction`): each row's k largest entries of
its pre-activations over the dead features, [B, n] with n up to MAX_ROW, as indices or straight as the
dense codes the path decodes.

torch.topk takes several multi-block radix passes over the whole matrix (about 0.17 ms of a captured
training step at the GPT-2 shape on the H200, k_aux = 384 of 1232 columns, and 0.29 ms at AlphaFold3's,
192 of 824). Here a program of one to four warps holds one row in registers (about 16 entries a
thread) and sets the row's k-th largest order-preserving integer key bit by bit from the top (16 rounds
for bf16: a compare and a row sum each), then takes the entries above it and the ties at it that
complete k (found with one scan). Ties go to the larger index, as the fused encode's AuxK stream breaks
them; NaN counts as -inf. It writes either the indices (in no particular order) or the codes: the ReLU
of each selected entry in its column and zeros elsewhere, which spares the dense path the gather, the
fill and the scatter that turn indices into codes.

Measured on the H200 (bf16, one call on Gaussian rows): 134 us against torch.topk's 183 at the GPT-2
shape (8192 rows of 1232) and 141 against 289 at AlphaFold3's (16384 rows of 824). Counting the keys
that reach three candidates per round (two bits at a time, half the rounds) was slower at every shape,
and rows longer than MAX_ROW are slower than torch.topk (Llama-8B's 6560 dead features, k = 2048: 474
against 299 us with eight warps). Inside the captured training step (SAEAdam, 5% of the features dead,
their bf16 values spread over each row), indices then torch's scatter: 2.199 against 2.251 ms a step
with torch.topk at GPT-2, 2.193 against 2.273 at AlphaFold3 (dc0b2c6).

Writing the codes, at the captured step's list lengths (e1b5c40, `do_bench`, Gaussian rows with the
list's padding at -inf; torch.topk alone 210 / 301 us): with four warps a row and the values live
through the rounds, 88.9 us at GPT-2 (8192 rows of 1600, k = 384) and 89.7 at AlphaFold3 (16384 of
1024, k = 192); with only the keys live (the winners' values loaded again for the codes), 82.5 / 81.3
at 16 entries a thread (four / two warps), 86.2 / 79.7 at 32, 99.6 / 92.0 at 8. Two or four rows a
program were slower at every warp count (94-217 us).

On by default for bf16, fp16 and fp32 rows on CUDA; FASTSAE_AUXK_ROW_TOPK=0 (read at import) keeps
torch.topk.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .filter import _ordered
from .launch import cdiv, next_power_of_2

ROW_TOPK = os.environ.get("FASTSAE_AUXK_ROW_TOPK", "1") == "1"
MAX_ROW = 2048  # longest row (16 entries a thread of four warps); longer ones measured faster in torch.topk
ENTRIES_PER_THREAD = 16
# `row_topk_codes` writes a row's ReLU without selecting where each row of the program has at most k
# positive entries and no NaN (`_row_topk_kernel`'s SHORTCUT; exact, and a program that must select pays
# only the count). Captured SAEAdam step on the H200, off -> on: 1.462 -> 1.395 ms at AlphaFold3's shape,
# 1.693 -> 1.619 at GPT-2's (bd19299). In that benchmark every dead feature's pre-activations are negative
# (bench/bench_train.py gives them a bias of -8), so every row takes it: the figures are its best case.
# In training it takes the rows whose dead features mostly sit below 0, as features that stopped firing
# tend to; where they do not, the step is the "off" figure.
CODES_WITHOUT_SELECTION = True
# Measured slower and removed: the k-th largest key of a row that a program holds alone by a radix select
# (tl.histogram of 4 or 8 bits a round among the keys matching the digits set so far) in place of
# `_largest_reaching`'s 16 bitwise rounds. Captured SAEAdam step on the H200 with every row selecting
# (CODES_WITHOUT_SELECTION off), bitwise / 4 / 8 bits a round: 1.432 / 1.464 / 1.508 ms at AlphaFold3's
# shape, 1.666 / 1.700 / 1.740 at GPT-2's (e0f787e).
PROGRAM_ELEMENTS = 1024  # shorter rows are taken several to a program, up to this many entries
# Low bits of the fp32 order keys that are zero (positives) or one (negatives) in every value of a dtype.
KEY_SHIFT = {torch.bfloat16: 16, torch.float16: 13, torch.float32: 0}


@triton.jit
def _largest_reaching(keys, k, BITS: tl.constexpr):
    """Per row of uint32 `keys` [BLOCK_M, N] below 2^BITS: the largest t >= 1 with at least k keys >= t
    (the k-th largest key; keys of 0 never count), set bit by bit from the top: BITS rounds of a compare
    and a row sum, with no bounds to carry and no test for an early exit (filter._kth_largest's
    bisection, whose loop condition is one more reduction a round, measured slower here)."""
    t = tl.zeros([keys.shape[0]], dtype=tl.uint32)
    for bit in tl.static_range(BITS - 1, -1, -1):
        candidate = t | (1 << bit)
        t = tl.where(tl.sum((keys >= candidate[:, None]).to(tl.int32), axis=1) >= k, candidate, t)
    return t


@triton.jit
def _winners(values, present, k, KEY_SHIFT: tl.constexpr):
    """bool [BLOCK_M, BLOCK_N]: each row's k largest `values` where `present` (ties to the larger index,
    NaN as -inf)."""
    # Unsigned keys of 32 - KEY_SHIFT bits in the values' order: the signed `_ordered` key shifted, then
    # offset by half its range (a wrapping add in uint32), NaN as -inf. -inf's key is above 0, so
    # entries outside the row get key 0 and the rounds need no mask. The codes load the winners' values
    # again (from L2) rather than keep them live through the rounds: measured faster (module docstring).
    signed = _ordered(tl.where(values == values, values, float("-inf"))) >> KEY_SHIFT
    keys = tl.where(present, signed.to(tl.uint32, bitcast=True) + (1 << (31 - KEY_SHIFT)), 0)
    kth = _largest_reaching(keys, k, 32 - KEY_SHIFT)
    # kth is 0 only in rows past B (no key reaches 1): their entries, all at key 0, must not tie.
    greater = keys > kth[:, None]
    tied = (keys == kth[:, None]) & (kth > 0)[:, None]
    need = k - tl.sum(greater.to(tl.int32), axis=1)
    # Among the ties, the `need` of largest index: those with at most `need` tied entries at or after
    # them (one scan, where rounds over the column bits cost as many cross-warp sums as the bits).
    tied_from_here = tl.cumsum(tied.to(tl.int32), axis=1, reverse=True)
    return greater | (tied & (tied_from_here <= need[:, None]))


@triton.jit
def _row_topk_kernel(
    pre_ptr, out_ptr, B, n, n_out, k, stride_pm, stride_pn, stride_om,
    KEY_SHIFT: tl.constexpr, WRITE_CODES: tl.constexpr, SHORTCUT: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Per row of `pre` [B, n]: the indices of its k largest entries into `out` [B, k], or with
    WRITE_CODES the dense codes [B, n_out] (each selected entry's ReLU in its column, zeros elsewhere,
    columns n to n_out included). SHORTCUT (codes only): a program whose rows each hold at most k
    positive entries and no NaN writes their ReLU without selecting: every positive entry is among the
    k largest, and the entries that complete k have codes of 0 whichever they are."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows64 = rows.to(tl.int64)[:, None]
    cols = tl.arange(0, BLOCK_N)[None, :]
    present = (rows < B)[:, None] & (cols < n)
    values = tl.load(pre_ptr + rows64 * stride_pm + cols * stride_pn, mask=present, other=float("-inf"))
    values = values.to(tl.float32)
    if WRITE_CODES:
        written = (rows < B)[:, None] & (cols < n_out)
        codes = tl.where(values > 0, values, 0.0)  # the shortcut's (a program with a NaN selects)
        select = True
        if SHORTCUT:
            most_positive = tl.max(tl.sum((values > 0).to(tl.int32), axis=1), axis=0)
            nans = tl.sum(tl.sum((values != values).to(tl.int32), axis=1), axis=0)
            select = (most_positive > k) | (nans > 0)
        if select:
            win = _winners(values, present, k, KEY_SHIFT)
            values = tl.load(pre_ptr + rows64 * stride_pm + cols * stride_pn, mask=win, other=0.0).to(tl.float32)
            codes = tl.where(values < 0, 0.0, values)  # torch.relu's: NaN stays, -inf is 0
        tl.store(out_ptr + rows64 * stride_om + cols, codes.to(out_ptr.dtype.element_ty), mask=written)
    else:
        win = _winners(values, present, k, KEY_SHIFT)
        position = tl.cumsum(win.to(tl.int32), axis=1) - 1
        tl.store(out_ptr + rows64 * stride_om + position, cols.to(tl.int64) + tl.zeros_like(rows64), mask=win)


def row_tile(n: int) -> dict:
    """The launch configuration for rows of n <= MAX_ROW entries: rows per program, padded row length, and
    warps for about ENTRIES_PER_THREAD entries a thread (at most four)."""
    block_n = next_power_of_2(n)
    block_m = max(1, PROGRAM_ELEMENTS // block_n)
    warps = min(4, max(1, block_m * block_n // (32 * ENTRIES_PER_THREAD)))
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)


def row_topk_indices(pre: Tensor, k: int) -> Tensor:
    """int64 [B, k]: the indices of each row's k largest entries of `pre` [B, n] (float32 / bfloat16 /
    float16, any strides, 1 <= k <= n <= MAX_ROW), in no particular order; ties to the larger index."""
    B, n = pre.shape
    _check_row(n, k)
    idx = pre.new_empty(B, k, dtype=torch.int64)
    _launch(pre, idx, n, k, write_codes=False)
    return idx


def row_topk_codes(pre: Tensor, n: int, k: int, dtype: torch.dtype) -> Tensor:
    """Dense codes [B, n_out] in `dtype` from `pre` [B, n_out] (float32 / bfloat16 / float16, any
    strides): in each row, the ReLU of its k largest entries among the first n columns (1 <= k <= n <=
    MAX_ROW) in their columns, zeros elsewhere. The same codes as scattering the ReLU of
    `row_topk_indices(pre[:, :n], k)`'s entries into zeros, without the indices, the gather, the fill
    and the scatter in between."""
    B, n_out = pre.shape
    _check_row(n, k)
    if not n <= n_out <= MAX_ROW:
        raise ValueError(f"row_topk_codes takes n <= n_out <= {MAX_ROW}, got n={n}, n_out={n_out}")
    codes = pre.new_empty(B, n_out, dtype=dtype)
    _launch(pre, codes, n, k, write_codes=True)
    return codes


def _check_row(n: int, k: int) -> None:
    if not 1 <= k <= n <= MAX_ROW:
        raise ValueError(f"row top-k takes 1 <= k <= n <= {MAX_ROW}, got k={k}, n={n}")


def _launch(pre: Tensor, out: Tensor, n: int, k: int, write_codes: bool) -> None:
    B, n_out = pre.shape
    tile = row_tile(n_out)
    _row_topk_kernel[(cdiv(B, tile["BLOCK_M"]),)](
        pre, out, B, n, n_out, k, pre.stride(0), pre.stride(1), out.stride(0),
        KEY_SHIFT=KEY_SHIFT[pre.dtype], WRITE_CODES=write_codes, SHORTCUT=CODES_WITHOUT_SELECTION, **tile,
    )  # fmt: skip
