"""Sparse decode: x_hat[b] = sum_j vals[b, j] * W_dec[idx[b, j]] (+ b_dec)   (`reference.decode_sparse`).

vals/idx [B, k], W_dec [F, d], b_dec [d] -> x_hat [B, d] in W_dec's dtype. A program owns BLOCK_M
tokens and BLOCK_D output dimensions; for each CODES_TILE of the k codes at once it gathers BLOCK_M x
CODES_TILE decoder row segments (contiguous BLOCK_D elements each) and accumulates in fp32. Only B*k*d
elements of W_dec are read, against B*F*d for a dense decode.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import reference
from .launch import bucket, cdiv, next_power_of_2, tuned
from .scatter import feature_sums


@triton.jit
def _codes_to_read(vals_ptr, rows64, row_valid, K, stride_vm, stride_vk, CODES_READ: tl.constexpr):
    """1 + the last code with a nonzero value in any of the program's rows (0 if none): the codes after
    it contribute nothing, so the loop over codes stops there. BatchTopK's sparse codes are each row's
    candidates with the batch's kept ones first and zeros after them (three quarters of the codes);
    TopK's are nonzero up to k, so this costs them one more read of their values."""
    last = tl.zeros([], dtype=tl.int32)
    for j0 in range(0, K, CODES_READ):
        codes = j0 + tl.arange(0, CODES_READ)
        mask = row_valid[:, None] & (codes < K)[None, :]
        v = tl.load(vals_ptr + rows64[:, None] * stride_vm + codes[None, :] * stride_vk, mask=mask, other=0.0)
        last = tl.maximum(last, tl.max(tl.max(tl.where(v != 0, codes[None, :] + 1, 0), axis=1), axis=0))
    return last


@triton.jit
def _decode_sparse_fwd_kernel(
    vals_ptr, idx_ptr, w_ptr, b_dec_ptr, out_ptr,
    B, K, D, F,
    stride_vm, stride_vk, stride_im, stride_ik, stride_wf, stride_wd, stride_om, stride_od,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, CODES_TILE: tl.constexpr,
    CODES_READ: tl.constexpr,
):  # fmt: skip
    # CODES_TILE codes' gathers at once, [BLOCK_M, CODES_TILE, BLOCK_D]: more loads in flight a program
    # than one code's BLOCK_M rows (sparsify's decode gathers all k codes of a token at once).
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_valid, dim_valid = rows < B, dims < D
    rows64 = rows.to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_codes = _codes_to_read(vals_ptr, rows64, row_valid, K, stride_vm, stride_vk, CODES_READ)
    for j0 in range(0, n_codes, CODES_TILE):
        codes = j0 + tl.arange(0, CODES_TILE)
        pair_valid = row_valid[:, None] & (codes < n_codes)[None, :]  # [BLOCK_M, CODES_TILE]
        v = tl.load(vals_ptr + rows64[:, None] * stride_vm + codes[None, :] * stride_vk, mask=pair_valid, other=0.0)
        v = v.to(tl.float32)
        f = tl.load(idx_ptr + rows64[:, None] * stride_im + codes[None, :] * stride_ik, mask=pair_valid, other=0)
        f = f.to(tl.int64)
        # An index outside [0, F) contributes nothing instead of reading out of bounds.
        gather = pair_valid & (f >= 0) & (f < F) & (v != 0.0)
        w = tl.load(
            w_ptr + f[:, :, None] * stride_wf + dims[None, None, :] * stride_wd,
            mask=gather[:, :, None] & dim_valid[None, None, :],
            other=0.0,
        ).to(tl.float32)  # [BLOCK_M, CODES_TILE, BLOCK_D]
        acc += tl.sum(v[:, :, None] * w, axis=1)
    if HAS_BIAS:
        acc += tl.load(b_dec_ptr + dims, mask=dim_valid, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows64[:, None] * stride_om + dims[None, :] * stride_od
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & dim_valid[None, :])


CODES_READ = 64  # codes' values a decode program reads at once to find where its codes end (`_codes_to_read`)
# Tiles of one code at a time, then of several codes' gathers at once (CODES_TILE), then of one token's
# codes over a wide slice of its row, as sparsify's decode reads them (whole decoder rows, contiguous), for
# the tuner. The multi-code tiles hold 4096 gathered entries per 4 warps: at 8192 per 4 warps ptxas took
# all 255 registers a thread (BLOCK_D = 128 spilled 352-360 bytes), mostly the gathers' 64-bit addresses.
_DECODE_CANDIDATES = [
    dict(BLOCK_M=m, BLOCK_D=d, CODES_TILE=c, num_warps=w)
    for m, d, c, w in [(16, 256, 1, 4), (32, 128, 1, 4), (64, 128, 1, 8), (8, 512, 1, 4)]
    + [(8, 128, 4, 4), (4, 128, 8, 4), (4, 256, 4, 4), (2, 256, 8, 4), (8, 256, 4, 8), (4, 256, 8, 8)]
    + [(1, 1024, 4, 4), (1, 1024, 8, 8), (1, 512, 8, 4), (1, 256, 16, 4)]
]


