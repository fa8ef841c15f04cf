"""fastsae's public functions, each a `torch.library` custom op `fastsae::<name>`.

Every op has a fake (meta) impl and registered autograd, so `torch.compile(fullgraph=True)` traces
through them. The default implementation, used on CPU, is the definition in `fastsae.reference`; GPU
kernels register for the "cuda" device under the same names (fastsae/ops/). The public wrappers
below check their arguments and raise a ValueError naming the bad one; they never synchronise with
the device, so NaN in the data is not checked here (see `SAEConfig.check_finite`).

Shapes: x [B, d], W_enc [d, F], b_enc [F], W_dec [F, d], b_dec [d], vals/idx [B, k].
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from . import _ext, reference
from .ops import autoencoder as autoencoder_ops
from .ops import auxk as auxk_ops
from .ops import batch_filter as batch_filter_ops
from .ops import batchtopk as batchtopk_ops
from .ops import columns as column_ops
from .ops import decode as decode_ops
from .ops import decoder as decoder_ops
from .ops import encode as encode_ops
from .ops import filter as filter_ops
from .ops import loss as loss_ops
from .ops import scatter as scatter_ops
from .ops.launch import join_event, join_stream, on_stream, only_asked

_ext.load()  # the C++ death-statistics ops: fire_counts, fire_counts_dense, update_since_fired, dead_mask

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class TopKCodes(NamedTuple):
    """Sparse codes of a TopK encode: post-ReLU values and int32 feature indices, [B, k] each, and the
    AuxK candidates among dead features ([B, k_aux]; [B, 0] when AuxK is off)."""

    vals: Tensor
    idx: Tensor
    aux_vals: Tensor
    aux_idx: Tensor


# ---------------------------------------------------------------------------------------------------
# Argument checks (metadata only: no device synchronisation)


def _check_float(name: str, tensor: Tensor, ndim: int) -> None:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16, float16 or float64, got {tensor.dtype}")
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(tensor.shape)}")


def _check_same_device(**tensors: Tensor | None) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")


def _check_encoder_args(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor) -> None:
    _check_float("x", x, 2)
    _check_float("W_enc", W_enc, 2)
    _check_float("b_enc", b_enc, 1)
    _check_float("b_dec", b_dec, 1)
    d, n_features = W_enc.shape
    if x.shape[0] == 0:
        raise ValueError("x is an empty batch (0 tokens)")
    if x.shape[1] != d:
        raise ValueError(f"x has {x.shape[1]} dimensions but W_enc expects d_in={d} (W_enc is {tuple(W_enc.shape)})")
    if b_enc.shape[0] != n_features:
        raise ValueError(f"b_enc has {b_enc.shape[0]} entries, expected n_features={n_features}")
    if b_dec.shape[0] != d:
        raise ValueError(f"b_dec has {b_dec.shape[0]} entries, expected d_in={d}")
    _check_same_device(x=x, W_enc=W_enc, b_enc=b_enc, b_dec=b_dec)


def _check_k(name: str, k: int, n_features: int, minimum: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool):
        raise TypeError(f"{name} must be an int, got {type(k).__name__}")
    if not minimum <= k <= n_features:
        raise ValueError(f"{name} must be in [{minimum}, n_features={n_features}], got {k}")


def _check_codes(vals: Tensor, idx: Tensor, n_features: int) -> None:
    _check_float("vals", vals, 2)
    if idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"idx must be int32 or int64, got {idx.dtype}")
    if idx.shape != vals.shape:
        raise ValueError(f"idx has shape {tuple(idx.shape)} but vals has {tuple(vals.shape)}")
    if vals.shape[0] == 0:
        raise ValueError("vals is an empty batch (0 tokens)")
    if vals.shape[1] > n_features:
        raise ValueError(f"vals has k={vals.shape[1]} codes per token but there are only {n_features} features")


def _assert_indices_in_range(name: str, idx: Tensor, n_features: int) -> None:
    """A negative index would wrap around to another feature (PyTorch indexing) and one >= n_features
    would contribute nothing in the CUDA kernels: both silently wrong. Checked on the device with no
    host synchronisation (torch._assert_async): on CUDA a failure is a device-side assert reported at
    the next synchronisation, on CPU it raises at once."""
    in_range = ((idx >= 0) & (idx < n_features)).all()
    torch._assert_async(in_range, f"{name} holds a feature index outside [0, {n_features})")


def _check_decoder_bias(b_dec: Tensor | None, W_dec: Tensor) -> None:
    if b_dec is None:
        return
    _check_float("b_dec", b_dec, 1)
    if b_dec.shape[0] != W_dec.shape[1]:
        raise ValueError(f"b_dec has {b_dec.shape[0]} entries, expected d_in={W_dec.shape[1]}")


# ---------------------------------------------------------------------------------------------------
# TopK encode


@torch.library.custom_op("fastsae::encode_topk", mutates_args=())
def _encode_topk(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int, k_aux: int, dead_mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return reference.encode_topk(x, W_enc, b_enc, b_dec, k, k_aux, dead_mask)


_encode_topk.register_kernel("cuda")(encode_ops.encode_topk)


@_encode_topk.register_fake
def _(x, W_enc, b_enc, b_dec, k, k_aux, dead_mask):
    batch = x.shape[0]
    return (
        x.new_empty(batch, k, dtype=W_enc.dtype),
        x.new_empty(batch, k, dtype=torch.int32),
        x.new_empty(batch, k_aux, dtype=W_enc.dtype),
        x.new_empty(batch, k_aux, dtype=torch.int32),
    )


@torch.library.custom_op("fastsae::encode_topk_backward", mutates_args=())
def _encode_topk_backward(
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
    grads = reference.encode_topk_backward(grad_vals, grad_aux_vals, x, W_enc, b_dec, vals, idx, aux_vals, aux_idx)
    return only_asked(grads, (x_requires_grad, True, True, True))


_encode_topk_backward.register_kernel("cuda")(encode_ops.encode_topk_backward)


@_encode_topk_backward.register_fake
def _(grad_vals, grad_aux_vals, x, W_enc, b_dec, vals, idx, aux_vals, aux_idx, x_requires_grad):
    return _encoder_grad_like(x, W_enc, b_dec, x_requires_grad)


def _encoder_grad_like(
    x: Tensor, W_enc: Tensor, b_dec: Tensor, x_requires_grad: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    grads = torch.empty_like(x), torch.empty_like(W_enc), W_enc.new_empty(W_enc.shape[1]), torch.empty_like(b_dec)
    return only_asked(grads, (x_requires_grad, True, True, True))


def _encode_topk_setup(ctx, inputs, output):
    x, W_enc, _, b_dec, *_ = inputs
    ctx.save_for_backward(x, W_enc, b_dec, *output)


def _encode_topk_grad(ctx, grad_vals, _grad_idx, grad_aux_vals, _grad_aux_idx):
    x, W_enc, b_dec, vals, idx, aux_vals, aux_idx = ctx.saved_tensors
    grads = _encode_topk_backward(
        grad_vals, grad_aux_vals, x, W_enc, b_dec, vals, idx, aux_vals, aux_idx, ctx.needs_input_grad[0]
    )
    return (*_only_needed(ctx, grads), None, None, None)


def _only_needed(ctx, grads):
    return tuple(g if needed else None for g, needed in zip(grads, ctx.needs_input_grad))


_encode_topk.register_autograd(_encode_topk_grad, setup_context=_encode_topk_setup)


def encode_topk(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    k: int,
    *,
    k_aux: int = 0,
    dead_mask: Tensor | None = None,
) -> TopKCodes:
    """TopK encode z = topk(relu((x - b_dec) @ W_enc + b_enc)), centering in fp32 before the matmul.

    Returns TopKCodes(vals [B, k], idx [B, k] int32, aux_vals, aux_idx). With k_aux > 0, aux_* hold the
    top-k_aux post-ReLU pre-activations among features where `dead_mask` [F] is True (for the AuxK
    loss); selected features that are not dead carry value 0. Differentiable w.r.t. x, W_enc, b_enc, b_dec.
    """
    _check_encoder_args(x, W_enc, b_enc, b_dec)
    n_features = W_enc.shape[1]
    _check_k("k", k, n_features, minimum=1)
    _check_k("k_aux", k_aux, n_features, minimum=0)
    if k_aux > 0:
        if dead_mask is None:
            raise ValueError("k_aux > 0 needs dead_mask, a bool [n_features] tensor of dead features")
        _check_dead_mask(dead_mask, n_features, x)
    return TopKCodes(*_encode_topk(x, W_enc, b_enc, b_dec, k, k_aux, dead_mask if k_aux > 0 else None))


def _check_dead_mask(dead_mask: Tensor, n_features: int, x: Tensor) -> None:
    if dead_mask.dtype != torch.bool or dead_mask.shape != (n_features,):
        raise ValueError(
            f"dead_mask must be bool of shape ({n_features},), got {dead_mask.dtype} {tuple(dead_mask.shape)}"
        )
    _check_same_device(x=x, dead_mask=dead_mask)


@torch.library.custom_op("fastsae::encode_topk_positive_counts", mutates_args=())
def _encode_topk_positive_counts(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int
) -> tuple[Tensor, Tensor, Tensor]:
    return reference.encode_topk_positive_counts(x, W_enc, b_enc, b_dec, k)


_encode_topk_positive_counts.register_kernel("cuda")(encode_ops.encode_topk_positive_counts)


@_encode_topk_positive_counts.register_fake
def _(x, W_enc, b_enc, b_dec, k):
    batch, n_features = x.shape[0], W_enc.shape[1]
    return (
        x.new_empty(batch, k, dtype=W_enc.dtype),
        x.new_empty(batch, k, dtype=torch.int32),
        x.new_empty(n_features, dtype=torch.int64),
    )


def encode_topk_positive_counts(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int
) -> tuple[Tensor, Tensor, Tensor]:
    """TopK encode (vals [B, k], idx [B, k] int32, as `encode_topk`) and, from the same pass over the
    pre-activations, int64 [F] counts of the tokens on which each feature's pre-activation is > 0.
    For classifying dead features (`fastsae.measure_death`) without a second, dense encode; not
    differentiable."""
    _check_encoder_args(x, W_enc, b_enc, b_dec)
    _check_k("k", k, W_enc.shape[1], minimum=1)
    return _encode_topk_positive_counts(x, W_enc, b_enc, b_dec, k)


# ---------------------------------------------------------------------------------------------------
# ReLU / JumpReLU encode


@torch.library.custom_op("fastsae::encode_relu", mutates_args=())
def _encode_relu(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, threshold: Tensor | None) -> Tensor:
    return reference.encode_relu(x, W_enc, b_enc, b_dec, threshold)


_encode_relu.register_kernel("cuda")(encode_ops.encode_relu)


@_encode_relu.register_fake
def _(x, W_enc, b_enc, b_dec, threshold):
    return x.new_empty(x.shape[0], W_enc.shape[1], dtype=W_enc.dtype)


@torch.library.custom_op("fastsae::encode_relu_backward", mutates_args=())
def _encode_relu_backward(
    grad_acts: Tensor, x: Tensor, W_enc: Tensor, b_dec: Tensor, acts: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return reference.encode_relu_backward(grad_acts, x, W_enc, b_dec, acts)


@_encode_relu_backward.register_fake
def _(grad_acts, x, W_enc, b_dec, acts):
    return _encoder_grad_like(x, W_enc, b_dec, True)


def _encode_relu_setup(ctx, inputs, output):
    x, W_enc, _, b_dec, _ = inputs
    ctx.save_for_backward(x, W_enc, b_dec, output)


def _encode_relu_grad(ctx, grad_acts):
    x, W_enc, b_dec, acts = ctx.saved_tensors
    grads = _encode_relu_backward(grad_acts, x, W_enc, b_dec, acts)
    return (*_only_needed(ctx, grads), None)


_encode_relu.register_autograd(_encode_relu_grad, setup_context=_encode_relu_setup)


def encode_relu(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, threshold: Tensor | None = None) -> Tensor:
    """Dense codes relu((x - b_dec) @ W_enc + b_enc) [B, F]; with a per-feature `threshold` [F], JumpReLU
    (pre where pre > threshold, else 0). The threshold receives no gradient."""
    _check_encoder_args(x, W_enc, b_enc, b_dec)
    if threshold is not None:
        _check_float("threshold", threshold, 1)
        if threshold.shape[0] != W_enc.shape[1]:
            raise ValueError(f"threshold has {threshold.shape[0]} entries, expected n_features={W_enc.shape[1]}")
        _check_same_device(x=x, threshold=threshold)
    return _encode_relu(x, W_enc, b_enc, b_dec, threshold)


def encode_batchtopk(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int) -> Tensor:
    """BatchTopK codes [B, F]: the B * k largest ReLU codes over the whole batch (Bussmann et al. 2024).
    Where each row's 4k candidates are few against F (`batchtopk.dense_from_candidates`) and the host may read
    their exactness check (not while compiling), the sparse codes of `encode_batchtopk_sparse`
    scattered into [B, F]; otherwise, or where the candidates may miss a code, the ReLU codes and a
    selection over the whole batch."""
    _check_encoder_args(x, W_enc, b_enc, b_dec)
    n_features = W_enc.shape[1]
    _check_k("k", k, n_features, minimum=1)
    if batchtopk_ops.dense_from_candidates(k, n_features) and batchtopk_ops.sparse_codes_possible(x):
        codes = _batchtopk_among_candidates(x, W_enc, b_enc, b_dec, k)
        if codes is not None:
            return codes.vals.new_zeros(x.shape[0], n_features).scatter(1, codes.idx.long(), codes.vals)
    return batchtopk_ops.batch_topk(_encode_relu(x, W_enc, b_enc, b_dec, None), k)


def encode_batchtopk_sparse(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int, threshold: Tensor | None = None
) -> TopKCodes:
    """BatchTopK codes as sparse TopKCodes (no AuxK candidates): the codes `encode_batchtopk` keeps (up
    to which of equal codes at the batch's threshold is kept), without a [B, F] tensor. Each row's
    candidates are its top min(F, 4k) codes from the TopK encode; the batch's B * k largest among them
    keep their values and the other candidates carry 0 (vals and idx are [B, min(F, 4k)]). Where a row
    may keep more codes than its candidates, the dense route runs instead, and vals and idx are [B, w]
    with w the most codes any row keeps (`fastsae/ops/batchtopk.py`). One host synchronisation, two on
    the dense route.

    `threshold` (optional; a 0-dim tensor on x's device): an estimate of the batch's threshold (the
    smallest code BatchTopK keeps), such as the last training batch's threshold. With it a CUDA
    batch first takes the threshold-first route (`fastsae/ops/batch_filter.py`: one pass keeps the
    entries within a margin of the estimate, then an exact selection among them, no per-row top-k): the
    same codes, [B, batch_filter.codes_width(k, F)], each row's kept codes first in descending order
    and zeros after them (on features spread over the dictionary). An estimate too far above the
    batch's threshold costs the route above after it. On the H200 it measured 2-5% slower than the
    route above (`batchtopk.THRESHOLD_FIRST` has the figures). Differentiable w.r.t. x, W_enc, b_enc, b_dec."""
    _check_encoder_args(x, W_enc, b_enc, b_dec)
    n_features = W_enc.shape[1]
    _check_k("k", k, n_features, minimum=1)
    if threshold is not None:
        if not isinstance(threshold, Tensor) or threshold.dim() != 0:
            raise ValueError(f"threshold must be a 0-dim tensor, got {threshold!r}")
        _check_same_device(x=x, threshold=threshold)
        if x.is_cuda and W_enc.dtype != torch.float64:
            detached = (t.detach() for t in (x, W_enc, b_enc, b_dec))
            codes = batch_filter_ops.threshold_first_codes(*detached, k, threshold.detach())
            if codes is not None:
                vals, idx = _SparseCodes.apply(*codes, x, W_enc, b_enc, b_dec)
                return TopKCodes(vals, idx, vals[:, :0], idx[:, :0])
    codes = _batchtopk_among_candidates(x, W_enc, b_enc, b_dec, k)
    if codes is not None:
        return codes
    codes = batchtopk_ops.batch_topk(_encode_relu(x, W_enc, b_enc, b_dec, None), k)
    most = max(1, int((codes != 0).sum(dim=1).max()))
    vals, idx = codes.topk(most, dim=1)
    idx = idx.to(torch.int32)
    return TopKCodes(vals, idx, vals[:, :0], idx[:, :0])


def _batchtopk_among_candidates(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int) -> TopKCodes | None:
    """Sparse BatchTopK codes [B, min(F, 4k)] from each row's top min(F, 4k) codes (the TopK encode's),
    those not among the batch's B * k largest carrying 0; None where a row may keep more codes than its
    candidates (`batchtopk.select_among_candidates`, one host synchronisation)."""
    n_features = W_enc.shape[1]
    width = batchtopk_ops.candidate_width(k, n_features)
    vals, idx, aux_vals, aux_idx = _encode_topk(x, W_enc, b_enc, b_dec, width, 0, None)
    keep = batchtopk_ops.select_among_candidates(vals, k, complete=width == n_features)
    return None if keep is None else TopKCodes(torch.where(keep, vals, 0), idx, aux_vals, aux_idx)


class _SparseCodes(torch.autograd.Function):
    """Sparse codes (vals, idx) selected without autograd, given the encoder's gradient: each code's
    value is its feature's post-ReLU pre-activation, so the TopK encode's backward applies."""

    @staticmethod
    def forward(ctx, vals, idx, x, W_enc, b_enc, b_dec):
        ctx.save_for_backward(x, W_enc, b_dec, vals, idx)
        ctx.mark_non_differentiable(idx)
        return vals.view_as(vals), idx.view_as(idx)

    @staticmethod
    def backward(ctx, grad_vals, _grad_idx):
        x, W_enc, b_dec, vals, idx = ctx.saved_tensors
        no_aux_vals, no_aux_idx = vals[:, :0], idx[:, :0]
        grads = _encode_topk_backward(
            grad_vals, no_aux_vals, x, W_enc, b_dec, vals, idx, no_aux_vals, no_aux_idx, ctx.needs_input_grad[2]
        )
        return None, None, *(g if needed else None for g, needed in zip(grads, ctx.needs_input_grad[2:]))


# ---------------------------------------------------------------------------------------------------
# Decode


@torch.library.custom_op("fastsae::decode_sparse", mutates_args=())
def _decode_sparse(vals: Tensor, idx: Tensor, W_dec: Tensor, b_dec: Tensor | None, fired_only: bool = False) -> Tensor:
    return reference.decode_sparse(vals, idx, W_dec, b_dec)


@_decode_sparse.register_kernel("cuda")
def _(vals, idx, W_dec, b_dec, fired_only=False):
    return decode_ops.decode_sparse(vals, idx, W_dec, b_dec)  # `fired_only` concerns the backward alone


@_decode_sparse.register_fake
def _(vals, idx, W_dec, b_dec, fired_only=False):
    return vals.new_empty(vals.shape[0], W_dec.shape[1], dtype=W_dec.dtype)


@torch.library.custom_op("fastsae::decode_sparse_backward", mutates_args=())
def _decode_sparse_backward(
    grad_out: Tensor, vals: Tensor, idx: Tensor, W_dec: Tensor, fired_only: bool = False
) -> tuple[Tensor, Tensor]:
    return reference.decode_sparse_backward(grad_out, vals, idx, W_dec, fired_only)


_decode_sparse_backward.register_kernel("cuda")(decode_ops.decode_sparse_backward)


@_decode_sparse_backward.register_fake
def _(grad_out, vals, idx, W_dec, fired_only=False):
    return torch.empty_like(vals), torch.empty_like(W_dec)


def _decode_sparse_setup(ctx, inputs, output):
    vals, idx, W_dec, b_dec, fired_only = inputs
    ctx.b_dec_dtype = None if b_dec is None else b_dec.dtype
    ctx.fired_only = fired_only
    ctx.save_for_backward(vals, idx, W_dec)


def _decode_sparse_grad(ctx, grad_out):
    vals, idx, W_dec = ctx.saved_tensors
    dvals, dW_dec = _decode_sparse_backward(grad_out, vals, idx, W_dec, ctx.fired_only)
    db_dec = None if ctx.b_dec_dtype is None else _decoder_bias_grad(grad_out, ctx.b_dec_dtype)
    return _only_needed(ctx, (dvals, None, dW_dec, db_dec, None))


def _decoder_bias_grad(grad_out: Tensor, dtype: torch.dtype) -> Tensor:
    """d b_dec of a decode: grad_out [B, d] summed over the batch in the accumulate dtype."""
    return grad_out.sum(0, dtype=reference.accumulate_dtype(grad_out)).to(dtype)


_decode_sparse.register_autograd(_decode_sparse_grad, setup_context=_decode_sparse_setup)


def decode_sparse(
    vals: Tensor, idx: Tensor, W_dec: Tensor, b_dec: Tensor | None = None, *, fired_only: bool = False
) -> Tensor:
    """Sparse decode x_hat[b] = sum_j vals[b, j] * W_dec[idx[b, j]] (+ b_dec) -> [B, d] in W_dec's dtype.
    Differentiable w.r.t. vals, W_dec and b_dec. `fired_only`: the gradient w.r.t. vals is 0 wherever
    vals is not > 0 (`reference.decode_sparse_backward`), for codes that are ReLU outputs, whose gradient
    the ReLU masks there anyway: the backward then skips those codes' decoder rows (a BatchTopK SAE's
    candidates that the batch did not keep, with value 0, are three quarters of its sparse codes)."""
    _check_float("W_dec", W_dec, 2)
    _check_codes(vals, idx, W_dec.shape[0])
    _check_decoder_bias(b_dec, W_dec)
    _check_same_device(vals=vals, idx=idx, W_dec=W_dec, b_dec=b_dec)
    if not isinstance(fired_only, bool):
        raise ValueError(f"fired_only must be True or False, got {fired_only!r}")
    _assert_indices_in_range("idx", idx, W_dec.shape[0])
    return _decode_sparse(vals, idx, W_dec, b_dec, fired_only)


def auxk_reconstruction(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, W_dec: Tensor, features: Tensor, k_aux: int,
    keep: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:  # fmt: skip
    """The AuxK reconstruction (no b_dec) from the top-k_aux post-ReLU pre-activations among `features`
    (int64 [n], the dead ones), computed densely over just those n features: one [B, n] GEMM for the
    pre-activations (centred in fp32 first), torch.topk, and one GEMM to decode. The same value as
    `decode_sparse` of `encode_topk(..., k_aux, dead_mask)`'s aux codes, and cheaper when n is a small
    multiple of k_aux: per-code gathers and atomics cost B * k_aux * d each, more than the encoder GEMM
    at k_aux = d/2. Differentiable w.r.t. x and every weight (`_DenseAuxK`). -> [B, d] in W_dec's dtype.
    `keep`, when given, maps the selected codes [B, min(k_aux, n)] to those to decode (a feature shard
    keeps the ones among the top k_aux over every shard, zeroing the others). Negative entries of
    `features` are padding, no feature: a list of fixed length (`torch.nonzero_static`) keeps every
    shape static, as a captured CUDA graph needs."""
    _check_encoder_args(x, W_enc, b_enc, b_dec)
    _check_decoder_weight(W_dec, W_enc)
    _check_auxk_features(features, k_aux, W_enc.shape[1])
    _check_same_device(x=x, W_enc=W_enc, W_dec=W_dec, features=features)
    return _DenseAuxK.apply(x, W_enc, b_enc, b_dec, W_dec, features, k_aux, keep)


def _check_decoder_weight(W_dec: Tensor, W_enc: Tensor) -> None:
    _check_float("W_dec", W_dec, 2)
    if W_dec.shape != (W_enc.shape[1], W_enc.shape[0]):
        raise ValueError(f"W_dec must be [n_features, d_in] = {tuple(W_enc.shape[::-1])}, got {tuple(W_dec.shape)}")


def _check_auxk_features(features: Tensor, k_aux: int, n_features: int) -> None:
    if features.dtype != torch.int64 or features.dim() != 1:
        shape = tuple(features.shape)
        raise ValueError(f"features must be an int64 [n] tensor of feature indices, got {features.dtype} {shape}")
    _check_k("k_aux", k_aux, n_features, minimum=1)


def topk_autoencoder(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, W_dec: Tensor, k: int, *,
    dead_features: Tensor | None = None, k_aux: int = 0,
) -> TopKAutoencoderOutput:  # fmt: skip
    """A TopK SAE's training forward in one autograd node: the codes `encode_topk(x, W_enc, b_enc, b_dec,
    k)`, their reconstruction `decode_sparse(vals, idx, W_dec, b_dec)` and, given `dead_features` (int64
    [n]; negative entries are padding), the AuxK reconstruction `auxk_reconstruction(x, W_enc, b_enc,
    b_dec, W_dec, dead_features, k_aux)`: the same values and gradients as those three calls, with
    AuxK's weight gradients added into the encode's and the decode's own in place (`_TopKAutoencoder`).
    Differentiable w.r.t. x, the weights and the biases (and vals: a loss may use the codes)."""
    _check_encoder_args(x, W_enc, b_enc, b_dec)
    _check_decoder_weight(W_dec, W_enc)
    _check_k("k", k, W_enc.shape[1], minimum=1)
    if dead_features is not None:
        _check_auxk_features(dead_features, k_aux, W_enc.shape[1])
    _check_same_device(x=x, W_enc=W_enc, W_dec=W_dec, dead_features=dead_features)
    recon, vals, idx, aux_recon = _TopKAutoencoder.apply(x, W_enc, b_enc, b_dec, W_dec, k, dead_features, k_aux)
    return TopKAutoencoderOutput(recon, vals, idx, None if dead_features is None else aux_recon)


class _AuxKOperands(NamedTuple):
    """What the dense AuxK path's products read, gathered from the weights before them."""

    slots: Tensor  # [n'] the feature list padded to a multiple of 8 with -1 (negative entries: none)
    centered: Tensor  # [B, d] x - b_dec in W_enc's dtype
    W_enc_dead: Tensor  # [d, n'] W_enc's columns of the listed features
    b_enc_dead: Tensor  # [n'] their biases, -inf at the padding
    W_dec_dead: Tensor  # [n', d] W_dec's rows of the listed features


def _auxk_operands(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, W_dec: Tensor, features: Tensor
) -> _AuxKOperands:
    n = features.shape[0]
    # Padded to a multiple of 8 columns (with feature 0, masked out of the top-k below): a bf16 [B, n]
    # matrix whose rows are not 16-byte aligned sends cuBLAS to kernels several times slower (measured:
    # sm75 kernels at n = 1228 on the H200). The padding columns, and the caller's (negative entries),
    # are -inf before the top-k: they get no code, so neither a value nor a gradient. Their bias is -inf
    # (a masked fill of the [B, n] pre-activations, its mask broadcast, took 27 us of the captured GPT-2
    # step on the H200 and 42 at AlphaFold3's).
    slots = torch.cat([features, features.new_full((-n % 8,), -1)])  # negative: padding, no feature
    padded = slots.clamp_min(0)
    b_enc_dead = b_enc.index_select(0, padded).masked_fill_(slots < 0, float("-inf"))
    W_enc_dead, W_dec_dead = W_enc.index_select(1, padded), W_dec.index_select(0, padded)
    return _AuxKOperands(slots, _centered(x, b_dec, W_enc.dtype), W_enc_dead, b_enc_dead, W_dec_dead)


def _dense_auxk_forward(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, W_dec: Tensor, features: Tensor, k_aux: int,
    keep: Callable[[Tensor], Tensor] | None, operands: _AuxKOperands | None = None,
) -> tuple[Tensor, tuple[Tensor, ...]]:  # fmt: skip
    """`auxk_reconstruction`'s value, and what `_dense_auxk_backward` needs (`_dense_auxk_saved`)."""
    saved = _dense_auxk_saved(x, W_enc, b_enc, b_dec, W_dec, features, k_aux, keep, operands)
    _, _, W_dec_dead, codes, _ = saved
    return codes @ W_dec_dead, saved


def _dense_auxk_saved(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, W_dec: Tensor, features: Tensor, k_aux: int,
    keep: Callable[[Tensor], Tensor] | None, operands: _AuxKOperands | None = None,
) -> tuple[Tensor, ...]:  # fmt: skip
    """What `_dense_auxk_backward` needs: (centred x, W_enc's and W_dec's dead-feature columns and rows,
    the dense codes [B, n'], the feature list padded to n' with -1, its negative entries kept), without
    the reconstruction. `operands`: `_auxk_operands(...)`, where the caller gathered them already."""
    n = features.shape[0]
    if operands is None:
        operands = _auxk_operands(x, W_enc, b_enc, b_dec, W_dec, features)
    slots, centered, W_enc_dead, b_enc_dead, W_dec_dead = operands
    if b_enc_dead.dtype == centered.dtype:
        pre = torch.addmm(b_enc_dead, centered, W_enc_dead)
    else:
        pre = centered @ W_enc_dead + b_enc_dead
    scores = pre[:, :n]
    if _row_topk(scores, n):
        if keep is None:  # the kernel writes the codes themselves, the padding columns' zeros included
            codes = auxk_ops.row_topk_codes(pre, n, min(k_aux, n), W_dec.dtype)
        else:
            indices = auxk_ops.row_topk_indices(scores, min(k_aux, n))
            codes = _scatter_codes(pre, indices, keep(scores.gather(1, indices).relu_()), W_dec.dtype)
    else:
        # Unsorted: the codes are scattered back by feature, so their order is not needed, and sorting
        # B x k_aux values took a third of the AuxK forward on the H200 (GPT-2 shape, k_aux = 384).
        top_values, indices = scores.topk(min(k_aux, n), dim=1, sorted=False)
        values = top_values.relu_() if keep is None else keep(top_values.relu_())
        codes = _scatter_codes(pre, indices, values, W_dec.dtype)
    return centered, W_enc_dead, W_dec_dead, codes, slots


def _centered(x: Tensor, b_dec: Tensor, dtype: torch.dtype) -> Tensor:
    """`reference.center(x, b_dec)` cast to `dtype`: on CUDA in one pass (the encode's centring kernel),
    where torch takes three (x to fp32, the subtraction, the cast: 23 us of the captured GPT-2 step)."""
    if x.is_cuda and torch.float64 not in (x.dtype, b_dec.dtype, dtype):
        return filter_ops.center(x, b_dec, dtype)
    return reference.center(x, b_dec).to(dtype)


def _row_topk(scores: Tensor, n: int) -> bool:
    """Whether the dense AuxK path selects with `auxk_ops`' row top-k (else torch.topk)."""
    return auxk_ops.ROW_TOPK and scores.is_cuda and scores.dtype in auxk_ops.KEY_SHIFT and 0 < n <= auxk_ops.MAX_ROW


def _scatter_codes(pre: Tensor, indices: Tensor, values: Tensor, dtype: torch.dtype) -> Tensor:
    """Dense codes shaped like `pre`, in `dtype`: `values` at `indices` in each row, zeros elsewhere."""
    return torch.zeros_like(pre, dtype=dtype).scatter_(1, indices, values.to(dtype))


def _dense_auxk_backward(
    grad_out: Tensor, saved: tuple[Tensor, ...], needs_x: bool, needs_encoder: bool, needs_decoder: bool
) -> tuple[Tensor | None, ...]:
    """The AuxK reconstruction's gradients over the dead features alone: (dx, dW_enc's dead columns as
    rows [n', d], db_enc[padded] in the accumulate dtype, dW_dec[padded] [n', d]); None where not
    asked for (`needs_encoder` covers W_enc and b_enc). The gradient reaches the pre-activations only
    through the selected codes that are positive, so it is one masked product away from the decoder's.
    d b_dec, the centring's share, is -W_enc[:, padded] @ db_enc[padded]: the callers take it."""
    centered, W_enc_dead, W_dec_dead, codes, _ = saved
    grad_out = grad_out.to(codes.dtype)
    dW_dec_dead = codes.t() @ grad_out if needs_decoder else None
    if not (needs_x or needs_encoder):
        return None, None, None, dW_dec_dead
    d_pre = grad_out @ W_dec_dead.t()
    if d_pre.is_cuda and d_pre.dtype != torch.float64:  # the mask and the sum in one pass (ops/columns.py)
        db_enc_dead = column_ops.masked_column_sums_(d_pre, codes)
    else:
        d_pre.mul_(codes > 0)  # ReLU and top-k: selected, > 0
        db_enc_dead = d_pre.sum(0, dtype=torch.promote_types(d_pre.dtype, torch.float32))
    d_pre = d_pre.to(centered.dtype)
    dW_enc_dead = d_pre.t() @ centered if needs_encoder else None
    dx = d_pre @ W_enc_dead.t() if needs_x else None
    return dx, dW_enc_dead, db_enc_dead, dW_dec_dead


class _DenseAuxK(torch.autograd.Function):
    """`auxk_reconstruction` with its backward written out (`_dense_auxk_backward`): autograd through
    the plain ops took a [B, d] product and the centring's backward for db_dec, and about ten [B, n]
    copies, fills and scatters per step for the masked fill, the scatter into the codes and their
    backward (GPT-2 shape on the H200). Each weight's gradient is full-size, zero off the dead features."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, W_dec, features, k_aux, keep):
        recon, saved = _dense_auxk_forward(x, W_enc, b_enc, b_dec, W_dec, features, k_aux, keep)
        ctx.save_for_backward(*saved)
        ctx.dtypes = (x.dtype, W_enc.shape, b_enc.dtype, b_dec.dtype, W_dec.shape)
        return recon

    @staticmethod
    def backward(ctx, grad_out):
        x_dtype, W_enc_shape, b_enc_dtype, b_dec_dtype, W_dec_shape = ctx.dtypes
        needs_x, needs_W_enc, needs_b_enc, needs_b_dec, needs_W_dec = ctx.needs_input_grad[:5]
        saved = ctx.saved_tensors
        W_enc_dead, padded = saved[1], saved[-1].clamp_min(0)  # (padding entries have zero gradients)
        needs_encoder = needs_W_enc or needs_b_enc or needs_b_dec
        dx, dW_enc_dead, db_enc_dead, dW_dec_dead = _dense_auxk_backward(
            grad_out, saved, needs_x, needs_encoder, needs_W_dec
        )
        dW_enc = dW_enc_dead.new_zeros(W_enc_shape).index_add_(1, padded, dW_enc_dead.t()) if needs_W_enc else None
        db_enc = db_enc_dead.new_zeros(W_enc_shape[1]).index_add_(0, padded, db_enc_dead) if needs_b_enc else None
        db_dec = -(W_enc_dead.to(db_enc_dead.dtype) @ db_enc_dead) if needs_b_dec else None
        dW_dec = dW_dec_dead.new_zeros(W_dec_shape).index_add_(0, padded, dW_dec_dead) if needs_W_dec else None
        return (
            None if dx is None else dx.to(x_dtype),
            dW_enc,
            None if db_enc is None else db_enc.to(b_enc_dtype),
            None if db_dec is None else db_dec.to(b_dec_dtype),
            dW_dec,
            None,
            None,
            None,
        )


class TopKAutoencoderOutput(NamedTuple):
    recon: Tensor  # [B, d] in W_dec's dtype
    vals: Tensor  # [B, k]
    idx: Tensor  # [B, k] int32
    aux_recon: Tensor | None  # [B, d], the AuxK reconstruction (no b_dec); None without dead_features


# The joint node's AuxK forward and backward on a second CUDA stream, beside the TopK encode and decode
# and their backward up to the weight gradients' sums (which add AuxK's in): AuxK's thin GEMMs and row
# top-k take the SMs that the row filter's, the decode's and the sort's launches leave idle, and their
# tails. Captured SAEAdam step on the H200 (bench.ab_step, cecab45): 1.711 -> 1.675 ms at AlphaFold3's
# shape, 1.906 -> 1.838 at GPT-2's, 2.940 -> 2.883 at GPT-2 width with k = 128. Eager steps and captured
# CUDA graphs (which record the fork and the join); never in code that torch.compile traces (one stream).
AUXK_SIDE_STREAM = True
# Under torch.compile, inside the opaque ops that `_TopKAutoencoder` runs while it is traced, as eagerly:
# experimental, off until measured (sae.compile()'s step at Llama-8B ran 2.5% slower than the eager one,
# AuxK in line, on the H200 at 9047ae7; bench_train's fastsae_module_compile with this on against off).
AUXK_SIDE_STREAM_COMPILED = False
# Its CUDA priority: 0, the main stream's. A high priority (-1), whose kernels' blocks go first to the
# SMs that free up, let AuxK's row top-k slow the first row filter launch beside it (250 against 102 us
# for the second, in a trace of the captured AlphaFold3 step): captured SAEAdam step on the H200, -1 -> 0,
# 1.634 -> 1.608 ms at AlphaFold3's shape, 1.870 -> 1.820 at GPT-2's (bench.ab_step, 4197cff). With AuxK
# after the encode and the sort in the forward (below), high was slower still: 0 -> -1, 1.620 -> 1.641 ms
# at AlphaFold3's, 1.784 -> 1.796 at GPT-2's (b61f826). So was a high priority for AuxK's backward alone,
# whose split-K reduce waited 67 us for d vals' blocks in a trace of that AlphaFold3 step: 0 -> -1,
# 1.551 -> 1.573 ms at AlphaFold3's shape, 1.795 -> 1.800 at GPT-2's (f2cdcf3).
AUXK_SIDE_STREAM_PRIORITY = 0
# AuxK's forward queued on the side stream after the encode, beside the decode and the codes' sort
# (SORT_IN_FORWARD), rather than before it, where it ran beside the first row filter launch and slowed
# it 2.5x (250 against 102 us in a trace of the captured AlphaFold3 step). Alone it measured level
# (before -> after: 1.645 -> 1.649 ms at AlphaFold3's shape, 1.906 -> 1.914 at GPT-2's, 278bf24, the
# sort then in the backward's critical path); it leaves the time that the sort fills.
AUXK_AFTER_ENCODE = True
# The codes' sort by feature for the backward's per-feature sums (`scatter.sort_by_feature`) done in the
# forward, on the main stream after the decode, while the side stream still runs AuxK's forward: about
# 100 us of the captured AlphaFold3 step's backward moved beside AuxK. Captured SAEAdam step on the H200,
# off -> on: 1.574 -> 1.553 ms at AlphaFold3's shape, 1.774 -> 1.769 at GPT-2's (b61f826).
SORT_IN_FORWARD = True
# That sort on a third stream of its own, which only the backward waits for (an event), so that the
# forward's losses start as soon as the decode and AuxK's forward are done rather than after the sort
# too (in a trace of the captured AlphaFold3 step, a54747a, the losses waited 27 us for the sort's tail).
# Captured SAEAdam step on the H200, off -> on: 1.474 -> 1.466 ms at AlphaFold3's shape, level at GPT-2's
# (1.705 -> 1.706; afefa16).
SORT_ON_OWN_STREAM = True
# With AuxK after the encode, its operands (the centred x, the dead features' weight columns and rows: a
# cat, a centring and three gathers, about 35 us of launches in a trace of the captured AlphaFold3 step,
# a54747a, which started only once the decode left the SMs) gathered on the side stream before the
# encode, so that after it AuxK's products start at once. Captured SAEAdam step on the H200, off -> on:
# 1.462 -> 1.442 ms at AlphaFold3's shape, 1.717 -> 1.691 at GPT-2's (bd19299), for 13-17 MB more peak
# memory (the operands live through the encode). AuxK's masked d pre-activations and their column sums
# from one Triton GEMM (mask, write and sums in its epilogue) in place of cuBLAS's product and
# `masked_column_sums_` measured slower and were removed: 1.461 -> 1.487 ms at AlphaFold3's shape,
# 1.631 -> 1.651 at GPT-2's (bd19299).
AUXK_OPERANDS_FIRST = True
# Measured slower and removed: AuxK's codes selected by the TopK encode's own pass (encode_topk with
# k_aux and the dead list as its dead mask, the codes scattered into the dense [B, n] codes) in place of
# the [B, n] GEMM and row top-k. With no bound on the dead features' values, the row filter keeps every
# dead pre-activation (1024 slots a row at AlphaFold3's shape): its launches took 290 against 103 us and
# the select 142 against 13 (H200 trace). Captured SAEAdam step on the H200, dense path / from the
# encode: 1.386 / 2.138 ms at AlphaFold3's shape (402af13).
_side_streams: dict[tuple[torch.device, int], torch.cuda.Stream] = {}
_sort_streams: dict[torch.device, torch.cuda.Stream] = {}


def _auxk_side_stream(x: Tensor) -> torch.cuda.Stream | None:
    """The second stream of x's device (at AUXK_SIDE_STREAM_PRIORITY), or None where AuxK runs in line."""
    if not (AUXK_SIDE_STREAM and x.is_cuda) or torch.compiler.is_compiling():
        return None
    key = (x.device, AUXK_SIDE_STREAM_PRIORITY)
    if key not in _side_streams:
        _side_streams[key] = torch.cuda.Stream(x.device, priority=AUXK_SIDE_STREAM_PRIORITY)
    return _side_streams[key]


def _compiled_side_stream(x: Tensor) -> torch.cuda.Stream | None:
    """AuxK's side stream inside the ops that compiled code calls, where AUXK_SIDE_STREAM_COMPILED."""
    return _auxk_side_stream(x) if AUXK_SIDE_STREAM_COMPILED else None


class _TopKAutoencoder(torch.autograd.Function):
    """`topk_autoencoder`: the encode and decode ops' forwards composed in one node, with one backward
    (`_topk_autoencoder_backward`) that adds AuxK's gradients over the dead features into the encode's
    and the decode's own weight gradients as it writes them. Through separate nodes each weight got a
    full-size AuxK gradient (mostly zeros) that autograd then added to the other: a fill and a sum over
    F x d per weight and step. While torch.compile traces it, a node with AuxK runs its forward and its
    backward as two opaque ops (`_topk_autoencoder_op`, `_topk_autoencoder_backward_op`): Dynamo had
    failed on the H200 tracing the dense AuxK's Triton launches inside the forward (at the GPT-2 and
    AlphaFold3 shapes), and inside an op AuxK can keep its side stream (AUXK_SIDE_STREAM_COMPILED),
    which traced code cannot."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, W_dec, k, features, k_aux):
        ctx.through_ops = features is not None and torch.compiler.is_compiling()
        ctx.side_stream, ctx.by_feature, ctx.sorted = None, None, None
        if ctx.through_ops:
            recon, vals, idx, aux_recon, *aux_saved = _topk_autoencoder_op(
                x, W_enc, b_enc, b_dec, W_dec, k, features, k_aux
            )
        else:
            ctx.side_stream = _auxk_side_stream(x) if features is not None else None
            recon, vals, idx, aux_recon, aux_saved, ctx.by_feature, ctx.sorted = _topk_autoencoder_forward(
                x, W_enc, b_enc, b_dec, W_dec, k, features, k_aux, ctx.side_stream, sort_in_forward=True
            )
        ctx.mark_non_differentiable(idx)
        ctx.save_for_backward(x, W_enc, b_dec, W_dec, vals, idx, *aux_saved)
        return recon, vals, idx, aux_recon

    @staticmethod
    def backward(ctx, grad_recon, grad_vals, _grad_idx, grad_aux):
        x, W_enc, b_dec, W_dec, vals, idx, *aux_saved = ctx.saved_tensors
        needs_x = ctx.needs_input_grad[0]
        if ctx.through_ops:
            grads = _topk_autoencoder_backward_op(
                grad_recon, grad_vals, grad_aux, x, W_enc, b_dec, W_dec, vals, idx, *aux_saved, needs_x
            )
        else:
            if ctx.sorted is not None:  # (long done: the forward's losses ran beside it)
                join_event(ctx.sorted, *ctx.by_feature)
            grads = _topk_autoencoder_backward_with_auxk(
                grad_recon, grad_vals, grad_aux, x, W_enc, b_dec, W_dec, vals, idx, tuple(aux_saved), needs_x,
                ctx.side_stream, ctx.by_feature,
            )  # fmt: skip
        dx, dW_enc, db_enc, db_dec, dW_dec = grads
        return dx if needs_x else None, dW_enc, db_enc, db_dec, dW_dec, None, None, None


def _topk_autoencoder_forward(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, W_dec: Tensor, k: int, features: Tensor | None,
    k_aux: int, side: torch.cuda.Stream | None, sort_in_forward: bool,
) -> tuple:  # fmt: skip
    """`_TopKAutoencoder`'s forward: (recon, vals, idx, AuxK's reconstruction (empty without `features`),
    what AuxK's backward needs (`_dense_auxk_forward`), the codes sorted by feature for the backward and
    the event the sort's stream recorded after it (both None unless `sort_in_forward` and the SORT_IN_FORWARD
    conditions hold)). With `side`, AuxK runs on that stream beside the encode and is joined before this
    returns."""
    aux_recon, aux_saved = x.new_empty(0, dtype=W_dec.dtype), ()
    operands = None
    if side is not None and AUXK_AFTER_ENCODE and AUXK_OPERANDS_FIRST:
        with on_stream(side):
            operands = _auxk_operands(x, W_enc, b_enc, b_dec, W_dec, features)

    def queue_auxk():
        with on_stream(side):
            return _dense_auxk_forward(x, W_enc, b_enc, b_dec, W_dec, features, k_aux, None, operands)

    if side is not None and not AUXK_AFTER_ENCODE:  # the side stream's work is short and takes free SMs first
        aux_recon, aux_saved = queue_auxk()
    vals, idx, _, _ = _encode_topk(x, W_enc, b_enc, b_dec, k, 0, None)
    if side is not None and AUXK_AFTER_ENCODE:
        aux_recon, aux_saved = queue_auxk()
    recon = _decode_sparse(vals, idx, W_dec, b_dec)
    by_feature, sorted_event = None, None
    n_features, d = W_enc.shape[1], W_enc.shape[0]
    if side is not None and sort_in_forward and SORT_IN_FORWARD and scatter_ops.route(n_features, d) == "blocked":
        if SORT_ON_OWN_STREAM:
            if x.device not in _sort_streams:
                _sort_streams[x.device] = torch.cuda.Stream(x.device)
            sort_stream = _sort_streams[x.device]
            with on_stream(sort_stream):
                by_feature = scatter_ops.sort_by_feature(idx, n_features)
            sorted_event = sort_stream.record_event()  # what the backward waits for
        else:
            by_feature = scatter_ops.sort_by_feature(idx, n_features)  # while the side stream runs AuxK
    if side is not None:
        join_stream(side, aux_recon, *aux_saved)
    elif features is not None:
        aux_recon, aux_saved = _dense_auxk_forward(x, W_enc, b_enc, b_dec, W_dec, features, k_aux, None)
    return recon, vals, idx, aux_recon, aux_saved, by_feature, sorted_event


def _topk_autoencoder_backward_with_auxk(
    grad_recon: Tensor, grad_vals: Tensor, grad_aux: Tensor, x: Tensor, W_enc: Tensor, b_dec: Tensor,
    W_dec: Tensor, vals: Tensor, idx: Tensor, aux_saved: tuple[Tensor, ...], needs_x: bool,
    side: torch.cuda.Stream | None, by_feature: scatter_ops.CodesByFeature | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """`_TopKAutoencoder`'s backward: (dx (empty unless `needs_x`), dW_enc, db_enc, db_dec, dW_dec), AuxK's
    gradients (from `aux_saved`, `_topk_autoencoder_forward`'s) added in. With `side` (AuxK's forward
    ran there), AuxK's backward runs there too, joined before this returns."""
    side = side if aux_saved else None
    dx_aux, dead, dead_dW_enc, dead_db_enc, dead_dW_dec = None, None, None, None, None
    if aux_saved:
        with on_stream(side) if side is not None else contextlib.nullcontext():
            aux_grads = _dense_auxk_backward(grad_aux, aux_saved, needs_x, True, True)
        (dx_aux, dead_dW_enc, dead_db_enc, dead_dW_dec), dead = aux_grads, aux_saved[-1]
    if side is not None:
        # The CUDA implementation itself, which waits for the side stream only where AuxK's
        # gradients are first added (after the codes' sort and d vals); the op is its dispatch.
        dx, dW_enc, db_enc, db_dec, dW_dec = autoencoder_ops.topk_autoencoder_backward(
            grad_recon, grad_vals, x, W_enc, b_dec, W_dec, vals, idx, needs_x, dead, dead_dW_enc,
            dead_db_enc, dead_dW_dec, side=side, by_feature=by_feature,
        )  # fmt: skip
        join_stream(side, dx_aux)
    else:
        dx, dW_enc, db_enc, db_dec, dW_dec = _topk_autoencoder_backward(
            grad_recon, grad_vals, x, W_enc, b_dec, W_dec, vals, idx, needs_x, dead, dead_dW_enc, dead_db_enc,
            dead_dW_dec,
        )  # fmt: skip
    if needs_x and dx_aux is not None:
        dx = dx + dx_aux.to(dx.dtype)
    return dx, dW_enc, db_enc, db_dec, dW_dec


@torch.library.custom_op("fastsae::topk_autoencoder", mutates_args=())
def _topk_autoencoder_op(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, W_dec: Tensor, k: int, features: Tensor, k_aux: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """`_topk_autoencoder_forward`, AuxK on its side stream where AUXK_SIDE_STREAM_COMPILED, the codes
    not sorted (the backward sorts them): (recon, vals, idx, AuxK's reconstruction, *what AuxK's
    backward needs), the centred x contiguous (the centring kernel pads its rows)."""
    recon, vals, idx, aux_recon, (centered, *saved), _, _ = _topk_autoencoder_forward(
        x, W_enc, b_enc, b_dec, W_dec, k, features, k_aux, _compiled_side_stream(x), sort_in_forward=False
    )
    return recon, vals, idx, aux_recon, centered.contiguous(), *saved


@_topk_autoencoder_op.register_fake
def _(x, W_enc, b_enc, b_dec, W_dec, k, features, k_aux):
    (B, d), slots = x.shape, features.shape[0] + -features.shape[0] % 8  # `_auxk_operands`' padding
    return (
        x.new_empty(B, d, dtype=W_dec.dtype),
        x.new_empty(B, k, dtype=W_enc.dtype),
        x.new_empty(B, k, dtype=torch.int32),
        x.new_empty(B, d, dtype=W_dec.dtype),
        x.new_empty(B, d, dtype=W_enc.dtype),
        W_enc.new_empty(d, slots),
        W_dec.new_empty(slots, d),
        x.new_empty(B, slots, dtype=W_dec.dtype),
        features.new_empty(slots),
    )


@torch.library.custom_op("fastsae::topk_autoencoder_backward_with_auxk", mutates_args=())
def _topk_autoencoder_backward_op(
    grad_recon: Tensor, grad_vals: Tensor, grad_aux: Tensor, x: Tensor, W_enc: Tensor, b_dec: Tensor,
    W_dec: Tensor, vals: Tensor, idx: Tensor, centered: Tensor, W_enc_dead: Tensor, W_dec_dead: Tensor,
    codes: Tensor, slots: Tensor, x_requires_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """`_topk_autoencoder_backward_with_auxk` of `_topk_autoencoder_op`'s outputs, AuxK's backward on
    its side stream where AUXK_SIDE_STREAM_COMPILED."""
    aux_saved = (centered, W_enc_dead, W_dec_dead, codes, slots)
    return _topk_autoencoder_backward_with_auxk(
        grad_recon, grad_vals, grad_aux, x, W_enc, b_dec, W_dec, vals, idx, aux_saved, x_requires_grad,
        _compiled_side_stream(x), None,
    )  # fmt: skip


@_topk_autoencoder_backward_op.register_fake
def _(
    grad_recon, grad_vals, grad_aux, x, W_enc, b_dec, W_dec, vals, idx, centered, W_enc_dead, W_dec_dead, codes,
    slots, x_requires_grad,
):  # fmt: skip
    return (*_encoder_grad_like(x, W_enc, b_dec, x_requires_grad), torch.empty_like(W_dec))


@torch.library.custom_op("fastsae::topk_autoencoder_backward", mutates_args=())
def _topk_autoencoder_backward(
    grad_recon: Tensor, grad_vals: Tensor, x: Tensor, W_enc: Tensor, b_dec: Tensor, W_dec: Tensor, vals: Tensor,
    idx: Tensor, x_requires_grad: bool, dead: Tensor | None, dead_dW_enc: Tensor | None,
    dead_db_enc: Tensor | None, dead_dW_dec: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    grads = reference.topk_autoencoder_backward(
        grad_recon, grad_vals, x, W_enc, b_dec, W_dec, vals, idx, dead, dead_dW_enc, dead_db_enc, dead_dW_dec
    )
    return only_asked(grads, (x_requires_grad, True, True, True, True))


_topk_autoencoder_backward.register_kernel("cuda")(autoencoder_ops.topk_autoencoder_backward)


@_topk_autoencoder_backward.register_fake
def _(grad_recon, grad_vals, x, W_enc, b_dec, W_dec, vals, idx, x_requires_grad, *_dead):
    return (*_encoder_grad_like(x, W_enc, b_dec, x_requires_grad), torch.empty_like(W_dec))


def topk_autoencoder_by_dead_count(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, W_dec: Tensor, k: int, dead: Tensor, k_aux: int,
    rungs: list[int], fired_only: bool,
) -> TopKAutoencoderOutput:  # fmt: skip
    """`topk_autoencoder` with AuxK over the dead features of the mask `dead` [F], for code that
    torch.compile traces whole and so cannot count them on the host: AuxK runs densely over the shortest
    list of `rungs` (lengths, ascending) that holds them, or past the last as the fused encode's second
    top-k stream (`encode_topk(..., k_aux, dead)`). The choice is made on the device, by a binary search of
    torch.cond over the rungs, in the forward and again in the backward (`_TopKAutoencoderByDeadCount`).
    `fired_only`: as `decode_sparse`'s, for the fused stream's decode."""
    _check_encoder_args(x, W_enc, b_enc, b_dec)
    _check_decoder_weight(W_dec, W_enc)
    n_features = W_enc.shape[1]
    _check_k("k", k, n_features, minimum=1)
    _check_k("k_aux", k_aux, n_features, minimum=1)
    _check_dead_mask(dead, n_features, x)
    if not rungs or any(not isinstance(n, int) or n < 0 for n in rungs) or list(rungs) != sorted(rungs):
        raise ValueError(f"rungs must be list lengths (ints >= 0) in ascending order, got {rungs!r}")
    recon, vals, idx, aux_recon = _TopKAutoencoderByDeadCount.apply(
        x, W_enc, b_enc, b_dec, W_dec, dead, k, k_aux, tuple(rungs), fired_only
    )
    return TopKAutoencoderOutput(recon, vals, idx, aux_recon)


def _by_dead_count(n_dead: Tensor, rungs: tuple[int, ...], dense: Callable, fused: Callable, operands: tuple):
    """torch.cond's binary search over `rungs`: dense(length)(*operands) for the shortest rung that holds
    n_dead, fused(*operands) past the last."""

    def pick(first: int, last: int) -> Callable:  # rungs[last - 1] holds them
        if last - first == 1:
            return dense(rungs[first])
        middle = (first + last - 1) // 2
        below, above = pick(first, middle + 1), pick(middle + 1, last)
        return lambda *operands: torch.cond(n_dead <= rungs[middle], below, above, operands)

    return torch.cond(n_dead <= rungs[-1], pick(0, len(rungs)), fused, operands)


class _TopKAutoencoderByDeadCount(torch.autograd.Function):
    """`topk_autoencoder_by_dead_count` as one autograd node whose forward and backward each branch by
    torch.cond on the dead count. Not torch.cond's own autograd: its backward runs the branch's forward
    again (the encode, the decode and AuxK: each step encoded twice, counted on a CPU, torch 2.13), where
    this backward recomputes only the dense AuxK's operands and codes over the list
    (`_topk_autoencoder_backward_recompute_op`) and writes each weight's gradient once, as the eager
    joint node does. The fused stream's branch keeps its AuxK codes (zeros in the dense branches)."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, W_dec, dead, k, k_aux, rungs, fired_only):
        B = x.shape[0]

        def dense(length: int) -> Callable:
            def branch(x, W_enc, b_enc, b_dec, W_dec, dead):
                features = torch.nonzero_static(dead, size=length, fill_value=-1).squeeze(1)
                recon, vals, idx, aux_recon, *_ = _topk_autoencoder_op(
                    x, W_enc, b_enc, b_dec, W_dec, k, features, k_aux
                )
                no_aux_vals, no_aux_idx = vals.new_zeros(B, k_aux), idx.new_zeros(B, k_aux)
                return recon, vals, idx.view(torch.float32), aux_recon, no_aux_vals, no_aux_idx.view(torch.float32)

            return branch

        def fused(x, W_enc, b_enc, b_dec, W_dec, dead):
            vals, idx, aux_vals, aux_idx = _encode_topk(x, W_enc, b_enc, b_dec, k, k_aux, dead)
            recon = _decode_sparse(vals, idx, W_dec, b_dec, fired_only)
            aux_recon = _decode_sparse(aux_vals, aux_idx, W_dec, None)
            return recon, vals, idx.view(torch.float32), aux_recon, aux_vals, aux_idx.view(torch.float32)

        n_dead = dead.sum()
        # (the indices travel through torch.cond as float32 of their bits, as every output is a float)
        recon, vals, idx_bits, aux_recon, aux_vals, aux_idx_bits = _by_dead_count(
            n_dead, rungs, dense, fused, (x, W_enc, b_enc, b_dec, W_dec, dead)
        )
        idx, aux_idx = idx_bits.view(torch.int32), aux_idx_bits.view(torch.int32)
        ctx.mark_non_differentiable(idx)
        ctx.save_for_backward(x, W_enc, b_enc, b_dec, W_dec, dead, n_dead, vals, idx, aux_vals, aux_idx)
        ctx.k_aux, ctx.rungs, ctx.fired_only = k_aux, rungs, fired_only
        return recon, vals, idx, aux_recon

    @staticmethod
    def backward(ctx, grad_recon, grad_vals, _grad_idx, grad_aux):
        x, W_enc, b_enc, b_dec, W_dec, dead, n_dead, vals, idx, aux_vals, aux_idx = ctx.saved_tensors
        needs_x, k_aux = ctx.needs_input_grad[0], ctx.k_aux

        def dense(length: int) -> Callable:
            def branch(grad_recon, grad_vals, grad_aux, x, W_enc, b_enc, b_dec, W_dec, dead, vals, idx):
                features = torch.nonzero_static(dead, size=length, fill_value=-1).squeeze(1)
                return _topk_autoencoder_backward_recompute_op(
                    grad_recon, grad_vals, grad_aux, x, W_enc, b_enc, b_dec, W_dec, vals, idx, features, k_aux,
                    needs_x,
                )  # fmt: skip

            return branch

        def fused(grad_recon, grad_vals, grad_aux, x, W_enc, b_enc, b_dec, W_dec, dead, vals, idx):
            d_vals, dW_dec = _decode_sparse_backward(grad_recon, vals, idx, W_dec, ctx.fired_only)
            d_aux_vals, dW_dec_aux = _decode_sparse_backward(grad_aux, aux_vals, aux_idx, W_dec)
            dx, dW_enc, db_enc, db_dec = _encode_topk_backward(
                grad_vals + d_vals, d_aux_vals, x, W_enc, b_dec, vals, idx, aux_vals, aux_idx, needs_x
            )
            return dx, dW_enc, db_enc, db_dec + _decoder_bias_grad(grad_recon, b_dec.dtype), dW_dec + dW_dec_aux

        operands = (grad_recon, grad_vals, grad_aux, x, W_enc, b_enc, b_dec, W_dec, dead, vals, idx)
        dx, dW_enc, db_enc, db_dec, dW_dec = _by_dead_count(n_dead, ctx.rungs, dense, fused, operands)
        return dx if needs_x else None, dW_enc, db_enc, db_dec, dW_dec, None, None, None, None, None


@torch.library.custom_op("fastsae::topk_autoencoder_backward_recompute_auxk", mutates_args=())
def _topk_autoencoder_backward_recompute_op(
    grad_recon: Tensor, grad_vals: Tensor, grad_aux: Tensor, x: Tensor, W_enc: Tensor, b_enc: Tensor,
    b_dec: Tensor, W_dec: Tensor, vals: Tensor, idx: Tensor, features: Tensor, k_aux: int, x_requires_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """`_topk_autoencoder_backward_with_auxk` after recomputing what the dense AuxK over `features` saves
    (its operands and codes, not its reconstruction; `_dense_auxk_saved`)."""
    aux_saved = _dense_auxk_saved(x, W_enc, b_enc, b_dec, W_dec, features, k_aux, None)
    return _topk_autoencoder_backward_with_auxk(
        grad_recon, grad_vals, grad_aux, x, W_enc, b_dec, W_dec, vals, idx, aux_saved, x_requires_grad,
        _compiled_side_stream(x), None,
    )  # fmt: skip


@_topk_autoencoder_backward_recompute_op.register_fake
def _(grad_recon, grad_vals, grad_aux, x, W_enc, b_enc, b_dec, W_dec, vals, idx, features, k_aux, x_requires_grad):
    return (*_encoder_grad_like(x, W_enc, b_dec, x_requires_grad), torch.empty_like(W_dec))


def decode_dense(acts: Tensor, W_dec: Tensor, b_dec: Tensor | None = None) -> Tensor:
    """Dense decode acts @ W_dec (+ b_dec) for ReLU / JumpReLU / BatchTopK codes: one GEMM, so plain
    PyTorch (cuBLAS) is the fast path."""
    _check_float("acts", acts, 2)
    _check_float("W_dec", W_dec, 2)
    if acts.shape[1] != W_dec.shape[0]:
        raise ValueError(f"acts has {acts.shape[1]} features but W_dec has {W_dec.shape[0]} rows")
    _check_decoder_bias(b_dec, W_dec)
    _check_same_device(acts=acts, W_dec=W_dec, b_dec=b_dec)
    out = acts.to(W_dec.dtype) @ W_dec
    return out if b_dec is None else out + b_dec.to(W_dec.dtype)


# ---------------------------------------------------------------------------------------------------
# Death statistics (C++/CUDA extension ops; see fastsae/_ext.py)


def fire_counts(idx: Tensor, n_features: int, vals: Tensor | None = None) -> Tensor:
    """Per-feature fire counts int64 [F] from sparse codes; with `vals`, entries whose value is not
    > 0 are not counted. Out-of-range indices raise on CPU."""
    if idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"idx must be int32 or int64, got {idx.dtype}")
    if n_features < 1:
        raise ValueError(f"n_features must be >= 1, got {n_features}")
    if vals is not None and vals.shape != idx.shape:
        raise ValueError(f"vals has shape {tuple(vals.shape)} but idx has {tuple(idx.shape)}")
    return torch.ops.fastsae.fire_counts(idx, n_features, vals)


def fire_counts_dense(acts: Tensor) -> Tensor:
    """Per-feature count of codes > 0 in dense codes [B, F] -> int64 [F]."""
    _check_float("acts", acts, 2)
    return torch.ops.fastsae.fire_counts_dense(acts)


def update_since_fired_(tokens_since_fired: Tensor, counts: Tensor, n_tokens: int) -> None:
    """In place: 0 where a feature fired in this batch of n_tokens tokens, else += n_tokens."""
    torch.ops.fastsae.update_since_fired(tokens_since_fired, counts, n_tokens)


def dead_mask(tokens_since_fired: Tensor, threshold: int) -> Tensor:
    """bool [F]: features that have not fired for more than `threshold` tokens."""
    return torch.ops.fastsae.dead_mask(tokens_since_fired, threshold)


# ---------------------------------------------------------------------------------------------------
# Losses and the decoder constraint: the reconstruction sums and the decoder's in-place steps as kernels
# on CUDA (one pass each); the other penalties are elementwise / reductions where plain PyTorch is fast


@torch.library.custom_op("fastsae::reconstruction_sums", mutates_args=())
def _reconstruction_sums(x_hat: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    return reference.reconstruction_sums(x_hat, x)


_reconstruction_sums.register_kernel("cuda")(loss_ops.reconstruction_sums)


@_reconstruction_sums.register_fake
def _(x_hat, x):
    acc = reference.accumulate_dtype(x_hat, x)
    return x.new_empty((), dtype=acc), x.new_empty((), dtype=acc)


@torch.library.custom_op("fastsae::reconstruction_sums_backward", mutates_args=())
def _reconstruction_sums_backward(
    grad_error: Tensor, grad_deviations: Tensor, x_hat: Tensor, x: Tensor, x_hat_grad: bool, x_grad: bool
) -> tuple[Tensor, Tensor]:
    grads = reference.reconstruction_sums_backward(grad_error, grad_deviations, x_hat, x)
    return only_asked(grads, (x_hat_grad, x_grad))


_reconstruction_sums_backward.register_kernel("cuda")(loss_ops.reconstruction_sums_backward)


@_reconstruction_sums_backward.register_fake
def _(grad_error, grad_deviations, x_hat, x, x_hat_grad, x_grad):
    return only_asked((torch.empty_like(x_hat), torch.empty_like(x)), (x_hat_grad, x_grad))


def _reconstruction_sums_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _reconstruction_sums_grad(ctx, grad_error, grad_deviations):
    x_hat, x = ctx.saved_tensors
    grads = _reconstruction_sums_backward(grad_error, grad_deviations, x_hat, x, *ctx.needs_input_grad)
    return _only_needed(ctx, grads)


_reconstruction_sums.register_autograd(_reconstruction_sums_grad, setup_context=_reconstruction_sums_setup)


def _check_reconstruction(name: str, x_hat: Tensor, x: Tensor) -> None:
    """x_hat, named `name`, and x: float [n, d] of one shape, n > 0."""
    _check_float(name, x_hat, 2)
    _check_float("x", x, 2)
    if x_hat.shape != x.shape:
        raise ValueError(f"{name} {tuple(x_hat.shape)} and x {tuple(x.shape)} must have the same shape")
    if x.shape[0] == 0:
        raise ValueError("x is an empty batch (0 tokens): there is no reconstruction error to sum")


def reconstruction_sums(x_hat: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """(squared error, squared deviations): sum of (x_hat - x)^2 over every element and sum over the tokens
    of ||x - mean(x)||^2, fp32 scalars (fp64 for fp64 inputs) for x_hat and x [n, d] of any float dtypes;
    what `mse` and `fvu` divide. On CUDA one pass over both (fastsae/ops/loss.py). Differentiable."""
    _check_reconstruction("x_hat", x_hat, x)
    _check_same_device(x_hat=x_hat, x=x)
    return _reconstruction_sums(x_hat, x)


def mse(x_hat: Tensor, x: Tensor) -> Tensor:
    """`reference.mse` from `reconstruction_sums`."""
    return reconstruction_sums(x_hat, x)[0] / x.numel()


def fvu(x_hat: Tensor, x: Tensor) -> Tensor:
    """`reference.fvu` from `reconstruction_sums`."""
    return reference.fvu_from_sums(*reconstruction_sums(x_hat, x), x.shape[0])


def auxk_loss(aux_recon: Tensor, residual: Tensor, n_dead: Tensor, k_aux: int) -> Tensor:
    """`reference.auxk_loss` from `reconstruction_sums`."""
    return fvu(aux_recon, residual) * auxk_scale(n_dead, k_aux)


@torch.library.custom_op("fastsae::training_losses", mutates_args=())
def _training_losses(
    recon: Tensor, x: Tensor, aux_recon: Tensor | None, n_dead: Tensor | None, k_aux: int, auxk_coef: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return reference.training_losses(recon, x, aux_recon, n_dead, k_aux, auxk_coef)


_training_losses.register_kernel("cuda")(loss_ops.training_losses)


@_training_losses.register_fake
def _(recon, x, aux_recon, n_dead, k_aux, auxk_coef):
    acc = reference.accumulate_dtype(recon, x, aux_recon)
    return (*(x.new_empty((), dtype=acc) for _ in range(4)), x.new_empty(5, dtype=acc))


@torch.library.custom_op("fastsae::training_losses_backward", mutates_args=())
def _training_losses_backward(
    grad_loss: Tensor | None, grad_mse: Tensor | None, grad_fvu: Tensor | None, grad_auxk: Tensor | None,
    sums: Tensor, recon: Tensor, x: Tensor, aux_recon: Tensor | None, auxk_coef: float, recon_grad: bool,
    x_grad: bool, aux_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    return loss_ops.reference_training_losses_backward(
        (grad_loss, grad_mse, grad_fvu, grad_auxk), sums, recon, x, aux_recon, auxk_coef, (recon_grad, x_grad, aux_grad)
    )


_training_losses_backward.register_kernel("cuda")(loss_ops.training_losses_backward)


@_training_losses_backward.register_fake
def _(grad_loss, grad_mse, grad_fvu, grad_auxk, sums, recon, x, aux_recon, auxk_coef, recon_grad, x_grad, aux_grad):
    shapes = (recon_grad, x_grad, aux_grad and aux_recon is not None)
    return tuple(
        t.new_empty(t.shape if wanted else 0)
        for t, wanted in zip((recon, x, x if aux_recon is None else aux_recon), shapes)
    )


def _training_losses_setup(ctx, inputs, output):
    recon, x, aux_recon, _, _, auxk_coef = inputs
    ctx.save_for_backward(recon, x, aux_recon, output[-1])
    ctx.auxk_coef = auxk_coef
    ctx.mark_non_differentiable(output[-1])
    # A loss no one differentiates gets None, not a zero tensor: no fills and no launches for it.
    ctx.set_materialize_grads(False)


def _training_losses_grad(ctx, grad_loss, grad_mse, grad_fvu, grad_auxk, _grad_sums):
    recon, x, aux_recon, sums = ctx.saved_tensors
    asked = ctx.needs_input_grad[:3]
    grads = _training_losses_backward(
        grad_loss, grad_mse, grad_fvu, grad_auxk, sums, recon, x, aux_recon, ctx.auxk_coef, *asked
    )
    return (*(g if wanted else None for g, wanted in zip(grads, asked)), None, None, None)


_training_losses.register_autograd(_training_losses_grad, setup_context=_training_losses_setup)


class TrainingLosses(NamedTuple):
    """A TopK SAE's training losses, fp32 scalars: loss = fvu + auxk_coef * auxk (to backpropagate),
    the MSE, the FVU and AuxK's loss (0 without it)."""

    loss: Tensor
    mse: Tensor
    fvu: Tensor
    auxk: Tensor


def training_losses(
    recon: Tensor, x: Tensor, aux_recon: Tensor | None = None, n_dead: Tensor | None = None, k_aux: int = 1,
    auxk_coef: float = 1 / 32,
) -> TrainingLosses:  # fmt: skip
    """`reference.training_losses`: the MSE and FVU of the reconstruction `recon` of x [n, d] and, given
    `aux_recon` [n, d] and `n_dead` (a 0-d integer tensor, the dead features' count), AuxK's loss: the
    FVU of its reconstruction of the residual x - recon (detached), weighted by min(n_dead / k_aux, 1);
    loss = fvu + auxk_coef * auxk. On CUDA three launches, and one for the gradient (fastsae/ops/loss.py),
    where the same values through `reconstruction_sums` and scalar arithmetic take about 35.
    Differentiable w.r.t. recon, x and aux_recon."""
    _check_reconstruction("recon", recon, x)
    if aux_recon is not None:
        _check_reconstruction("aux_recon", aux_recon, x)
        if not isinstance(n_dead, Tensor) or n_dead.dim() != 0 or n_dead.is_floating_point():
            raise ValueError(f"n_dead must be a 0-d integer tensor with aux_recon, got {n_dead!r}")
        if not isinstance(k_aux, int) or isinstance(k_aux, bool) or k_aux < 1:
            raise ValueError(f"k_aux must be a positive int, got {k_aux!r}")
    _check_same_device(recon=recon, x=x, aux_recon=aux_recon, n_dead=n_dead)
    *losses, _ = _training_losses(recon, x, aux_recon, n_dead if aux_recon is not None else None, k_aux, auxk_coef)
    return TrainingLosses(*losses)


fvu_from_sums = reference.fvu_from_sums
auxk_scale = reference.auxk_scale
l1_penalty = reference.l1_penalty
l1_sum = reference.l1_sum
l0_penalty = reference.l0_penalty
jumprelu = reference.jumprelu
normalize_decoder_rows = reference.normalize_decoder_rows
remove_parallel_grad = reference.remove_parallel_grad


def _fused_decoder_kernels(W_dec: Tensor) -> bool:
    return W_dec.is_cuda and W_dec.dtype != torch.float64


@torch.no_grad()
def remove_parallel_grad_(W_dec: Tensor, grad: Tensor) -> None:
    """In place on `grad`: `remove_parallel_grad` in one pass over W_dec on CUDA (fastsae/ops/decoder.py)."""
    _check_float("W_dec", W_dec, 2)
    if grad.shape != W_dec.shape:
        raise ValueError(f"grad has shape {tuple(grad.shape)} but W_dec has {tuple(W_dec.shape)}")
    _check_same_device(W_dec=W_dec, grad=grad)
    if _fused_decoder_kernels(W_dec):
        decoder_ops.remove_parallel_grad_(W_dec, grad)
    else:
        grad.copy_(remove_parallel_grad(W_dec, grad))


@torch.no_grad()
def decoder_adam_(
    W_dec: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int | Tensor, lr: float | Tensor,
    beta1: float, beta2: float, eps: float,
) -> None:  # fmt: skip
    """In place on W_dec and the Adam moments: `reference.decoder_adam` (the gradient's parallel part
    removed, Adam's step, rows renormalised), in one pass over them on CUDA (fastsae/ops/decoder.py).
    `step` (counted from 1) and `lr` may be 0-dim tensors on W_dec's device, which a CUDA graph reads
    at every replay."""
    _check_float("W_dec", W_dec, 2)
    _check_adam_state("W_dec", W_dec, grad, exp_avg, exp_avg_sq, step, lr)
    unit_rows = all(t.stride(1) == 1 for t in (W_dec, grad, exp_avg, exp_avg_sq))
    args = (W_dec, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps)
    if _fused_decoder_kernels(W_dec) and unit_rows:
        decoder_ops.decoder_adam_(*args)
    else:
        _copy_into((W_dec, exp_avg, exp_avg_sq), reference.decoder_adam(*args))


@torch.no_grad()
def adam_(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int | Tensor, lr: float | Tensor,
    beta1: float, beta2: float, eps: float,
) -> None:  # fmt: skip
    """In place on `param` and the Adam moments: `reference.adam` (torch.optim.Adam's step), in one
    pass over them on CUDA (fastsae/ops/decoder.py). `step` (counted from 1) and `lr` may be 0-dim
    tensors on param's device, which a CUDA graph reads at every replay."""
    _check_float("param", param, param.dim())
    _check_adam_state("param", param, grad, exp_avg, exp_avg_sq, step, lr)
    contiguous = all(t.is_contiguous() for t in (param, grad, exp_avg, exp_avg_sq))
    args = (param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps)
    if _fused_decoder_kernels(param) and contiguous:
        decoder_ops.adam_(*args)
    else:
        _copy_into((param, exp_avg, exp_avg_sq), reference.adam(*args))


def _check_adam_state(
    name: str, param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int | Tensor,
    lr: float | Tensor,
) -> None:  # fmt: skip
    for other, tensor in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if tensor.shape != param.shape:
            raise ValueError(f"{other} has shape {tuple(tensor.shape)} but {name} has {tuple(param.shape)}")
    _check_same_device(**{name: param}, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    for other, value in (("step", step), ("lr", lr)):
        if isinstance(value, Tensor):
            if value.dim() != 0 or (other == "lr" and not value.is_floating_point()):
                raise ValueError(f"{other} must be a number or a 0-dim tensor (floating for lr), got a "
                                 f"{value.dim()}-dim {value.dtype} tensor")  # fmt: skip
            _check_same_device(**{name: param, other: value})


def _copy_into(targets: tuple[Tensor, ...], values: tuple[Tensor, ...]) -> None:
    """The reference's results written into the caller's tensors (the in-place ops' CPU path)."""
    for target, value in zip(targets, values):
        target.copy_(value)


@torch.no_grad()
def normalize_decoder_rows_(W_dec: Tensor) -> None:
    """In place: `normalize_decoder_rows` in one pass over W_dec on CUDA (fastsae/ops/decoder.py)."""
    _check_float("W_dec", W_dec, 2)
    if _fused_decoder_kernels(W_dec):
        decoder_ops.normalize_rows_(W_dec)
    else:
        W_dec.copy_(normalize_decoder_rows(W_dec))
