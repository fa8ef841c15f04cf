"""Per-feature sums over sparse codes: the weight gradients of a TopK SAE without a dense [B, F] matrix.

    out[f]      = sum over (b, j) with idx[b, j] == f of coef[b, j] * (rows[b] - center)     [F, d]
    coef_sum[f] = sum over the same (b, j) of coef[b, j]                                      [F], fp32

summed in fp32 and returned in the dtype the caller asks for (the weight's), or transposed ([d, F]).

dW_dec is this with rows = d x_hat and coef = vals; dW_enc^T (and d b_enc) with rows = x, center =
b_dec and coef = d vals masked by the ReLU (`reference.decode_sparse_backward`,
`reference.encode_topk_backward`). Two implementations:
- blocked: the codes are sorted by feature (CSR); one program per (BLOCK_F features, d block) sums
  its features' codes in a fixed order with tensor-core products and writes the output once, in its
  final dtype and layout ([F, d] or [d, F]: no fp32 buffer, no transposing copy), so results are
  bit-identical from run to run;
- atomic: one program per (token block, d block) adds each code's contribution to its feature's row
  of a zeroed fp32 buffer with atomics (no sort; the order of the additions varies between runs),
  cast (and transposed) in one copy after.
The blocked route runs when `torch.are_deterministic_algorithms_enabled()`, and otherwise where it
measured faster. On the H200 (bf16, a whole TopK training step with AuxK, fused optimizer) it took
34.2 ms against the atomic route's 42.9 at the Llama-8B shape (F * d = 2^29: filling, casting and
transposing the fp32 buffer dominate there) and 7.07 against 7.29 at GPT-2 (2^24.2); at AlphaFold3
(2^22.6), whose features have few codes each, 2.38 against 2.50 in the captured step with SAEAdam once
the two sums shared one sort (8.77 against 7.99 before). BLOCKED_FROM_OUTPUT_ELEMENTS sits below that.
(A third route, one program per feature summing on CUDA cores, measured slower than the
blocked one at all three.) ROUTE, from the environment variable FASTSAE_FEATURE_SUMS ("auto", the
default, "atomic" or "blocked"; read at import), overrides the choice.

Two sums over the same codes (a TopK step's dW_dec and dW_enc) share one sort (`sort_by_feature`). Sums
computed apart for a few features (AuxK's dense gradients over the dead ones) are added to theirs before
the output is written (`extra`): on the blocked route in the kernel's epilogue, where an index_add_ into
the finished [d, F] gradient scattered single elements across F (0.8 ms per Llama-8B step on the H200).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import bucket, cdiv, dot_dtype, input_precision, tuned

ROUTE = os.environ.get("FASTSAE_FEATURE_SUMS", "auto")
if ROUTE not in ("auto", "atomic", "blocked"):
    raise ValueError(f"FASTSAE_FEATURE_SUMS must be 'auto', 'atomic' or 'blocked', got {ROUTE!r}")
BLOCKED_FROM_OUTPUT_ELEMENTS = 2**22  # F * d from which "auto" takes the blocked route

# Tile configurations the tuner times for each route. Blocked: BLOCK_F features x BLOCK_D dimensions per
# program, BLOCK_E codes per step of its loop, not software-pipelined (num_stages=1). On the H200 (bf16,
# dW_enc^T from 32 codes a token) 16 features a program without pipelining took 125-132 us a call at the
# GPT-2 shape, 123 at AlphaFold3 and 1.03-1.16 ms at Llama-8B, against 198, 194 and 1506 for 32 x 32 x
# 128 with Triton's default three stages (175 for that tile with one stage): more, smaller programs in
# flight balance features of uneven code counts, and pipelining bought nothing for loads whose addresses
# come from the codes loaded in the same step while it cost registers (128 a thread at 32 x 32 x 128
# against 87 at 16 x 32 x 128 unpipelined, sm_90). Loading the next step's codes and rows before this
# step's product by hand did not help either. Wider tiles (64 x 32 x 256 and 64 x 64 x 128, 8 warps)
# measured no faster before.
# Atomic: BLOCK_M tokens x BLOCK_D dimensions per program.
_BLOCKED_CANDIDATES = [
    dict(BLOCK_F=16, BLOCK_E=e, BLOCK_D=bd, num_warps=w, num_stages=1)
    for e, bd, w in [(32, 128, 4), (32, 256, 4), (16, 128, 4), (32, 128, 2)]
]
_ATOMIC_CANDIDATES = [
    dict(BLOCK_M=m, BLOCK_D=bd, num_warps=w) for m, bd, w in [(32, 128, 4), (16, 256, 4), (64, 128, 8)]
]


@triton.jit
def _feature_sum_atomic_kernel(
    rows_ptr, center_ptr, coef_ptr, idx_ptr, out_ptr, coef_sum_ptr,
    B, K, D, stride_rm, stride_rd,
    HAS_CENTER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    tokens = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    token_valid, dim_valid = tokens < B, dims < D
    tokens64 = tokens.to(tl.int64)
    rows = tl.load(
        rows_ptr + tokens64[:, None] * stride_rm + dims[None, :] * stride_rd,
        mask=token_valid[:, None] & dim_valid[None, :],
        other=0.0,
    ).to(tl.float32)  # [BLOCK_M, BLOCK_D], loaded once for all k codes of these tokens
    if HAS_CENTER:
        rows = rows - tl.load(center_ptr + dims, mask=dim_valid, other=0.0).to(tl.float32)[None, :]
    for j in range(0, K):
        coef = tl.load(coef_ptr + tokens64 * K + j, mask=token_valid, other=0.0).to(tl.float32)
        feature = tl.load(idx_ptr + tokens64 * K + j, mask=token_valid, other=0).to(tl.int64)
        live = token_valid & (coef != 0.0)  # codes that did not fire add nothing: skip their atomics
        tl.atomic_add(
            out_ptr + feature[:, None] * D + dims[None, :],
            coef[:, None] * rows,
            mask=live[:, None] & dim_valid[None, :],
            sem="relaxed",
        )
        if tl.program_id(1) == 0:
            tl.atomic_add(coef_sum_ptr + feature, coef, mask=live, sem="relaxed")


@triton.jit
def _feature_sum_blocked_kernel(
    rows_ptr, center_ptr, coef_ptr, order_ptr, token_ptr, feature_ptr, offsets_ptr, out_ptr, coef_sum_ptr,
    extra_slot_ptr, extra_rows_ptr, extra_sums_ptr, weight_ptr, weighted_ptr,
    F, D, stride_rm, stride_rd, stride_of, stride_od, stride_xm, stride_xd, stride_wd, stride_wf,
    HAS_CENTER: tl.constexpr, HAS_EXTRA: tl.constexpr, HAS_EXTRA_SUMS: tl.constexpr, WEIGHTED: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_F: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # BLOCK_F consecutive features own one contiguous run of the CSR codes. Each chunk of BLOCK_E codes
    # is a [BLOCK_F, BLOCK_E] matrix holding each code's coefficient in its feature's row (one entry
    # per column) times the codes' gathered rows [BLOCK_E, BLOCK_D]: a tensor-core product adds every
    # code to its feature's sum. The rows are centred in fp32 before they meet the product's dtype, as
    # the encoder kernels centre theirs (subtracting sum(coef) * center after would cancel when the
    # rows sit far from 0 and near the centre). WEIGHTED: weighted [feature block, its dims] = the block's
    # share of weight @ coef sums (every program of a feature block has its coef sums whole).
    first = tl.program_id(0) * BLOCK_F
    features = first + tl.arange(0, BLOCK_F)
    feature_valid = features < F
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dim_valid = dims < D
    start = tl.load(offsets_ptr + first)
    end = tl.load(offsets_ptr + tl.minimum(first + BLOCK_F, F))
    if HAS_CENTER:
        center = tl.load(center_ptr + dims, mask=dim_valid, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_F, BLOCK_D], dtype=tl.float32)
    coef_total = tl.zeros([BLOCK_F], dtype=tl.float32)
    for e0 in range(start, end, BLOCK_E):
        entries = e0 + tl.arange(0, BLOCK_E)
        valid = entries < end
        # each code's coefficient read where the caller wrote it, through the sort's order (no gather of
        # coef into CSR order first: a launch on the backward's critical path)
        code = tl.load(order_ptr + entries, mask=valid, other=0)
        coef = tl.load(coef_ptr + code, mask=valid, other=0.0).to(tl.float32)
        token = tl.load(token_ptr + entries, mask=valid, other=0).to(tl.int64)
        feature = tl.load(feature_ptr + entries, mask=valid, other=-1)
        spread = tl.where(feature[None, :] == features[:, None], coef[None, :], 0.0)  # [BLOCK_F, BLOCK_E]
        rows = tl.load(
            rows_ptr + token[:, None] * stride_rm + dims[None, :] * stride_rd,
            mask=valid[:, None] & dim_valid[None, :],
            other=0.0,
        ).to(tl.float32)  # [BLOCK_E, BLOCK_D]
        if HAS_CENTER:
            rows = tl.where(valid[:, None], rows - center[None, :], 0.0)
        acc = tl.dot(spread.to(DOT_DTYPE), rows.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)
        coef_total += tl.sum(spread, axis=1)
    if HAS_EXTRA:  # the sums computed apart, at their features' slots (-1: none)
        slot = tl.load(extra_slot_ptr + features, mask=feature_valid, other=-1)
        has_extra = slot >= 0
        extra = extra_rows_ptr + slot.to(tl.int64)[:, None] * stride_xm + dims[None, :] * stride_xd
        acc += tl.load(extra, mask=has_extra[:, None] & dim_valid[None, :], other=0.0).to(tl.float32)
        if HAS_EXTRA_SUMS:
            coef_total += tl.load(extra_sums_ptr + slot, mask=has_extra, other=0.0).to(tl.float32)
    out = out_ptr + features.to(tl.int64)[:, None] * stride_of + dims[None, :] * stride_od
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=feature_valid[:, None] & dim_valid[None, :])
    if tl.program_id(1) == 0:
        tl.store(coef_sum_ptr + features, coef_total, mask=feature_valid)
    if WEIGHTED:
        weight = weight_ptr + dims.to(tl.int64)[None, :] * stride_wd + features[:, None] * stride_wf
        w = tl.load(weight, mask=feature_valid[:, None] & dim_valid[None, :], other=0.0).to(tl.float32)
        weighted = weighted_ptr + tl.program_id(0).to(tl.int64) * D + dims
        tl.store(weighted, tl.sum(w * coef_total[:, None], axis=0), mask=dim_valid)


class FeatureSums(NamedTuple):
    out: Tensor  # [F, d] in the asked dtype, or [d, F] when transposed
    coef_sum: Tensor  # [F] fp32
    weighted: Tensor | None = None  # [d] fp32: weight @ coef_sum, where a weight was given


class CodesByFeature(NamedTuple):
    """Codes [B, K] in CSR order (by feature, then by token), as the blocked route reads them."""

    order: Tensor  # [B * K] int64: the flat code at each sorted position
    offsets: Tensor  # [F + 1]: each feature's first sorted position
    tokens: Tensor  # [B * K] int32: each sorted code's token
    features: Tensor  # [B * K] int32: each sorted code's feature


def sort_by_feature(idx: Tensor, n_features: int, coef: Tensor | None = None) -> CodesByFeature:
    """The codes idx [B, K] sorted by feature (stable: by token within a feature). Each feature's first
    code is found by binary search (torch.bincount would size its output from the largest index: a host
    sync, which a captured CUDA graph cannot hold). (One Triton launch in place of the searchsorted,
    division and two casts after the sort measured slower on the H200: 60 us for its binary searches,
    captured SAEAdam step 1.613 -> 1.631 ms at AlphaFold3's shape, level at GPT-2's; 4197cff.)
    With `coef` [B, K], the codes whose coefficient is 0 sort after every feature (key F: in no feature's
    range), so the sums skip them: they add nothing, and a BatchTopK step's codes are mostly such (each
    row's candidates that the batch did not keep, value 0)."""
    flat_idx = idx.flatten()
    if coef is not None:
        flat_idx = torch.where(coef.flatten() != 0, flat_idx, n_features)
    if n_features < torch.iinfo(torch.int16).max:  # 16-bit keys: half the radix sort's passes of 32-bit ones
        flat_idx = flat_idx.to(torch.int16)
    sorted_idx, order = torch.sort(flat_idx, stable=True)
    features = torch.arange(n_features + 1, device=idx.device, dtype=sorted_idx.dtype)
    offsets = torch.searchsorted(sorted_idx, features)
    return CodesByFeature(order, offsets, (order // idx.shape[1]).to(torch.int32), sorted_idx.to(torch.int32))


def route(n_features: int, d: int) -> str:
    """The route `feature_sums` takes for an [F, d] output: "blocked" or "atomic"."""
    if torch.are_deterministic_algorithms_enabled():
        return "blocked"
    if ROUTE == "auto":
        return "blocked" if n_features * d >= BLOCKED_FROM_OUTPUT_ELEMENTS else "atomic"
    return ROUTE


def feature_sums(
    rows: Tensor,
    coef: Tensor,
    idx: Tensor,
    n_features: int,
    center: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    transposed: bool = False,
    by_feature: CodesByFeature | None = None,
    extra: tuple[Tensor, Tensor, Tensor | None] | None = None,
    extra_slots: Tensor | None = None,
    weight: Tensor | None = None,
) -> FeatureSums:
    """(out, coef_sum [F] in fp32) as defined in the module docstring; out is [F, d] in `dtype`,
    or its transpose [d, F] (contiguous) when `transposed`. rows [B, d]; coef, idx [B, K]; center [d] or
    None. `by_feature`: `sort_by_feature(idx, F)`, when the caller shares it between sums (the blocked
    route sorts otherwise, leaving out the codes whose coef is 0, as the atomic route skips them).
    `extra` = (features [n] int64, distinct where >= 0, negative entries none; their rows [n, d]; their
    coef sums [n] or None): added to those features' sums. `extra_slots`: `slots(features, F)`, when
    the caller shares it between sums. `weight` [d, F]: FeatureSums.weighted =
    weight @ coef_sum in fp32, on the blocked route from the same launch's epilogue (per feature block,
    added after in a fixed order), on the atomic route by `weighted_sums` after it."""
    B, d = rows.shape
    K = idx.shape[1]
    coef, idx = coef.contiguous(), idx.contiguous()
    center_arg = center.contiguous() if center is not None else rows  # the kernels read it with unit stride
    coef_sum = rows.new_empty(n_features, dtype=torch.float32)
    if weight is not None and weight.shape != (d, n_features):
        raise ValueError(f"weight must be [d, F] = {(d, n_features)}, got {tuple(weight.shape)}")
    if route(n_features, d) == "blocked":
        codes = by_feature if by_feature is not None else sort_by_feature(idx, n_features, coef)
        out = rows.new_empty((d, n_features) if transposed else (n_features, d), dtype=dtype)
        out_f = out.t() if transposed else out  # [F, d] view: the kernel writes either layout directly
        if extra is not None:
            extra_features, extra_rows, extra_sums = extra
            extra_slot = slots(extra_features, n_features) if extra_slots is None else extra_slots
        else:
            extra_slot, extra_rows, extra_sums = coef_sum, rows, None  # placeholders the kernel never reads

        weighted_parts = coef_sum  # [feature blocks, d] where `weight` is given (a placeholder otherwise)
        weight_arg = coef_sum[None, :] if weight is None else weight

        def run(cfg: dict) -> None:
            nonlocal weighted_parts
            grid = (cdiv(n_features, cfg["BLOCK_F"]), cdiv(d, cfg["BLOCK_D"]))
            if weight is not None:
                weighted_parts = rows.new_empty(grid[0], d, dtype=torch.float32)
            _feature_sum_blocked_kernel[grid](
                rows, center_arg, coef, codes.order, codes.tokens, codes.features, codes.offsets, out_f, coef_sum,
                extra_slot, extra_rows, coef_sum if extra_sums is None else extra_sums, weight_arg, weighted_parts,
                n_features, d, rows.stride(0), rows.stride(1), out_f.stride(0), out_f.stride(1),
                extra_rows.stride(0), extra_rows.stride(1), weight_arg.stride(0), weight_arg.stride(1),
                HAS_CENTER=center is not None, HAS_EXTRA=extra is not None, HAS_EXTRA_SUMS=extra_sums is not None,
                WEIGHTED=weight is not None, DOT_DTYPE=dot_dtype(rows.dtype),
                INPUT_PRECISION=input_precision(rows.dtype), **cfg,
            )  # fmt: skip

        key = (
            "feature_sums", "blocked", d, n_features, bucket(B), bucket(K), rows.dtype, dtype, extra is not None,
            weight is not None,
        )  # fmt: skip
        run(tuned(key, _BLOCKED_CANDIDATES, run))
        return FeatureSums(out, coef_sum, None if weight is None else weighted_parts.sum(dim=0))

    out = torch.zeros(n_features, d, dtype=torch.float32, device=rows.device)

    def run(cfg: dict) -> None:
        out.zero_()
        coef_sum.zero_()
        grid = (cdiv(B, cfg["BLOCK_M"]), cdiv(d, cfg["BLOCK_D"]))
        _feature_sum_atomic_kernel[grid](
            rows, center_arg, coef, idx, out, coef_sum,
            B, K, d, rows.stride(0), rows.stride(1),
            HAS_CENTER=center is not None, **cfg,
        )  # fmt: skip

    run(tuned(("feature_sums", "atomic", d, n_features, bucket(B), bucket(K), rows.dtype), _ATOMIC_CANDIDATES, run))
    if extra is not None:  # rows of the fp32 buffer: a cheap index_add_ before the cast
        extra_features, extra_rows, extra_sums = extra
        valid = extra_features >= 0
        target = extra_features.clamp_min(0)
        out.index_add_(0, target, torch.where(valid[:, None], extra_rows.float(), 0.0))
        if extra_sums is not None:
            coef_sum.index_add_(0, target, torch.where(valid, extra_sums.float(), 0.0))
    if transposed:  # one copy, casting as it transposes (from the fp32 sums on the atomic route)
        out = out.new_empty(d, n_features, dtype=dtype).copy_(out.t())
    elif out.dtype != dtype:
        out = out.to(dtype)
    return FeatureSums(out, coef_sum, None if weight is None else weighted_sums(weight, coef_sum))


@triton.jit
def _weighted_sums_kernel(
    w_ptr, values_ptr, partial_ptr, D, F, features_per_split, stride_wd, stride_wf,
    BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr,
):  # fmt: skip
    """partial[split, dims] = sum over the split's features f of weight[dims, f] * values[f], in fp32."""
    dims = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    dim_valid = dims < D
    split = tl.program_id(1)
    first = split * features_per_split
    last = tl.minimum(first + features_per_split, F)
    acc = tl.zeros([BLOCK_D, BLOCK_F], dtype=tl.float32)
    for f0 in range(first, last, BLOCK_F):
        features = f0 + tl.arange(0, BLOCK_F)
        feature_valid = features < last
        w = tl.load(w_ptr + dims.to(tl.int64)[:, None] * stride_wd + features[None, :] * stride_wf,
                    mask=dim_valid[:, None] & feature_valid[None, :], other=0.0).to(tl.float32)  # fmt: skip
        acc += w * tl.load(values_ptr + features, mask=feature_valid, other=0.0)[None, :]
    tl.store(partial_ptr + split * D + dims, tl.sum(acc, axis=1), mask=dim_valid)


# `weighted_sums` reads the weight in programs of WEIGHTED_SUMS_ROWS rows x WEIGHTED_SUMS_FEATURES
# features (enough programs in flight to stream it at memory speed), WEIGHTED_SUMS_BLOCK features per
# step of a program's loop, in at most WEIGHTED_SUMS_SPLITS feature splits (their fp32 partial sums,
# [splits, d], are added after).
WEIGHTED_SUMS_ROWS, WEIGHTED_SUMS_FEATURES, WEIGHTED_SUMS_BLOCK, WEIGHTED_SUMS_SPLITS = 8, 4096, 512, 64


def weighted_sums(weight: Tensor, values: Tensor) -> Tensor:
    """weight [d, F] @ values [F] in fp32 [d], reading the weight in its own dtype and accumulating in a
    fixed order (cuBLAS would need the weight in fp32 first: a copy of [d, F] that cost more than this
    whole product). On the atomic route, W_enc @ db_enc: minus the centring's gradient of a TopK encode."""
    D, F = weight.shape
    n_split = min(cdiv(F, WEIGHTED_SUMS_FEATURES), WEIGHTED_SUMS_SPLITS)
    features_per_split = cdiv(cdiv(F, n_split), WEIGHTED_SUMS_BLOCK) * WEIGHTED_SUMS_BLOCK
    n_split = cdiv(F, features_per_split)
    partial = values.new_empty(n_split, D, dtype=torch.float32)
    _weighted_sums_kernel[(cdiv(D, WEIGHTED_SUMS_ROWS), n_split)](
        weight, values, partial, D, F, features_per_split, weight.stride(0), weight.stride(1),
        BLOCK_D=WEIGHTED_SUMS_ROWS, BLOCK_F=WEIGHTED_SUMS_BLOCK, num_warps=4,
    )  # fmt: skip
    return partial.sum(dim=0)


def slots(features: Tensor, n_features: int) -> Tensor:
    """int32 [F]: each feature's position in `features` (distinct where >= 0), -1 where it is absent.
    The negative entries write to slots past F, dropped after (one scatter, no host sync)."""
    n = features.shape[0]
    positions = torch.arange(n, device=features.device, dtype=torch.int32)
    target = torch.where(features >= 0, features, n_features + positions.long())
    slots = torch.full((n_features + n,), -1, device=features.device, dtype=torch.int32)
    return slots.scatter_(0, target, positions)[:n_features]