def decode_sparse(vals: Tensor, idx: Tensor, W_dec: Tensor, b_dec: Tensor | None, tile: dict | None = None) -> Tensor:
    """Sparse decode; same contract as `reference.decode_sparse` (arguments checked by
    `fastsae.functional.decode_sparse`). Codes with value 0 skip their gather. `tile`: one of
    `_DECODE_CANDIDATES` instead of the tuner's pick."""
    if W_dec.dtype == torch.float64:
        return reference.decode_sparse(vals, idx, W_dec, b_dec)
    B, K = vals.shape
    F, D = W_dec.shape
    b_dec = None if b_dec is None else b_dec.contiguous()  # the kernel reads it with unit stride
    out = vals.new_empty(B, D, dtype=W_dec.dtype)

    def run(cfg: dict) -> None:
        grid = (cdiv(B, cfg["BLOCK_M"]), cdiv(D, cfg["BLOCK_D"]))
        _decode_sparse_fwd_kernel[grid](
            vals, idx, W_dec, b_dec if b_dec is not None else W_dec, out,
            B, K, D, F,
            vals.stride(0), vals.stride(1), idx.stride(0), idx.stride(1),
            W_dec.stride(0), W_dec.stride(1), out.stride(0), out.stride(1),
            HAS_BIAS=b_dec is not None, CODES_READ=min(CODES_READ, next_power_of_2(K)), **cfg,
        )  # fmt: skip

    if tile is None:
        tile = tuned(("decode_sparse", D, F, bucket(B), bucket(K), W_dec.dtype), _DECODE_CANDIDATES, run)
    run(tile)
    return out


# ---------------------------------------------------------------------------------------------------
# Backward: d vals = d x_hat . W_dec[idx] (a gathered dot per code); dW_dec = per-feature sums (scatter.py)


@triton.jit
def _decode_sparse_bwd_vals_kernel(
    grad_ptr, idx_ptr, w_ptr, dvals_ptr, vals_ptr, grad_vals_ptr,
    B, K, D, F,
    stride_gm, stride_gd, stride_im, stride_ik, stride_wf, stride_wd, stride_dm, stride_dk,
    stride_vm, stride_vk, stride_gvm, stride_gvk,
    COEF: tl.constexpr, FIRED_ONLY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, CODES: tl.constexpr,
    CODES_TILE: tl.constexpr,
):  # fmt: skip
    # Program (i, c) owns tokens block i and their codes c * CODES ... (c + 1) * CODES - 1: splitting the
    # codes as well as the tokens puts more gathers in flight (one program per token block ran its k
    # dependent gathers in turn: 141 us per step at the GPT-2 shape on the H200, twice the forward's time
    # for the same gathered bytes). It takes CODES_TILE of them at once, a [BLOCK_M, CODES_TILE, BLOCK_D]
    # gather of decoder rows, and sums each code's products across the threads once, after the last
    # BLOCK_D slice of the row, not once per slice. COEF: writes the encoder's coefficients instead,
    # where(vals > 0, d vals + grad_vals, 0) (the ReLU's mask), from the fp32 sums. FIRED_ONLY: d vals of
    # codes whose value is not > 0 are 0. Under either, those codes' decoder rows are not gathered, and a
    # tile of codes none of which fired skips the loop over d (BatchTopK's candidates the batch did not
    # keep: three quarters of its codes).
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < B
    rows64 = rows.to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    first_code = tl.program_id(1) * CODES
    last_code = tl.minimum(first_code + CODES, K)
    for j0 in range(first_code, last_code, CODES_TILE):
        codes = j0 + tl.arange(0, CODES_TILE)
        pair_valid = row_valid[:, None] & (codes < last_code)[None, :]  # [BLOCK_M, CODES_TILE]
        f = tl.load(idx_ptr + rows64[:, None] * stride_im + codes[None, :] * stride_ik, mask=pair_valid, other=0)
        f = f.to(tl.int64)
        gather = pair_valid & (f >= 0) & (f < F)
        code_offsets = rows64[:, None] * stride_vm + codes[None, :] * stride_vk
        d_end = D
        if COEF or FIRED_ONLY:
            fired = tl.load(vals_ptr + code_offsets, mask=pair_valid, other=0.0) > 0
            gather = gather & fired
            d_end = tl.where(tl.max(tl.max(fired.to(tl.int32), axis=1), axis=0) > 0, D, 0)
        acc = tl.zeros([BLOCK_M, CODES_TILE, BLOCK_D], dtype=tl.float32)
        for d0 in range(0, d_end, BLOCK_D):
            dim_valid = (d0 + dims) < D
            g = tl.load(
                grad_ptr + rows64[:, None] * stride_gm + (d0 + dims)[None, :] * stride_gd,
                mask=row_valid[:, None] & dim_valid[None, :],
                other=0.0,
            ).to(tl.float32)  # [BLOCK_M, BLOCK_D], from L1/L2 after the first codes
            w = tl.load(
                w_ptr + f[:, :, None] * stride_wf + (d0 + dims)[None, None, :] * stride_wd,
                mask=gather[:, :, None] & dim_valid[None, None, :],
                other=0.0,
            ).to(tl.float32)  # [BLOCK_M, CODES_TILE, BLOCK_D]
            acc += g[:, None, :] * w
        dvals = tl.sum(acc, axis=2)
        if COEF:
            grad_vals = tl.load(
                grad_vals_ptr + rows64[:, None] * stride_gvm + codes[None, :] * stride_gvk, mask=pair_valid, other=0.0
            ).to(tl.float32)
            dvals = tl.where(fired, dvals + grad_vals, 0.0)
        elif FIRED_ONLY:
            dvals = tl.where(fired, dvals, 0.0)  # 0 even where d x_hat is not finite
        tl.store(
            dvals_ptr + rows64[:, None] * stride_dm + codes[None, :] * stride_dk,
            dvals.to(dvals_ptr.dtype.element_ty),
            mask=pair_valid,
        )


