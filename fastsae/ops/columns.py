"""Column sums of a [B, n] matrix in fp32 (`column_sums`), and the AuxK backward's masked variant that
also zeroes, in place, the entries whose code is not positive (`masked_column_sums_`).

torch's column reduction of a bf16 [B, n] matrix (`t.sum(0, dtype=torch.float32)`) took 20-32 us a
call inside the captured training step on the H200 at AlphaFold3's shape (16384 x 384: 12.6 MB, about
3 us of HBM time), and the step makes four: the column means of the loss's two targets, d b_dec's sum
of the reconstruction's gradient and AuxK's d b_enc. Here each program sums a fixed range of rows over
BLOCK_N columns into its own row of partial sums, which torch then adds (a few hundred rows): the same
inputs give the same bits, with no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import cdiv, sm_count

# A program owns BLOCK_N columns (256 contiguous bytes of a bf16 row) and loads BLOCK_M rows of them a
# loop iteration: 8 entries a thread of WARPS warps, with 48 registers a thread (71 masked) on sm_90,
# where 32 rows took 128 (248) for their 64-bit addresses. PROGRAMS_PER_SM keeps reads in flight.
BLOCK_M = 16
BLOCK_N = 128
WARPS = 8
PROGRAMS_PER_SM = 8


@triton.jit
def _column_sums_kernel(
    values_ptr, codes_ptr, partial_ptr, B, n, rows_per_program, stride_vm, stride_vn, stride_cm, stride_cn,
    MASKED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    first = tl.program_id(0) * rows_per_program
    end = tl.minimum(first + rows_per_program, B)
    sums = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(first, end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        mask = (rows < end)[:, None] & (cols < n)[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        values = tl.load(values_ptr + rows64 * stride_vm + cols[None, :] * stride_vn, mask=mask, other=0.0)
        if MASKED:  # the ReLU's and the top-k's mask, as torch's threshold_backward takes it
            codes = tl.load(codes_ptr + rows64 * stride_cm + cols[None, :] * stride_cn, mask=mask, other=0.0)
            values = tl.where(codes > 0, values, 0.0)
            tl.store(
                values_ptr + rows64 * stride_vm + cols[None, :] * stride_vn,
                values.to(values_ptr.dtype.element_ty),
                mask=mask,
            )
        sums += values.to(tl.float32)
    tl.store(partial_ptr + tl.program_id(0).to(tl.int64) * n + cols, tl.sum(sums, axis=0), mask=cols < n)


def column_sums(values: Tensor) -> Tensor:
    """fp32 [n]: the sums over the rows of `values` [B, n] (fp32 / bf16 / fp16, any strides)."""
    return _column_sums(values, None)


def masked_column_sums_(values: Tensor, codes: Tensor) -> Tensor:
    """In place on `values` [B, n]: zero the entries where `codes` [B, n] is not positive (NaN included);
    returns the fp32 [n] sums over the rows of the result. Any strides (`values` writable: no overlaps)."""
    if codes.shape != values.shape:
        raise ValueError(f"codes {tuple(codes.shape)} and values {tuple(values.shape)} differ in shape")
    return _column_sums(values, codes)


def _column_sums(values: Tensor, codes: Tensor | None) -> Tensor:
    B, n = values.shape
    if B == 0:
        return values.new_zeros(n, dtype=torch.float32)
    column_blocks = cdiv(n, BLOCK_N)
    # Enough programs to fill the GPU, each a whole number of BLOCK_M rows; the split depends on the
    # shape and the device alone, so the order of every sum does too.
    splits = max(1, min(cdiv(B, BLOCK_M), cdiv(PROGRAMS_PER_SM * sm_count(values.device), column_blocks)))
    rows_per_program = cdiv(cdiv(B, splits), BLOCK_M) * BLOCK_M
    partial = values.new_empty(cdiv(B, rows_per_program), n, dtype=torch.float32)
    _column_sums_kernel[(partial.shape[0], column_blocks)](
        values, values if codes is None else codes, partial, B, n, rows_per_program,
        *values.stride(), *(values if codes is None else codes).stride(),
        MASKED=codes is not None, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=WARPS,
    )  # fmt: skip
    return partial.sum(0)
