"""The pure-PyTorch definition of every fastsae op.

Everything here is written for clarity, not speed: dense [B, F] intermediates, fp32 (or fp64 when any
input is fp64) arithmetic throughout, outputs cast back to the parameter dtype. The Triton and CUDA
kernels must match these functions within dtype tolerance; the tests compare against them in fp64,
and the custom ops of `fastsae.functional` use them as their CPU implementation.

Shapes: x [B, d], W_enc [d, F], b_enc [F], W_dec [F, d], b_dec [d], vals/idx [B, k].
An SAE computes z = act((x - b_dec) @ W_enc + b_enc) and x_hat = z @ W_dec + b_dec.
"""

from __future__ import annotations

import torch
from torch import Tensor


def accumulate_dtype(*tensors: Tensor | None) -> torch.dtype:
    """fp64 when any input is fp64 (tests), fp32 otherwise: fp16/bf16 inputs accumulate in fp32."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def center(x: Tensor, b_dec: Tensor) -> Tensor:
    """x - b_dec in the accumulate dtype: the subtraction happens before any cast to a matmul dtype,
    so outlier dimensions with |mean| >> std keep their per-token signal ("outlier-aware")."""
    acc = accumulate_dtype(x, b_dec)
    return x.to(acc) - b_dec.to(acc)


def pre_activation(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor) -> Tensor:
    """(x - b_dec) @ W_enc + b_enc -> [B, F], in the accumulate dtype."""
    xc = center(x, b_dec)
    return xc @ W_enc.to(xc.dtype) + b_enc.to(xc.dtype)


def gemm_bias_group_max(
    xc: Tensor, W_enc: Tensor, b_enc: Tensor, group: int, tile_rows: int = 128
) -> tuple[Tensor, Tensor]:
    """pre = xc @ W_enc + b_enc accumulated in fp32 and rounded to xc's dtype, [B, F], and its
    `group_maxima`."""
    pre = (xc.float() @ W_enc.float() + b_enc.float()).to(xc.dtype)
    return pre, group_maxima(pre, group, tile_rows)


def group_maxima(pre: Tensor, group: int, tile_rows: int = 128) -> Tensor:
    """The maxima of each row of `pre` [B, F] over every `group` adjacent features, as fp32
    [ceil(F / group), B rounded up to tile_rows]: a group's maxima contiguous over the rows, which are
    rounded up to whole tiles (the padding rows' entries are not defined; here -inf)."""
    B, F = pre.shape
    n_groups, rows = -(-F // group), -(-B // tile_rows) * tile_rows
    padded = pre.float().new_full((rows, n_groups * group), float("-inf"))
    padded[:B, :F] = pre.float()
    return padded.view(rows, n_groups, group).amax(-1).T.contiguous()


def gemm_bias_filter(xc: Tensor, W_enc: Tensor, b_enc: Tensor, tau: Tensor) -> tuple[Tensor, list[Tensor]]:
    """The filter GEMM: (count int32 [B], keys) for pre = xc @ W_enc + b_enc in fp32, where count[r] is
    the number of entries of row r with pre > tau[r] (NaN passes none) and keys[r] their int64 keys,
    largest first: the high word orders like the fp32 value (negative values' magnitude bits flipped),
    the low word is the feature. A kernel stores the first `cap` that reach its buffer, in any order.
    `key_values` reads the values back."""
    pre = xc.float() @ W_enc.float() + b_enc.float()
    passed = pre > tau.float()[:, None]
    features = torch.arange(pre.shape[1], device=pre.device, dtype=torch.int64)
    keys = (_flip_negatives(pre.view(torch.int32)).to(torch.int64) << 32) | features
    rows = [keys[r][passed[r]].sort(descending=True).values for r in range(pre.shape[0])]
    return passed.sum(dim=1, dtype=torch.int32), rows


def key_values(keys: Tensor) -> Tensor:
    """The fp32 values of `gemm_bias_filter`'s int64 keys (their features are the low words)."""
    return _flip_negatives((keys >> 32).to(torch.int32)).view(torch.float32)


def _flip_negatives(bits: Tensor) -> Tensor:
    """int32 fp32 bits with the magnitude bits of negatives flipped: signed int order is then the values'
    order. The flip is its own inverse."""
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def topk_activation(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per-row top-k of `pre`; values are post-ReLU (a selected negative pre-activation becomes 0 and
    does not count as fired). Returns vals [B, k] (dtype of pre) and idx [B, k] int32."""
    top_vals, top_idx = pre.topk(k, dim=-1)
    return top_vals.relu(), top_idx.to(torch.int32)


def encode_topk(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    k: int,
    k_aux: int = 0,
    dead_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """TopK encode, plus the AuxK candidates: the top-k_aux post-ReLU pre-activations among features
    flagged in `dead_mask` (a feature not flagged dead yields value 0 if it is ever selected, so the
    shape stays fixed and no host synchronisation is needed). Returns vals, idx, aux_vals, aux_idx;
    the aux tensors are [B, 0] when k_aux == 0."""
    pre = pre_activation(x, W_enc, b_enc, b_dec)
    vals, idx = topk_activation(pre, k)
    if k_aux > 0:
        dead_pre = pre.masked_fill(~dead_mask.bool(), float("-inf"))
        aux_vals, aux_idx = topk_activation(dead_pre, k_aux)
    else:
        aux_vals, aux_idx = pre.new_empty(pre.shape[0], 0), idx.new_empty(pre.shape[0], 0)
    return vals.to(W_enc.dtype), idx, aux_vals.to(W_enc.dtype), aux_idx


def encode_topk_positive_counts(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int
) -> tuple[Tensor, Tensor, Tensor]:
    """TopK encode (vals, idx as in `encode_topk`) and, per feature, how many tokens have a positive
    pre-activation (int64 [F]): the death classification's evidence, since a feature never positive
    is dead-by-ReLU and one positive but never selected is dead-by-TopK."""
    pre = pre_activation(x, W_enc, b_enc, b_dec)
    vals, idx = topk_activation(pre, k)
    return vals.to(W_enc.dtype), idx, (pre > 0).sum(dim=0)


def encode_relu(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, threshold: Tensor | None = None) -> Tensor:
    """Dense codes: ReLU, or JumpReLU when a per-feature `threshold` [F] is given
    (z = pre where pre > threshold, else 0). Returns [B, F] in the parameter dtype."""
    pre = pre_activation(x, W_enc, b_enc, b_dec)
    cut = torch.zeros((), dtype=pre.dtype) if threshold is None else threshold.to(pre.dtype)
    return torch.where(pre > cut, pre, 0.0).to(W_enc.dtype)


def batch_topk(acts: Tensor, k: int) -> Tensor:
    """BatchTopK: keep the B * k largest of the (post-ReLU) dense codes over the whole batch, so tokens
    share a budget of k active features on average. Returns dense [B, F] codes."""
    flat = acts.flatten()
    keep = flat.topk(min(k * acts.shape[0], flat.numel())).indices
    return torch.zeros_like(flat).scatter(0, keep, flat[keep]).view_as(acts)


def encoder_backward(dZ: Tensor, x: Tensor, W_enc: Tensor, b_dec: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of pre = (x - b_dec) @ W_enc + b_enc given d pre = dZ [B, F].
    Returns dx, dW_enc, db_enc, db_dec, each in the dtype of its input."""
    xc = center(x, b_dec)
    dZ = dZ.to(xc.dtype)
    dxc = dZ @ W_enc.to(xc.dtype).T
    return dxc.to(x.dtype), (xc.T @ dZ).to(W_enc.dtype), dZ.sum(0).to(W_enc.dtype), (-dxc.sum(0)).to(b_dec.dtype)


def scatter_codes(vals: Tensor, idx: Tensor, n_features: int) -> Tensor:
    """Dense [B, F] matrix holding vals at idx (duplicates add), in the accumulate dtype."""
    acc = accumulate_dtype(vals)
    dense = torch.zeros(vals.shape[0], n_features, dtype=acc, device=vals.device)
    return dense.scatter_add_(1, idx.long(), vals.to(acc))


def encode_topk_backward(
    grad_vals: Tensor,
    grad_aux_vals: Tensor,
    x: Tensor,
    W_enc: Tensor,
    b_dec: Tensor,
    vals: Tensor,
    idx: Tensor,
    aux_vals: Tensor,
    aux_idx: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward of `encode_topk`: dZ holds k (+ k_aux) non-zeros per row, masked where the post-ReLU
    value is 0 (the ReLU's zero gradient). Returns dx, dW_enc, db_enc, db_dec."""
    n_features = W_enc.shape[1]
    dZ = scatter_codes(grad_vals * (vals > 0), idx, n_features)
    dZ += scatter_codes(grad_aux_vals * (aux_vals > 0), aux_idx, n_features)
    return encoder_backward(dZ, x, W_enc, b_dec)


def encode_relu_backward(
    grad_acts: Tensor, x: Tensor, W_enc: Tensor, b_dec: Tensor, acts: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward of `encode_relu` (ReLU or JumpReLU): gradient passes where the code is non-zero."""
    return encoder_backward(grad_acts * (acts != 0), x, W_enc, b_dec)


def _gather_rows(W: Tensor, idx: Tensor) -> Tensor:
    """W[idx] -> [B, k, d] (index_select: several times faster than advanced indexing on a CPU)."""
    return W.index_select(0, idx.long().flatten()).view(*idx.shape, W.shape[1])


def decode_sparse(vals: Tensor, idx: Tensor, W_dec: Tensor, b_dec: Tensor | None = None) -> Tensor:
    """x_hat[b] = sum_j vals[b, j] * W_dec[idx[b, j]] (+ b_dec). Returns [B, d] in W_dec's dtype."""
    acc = accumulate_dtype(vals, W_dec)
    out = torch.einsum("bk,bkd->bd", vals.to(acc), _gather_rows(W_dec.to(acc), idx))
    if b_dec is not None:
        out = out + b_dec.to(acc)
    return out.to(W_dec.dtype)


def decode_sparse_backward(
    grad_out: Tensor, vals: Tensor, idx: Tensor, W_dec: Tensor, fired_only: bool = False
) -> tuple[Tensor, Tensor]:
    """Backward of `decode_sparse` w.r.t. vals and W_dec:
    dvals[b, j] = grad_out[b] . W_dec[idx[b, j]];  dW_dec[f] = sum over idx[b, j] == f of vals[b, j] * grad_out[b].
    (d b_dec is grad_out summed over the batch.) `fired_only`: dvals[b, j] = 0 where vals[b, j] is not > 0,
    for codes that are ReLU outputs (a training SAE's), whose gradient the ReLU masks there anyway."""
    acc = accumulate_dtype(grad_out, vals, W_dec)
    g = grad_out.to(acc)
    rows = _gather_rows(W_dec.to(acc), idx)
    dvals = torch.einsum("bd,bkd->bk", g, rows)
    if fired_only:
        dvals = torch.where(vals > 0, dvals, 0)
    contributions = vals.to(acc)[..., None] * g[:, None, :]  # [B, k, d]
    dW_dec = torch.zeros(W_dec.shape, dtype=acc, device=W_dec.device)
    dW_dec.index_add_(0, idx.long().flatten(), contributions.flatten(0, 1))
    return dvals.to(vals.dtype), dW_dec.to(W_dec.dtype)


def topk_autoencoder_backward(
    grad_recon: Tensor, grad_vals: Tensor, x: Tensor, W_enc: Tensor, b_dec: Tensor, W_dec: Tensor, vals: Tensor,
    idx: Tensor, dead: Tensor | None = None, dead_dW_enc: Tensor | None = None, dead_db_enc: Tensor | None = None,
    dead_dW_dec: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """Backward of a TopK SAE's training node (`functional.topk_autoencoder`) through its encode and its
    sparse decode x_hat = decode_sparse(vals, idx, W_dec, b_dec): the decode's gradients, then the
    encode's of grad_vals + the decode's d vals. Given `dead` ([n] int64, negative entries none), the
    gradients computed apart for those features (AuxK's) are added to theirs: dead_dW_enc [n, d] (their
    columns of dW_enc, as rows), dead_db_enc [n] and dead_dW_dec [n, d]; their d b_enc reaches d b_dec
    through the centring as the rest does. Returns dx, dW_enc, db_enc, db_dec, dW_dec."""
    dvals, dW_dec = decode_sparse_backward(grad_recon, vals, idx, W_dec)
    no_codes = vals[:, :0]
    dx, dW_enc, db_enc, db_dec = encode_topk_backward(
        grad_vals + dvals, no_codes, x, W_enc, b_dec, vals, idx, no_codes, idx[:, :0]
    )
    acc = accumulate_dtype(grad_recon, W_enc)
    db_dec = db_dec.to(acc) + grad_recon.to(acc).sum(0)
    if dead is not None:
        present = dead >= 0
        features = dead.clamp_min(0)
        dW_enc = dW_enc.to(acc).index_add(1, features, (dead_dW_enc.to(acc) * present[:, None]).t()).to(W_enc.dtype)
        dead_db_enc = dead_db_enc.to(acc) * present
        db_enc = db_enc.to(acc).index_add(0, features, dead_db_enc).to(W_enc.dtype)
        db_dec = db_dec - W_enc.to(acc)[:, features] @ dead_db_enc
        dW_dec = dW_dec.to(acc).index_add(0, features, dead_dW_dec.to(acc) * present[:, None]).to(W_dec.dtype)
    return dx, dW_enc, db_enc, db_dec.to(b_dec.dtype), dW_dec


def decode_dense(acts: Tensor, W_dec: Tensor, b_dec: Tensor | None = None) -> Tensor:
    """x_hat = acts @ W_dec (+ b_dec), for dense (ReLU / JumpReLU / BatchTopK) codes."""
    acc = accumulate_dtype(acts, W_dec)
    out = acts.to(acc) @ W_dec.to(acc)
    if b_dec is not None:
        out = out + b_dec.to(acc)
    return out.to(W_dec.dtype)


def reconstruction_sums(x_hat: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """(squared error, squared deviations) of a reconstruction x_hat of x [n, d], fp32 (or fp64) scalars:
    sum over every element of (x_hat - x)^2, and sum over the tokens of ||x - mean(x)||^2 (mean over the
    n tokens): what the MSE and the FVU divide."""
    acc = accumulate_dtype(x_hat, x)
    x = x.to(acc)
    return (x_hat.to(acc) - x).pow(2).sum(), (x - x.mean(0)).pow(2).sum()


def reconstruction_sums_backward(
    grad_error: Tensor, grad_deviations: Tensor, x_hat: Tensor, x: Tensor
) -> tuple[Tensor, Tensor]:
    """(d x_hat, d x) of `reconstruction_sums`, in their inputs' dtypes: d x_hat = 2 grad_error (x_hat - x),
    d x = -2 grad_error (x_hat - x) + 2 grad_deviations (x - mean(x)) (the mean's own gradient sums to 0)."""
    acc = accumulate_dtype(x_hat, x)
    x_acc = x.to(acc)
    scaled = 2 * grad_error.to(acc) * (x_hat.to(acc) - x_acc)
    return scaled.to(x_hat.dtype), (2 * grad_deviations.to(acc) * (x_acc - x_acc.mean(0)) - scaled).to(x.dtype)


def mse(x_hat: Tensor, x: Tensor) -> Tensor:
    """Mean squared error over all elements, as an fp32 (or fp64) scalar."""
    return reconstruction_sums(x_hat, x)[0] / x.numel()


def fvu(x_hat: Tensor, x: Tensor) -> Tensor:
    """Fraction of variance unexplained: squared error summed over the batch divided by the total
    variance of x around its batch mean. NaN for a batch of one token (no variance to explain)."""
    error, deviations = reconstruction_sums(x_hat, x)
    return fvu_from_sums(error, deviations, x.shape[0])


def fvu_from_sums(error: Tensor, deviations: Tensor, n_tokens: int) -> Tensor:
    """The FVU from `reconstruction_sums` over n_tokens tokens (NaN for one token)."""
    return error / deviations if n_tokens > 1 else torch.full_like(error, float("nan"))


def layer_norm_input(x: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor, Tensor]:
    """SAELens' run-time "layer_norm" activation normalisation of x [N, d]: (each token's activations less
    their mean over the d dimensions, over their standard deviation (Bessel-corrected) + eps; the mean
    [N, 1]; the standard deviation [N, 1]). A reconstruction y maps back as y * std + mean."""
    mean = x.mean(dim=-1, keepdim=True)
    centered = x - mean
    std = centered.std(dim=-1, keepdim=True)
    return centered / (std + eps), mean, std


def matryoshka_fvus(acts: Tensor, W_dec: Tensor, b_dec: Tensor, x: Tensor, widths: tuple[int, ...]) -> Tensor:
    """A Matryoshka SAE's added loss: the sum over `widths` w of the FVU of x reconstructed from its codes
    acts [B, F] on the first w features alone."""
    total = torch.zeros((), dtype=accumulate_dtype(acts, x), device=x.device)
    for width in widths:
        total = total + fvu(decode_dense(acts[:, :width], W_dec[:width], b_dec), x)
    return total


def auxk_loss(aux_recon: Tensor, residual: Tensor, n_dead: Tensor, k_aux: int) -> Tensor:
    """AuxK loss (Gao et al. 2024): how well the top-k_aux dead features reconstruct the main
    reconstruction's residual, as an FVU of the residual, scaled by min(n_dead / k_aux, 1) so it
    vanishes when no feature is dead (no host synchronisation needed to switch it off)."""
    return fvu(aux_recon, residual) * auxk_scale(n_dead, k_aux)


def auxk_scale(n_dead: Tensor, k_aux: int) -> Tensor:
    """The AuxK loss's weight min(n_dead / k_aux, 1)."""
    return (n_dead.to(torch.float32) / k_aux).clamp(max=1.0)


def training_losses(
    recon: Tensor, x: Tensor, aux_recon: Tensor | None, n_dead: Tensor | None, k_aux: int, auxk_coef: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """A TopK SAE's training losses from its reconstruction `recon` of x [n, d] and, given `aux_recon`,
    AuxK's reconstruction of the residual x - recon (taken in fp32 and detached: AuxK trains the dead
    features alone). Returns (loss, mse, fvu, auxk, sums), fp32 (fp64 for fp64 inputs):
    loss = fvu + auxk_coef * auxk, auxk = the residual's FVU x auxk_scale(n_dead, k_aux) (`auxk_loss`;
    0 without `aux_recon`), and sums [5] = (error, deviations, aux_error, aux_deviations, aux_scale):
    `reconstruction_sums` of (recon, x) and of (aux_recon, residual) (zeros without `aux_recon`), what
    the gradient needs."""
    error, deviations = reconstruction_sums(recon, x)
    fvu = fvu_from_sums(error, deviations, x.shape[0])
    aux_sums = torch.zeros(3, dtype=error.dtype, device=error.device)
    auxk = torch.zeros_like(fvu)
    if aux_recon is not None:
        acc = accumulate_dtype(recon, x, aux_recon)
        residual = (x.to(acc) - recon.to(acc)).detach()
        aux_error, aux_deviations = reconstruction_sums(aux_recon, residual)
        scale = auxk_scale(n_dead, k_aux).to(error.dtype)
        aux_sums = torch.stack([aux_error, aux_deviations, scale])
        auxk = fvu_from_sums(aux_error, aux_deviations, x.shape[0]) * scale
    sums = torch.cat([torch.stack([error, deviations]), aux_sums]).detach()
    return fvu + auxk_coef * auxk, error / x.numel(), fvu, auxk, sums


def training_losses_backward(
    grad_losses: Tensor, sums: Tensor, recon: Tensor, x: Tensor, aux_recon: Tensor | None, auxk_coef: float
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(d recon, d x, d aux_recon) of `training_losses` from the gradients of its losses [4] (of loss,
    mse, fvu and auxk) and its sums [5], in their inputs' dtypes (d aux_recon None without `aux_recon`).
    The FVUs of one token are NaN constants: no gradient. The residual is detached, so AuxK's loss
    reaches aux_recon alone."""
    acc = accumulate_dtype(recon, x, aux_recon)
    grad_loss, grad_mse, grad_fvu, grad_auxk = grad_losses.to(acc)
    error, deviations, aux_error, aux_deviations, aux_scale = sums.to(acc)
    several = x.shape[0] > 1
    grad_error, grad_deviations = grad_mse / x.numel(), torch.zeros_like(grad_mse)
    if several:
        fvu_grad = grad_fvu + grad_loss
        grad_error, grad_deviations = grad_error + fvu_grad / deviations, -fvu_grad * error / deviations**2
    d_recon, d_x = reconstruction_sums_backward(grad_error, grad_deviations, recon, x)
    if aux_recon is None:
        return d_recon, d_x, None
    grad_aux_error = (grad_auxk + auxk_coef * grad_loss) * aux_scale / aux_deviations if several else 0 * grad_auxk
    residual = x.to(acc) - recon.to(acc)
    return d_recon, d_x, (2 * grad_aux_error * (aux_recon.to(acc) - residual)).to(aux_recon.dtype)


def l1_penalty(acts: Tensor, W_dec: Tensor, x: Tensor) -> Tensor:
    """The ReLU SAE's sparsity penalty (SAELens' standard SAE), in the units of the FVU loss: per token
    sum_f acts_f * ||W_dec_f|| (each code weighted by its decoder row's norm, so shrinking rows cannot
    dodge it), averaged over the batch and divided by sqrt(d * E||x - mean(x)||^2). At that scale,
    FVU + l1_coef * l1_penalty is SAELens' MSE + l1_coefficient * L1 on activations normalised to
    E||x||^2 = d, divided by d: SAELens' l1_coefficient values carry over."""
    acc = accumulate_dtype(acts, x)
    x = x.to(acc)
    variance = (x - x.mean(0)).pow(2).sum(-1).mean()
    return l1_sum(acts, W_dec, acc) / acts.shape[0] / (x.shape[-1] * variance).sqrt()


def l1_sum(acts: Tensor, W_dec: Tensor, acc: torch.dtype) -> Tensor:
    """sum over tokens and features of acts_f * ||W_dec_f||, in `acc`: `l1_penalty` before its
    normalisation (data-parallel training normalises it over every replica's tokens)."""
    return (acts.to(acc) * W_dec.to(acc).norm(dim=1)).sum()


def _rectangle(pre: Tensor, threshold: Tensor, bandwidth: float | Tensor) -> Tensor:
    """K((pre - threshold) / bandwidth) / bandwidth with K the unit rectangle on (-1/2, 1/2)."""
    return ((pre - threshold).abs() < bandwidth / 2).to(pre.dtype) / bandwidth


class _JumpReLU(torch.autograd.Function):
    """pre * (pre > threshold); the threshold's gradient is the straight-through estimate of
    Rajamanoharan et al. 2024 (-threshold * K((pre - threshold) / bandwidth) / bandwidth per code)."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float | Tensor) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold = ctx.saved_tensors
        grad_pre = grad * (pre > threshold)
        grad_threshold = (grad * -threshold * _rectangle(pre, threshold, ctx.bandwidth)).sum(0)
        return grad_pre, grad_threshold, None


class _Step(torch.autograd.Function):
    """(pre > threshold) as a float, with the straight-through threshold gradient
    -K((pre - threshold) / bandwidth) / bandwidth and none for pre (Rajamanoharan et al. 2024)."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float | Tensor) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold = ctx.saved_tensors
        return None, (grad * -_rectangle(pre, threshold, ctx.bandwidth)).sum(0), None


def jumprelu(pre: Tensor, threshold: Tensor, bandwidth: float | Tensor) -> Tensor:
    """JumpReLU codes [B, F] of pre-activations [B, F] at per-feature thresholds [F], differentiable in
    the thresholds through a straight-through estimate over a window of width `bandwidth` (a float, or
    a 0-d tensor that stays on the device)."""
    return _JumpReLU.apply(pre, threshold, bandwidth)


def l0_penalty(pre: Tensor, threshold: Tensor, bandwidth: float | Tensor) -> Tensor:
    """Codes above threshold per token, averaged over the batch (the JumpReLU SAE's L0 loss),
    differentiable in the thresholds through the same straight-through estimate."""
    return _Step.apply(pre, threshold, bandwidth).sum(-1).mean()


def fire_counts(idx: Tensor, n_features: int, vals: Tensor | None = None) -> Tensor:
    """How many tokens each feature fired on: int64 [F]. With `vals`, entries whose value is not > 0
    are not fires (a selected feature with value 0 did not fire)."""
    flat = idx.long().flatten()
    if vals is not None:
        flat = flat[vals.flatten() > 0]
    return torch.bincount(flat, minlength=n_features)


def fire_counts_dense(acts: Tensor) -> Tensor:
    """Per-feature count of values > 0 in dense codes [B, F]: int64 [F]."""
    return (acts > 0).sum(0, dtype=torch.int64)


def update_since_fired(tokens_since_fired: Tensor, counts: Tensor, n_tokens: int) -> Tensor:
    """Tokens since each feature last fired, after a batch of n_tokens with per-feature fire counts."""
    return torch.where(counts > 0, 0, tokens_since_fired + n_tokens)


def dead_mask(tokens_since_fired: Tensor, threshold: int) -> Tensor:
    """Features that have not fired for more than `threshold` tokens: bool [F]."""
    return tokens_since_fired > threshold


def normalize_decoder_rows(W_dec: Tensor, eps: float = 1e-12) -> Tensor:
    """W_dec with every row scaled to unit L2 norm (the decoder constraint)."""
    acc = accumulate_dtype(W_dec)
    w = W_dec.to(acc)
    return (w / w.norm(dim=1, keepdim=True).clamp_min(eps)).to(W_dec.dtype)


def remove_parallel_grad(W_dec: Tensor, grad: Tensor, eps: float = 1e-12) -> Tensor:
    """The decoder gradient minus its component parallel to each decoder row, so that a step along
    it leaves the row norms unchanged to first order."""
    acc = accumulate_dtype(W_dec, grad)
    w, g = W_dec.to(acc), grad.to(acc)
    parallel = (g * w).sum(1, keepdim=True) / (w * w).sum(1, keepdim=True).clamp_min(eps)
    return (g - parallel * w).to(grad.dtype)


def decoder_adam(
    W_dec: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int | Tensor, lr: float | Tensor,
    beta1: float, beta2: float, eps: float,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """One Adam step of the decoder under its unit-norm constraint (`fastsae.optim.SAEAdam`): the
    gradient without its component along each row (`remove_parallel_grad`), torch.optim.Adam's update
    (step counted from 1, and lr: numbers, or 0-dim tensors), then every row renormalised. Returns (W_dec,
    exp_avg, exp_avg_sq), each in its input's dtype; computed in fp32 (fp64 for fp64 inputs)."""
    acc = accumulate_dtype(W_dec, grad, exp_avg)
    w = W_dec.to(acc)
    g = remove_parallel_grad(w, grad.to(acc))
    w, m, v = _adam_update(w, g, exp_avg.to(acc), exp_avg_sq.to(acc), step, lr, beta1, beta2, eps)
    return normalize_decoder_rows(w).to(W_dec.dtype), m.to(exp_avg.dtype), v.to(exp_avg_sq.dtype)


def adam(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int | Tensor, lr: float | Tensor,
    beta1: float, beta2: float, eps: float,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """One torch.optim.Adam step (no weight decay, no AMSGrad; step counted from 1, and lr: numbers, or
    0-dim tensors). Returns (param, exp_avg, exp_avg_sq), each in its input's dtype; computed in fp32
    (fp64 for fp64 inputs)."""
    acc = accumulate_dtype(param, grad, exp_avg)
    p, m, v = _adam_update(
        param.to(acc), grad.to(acc), exp_avg.to(acc), exp_avg_sq.to(acc), step, lr, beta1, beta2, eps
    )
    return p.to(param.dtype), m.to(exp_avg.dtype), v.to(exp_avg_sq.dtype)


def _adam_update(p, g, m, v, step, lr, beta1, beta2, eps) -> tuple[Tensor, Tensor, Tensor]:
    m = m.lerp(g, 1 - beta1)
    v = beta2 * v + (1 - beta2) * g * g
    denominator = v.sqrt() / (1 - beta2**step) ** 0.5 + eps
    return p - lr / (1 - beta1**step) * m / denominator, m, v
