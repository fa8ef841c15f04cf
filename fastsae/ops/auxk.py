"""The dense AuxK path's selection (`functional.auxk_reconstruction`): the indices of the k largest
entries of each row of its pre-activations over the dead features, [B, n] with n up to MAX_ROW.

torch.topk takes several multi-block radix passes over the whole matrix (about 0.17 ms of a captured
training step at the GPT-2 shape on the H200, k_aux = 384 of 1232 columns, and 0.29 ms at AlphaFold3's,
192 of 824). Here a program of four warps holds one row in registers (up to 16 entries a thread) and
sets the row's k-th largest order-preserving integer key bit by bit from the top (16 rounds for bf16:
a compare and a row sum each), then writes the indices of the entries above it and of the ties at it
that complete k (found with one scan). Ties go to the larger index, as the fused encode's AuxK stream
breaks them; NaN counts as -inf. The indices are in no particular order (the caller scatters the codes
back by index).

Measured on the H200 (bf16, one call on Gaussian rows): 134 us against torch.topk's 183 at the GPT-2
shape (8192 rows of 1232) and 141 against 289 at AlphaFold3's (16384 rows of 824). One warp a row (64
entries a thread, 168 registers) took 262 and 245, eight warps 148 and 163: fewer registers a thread
keep more rows in flight until the cross-warp sums of each round dominate. Counting the keys that reach
three candidates per round (two bits at a time, half the rounds) was slower at every shape, and rows
longer than MAX_ROW are slower than torch.topk (Llama-8B's 6560 dead features, k = 2048: 474 against
299 us with eight warps).

Off by default: inside the captured training step it did not win. The benchmark then silenced its dead
features with an encoder bias of -1e4 (-8 since), which rounds their bf16 pre-activations to one value:
every entry of every row tied. With the ties then completed by rounds over the column bits (26 rounds in
all) it took 163 us a step at GPT-2 (an AuxK list of 1600) and 325 at AlphaFold3 (1024), against
torch.topk's kernels at about 175 and 300; one scan completes them now (not yet timed on the H200).
FASTSAE_AUXK_ROW_TOPK=1 (read at import) makes `functional.auxk_reconstruction` use it on CUDA for
bf16, fp16 and fp32 rows.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .filter import _ordered
from .launch import cdiv, next_power_of_2

ROW_TOPK = os.environ.get("FASTSAE_AUXK_ROW_TOPK") == "1"
MAX_ROW = 2048  # longest row (16 entries a thread of four warps); longer ones measured faster in torch.topk
WARPS = 4
PROGRAM_ELEMENTS = 1024  # shorter rows are taken several to a program, up to this many entries
# Low bits of the fp32 order keys that are zero (positives) or one (negatives) in every value of a dtype.
KEY_SHIFT = {torch.bfloat16: 16, torch.float16: 13, torch.float32: 0}


@triton.jit
def _largest_reaching(keys, present, k, BITS: tl.constexpr):
    """Per row of uint32 `keys` [BLOCK_M, N] below 2^BITS where `present`: the largest t with at least k
    present keys >= t (the k-th largest key), set bit by bit from the top: BITS rounds of a compare and
    a row sum, with no bounds to carry and no test for an early exit (filter._kth_largest's bisection,
    whose loop condition is one more reduction a round, measured slower here)."""
    t = tl.zeros([keys.shape[0]], dtype=tl.uint32)
    for bit in tl.static_range(BITS - 1, -1, -1):
        candidate = t | (1 << bit)
        t = tl.where(tl.sum((present & (keys >= candidate[:, None])).to(tl.int32), axis=1) >= k, candidate, t)
    return t


@triton.jit
def _row_topk_kernel(
    pre_ptr, idx_ptr, B, n, k, stride_pm, stride_pn, stride_im,
    KEY_SHIFT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows64 = rows.to(tl.int64)[:, None]
    cols = tl.arange(0, BLOCK_N)[None, :]
    present = (rows < B)[:, None] & (cols < n)
    values = tl.load(pre_ptr + rows64 * stride_pm + cols * stride_pn, mask=present, other=float("-inf"))
    values = values.to(tl.float32)
    # Unsigned keys of 32 - KEY_SHIFT bits in the values' order: the signed `_ordered` key shifted, then
    # offset by half its range (a wrapping add in uint32).
    signed = _ordered(tl.where(values == values, values, float("-inf"))) >> KEY_SHIFT
    keys = signed.to(tl.uint32, bitcast=True) + (1 << (31 - KEY_SHIFT))
    kth = _largest_reaching(keys, present, k, 32 - KEY_SHIFT)
    greater = present & (keys > kth[:, None])
    tied = present & (keys == kth[:, None])
    need = k - tl.sum(greater.to(tl.int32), axis=1)
    # Among the ties, the `need` of largest index: those with at most `need` tied entries at or after
    # them (one scan, where rounds over the column bits cost as many cross-warp sums as the bits).
    tied_from_here = tl.cumsum(tied.to(tl.int32), axis=1, reverse=True)
    win = greater | (tied & (tied_from_here <= need[:, None]))
    position = tl.cumsum(win.to(tl.int32), axis=1) - 1
    tl.store(idx_ptr + rows64 * stride_im + position, cols.to(tl.int64) + tl.zeros_like(rows64), mask=win)


def row_tile(n: int) -> dict:
    """The launch configuration for rows of n <= MAX_ROW entries: rows per program, padded row length, warps."""
    block_n = next_power_of_2(n)
    return dict(BLOCK_M=max(1, PROGRAM_ELEMENTS // block_n), BLOCK_N=block_n, num_warps=WARPS)


def row_topk_indices(pre: Tensor, k: int) -> Tensor:
    """int64 [B, k]: the indices of each row's k largest entries of `pre` [B, n] (float32 / bfloat16 /
    float16, any strides, 1 <= k <= n <= MAX_ROW), in no particular order; ties to the larger index."""
    B, n = pre.shape
    if not 1 <= k <= n <= MAX_ROW:
        raise ValueError(f"row_topk_indices takes 1 <= k <= n <= {MAX_ROW}, got k={k}, n={n}")
    idx = pre.new_empty(B, k, dtype=torch.int64)
    tile = row_tile(n)
    _row_topk_kernel[(cdiv(B, tile["BLOCK_M"]),)](
        pre, idx, B, n, k, pre.stride(0), pre.stride(1), idx.stride(0), KEY_SHIFT=KEY_SHIFT[pre.dtype], **tile
    )  # fmt: skip
    return idx
