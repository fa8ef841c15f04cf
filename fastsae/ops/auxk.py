"""The dense AuxK path's selection (`functional.auxk_reconstruction`): the indices of the k largest
entries of each row of its pre-activations over the dead features, [B, n] with n up to MAX_ROW.

torch.topk takes several multi-block radix passes over the whole matrix (about 0.19 ms of a captured
training step at the GPT-2 shape on the H200, k_aux = 384 of 2048 columns: a sixth of what AuxK costs).
Here each program holds whole rows in registers and finds each row's k-th largest by bisection on
order-preserving integer keys (16-bit keys for bf16 inputs: at most 16 rounds of a compare and a row
sum), then writes the indices of the entries above it and of the ties at it that complete k. Ties go to
the larger index, as the fused encode's AuxK stream breaks them; NaN counts as -inf. The indices are in
no particular order (the caller scatters the codes back by index).

A row of up to ROW_ELEMENTS entries is one warp's, so that each round's row sum is a few shuffles with
no barrier. Experimental, off by default: it has not beaten torch.topk yet. Per captured GPT-2 step on
the H200 (8192 rows of 1600 columns, k = 384), eight warps sharing two rows took 217 us and a warp per
row 178 us, against torch.topk's 155 us. FASTSAE_AUXK_ROW_TOPK=1 (read at import) makes
`functional.auxk_reconstruction` use it on CUDA for bf16, fp16 and fp32 rows.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .filter import _kth_largest, _ordered
from .launch import cdiv, next_power_of_2

ROW_TOPK = os.environ.get("FASTSAE_AUXK_ROW_TOPK") == "1"
ROW_ELEMENTS = 2048  # entries per warp (64 per thread): shorter rows are taken several to a warp
MAX_ROW = 8 * ROW_ELEMENTS  # longer rows than one warp holds are shared by up to 8 warps
# Low bits of the fp32 order keys that are zero (positives) or one (negatives) in every value of a dtype.
KEY_SHIFT = {torch.bfloat16: 16, torch.float16: 13, torch.float32: 0}


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
    keys = _ordered(tl.where(values == values, values, float("-inf"))) >> KEY_SHIFT
    kth = _kth_largest(keys, present, k)
    greater = present & (keys > kth[:, None])
    tied = present & (keys == kth[:, None])
    need = k - tl.sum(greater.to(tl.int32), axis=1)
    # Among the ties, the `need` largest indices (none when the bound fell between two keys: no ties).
    cut = _kth_largest(cols + tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32), tied, need)
    win = greater | (tied & (cols >= cut[:, None]))
    position = tl.cumsum(win.to(tl.int32), axis=1) - 1
    tl.store(idx_ptr + rows64 * stride_im + position, cols.to(tl.int64) + tl.zeros_like(rows64), mask=win)


def row_tile(n: int) -> dict:
    """The launch configuration for rows of n entries: rows per program, padded row length, warps."""
    block_n = next_power_of_2(n)
    return dict(BLOCK_M=max(1, ROW_ELEMENTS // block_n), BLOCK_N=block_n, num_warps=max(1, block_n // ROW_ELEMENTS))


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
