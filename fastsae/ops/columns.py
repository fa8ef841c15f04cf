"""Column sums of a training step's [B, n] matrices in fp32, in two launches whose order of addition
depends only on the shape and the device (the same inputs give the same bits, with no atomics):

- `column_sums(values, scale)`: scale * the sum over the rows, e.g. the column means of x that the
  FVU's deviations subtract and d b_dec's sum of d x_hat over the tokens;
- `masked_column_sums_(values, codes)`: the dense AuxK backward's, which first zeroes, in place, the
  entries of the gradient that reaches its pre-activations where the code is not positive (the ReLU's
  and the top-k's mask), and sums the result (d b_enc over the dead features).

Each program of the first launch sums a fixed range of rows over BLOCK_N columns into its own row of
partial sums; the second adds those rows (a few hundred) column by column. In torch the masked sums are
a compare, a multiply and a column reduction: 13 + 43 + 16 us a step inside the captured GPT-2 step on
the H200 (8192 x 1232 bf16), 9 + 61 + 22 at AlphaFold3's (16384 x 824); and torch's column reduction of
a bf16 [16384, 384] matrix (AlphaFold3's x and d x_hat) took 23-25 us, about 0.5 TB/s, three times a
step. These launches took 57 + 12 us for the captured AlphaFold3 step's four column sums, against
109 us before (b071ab0), and 52 + 10 us at GPT-2's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import cdiv, sm_count

# A program owns BLOCK_N columns (256 contiguous bytes of a bf16 row) and loads BLOCK_M rows of them a
# loop iteration, with WARPS warps and PROGRAMS_PER_SM programs per SM to keep reads in flight. The
# masked sums load two matrices and store one: 8 entries a thread, 72 registers a thread on sm_90 (32
# rows took 138). The plain sums load one: 32 entries a thread, 16 KB a program in flight, 128
# registers a thread. (Separate names, so that `python -m bench.ab_step` can time other values.)
BLOCK_N = 128
WARPS = 8
MASKED_BLOCK_M = 16
MASKED_PROGRAMS_PER_SM = 8
PLAIN_BLOCK_M = 64
PLAIN_PROGRAMS_PER_SM = 4
# The second launch: a program adds PARTIAL_ROWS rows of PARTIAL_COLUMNS partial sums at a time.
PARTIAL_ROWS = 64
PARTIAL_COLUMNS = 64


@triton.jit
def _column_sums_kernel(
    values_ptr, codes_ptr, partial_ptr, B, n, rows_per_program, stride_vm, stride_vn, stride_cm, stride_cn,
    MASKED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    first = tl.program_id(0) * rows_per_program
    end = tl.minimum(first + rows_per_program, B)
    local = tl.arange(0, BLOCK_M)[:, None]
    # 32-bit offsets within a tile, from 64-bit row pointers advanced a tile at a time
    value_offsets = local * stride_vm + cols[None, :] * stride_vn
    code_offsets = local * stride_cm + cols[None, :] * stride_cn
    values_row = values_ptr + first.to(tl.int64) * stride_vm
    codes_row = codes_ptr + first.to(tl.int64) * stride_cm
    sums = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(first, end, BLOCK_M):
        mask = (start + local < end) & (cols < n)[None, :]
        values = tl.load(values_row + value_offsets, mask=mask, other=0.0)
        if MASKED:
            codes = tl.load(codes_row + code_offsets, mask=mask, other=0.0)
            values = tl.where(codes > 0, values, 0.0)  # as torch's threshold_backward masks
            tl.store(values_row + value_offsets, values.to(values_ptr.dtype.element_ty), mask=mask)
            codes_row += BLOCK_M * stride_cm
        sums += values.to(tl.float32)
        values_row += BLOCK_M * stride_vm
    tl.store(partial_ptr + tl.program_id(0).to(tl.int64) * n + cols, tl.sum(sums, axis=0), mask=cols < n)


@triton.jit
def _add_partial_sums_kernel(
    partial_ptr, out_ptr, P, n, scale, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr
):  # fmt: skip
    """out[c] = scale * the sum of partial [P, n]'s column c, in a fixed order."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    local = tl.arange(0, BLOCK_P)[:, None]
    sums = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for start in range(0, P, BLOCK_P):
        mask = (start + local < P) & (cols < n)[None, :]
        sums += tl.load(partial_ptr + (start + local) * n + cols[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + cols, tl.sum(sums, axis=0) * scale, mask=cols < n)


def column_sums(values: Tensor, scale: float = 1.0) -> Tensor:
    """fp32 [n]: `scale` times the sums over the rows of `values` [B, n] (any strides, any float dtype)."""
    return _column_sums(values, None, scale)


def masked_column_sums_(values: Tensor, codes: Tensor) -> Tensor:
    """In place on `values` [B, n]: zero the entries where `codes` [B, n] is not positive (NaN included);
    returns the fp32 [n] sums over the rows of the result. Any strides (`values` writable: no overlaps)."""
    if codes.shape != values.shape:
        raise ValueError(f"codes {tuple(codes.shape)} and values {tuple(values.shape)} differ in shape")
    return _column_sums(values, codes, 1.0)


def _column_sums(values: Tensor, codes: Tensor | None, scale: float) -> Tensor:
    if values.dim() != 2:
        raise ValueError(f"column sums take a [rows, columns] matrix, got shape {tuple(values.shape)}")
    B, n = values.shape
    if B == 0 or n == 0:  # (a captured step's AuxK list may have no entries: no dead feature yet)
        return values.new_zeros(n, dtype=torch.float32)
    block_m, per_sm = (
        (PLAIN_BLOCK_M, PLAIN_PROGRAMS_PER_SM) if codes is None else (MASKED_BLOCK_M, MASKED_PROGRAMS_PER_SM)
    )
    column_blocks = cdiv(n, BLOCK_N)
    # Enough programs to fill the GPU, each a whole number of BLOCK_M rows; the split depends on the
    # shape and the device alone, so the order of every sum does too.
    programs = per_sm * sm_count(values.device)
    splits = max(1, min(cdiv(B, block_m), cdiv(programs, column_blocks)))
    rows_per_program = cdiv(cdiv(B, splits), block_m) * block_m
    partial = values.new_empty(cdiv(B, rows_per_program), n, dtype=torch.float32)
    codes_arg, code_strides = (values, (0, 0)) if codes is None else (codes, codes.stride())  # unread unmasked
    _column_sums_kernel[(partial.shape[0], column_blocks)](
        values, codes_arg, partial, B, n, rows_per_program, *values.stride(), *code_strides,
        MASKED=codes is not None, BLOCK_M=block_m, BLOCK_N=BLOCK_N, num_warps=WARPS,
    )  # fmt: skip
    sums = values.new_empty(n, dtype=torch.float32)
    _add_partial_sums_kernel[(cdiv(n, PARTIAL_COLUMNS),)](
        partial, sums, partial.shape[0], n, scale, BLOCK_P=PARTIAL_ROWS, BLOCK_N=PARTIAL_COLUMNS, num_warps=4
    )  # fmt: skip
    return sums
