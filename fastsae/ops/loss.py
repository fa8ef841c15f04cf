"""The reconstruction loss's sums and their gradient, each one pass over x_hat and x [n, d]
(`reference.reconstruction_sums`):

    error      = sum over every element of (x_hat - x)^2
    deviations = sum over the tokens of ||x - mean(x)||^2          (mean over the n tokens)
    d x_hat    = 2 d_error (x_hat - x)
    d x        = -2 d_error (x_hat - x) + 2 d_deviations (x - mean(x))

in fp32 whatever the inputs' dtype. Written in PyTorch, the MSE, the FVU and the AuxK FVU of a training
step cast x_hat and x to fp32, subtract and square them again for each, and their backward as many
times: about 35 launches over [n, d] tensors per step. Here the forward is one pass (after the column
means, one reduction) and each backward one more.
Each program sums BLOCK_M rows in a fixed order into its own partial sums, added after (no atomics: the
same inputs give the same bits).

A TopK SAE's training step takes its losses from `training_losses` (below): the same sums for the main
reconstruction and for AuxK's of the residual, and the scalars that mix them, in three launches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import reference
from .columns import column_sums
from .launch import cdiv, next_power_of_2, only_asked, sm_count

BLOCK_ELEMENTS = 4096  # of a [BLOCK_M, BLOCK_D] tile, loaded at once: 16 fp32 per thread of 8 warps


@triton.jit
def _reconstruction_sums_kernel(
    x_hat_ptr, x_ptr, mean_ptr, partial_ptr, N, D, stride_hm, stride_hd, stride_xm, stride_xd,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows64 = rows.to(tl.int64)[:, None]
    error = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    deviations = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        mask = (rows < N)[:, None] & (dims < D)[None, :]
        x_hat = tl.load(x_hat_ptr + rows64 * stride_hm + dims[None, :] * stride_hd, mask=mask, other=0.0)
        x = tl.load(x_ptr + rows64 * stride_xm + dims[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + dims, mask=dims < D, other=0.0)
        diff = x_hat.to(tl.float32) - x
        error += diff * diff
        centred = tl.where(mask, x - mean[None, :], 0.0)
        deviations += centred * centred
    tl.store(partial_ptr + 2 * tl.program_id(0), tl.sum(tl.sum(error, axis=1), axis=0))
    tl.store(partial_ptr + 2 * tl.program_id(0) + 1, tl.sum(tl.sum(deviations, axis=1), axis=0))


@triton.jit
def _reconstruction_sums_bwd_kernel(
    x_hat_ptr, x_ptr, mean_ptr, grad_ptr, d_x_hat_ptr, d_x_ptr, N, D,
    stride_hm, stride_hd, stride_xm, stride_xd,
    X_HAT_GRAD: tl.constexpr, X_GRAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (rows < N)[:, None] & (dims < D)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x_hat = tl.load(x_hat_ptr + rows64 * stride_hm + dims[None, :] * stride_hd, mask=mask, other=0.0)
    x = tl.load(x_ptr + rows64 * stride_xm + dims[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    d_error = 2 * tl.load(grad_ptr)
    scaled = d_error * (x_hat.to(tl.float32) - x)
    contiguous = rows64 * D + dims[None, :]  # the gradients are new contiguous tensors
    if X_HAT_GRAD:
        tl.store(d_x_hat_ptr + contiguous, scaled.to(d_x_hat_ptr.dtype.element_ty), mask=mask)
    if X_GRAD:
        mean = tl.load(mean_ptr + dims, mask=dims < D, other=0.0)
        d_x = 2 * tl.load(grad_ptr + 1) * (x - mean[None, :]) - scaled
        tl.store(d_x_ptr + contiguous, d_x.to(d_x_ptr.dtype.element_ty), mask=mask)


def _tile(D: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_D): rows of up to 1024 dimensions at once, BLOCK_ELEMENTS in all."""
    block_d = min(next_power_of_2(D), 1024)
    return max(1, BLOCK_ELEMENTS // block_d), block_d


def reconstruction_sums(x_hat: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """`reference.reconstruction_sums`, in fp32."""
    if torch.float64 in (x_hat.dtype, x.dtype):
        return reference.reconstruction_sums(x_hat, x)
    N, D = x.shape
    block_m, block_d = _tile(D)
    partial = x.new_empty(cdiv(N, block_m), 2, dtype=torch.float32)
    _reconstruction_sums_kernel[(partial.shape[0],)](
        x_hat, x, column_sums(x, 1 / N), partial, N, D,
        x_hat.stride(0), x_hat.stride(1), x.stride(0), x.stride(1), BLOCK_M=block_m, BLOCK_D=block_d, num_warps=8,
    )  # fmt: skip
    return partial[:, 0].sum(), partial[:, 1].sum()  # two tensors: a custom op's outputs may not alias


def reconstruction_sums_backward(
    grad_error: Tensor, grad_deviations: Tensor, x_hat: Tensor, x: Tensor, x_hat_grad: bool, x_grad: bool
) -> tuple[Tensor, Tensor]:
    """`reference.reconstruction_sums_backward`, except that a gradient not asked for is an empty tensor
    (x's needs its column means again: the forward does not keep them)."""
    if torch.float64 in (x_hat.dtype, x.dtype):
        grads = reference.reconstruction_sums_backward(grad_error, grad_deviations, x_hat, x)
        return only_asked(grads, (x_hat_grad, x_grad))
    N, D = x.shape
    d_x_hat = x_hat.new_empty((N, D) if x_hat_grad else 0)
    d_x = x.new_empty((N, D) if x_grad else 0)
    grads = torch.stack([grad_error, grad_deviations]).float()
    mean = column_sums(x, 1 / N) if x_grad else grads
    block_m, block_d = _tile(D)
    _reconstruction_sums_bwd_kernel[(cdiv(N, block_m), cdiv(D, block_d))](
        x_hat, x, mean, grads, d_x_hat, d_x, N, D, x_hat.stride(0), x_hat.stride(1), x.stride(0), x.stride(1),
        X_HAT_GRAD=x_hat_grad, X_GRAD=x_grad, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=8,
    )  # fmt: skip
    return d_x_hat, d_x


# ---------------------------------------------------------------------------------------------------
# A TopK SAE's training losses in one node (`reference.training_losses`): the MSE, the FVU and AuxK's
# FVU of the residual x - recon, each from its sums, and the loss that mixes them, in three launches;
# the gradient of all four in one. Through `reconstruction_sums` and torch's scalar arithmetic the
# captured step ran about 35 launches for them and their backward, most a few scalars each.
#
# The spreads (sums over the tokens of ||v - mean(v)||^2, v = x and the residual) take no launch of their
# own for the means: a program of the first launch takes its rows' column means, then the squared
# deviations about them (a second read of its rows, from L2); the second launch adds what those lack of
# the spread about the whole batch's means, each of its programs loading every program's means of a few
# columns at once (one read: a loop over them waits out a read per iteration); the third adds it all
# up. No raw moments: an outlier dimension whose mean is far above its spread keeps its spread exact.
#
# Measured on the H200 (captured SAEAdam step, bf16, b61f826): through `reconstruction_sums` -> this node,
# 1.575 -> 1.552 ms at AlphaFold3's shape, 1.793 -> 1.782 at GPT-2's. The first launch then merged each
# tile's means and spreads into its running ones (Chan, Golub and LeVeque's pairwise update: four
# reductions across the tile's rows an iteration, 255 registers a thread and a 48-byte spill on sm_90) and
# took 70 us of the AlphaFold3 step; the two passes take 120 registers and no spill: 1.553 -> 1.516 ms
# at AlphaFold3's shape, 1.796 -> 1.759 at GPT-2's (f2cdcf3).

LOSS_PROGRAMS_PER_SM = 2  # row ranges of the first launch: few partial means for the second to merge
LOSS_BLOCK_M = 16  # rows of a tile of the first launch
LOSS_BLOCK_D = 64  # columns a program of the first launch owns
# Partial means a program of the second launch loads at once (programs x columns): 4096 gives 48 programs
# at AlphaFold3's shape on the H200 (264 programs' means of 384 columns) where 16384 gave 12, which took
# 12 us of the captured step's forward (trace of a54747a).
MERGE_ELEMENTS = 4096


@triton.jit
def _load_pair(recon_ptr, x_ptr, rows, dims, valid, stride_rm, stride_rd, stride_xm, stride_xd):
    """x and recon - x of a tile, in fp32 (zeros outside `valid`)."""
    x = tl.load(x_ptr + rows * stride_xm + dims[None, :] * stride_xd, mask=valid, other=0.0).to(tl.float32)
    recon = tl.load(recon_ptr + rows * stride_rm + dims[None, :] * stride_rd, mask=valid, other=0.0)
    return x, recon.to(tl.float32) - x


@triton.jit
def _training_sums_kernel(
    recon_ptr, x_ptr, aux_ptr, means_ptr, partial_ptr, N, D, rows_per_program,
    stride_rm, stride_rd, stride_xm, stride_xd, stride_am, stride_ad,
    HAS_AUX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Program (p, c), over rows [p * rows_per_program, ...) and column block c: partial [p, c] =
    (squared error, AuxK's squared error, x's spread, the residual's spread) about the program's own
    column means, and means [p, 0 / 1, its columns] = x's / the residual's column means: the means
    first, then the spreads about them, reading the program's rows of x and recon twice (the second
    time from L2)."""
    program = tl.program_id(0)
    first = program * rows_per_program
    end = tl.minimum(first + rows_per_program, N)
    local = tl.arange(0, BLOCK_M)
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    strides = (stride_rm, stride_rd, stride_xm, stride_xd)
    error = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    aux_error = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    total = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    aux_total = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(first, end, BLOCK_M):
        rows = (start + local).to(tl.int64)[:, None]
        valid = (start + local < end)[:, None] & (dims < D)[None, :]
        x, diff = _load_pair(recon_ptr, x_ptr, rows, dims, valid, *strides)  # the residual is -diff
        error += diff * diff
        total += x
        if HAS_AUX:
            aux = tl.load(aux_ptr + rows * stride_am + dims[None, :] * stride_ad, mask=valid, other=0.0)
            aux_diff = aux.to(tl.float32) + diff
            aux_error += aux_diff * aux_diff
            aux_total -= diff
    count = (end - first).to(tl.float32)
    mean = tl.sum(total, axis=0) / count
    aux_mean = tl.sum(aux_total, axis=0) / count
    squares = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    aux_squares = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(first, end, BLOCK_M):
        rows = (start + local).to(tl.int64)[:, None]
        valid = (start + local < end)[:, None] & (dims < D)[None, :]
        x, diff = _load_pair(recon_ptr, x_ptr, rows, dims, valid, *strides)
        deviation = tl.where(valid, x - mean[None, :], 0.0)
        squares += deviation * deviation
        if HAS_AUX:
            aux_deviation = tl.where(valid, -diff - aux_mean[None, :], 0.0)
            aux_squares += aux_deviation * aux_deviation
    spread = tl.sum(squares, axis=0)
    aux_spread = tl.sum(aux_squares, axis=0)
    means = means_ptr + program.to(tl.int64) * 2 * D + dims
    tl.store(means, mean, mask=dims < D)
    tl.store(means + D, aux_mean, mask=dims < D)
    partial = partial_ptr + (program * tl.num_programs(1) + tl.program_id(1)) * 4
    tl.store(partial, tl.sum(tl.sum(error, axis=1), axis=0))
    tl.store(partial + 1, tl.sum(tl.sum(aux_error, axis=1), axis=0))
    tl.store(partial + 2, tl.sum(spread, axis=0))
    tl.store(partial + 3, tl.sum(aux_spread, axis=0))


@triton.jit
def _merge_means_kernel(
    means_ptr, between_ptr, N, D, P, rows_per_program, HAS_AUX: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    """between [g, 0 / 1]: over column block g, the sum over its columns and the programs of
    n_p (mean_p - mean)^2 for x's / the residual's means: what the programs' own spreads lack of the
    spread about the whole batch's mean."""
    p = tl.arange(0, BLOCK_P)
    dims = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    rows = tl.minimum(tl.maximum(N - p * rows_per_program, 0), rows_per_program).to(tl.float32)[:, None]
    mask = (p < P)[:, None] & (dims < D)[None, :]
    offsets = (p.to(tl.int64) * 2)[:, None] * D + dims[None, :]
    for which in tl.static_range(2 if HAS_AUX else 1):
        means = tl.load(means_ptr + offsets + which * D, mask=mask, other=0.0)
        mean = tl.sum(rows * means, axis=0) / N
        offset = tl.where(mask, means - mean[None, :], 0.0)
        tl.store(between_ptr + tl.program_id(0) * 2 + which, tl.sum(tl.sum(rows * offset * offset, axis=1), axis=0))


@triton.jit
def _training_losses_kernel(
    partial_ptr, between_ptr, n_dead_ptr, loss_ptr, mse_ptr, fvu_ptr, auxk_ptr, sums_ptr, N, D, n_partial,
    n_between, k_aux, auxk_coef, HAS_AUX: tl.constexpr, BLOCK_PARTIAL: tl.constexpr, BLOCK_BETWEEN: tl.constexpr,
):  # fmt: skip
    """One program: the partial sums added in a fixed order, then (loss, mse, fvu, auxk) and sums =
    (error, deviations, aux_error, aux_deviations, aux_scale)."""
    entries = tl.arange(0, BLOCK_PARTIAL)[:, None] * 4 + tl.arange(0, 4)[None, :]
    totals = tl.sum(tl.load(partial_ptr + entries, mask=entries < n_partial * 4, other=0.0), axis=0)
    pairs = tl.arange(0, BLOCK_BETWEEN)[:, None] * 2 + tl.arange(0, 2)[None, :]
    between = tl.sum(tl.load(between_ptr + pairs, mask=pairs < n_between * 2, other=0.0), axis=0)
    column = tl.arange(0, 4)
    error = tl.sum(tl.where(column == 0, totals, 0.0), axis=0)
    deviations = tl.sum(tl.where(column == 2, totals, 0.0), axis=0)
    deviations += tl.sum(tl.where(tl.arange(0, 2) == 0, between, 0.0), axis=0)
    nan = float("nan")
    fvu = tl.where(N > 1, error / deviations, nan)
    tl.store(sums_ptr, error)
    tl.store(sums_ptr + 1, deviations)
    auxk = 0.0
    if HAS_AUX:
        aux_error = tl.sum(tl.where(column == 1, totals, 0.0), axis=0)
        aux_deviations = tl.sum(tl.where(column == 3, totals, 0.0), axis=0)
        aux_deviations += tl.sum(tl.where(tl.arange(0, 2) == 1, between, 0.0), axis=0)
        scale = tl.minimum(tl.load(n_dead_ptr).to(tl.float32) / k_aux, 1.0)
        auxk = tl.where(N > 1, aux_error / aux_deviations, nan) * scale
        tl.store(sums_ptr + 2, aux_error)
        tl.store(sums_ptr + 3, aux_deviations)
        tl.store(sums_ptr + 4, scale)
    else:
        tl.store(sums_ptr + 2 + tl.arange(0, 4), tl.zeros([4], dtype=tl.float32), mask=tl.arange(0, 4) < 3)
    tl.store(loss_ptr, fvu + auxk_coef * auxk)
    tl.store(mse_ptr, error / (N.to(tl.float32) * D))
    tl.store(fvu_ptr, fvu)
    tl.store(auxk_ptr, auxk)


@triton.jit
def _training_losses_bwd_kernel(
    recon_ptr, x_ptr, aux_ptr, mean_ptr, grad_loss_ptr, grad_mse_ptr, grad_fvu_ptr, grad_auxk_ptr, sums_ptr,
    d_recon_ptr, d_x_ptr, d_aux_ptr, N, D, auxk_coef,
    stride_rm, stride_rd, stride_xm, stride_xd, stride_am, stride_ad,
    GRAD_LOSS: tl.constexpr, GRAD_MSE: tl.constexpr, GRAD_FVU: tl.constexpr, GRAD_AUXK: tl.constexpr,
    RECON_GRAD: tl.constexpr, X_GRAD: tl.constexpr, AUX_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """`reference.training_losses_backward` over a [BLOCK_M, BLOCK_D] tile; the scalars it needs come
    from the losses' gradients (each absent, a zero, where its flag is off) and `sums` [5]."""
    grad_loss = tl.load(grad_loss_ptr).to(tl.float32) if GRAD_LOSS else 0.0
    grad_mse = tl.load(grad_mse_ptr).to(tl.float32) if GRAD_MSE else 0.0
    grad_fvu = tl.load(grad_fvu_ptr).to(tl.float32) if GRAD_FVU else 0.0
    grad_auxk = tl.load(grad_auxk_ptr).to(tl.float32) if GRAD_AUXK else 0.0
    error = tl.load(sums_ptr)
    deviations = tl.load(sums_ptr + 1)
    fvu_grad = tl.where(N > 1, grad_fvu + grad_loss, 0.0)
    grad_error = fvu_grad / deviations + grad_mse / (N.to(tl.float32) * D)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (rows < N)[:, None] & (dims < D)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + rows64 * stride_xm + dims[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    recon = tl.load(recon_ptr + rows64 * stride_rm + dims[None, :] * stride_rd, mask=mask, other=0.0)
    diff = recon.to(tl.float32) - x
    contiguous = rows64 * D + dims[None, :]  # the gradients are new contiguous tensors
    if RECON_GRAD:
        tl.store(d_recon_ptr + contiguous, (2 * grad_error * diff).to(d_recon_ptr.dtype.element_ty), mask=mask)
    if X_GRAD:
        grad_deviations = -fvu_grad * error / (deviations * deviations)
        mean = tl.load(mean_ptr + dims, mask=dims < D, other=0.0)
        d_x = 2 * grad_deviations * (x - mean[None, :]) - 2 * grad_error * diff
        tl.store(d_x_ptr + contiguous, d_x.to(d_x_ptr.dtype.element_ty), mask=mask)
    if AUX_GRAD:
        aux_grad = grad_auxk + auxk_coef * grad_loss
        grad_aux_error = tl.where(N > 1, aux_grad * tl.load(sums_ptr + 4) / tl.load(sums_ptr + 3), 0.0)
        aux = tl.load(aux_ptr + rows64 * stride_am + dims[None, :] * stride_ad, mask=mask, other=0.0)
        d_aux = 2 * grad_aux_error * (aux.to(tl.float32) + diff)  # aux_recon - (x - recon)
        tl.store(d_aux_ptr + contiguous, d_aux.to(d_aux_ptr.dtype.element_ty), mask=mask)


def reference_training_losses_backward(
    grads_in: tuple[Tensor | None, ...], sums: Tensor, recon: Tensor, x: Tensor, aux_recon: Tensor | None,
    auxk_coef: float, asked: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """`reference.training_losses_backward` with `training_losses_backward`'s contract: the losses'
    gradients one by one (None: zero), and an empty tensor for a gradient not `asked` for (d aux_recon
    too, without aux_recon)."""
    grad = torch.stack([sums.new_zeros(()) if g is None else g.to(sums.dtype) for g in grads_in])
    d_recon, d_x, d_aux = reference.training_losses_backward(grad, sums, recon, x, aux_recon, auxk_coef)
    return only_asked((d_recon, d_x, x.new_empty(0) if d_aux is None else d_aux), asked)


def _reference_only(recon: Tensor, x: Tensor, aux_recon: Tensor | None) -> bool:
    """fp64 inputs (tests), and a batch of one token, whose FVUs are NaN constants, take the reference."""
    return x.shape[0] < 2 or torch.float64 in (recon.dtype, x.dtype, getattr(aux_recon, "dtype", None))


def training_losses(
    recon: Tensor, x: Tensor, aux_recon: Tensor | None, n_dead: Tensor | None, k_aux: int, auxk_coef: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """`reference.training_losses`: (loss, mse, fvu, auxk, sums [5]) in fp32, in three launches."""
    if _reference_only(recon, x, aux_recon):
        return reference.training_losses(recon, x, aux_recon, n_dead, k_aux, auxk_coef)
    N, D = x.shape
    block_d = min(next_power_of_2(D), LOSS_BLOCK_D)
    programs = min(cdiv(N, LOSS_BLOCK_M), LOSS_PROGRAMS_PER_SM * sm_count(x.device))
    # a whole number of tiles a program, from the shape and the device alone (so is every sum's order)
    rows_per_program = cdiv(cdiv(N, programs), LOSS_BLOCK_M) * LOSS_BLOCK_M
    programs = cdiv(N, rows_per_program)
    partial = x.new_empty(programs, cdiv(D, block_d), 4, dtype=torch.float32)
    means = x.new_empty(programs, 2, D, dtype=torch.float32)
    has_aux = aux_recon is not None
    aux, aux_strides = (aux_recon, aux_recon.stride()) if has_aux else (x, (0, 0))  # unread without AuxK
    _training_sums_kernel[(programs, cdiv(D, block_d))](
        recon, x, aux, means, partial, N, D, rows_per_program, *recon.stride(), *x.stride(), *aux_strides,
        HAS_AUX=has_aux, BLOCK_M=LOSS_BLOCK_M, BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip
    block_p = next_power_of_2(programs)
    merge_d = max(1, min(next_power_of_2(D), MERGE_ELEMENTS // block_p))
    between = x.new_empty(cdiv(D, merge_d), 2, dtype=torch.float32)
    _merge_means_kernel[(between.shape[0],)](
        means, between, N, D, programs, rows_per_program, HAS_AUX=has_aux, BLOCK_P=block_p, BLOCK_D=merge_d,
        num_warps=8,
    )  # fmt: skip
    loss, mse, fvu, auxk = (x.new_empty((), dtype=torch.float32) for _ in range(4))
    sums = x.new_empty(5, dtype=torch.float32)
    _training_losses_kernel[(1,)](
        partial, between, partial if n_dead is None else n_dead, loss, mse, fvu, auxk, sums, N, D,
        partial.numel() // 4, between.shape[0], max(k_aux, 1), auxk_coef, HAS_AUX=has_aux,
        BLOCK_PARTIAL=next_power_of_2(partial.numel() // 4), BLOCK_BETWEEN=next_power_of_2(between.shape[0]),
        num_warps=4,
    )  # fmt: skip
    return loss, mse, fvu, auxk, sums


def training_losses_backward(
    grad_loss: Tensor | None, grad_mse: Tensor | None, grad_fvu: Tensor | None, grad_auxk: Tensor | None,
    sums: Tensor, recon: Tensor, x: Tensor, aux_recon: Tensor | None, auxk_coef: float, recon_grad: bool,
    x_grad: bool, aux_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """`reference.training_losses_backward` (a loss's gradient None: zero), except that a gradient not
    asked for is an empty tensor."""
    grads_in = (grad_loss, grad_mse, grad_fvu, grad_auxk)
    asked = (recon_grad, x_grad, aux_grad)
    if _reference_only(recon, x, aux_recon):
        return reference_training_losses_backward(grads_in, sums, recon, x, aux_recon, auxk_coef, asked)
    aux_grad = aux_grad and aux_recon is not None
    N, D = x.shape
    d_recon = recon.new_empty((N, D) if recon_grad else 0)
    d_x = x.new_empty((N, D) if x_grad else 0)
    d_aux = (recon if aux_recon is None else aux_recon).new_empty((N, D) if aux_grad else 0)
    mean = column_sums(x, 1 / N) if x_grad else sums
    aux, aux_strides = (aux_recon, aux_recon.stride()) if aux_recon is not None else (x, (0, 0))
    block_m, block_d = _tile(D)
    _training_losses_bwd_kernel[(cdiv(N, block_m), cdiv(D, block_d))](
        recon, x, aux, mean, *(sums if g is None else g for g in grads_in), sums, d_recon, d_x, d_aux, N, D,
        auxk_coef, *recon.stride(), *x.stride(), *aux_strides,
        GRAD_LOSS=grad_loss is not None, GRAD_MSE=grad_mse is not None, GRAD_FVU=grad_fvu is not None,
        GRAD_AUXK=grad_auxk is not None, RECON_GRAD=recon_grad, X_GRAD=x_grad, AUX_GRAD=aux_grad,
        BLOCK_M=block_m, BLOCK_D=block_d, num_warps=8,
    )  # fmt: skip
    return d_recon, d_x, d_aux