# Codes gathered at once by a d vals program (CODES_TILE) in the candidates beside those of one code at a
# time; 1 leaves only those (a switch for bench.ab_step). On the H200 the tuner picked a 4-code tile at
# AF3 and GPT-2: captured SAEAdam step 1.644 -> 1.632 ms and 1.833 -> 1.818 ms.
DVALS_CODES_TILE = 4


def _dvals_candidates() -> list[dict]:
    one_code = [
        dict(BLOCK_M=m, BLOCK_D=d, CODES=c, CODES_TILE=1, num_warps=w)
        for m, d, c, w in [(32, 128, 64, 4), (16, 256, 64, 4), (64, 64, 64, 4), (32, 128, 4, 4), (16, 256, 8, 4)]
        + [(64, 128, 2, 8)]
    ]
    if DVALS_CODES_TILE == 1:
        return one_code
    tile = DVALS_CODES_TILE
    return one_code + [
        dict(BLOCK_M=m, BLOCK_D=d, CODES=c * tile, CODES_TILE=tile, num_warps=w)
        for m, d, c, w in [(8, 128, 2, 4), (16, 128, 2, 4), (8, 128, 8, 4), (16, 64, 8, 4), (32, 64, 2, 8)]
    ]


def decode_sparse_backward(
    grad_out: Tensor, vals: Tensor, idx: Tensor, W_dec: Tensor, fired_only: bool = False
) -> tuple[Tensor, Tensor]:
    """(d vals, dW_dec) of the sparse decode; same contract as `reference.decode_sparse_backward`.
    dW_dec comes from `scatter.feature_sums`: deterministic when torch's deterministic algorithms are on."""
    if W_dec.dtype == torch.float64:
        return reference.decode_sparse_backward(grad_out, vals, idx, W_dec, fired_only)
    dW_dec = feature_sums(grad_out, vals, idx, W_dec.shape[0], dtype=W_dec.dtype).out
    return sparse_dvals(grad_out, vals, idx, W_dec, fired_only=fired_only), dW_dec


def sparse_dvals(
    grad_out: Tensor, vals: Tensor, idx: Tensor, W_dec: Tensor, tile: dict | None = None,
    grad_vals: Tensor | None = None, fired_only: bool = False,
) -> Tensor:  # fmt: skip
    """d vals[b, j] = grad_out[b] . W_dec[idx[b, j]] -> [B, K] in vals' dtype; `tile`: one of
    `_dvals_candidates()` instead of the tuner's pick. Given `grad_vals` [B, K], the TopK encode's
    coefficients instead: where(vals > 0, d vals + grad_vals, 0), summed in fp32 before the rounding.
    `fired_only`: where(vals > 0, d vals, 0), for codes that are ReLU outputs whose gradient the
    encoder's backward masks anyway (`reference.decode_sparse_backward`)."""
    B, K = vals.shape
    F, D = W_dec.shape
    dvals = vals.new_empty(B, K)
    coef = grad_vals is not None
    grad_vals = grad_vals if coef else vals  # any [B, K] tensor when not read

    def run(cfg: dict) -> None:
        _decode_sparse_bwd_vals_kernel[(cdiv(B, cfg["BLOCK_M"]), cdiv(K, cfg["CODES"]))](
            grad_out, idx, W_dec, dvals, vals, grad_vals,
            B, K, D, F,
            grad_out.stride(0), grad_out.stride(1), idx.stride(0), idx.stride(1),
            W_dec.stride(0), W_dec.stride(1), dvals.stride(0), dvals.stride(1),
            vals.stride(0), vals.stride(1), grad_vals.stride(0), grad_vals.stride(1),
            COEF=coef, FIRED_ONLY=fired_only, **cfg,
        )  # fmt: skip

    if tile is None:
        key = ("decode_sparse_bwd_vals", D, F, bucket(B), bucket(K), W_dec.dtype, coef or fired_only)
        tile = tuned(key, _dvals_candidates(), run)
    run(tile)
    return dvals
