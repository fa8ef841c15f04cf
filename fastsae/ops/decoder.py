"""The decoder's unit-norm constraint, one pass over W_dec [F, d] each (`reference.remove_parallel_grad`,
`reference.normalize_decoder_rows`):

    before optimizer.step():  grad[f] -= (grad[f] . W[f]) / (W[f] . W[f]) * W[f]     (in place on grad)
    after optimizer.step():   W[f] /= max(||W[f]||, eps)                             (in place on W)

and both fused with the Adam step between them (`reference.decoder_adam`, for `fastsae.optim.SAEAdam`):
one read of W, grad and the two moments and one write of W and the moments, where the three separate
steps read and write W_dec-sized tensors twelve times. The same Adam step without the constraint
(`reference.adam`) serves SAEAdam's other parameters: on the H200 torch's fused Adam kernel took
4.3 ms per step for the Llama-8B shape's bf16 encoder, where the decoder's pass took 1.8 ms for as
many elements and more arithmetic.

A program owns BLOCK_F rows and holds each row whole (d fits in registers for SAE widths), so every
row is read once and written once, with fp32 dot products.
"""

from __future__ import annotations

import math

import triton
import triton.language as tl
from torch import Tensor

from .launch import cdiv, next_power_of_2


@triton.jit
def _remove_parallel_grad_kernel(
    w_ptr, grad_ptr, F, D, stride_wf, stride_wd, stride_gf, stride_gd, eps,
    BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    dims = tl.arange(0, BLOCK_D)
    mask = (rows < F)[:, None] & (dims < D)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    w = tl.load(w_ptr + rows64 * stride_wf + dims[None, :] * stride_wd, mask=mask, other=0.0).to(tl.float32)
    g_ptrs = grad_ptr + rows64 * stride_gf + dims[None, :] * stride_gd
    g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_F, BLOCK_D]
    parallel = tl.sum(g * w, axis=1) / tl.maximum(tl.sum(w * w, axis=1), eps)
    tl.store(g_ptrs, (g - parallel[:, None] * w).to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _normalize_rows_kernel(
    w_ptr, F, D, stride_wf, stride_wd, eps, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    dims = tl.arange(0, BLOCK_D)
    mask = (rows < F)[:, None] & (dims < D)[None, :]
    ptrs = w_ptr + rows.to(tl.int64)[:, None] * stride_wf + dims[None, :] * stride_wd
    w = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_F, BLOCK_D]
    norm = tl.maximum(tl.sqrt(tl.sum(w * w, axis=1)), eps)
    tl.store(ptrs, (w / norm[:, None]).to(w_ptr.dtype.element_ty), mask=mask)


def _grid(W: Tensor) -> tuple[tuple[int], dict]:
    """About 16 row elements per thread (more spill registers: checked with bench.kernel_resources)."""
    block_d = next_power_of_2(W.shape[1])
    num_warps = 4 if block_d <= 2048 else 8
    block_f = max(1, 16 * 32 * num_warps // block_d)
    return (cdiv(W.shape[0], block_f),), dict(BLOCK_F=block_f, BLOCK_D=block_d, num_warps=num_warps)


def remove_parallel_grad_(W_dec: Tensor, grad: Tensor, eps: float = 1e-12) -> None:
    """In place on `grad`: drop each row's component along its decoder row (eps: as `reference`,
    on the squared norm)."""
    grid, cfg = _grid(W_dec)
    _remove_parallel_grad_kernel[grid](
        W_dec, grad, W_dec.shape[0], W_dec.shape[1],
        W_dec.stride(0), W_dec.stride(1), grad.stride(0), grad.stride(1), eps, **cfg,
    )  # fmt: skip


def normalize_rows_(W_dec: Tensor, eps: float = 1e-12) -> None:
    """In place: every row of W_dec scaled to unit L2 norm."""
    grid, cfg = _grid(W_dec)
    _normalize_rows_kernel[grid](W_dec, W_dec.shape[0], W_dec.shape[1], W_dec.stride(0), W_dec.stride(1), eps, **cfg)


@triton.jit
def _bias_corrections(
    step_ptr, step_size, bias2_sqrt, lr_ptr, lr, log_beta1, log_beta2, STEP_ON_DEVICE: tl.constexpr,
    LR_ON_DEVICE: tl.constexpr,
):  # fmt: skip
    """(lr / (1 - beta1^step), sqrt(1 - beta2^step)): the host's, or computed here from the count at
    `step_ptr` (STEP_ON_DEVICE) and the rate at `lr_ptr` (LR_ON_DEVICE; with the count on the host,
    `step_size` is then 1 / (1 - beta1^step)); see `_bias_correction_args`."""
    if LR_ON_DEVICE:
        lr = tl.load(lr_ptr).to(tl.float32)
    if STEP_ON_DEVICE:
        step = tl.load(step_ptr).to(tl.float32)
        step_size = lr / _one_minus_power(step * log_beta1)
        bias2_sqrt = tl.sqrt(_one_minus_power(step * log_beta2))
    elif LR_ON_DEVICE:
        step_size = lr * step_size
    return step_size, bias2_sqrt


@triton.jit
def _one_minus_power(y):
    """1 - e^y for y <= 0 (y = step x log beta) in fp32, with no cancellation near y = 0: Taylor's series
    there. 1 - e^y alone loses about four of the seven digits of 1 - 0.999^1: with it (as exp2 of the
    count times log2 beta) the step-1 update of fp32 weights was 1.1-1.4e-5 off the fp64 reference on
    the H200, above fp32's tolerance. For y >= -0.5 the series' first nine terms leave out less than
    0.5^9 / 10! (6e-10) of the value."""
    z = tl.maximum(y, -0.5)  # (beta = 0 gives y = -inf: the series must not see it)
    series = -z * (
        1 + z / 2 * (1 + z / 3 * (1 + z / 4 * (1 + z / 5 * (1 + z / 6 * (1 + z / 7 * (1 + z / 8 * (1 + z / 9)))))))
    )
    return tl.where(y >= -0.5, series, 1 - tl.exp(y))


@triton.jit
def _adam_update(
    p, g, m, v, step_ptr, step_size, bias2_sqrt, lr_ptr, lr, log_beta1, log_beta2, beta2, one_minus_beta1,
    one_minus_beta2, eps, STEP_ON_DEVICE: tl.constexpr, LR_ON_DEVICE: tl.constexpr,
):  # fmt: skip
    """Adam's step on fp32 values, with torch.optim.Adam's arithmetic: (p, m, v) after it. The bias
    corrections as `_bias_corrections` gives them."""
    step_size, bias2_sqrt = _bias_corrections(step_ptr, step_size, bias2_sqrt, lr_ptr, lr, log_beta1, log_beta2,
                                              STEP_ON_DEVICE, LR_ON_DEVICE)  # fmt: skip
    m += one_minus_beta1 * (g - m)  # torch's lerp
    v = beta2 * v + one_minus_beta2 * g * g
    p -= step_size * m / (tl.sqrt(v) / bias2_sqrt + eps)
    return p, m, v


@triton.jit
def _decoder_adam_kernel(
    w_ptr, grad_ptr, m_ptr, v_ptr, F, D, stride_wf, stride_gf, stride_mf, stride_vf,
    step_ptr, step_size, bias2_sqrt, lr_ptr, lr, log_beta1, log_beta2, beta2, one_minus_beta1, one_minus_beta2,
    eps, norm_eps, STEP_ON_DEVICE: tl.constexpr, LR_ON_DEVICE: tl.constexpr, BLOCK_F: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    dims = tl.arange(0, BLOCK_D)
    mask = (rows < F)[:, None] & (dims < D)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    w_ptrs = w_ptr + rows64 * stride_wf + dims[None, :]
    m_ptrs = m_ptr + rows64 * stride_mf + dims[None, :]
    v_ptrs = v_ptr + rows64 * stride_vf + dims[None, :]
    w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)  # padded columns stay 0 throughout
    g = tl.load(grad_ptr + rows64 * stride_gf + dims[None, :], mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptrs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptrs, mask=mask, other=0.0).to(tl.float32)
    g -= (tl.sum(g * w, axis=1) / tl.maximum(tl.sum(w * w, axis=1), norm_eps))[:, None] * w
    w, m, v = _adam_update(w, g, m, v, step_ptr, step_size, bias2_sqrt, lr_ptr, lr, log_beta1, log_beta2, beta2,
                           one_minus_beta1, one_minus_beta2, eps, STEP_ON_DEVICE, LR_ON_DEVICE)  # fmt: skip
    norm = tl.maximum(tl.sqrt(tl.sum(w * w, axis=1)), norm_eps)
    tl.store(w_ptrs, (w / norm[:, None]).to(w_ptr.dtype.element_ty), mask=mask)
    tl.store(m_ptrs, m.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptrs, v.to(v_ptr.dtype.element_ty), mask=mask)


def decoder_adam_(
    W_dec: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int | Tensor, lr: float | Tensor,
    beta1: float, beta2: float, eps: float, norm_eps: float = 1e-12,
) -> None:  # fmt: skip
    """In place on W_dec and the moments: `reference.decoder_adam` in one pass (rows with unit column
    stride). `step` and `lr` are numbers, or 0-dim tensors on W_dec's device (a captured step: the
    kernel reads them, so that a replay takes the count and rate of its time)."""
    grid, cfg = _grid(W_dec)
    corrections, flags = _bias_correction_args(step, lr, beta1, beta2)
    _decoder_adam_kernel[grid](
        W_dec, grad, exp_avg, exp_avg_sq, W_dec.shape[0], W_dec.shape[1],
        W_dec.stride(0), grad.stride(0), exp_avg.stride(0), exp_avg_sq.stride(0),
        # 1 - beta in double precision: in fp32, 1 - fp32(0.999) is 1.3e-5 off
        *corrections, beta2, 1 - beta1, 1 - beta2, eps, norm_eps, **flags, **cfg,
    )  # fmt: skip


def _bias_correction_args(
    step: int | Tensor, lr: float | Tensor, beta1: float, beta2: float
) -> tuple[tuple, dict[str, bool]]:  # fmt: skip
    """The Adam kernels' bias-correction arguments (count, lr / (1 - beta1^step), sqrt(1 - beta2^step),
    the rate's tensor, the rate, log beta1, log beta2) and their STEP_ON_DEVICE and LR_ON_DEVICE flags.
    Numbers: the host computes the corrections in double precision. A count tensor on the device (a
    captured step): the kernel reads it and computes them in fp32, where torch's arithmetic on the count
    took seven launches per parameter and step (186 -> 143 kernels a captured GPT-2 step on the H200).
    A rate tensor (one a scheduler changes between a captured step's replays): the kernel reads it, and
    with the count on the host multiplies it by the host's 1 / (1 - beta1^step)."""
    lr_ptr, lr_value = (lr, 0.0) if isinstance(lr, Tensor) else (None, lr)
    flags = dict(STEP_ON_DEVICE=isinstance(step, Tensor), LR_ON_DEVICE=lr_ptr is not None)
    if flags["STEP_ON_DEVICE"]:
        return (step, 0.0, 0.0, lr_ptr, lr_value, _log(beta1), _log(beta2)), flags
    step_size = (1.0 if flags["LR_ON_DEVICE"] else lr_value) / (1 - beta1**step)
    return (None, step_size, (1 - beta2**step) ** 0.5, lr_ptr, lr_value, 0.0, 0.0), flags


def _log(beta: float) -> float:
    return math.log(beta) if beta > 0 else float("-inf")  # beta = 0: beta^step is 0 from step 1


@triton.jit
def _adam_kernel(
    p_ptr, grad_ptr, m_ptr, v_ptr, n, step_ptr, step_size, bias2_sqrt, lr_ptr, lr, log_beta1, log_beta2, beta2,
    one_minus_beta1, one_minus_beta2, eps, STEP_ON_DEVICE: tl.constexpr, LR_ON_DEVICE: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    p = tl.load(p_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    p, m, v = _adam_update(p, g, m, v, step_ptr, step_size, bias2_sqrt, lr_ptr, lr, log_beta1, log_beta2, beta2,
                           one_minus_beta1, one_minus_beta2, eps, STEP_ON_DEVICE, LR_ON_DEVICE)  # fmt: skip
    tl.store(p_ptr + offsets, p.to(p_ptr.dtype.element_ty), mask=mask)
    tl.store(m_ptr + offsets, m.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + offsets, v.to(v_ptr.dtype.element_ty), mask=mask)


ADAM_BLOCK = 2048  # elements per program: 16 per thread at 4 warps


def adam_(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int | Tensor, lr: float | Tensor,
    beta1: float, beta2: float, eps: float,
) -> None:  # fmt: skip
    """In place on `param` and the moments (all contiguous): `reference.adam` in one pass. `step` and
    `lr` as `decoder_adam_`'s."""
    n = param.numel()
    corrections, flags = _bias_correction_args(step, lr, beta1, beta2)
    _adam_kernel[(cdiv(n, ADAM_BLOCK),)](
        param, grad, exp_avg, exp_avg_sq, n, *corrections, beta2, 1 - beta1, 1 - beta2, eps,
        **flags, BLOCK=ADAM_BLOCK, num_warps=4,
    )  # fmt: skip
