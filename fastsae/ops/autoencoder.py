"""Backward of a TopK SAE's training node (`functional.topk_autoencoder`): the sparse decode's and the
encode's gradients in one pass over the codes (`reference.topk_autoencoder_backward`).

Against the two ops' backwards called in turn (`decode.decode_sparse_backward`, then
`encode.encode_topk_backward`), it
- sorts the codes by feature once for both weight gradients, which sum over the same idx
  (`scatter.sort_by_feature`, on the blocked route);
- adds AuxK's dense gradients over the dead features inside those per-feature sums, before each
  gradient is written, instead of scattering them into the finished gradients with index_add_ (along
  F in dW_enc's [d, F] layout: one element per 32-byte sector);
- takes d b_dec's centring term from d b_enc with AuxK's share already in it (one pass over W_enc).
d vals (each code's d x_hat . its decoder row) stay a kernel of their own (`decode.sparse_dvals`, about
100 us of the captured GPT-2 and AlphaFold3 steps on the H200). Taking them inside dW_dec's sums, which
load every code's d x_hat row anyway, measured no faster there: the captured SAEAdam step 1.983 against
1.970 ms at GPT-2, 1.946 against 1.937 at AlphaFold3 and 3.021 against 3.035 at k = 128 (op
`train_step_ab` in bench/results, two rounds each), as the decoder sums' registers rose from 72 to 99 a
thread; commit 77d3235 has that path (FASTSAE_FUSED_DVALS). Nor did taking dW_dec's sums in dW_enc's
launch (each code's order, token and feature loaded once, the two rows gathered side by side; 115-127
registers a thread at half the columns a warp): 1.475 -> 1.541 ms at AlphaFold3's shape, 1.700 -> 1.763
at GPT-2's (a54747a has it). AuxK's backward with dW_dec's dead rows last measured level (1.472 ->
1.476 ms at AlphaFold3's, 1.699 -> 1.695 at GPT-2's).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from .columns import column_sums
from .decode import decode_sparse, sparse_dvals
from .launch import join_event, join_stream, on_stream, only_asked
from .scatter import CodesByFeature, feature_sums, route, slots, sort_by_feature

# With AuxK on a side stream (`functional.AUXK_SIDE_STREAM`), dW_dec's per-feature sums run there after
# AuxK's backward, beside d vals on the current stream (both gather a [B, d] row per code from L2).
# Measured on the H200 (captured SAEAdam step, bf16, off -> on): AF3 1.686 -> 1.659 ms, GPT-2 1.920 ->
# 1.877 ms, GPT-2 width at k = 128 2.799 -> 2.756 ms, Llama-8B level (16.42 -> 16.47 ms), and AF3's peak
# memory 740 -> 675 MB.
DECODER_SUMS_ON_SIDE_STREAM = True
# The encoder's coefficients, where(vals > 0, d vals + grad_vals, 0), written by the d vals kernel (in
# fp32 before the rounding) instead of three torch launches over [B, K] after it. Measured on the H200
# (captured SAEAdam step, bf16, off -> on, one round): AF3 1.642 -> 1.644 ms (level), GPT-2 1.740 ->
# 1.730 ms (9706992).
COEF_IN_DVALS = True


def topk_autoencoder_backward(
    grad_recon: Tensor, grad_vals: Tensor, x: Tensor, W_enc: Tensor, b_dec: Tensor, W_dec: Tensor, vals: Tensor,
    idx: Tensor, x_requires_grad: bool, dead: Tensor | None, dead_dW_enc: Tensor | None,
    dead_db_enc: Tensor | None, dead_dW_dec: Tensor | None, side: torch.cuda.Stream | None = None,
    by_feature: CodesByFeature | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(dx, dW_enc, db_enc, db_dec, dW_dec); same contract as `reference.topk_autoencoder_backward`
    except that dx is an empty tensor unless `x_requires_grad`. Deterministic when torch's deterministic
    algorithms are on (`scatter.feature_sums`). `side`: the stream that is still computing AuxK's
    gradients (`functional.AUXK_SIDE_STREAM`); the current stream waits for it only where they are first
    added, after the codes' sort and d vals, and with DECODER_SUMS_ON_SIDE_STREAM dW_dec's sums run
    there too, beside d vals. (Sorting the codes on `side` first, before AuxK's backward, so that d vals
    starts at once, measured slower on the H200: captured SAEAdam step 1.605 -> 1.643 ms at AlphaFold3's
    shape, 5183f92.) `by_feature`: `sort_by_feature(idx, F)`, where the caller has sorted the codes
    already (`functional.SORT_IN_FORWARD`)."""
    if torch.float64 in (W_enc.dtype, W_dec.dtype):
        if side is not None:
            join_stream(side)
        grads = reference.topk_autoencoder_backward(
            grad_recon, grad_vals, x, W_enc, b_dec, W_dec, vals, idx, dead, dead_dW_enc, dead_db_enc, dead_dW_dec
        )
        return only_asked(grads, (x_requires_grad, True, True, True, True))
    d, n_features = W_enc.shape
    dead_slots = None
    if route(n_features, d) == "blocked":
        if by_feature is None:
            by_feature = sort_by_feature(idx, n_features)
        if dead is not None:  # where both sums add AuxK's rows, found once
            dead_slots = slots(dead, n_features)

    def decoder_sums() -> Tensor:
        extra = None if dead is None else (dead, dead_dW_dec, None)
        return feature_sums(
            grad_recon, vals, idx, n_features, dtype=W_dec.dtype, by_feature=by_feature, extra=extra,
            extra_slots=dead_slots,
        )[0]  # fmt: skip

    dW_dec = None
    auxk_done = None if side is None else side.record_event()  # AuxK's backward, queued there first
    if side is not None and DECODER_SUMS_ON_SIDE_STREAM:
        with on_stream(side):
            dW_dec = decoder_sums()
    # d b_dec's decoder term, while AuxK's backward (the critical path here) runs on `side`, rather than
    # after the weights' sums, where the step's last launches wait for it
    grad_recon_sums = column_sums(grad_recon)
    if COEF_IN_DVALS:
        coef = sparse_dvals(grad_recon, vals, idx, W_dec, grad_vals=grad_vals)
    else:
        coef = torch.where(vals > 0, sparse_dvals(grad_recon, vals, idx, W_dec) + grad_vals, 0)  # the ReLU's mask
    if auxk_done is not None:  # AuxK's gradients, not dW_dec's sums behind them: dW_enc's run beside those
        join_event(auxk_done, dead_dW_enc, dead_db_enc, dead_dW_dec)
    if dW_dec is None:
        dW_dec = decoder_sums()
    dW_enc, db_enc, weighted = feature_sums(
        x, coef, idx, n_features, center=b_dec, dtype=W_enc.dtype, transposed=True, by_feature=by_feature,
        extra=None if dead is None else (dead, dead_dW_enc, dead_db_enc), extra_slots=dead_slots, weight=W_enc,
    )  # fmt: skip
    db_dec = grad_recon_sums - weighted  # the centring's share, -W_enc @ db_enc, from the sums
    if x_requires_grad:
        dx = decode_sparse(coef, idx, W_enc.t(), None).to(x.dtype)  # rows of W_enc^T: strided gathers
    else:  # (nobody reads it: no fill of [B, d])
        dx = x.new_empty(0)
    if side is not None:
        join_stream(side, dW_dec)
    return dx, dW_enc, db_enc.to(W_enc.dtype), db_dec.to(b_dec.dtype), dW_dec
