"""Sparse decode: x_hat[b] = sum_j vals[b, j] * W_dec[idx[b, j]] (+ b_dec)   (`reference.decode_sparse`).

vals/idx [B, k], W_dec [F, d], b_dec [d] -> x_hat [B, d] in W_dec's dtype. A program owns BLOCK_M
tokens and BLOCK_D output dimensions; for each of the k codes it gathers BLOCK_M decoder row
segments (contiguous BLOCK_D elements each) and accumulates in fp32. Only B*k*d elements of W_dec
are read, against B*F*d for a dense decode.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import reference
from .launch import bucket, tuned


@triton.jit
def _decode_sparse_fwd_kernel(
    vals_ptr, idx_ptr, w_ptr, b_dec_ptr, out_ptr,
    B, K, D, F,
    stride_vm, stride_vk, stride_im, stride_ik, stride_wf, stride_wd, stride_om, stride_od,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_valid, dim_valid = rows < B, dims < D
    rows64 = rows.to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for j in range(0, K):
        v = tl.load(vals_ptr + rows64 * stride_vm + j * stride_vk, mask=row_valid, other=0.0).to(tl.float32)
        f = tl.load(idx_ptr + rows64 * stride_im + j * stride_ik, mask=row_valid, other=0).to(tl.int64)
        # An index outside [0, F) contributes nothing instead of reading out of bounds.
        gather = row_valid & (f >= 0) & (f < F) & (v != 0.0)
        w = tl.load(
            w_ptr + f[:, None] * stride_wf + dims[None, :] * stride_wd,
            mask=gather[:, None] & dim_valid[None, :],
            other=0.0,
        ).to(tl.float32)  # [BLOCK_M, BLOCK_D]
        acc += v[:, None] * w
    if HAS_BIAS:
        acc += tl.load(b_dec_ptr + dims, mask=dim_valid, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows64[:, None] * stride_om + dims[None, :] * stride_od
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & dim_valid[None, :])


_DECODE_CANDIDATES = [
    dict(BLOCK_M=m, BLOCK_D=d, num_warps=w) for m, d, w in [(16, 256, 4), (32, 128, 4), (64, 128, 8), (8, 512, 4)]
]


def decode_sparse(vals: Tensor, idx: Tensor, W_dec: Tensor, b_dec: Tensor | None) -> Tensor:
    """Sparse decode; same contract as `reference.decode_sparse` (arguments checked by
    `fastsae.functional.decode_sparse`). Codes with value 0 skip their gather."""
    if W_dec.dtype == torch.float64:
        return reference.decode_sparse(vals, idx, W_dec, b_dec)
    B, K = vals.shape
    F, D = W_dec.shape
    b_dec = None if b_dec is None else b_dec.contiguous()  # the kernel reads it with unit stride
    out = vals.new_empty(B, D, dtype=W_dec.dtype)

    def run(cfg: dict) -> None:
        grid = (triton.cdiv(B, cfg["BLOCK_M"]), triton.cdiv(D, cfg["BLOCK_D"]))
        _decode_sparse_fwd_kernel[grid](
            vals, idx, W_dec, b_dec if b_dec is not None else W_dec, out,
            B, K, D, F,
            vals.stride(0), vals.stride(1), idx.stride(0), idx.stride(1),
            W_dec.stride(0), W_dec.stride(1), out.stride(0), out.stride(1),
            HAS_BIAS=b_dec is not None, **cfg,
        )  # fmt: skip

    run(tuned(("decode_sparse", D, F, bucket(B), bucket(K), W_dec.dtype), _DECODE_CANDIDATES, run))
    return out
