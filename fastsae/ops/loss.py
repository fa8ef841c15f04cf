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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import reference
from .columns import column_sums
from .launch import cdiv, next_power_of_2

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


def only_asked(grads: tuple[Tensor, Tensor], asked: tuple[bool, bool]) -> tuple[Tensor, Tensor]:
    """`grads`, each replaced by an empty tensor of its dtype where not `asked` (what the kernel returns)."""
    return tuple(grad if wanted else grad.new_empty(0) for grad, wanted in zip(grads, asked))
