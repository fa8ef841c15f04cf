"""The comparison helpers and the one tolerance table that every test uses."""

import pytest
import torch

from fastsae import reference, testing
from fastsae.ops import encode

# Relative RMS error allowed against an fp64 reference, by the dtype of the tested computation.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}

# A pre-activation within the kernel's rounding of a threshold (the centred input is cast to the
# weights' dtype before the matmul) may land on either side of it, relative to max(|pre|, 1).
ROUNDING_BAND = {torch.float32: 1e-4, torch.float16: 0.02, torch.bfloat16: 0.1}

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
]

# Where the Triton kernels themselves run: CPU tensors under TRITON_INTERPRET=1, or the GPU.
KERNEL_DEVICES = [
    pytest.param("cpu", id="interpret", marks=pytest.mark.interpret),
    pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str = "output") -> None:
    """`fastsae.testing.assert_close` at the tolerance of `dtype`."""
    testing.assert_close(actual, expected, TOLERANCE[dtype], f"{name} ({dtype})")


def poisoned_outputs(B, k, k_aux, device):
    """(vals, idx, aux_vals, aux_idx) for a filter route to write, NaN and -1 wherever it does not."""
    return tuple(
        torch.full((B, width), float("nan"), device=device) if floating else
        torch.full((B, width), -1, dtype=torch.int32, device=device)
        for width in (k, k_aux) for floating in (True, False)
    )  # fmt: skip


def random_sae_weights(d: int, n_features: int, dtype=torch.float64, device="cpu"):
    """Encoder/decoder weights and biases with unit-norm decoder rows, like an initialised SAE (drawn
    on `device`: full-width GPU cases would spend seconds drawing them on the CPU)."""
    W_dec = torch.randn(n_features, d, dtype=torch.float64, device=device)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    W_enc = W_dec.T.contiguous() + 0.1 * torch.randn(d, n_features, dtype=torch.float64, device=device)
    b_enc = 0.1 * torch.randn(n_features, dtype=torch.float64, device=device)
    b_dec = torch.randn(d, dtype=torch.float64, device=device)
    return [t.to(dtype=dtype) for t in (W_enc, b_enc, W_dec, b_dec)]


def assert_topk_matches(vals, idx, pre, k, dtype, name="topk"):
    """`fastsae.testing.assert_topk_matches` at the tolerance of `dtype`, with fastsae's int32 indices."""
    assert idx.dtype == torch.int32, f"{name}: indices are {idx.dtype}"
    testing.assert_topk_matches(vals, idx, pre, k, TOLERANCE[dtype], f"{name} ({dtype})")


def check_encode_topk_backward(x, W_enc, b_dec, codes, dtype, generator=None):
    """`ops.encode.encode_topk_backward` of random output gradients for `codes` (vals, idx, aux_vals,
    aux_idx), drawn from `generator` (a CPU one; default torch's), every gradient checked against
    `reference.encode_topk_backward` in fp64. Returns the gradients and a function that recomputes them
    (for repeatability checks)."""
    vals, _, aux_vals, _ = codes
    grad_vals, grad_aux = (
        torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device) for t in (vals, aux_vals)
    )
    saved = (x, W_enc, b_dec, *codes)

    def run():
        return encode.encode_topk_backward(grad_vals, grad_aux, *saved, True)

    grads = run()
    as64 = [t.double() if t.is_floating_point() else t for t in (grad_vals, grad_aux, *saved)]
    expected = reference.encode_topk_backward(*as64)
    # Each gradient is a sum over codes, whose rounding error scales with the sum of its terms'
    # magnitudes, not with the sum itself (a column of d b_enc may cancel to near 0): the same backward
    # of |every factor| (x centred first) is the scale the error is measured against.
    grad_vals64, grad_aux64, x64, W_enc64, b_dec64, *codes64 = as64
    magnitudes = reference.encode_topk_backward(
        grad_vals64.abs(), grad_aux64.abs(), (x64 - b_dec64).abs(), W_enc64.abs(), torch.zeros_like(b_dec64), *codes64
    )
    for name, actual, want, scale in zip(("dx", "dW_enc", "db_enc", "db_dec"), grads, expected, magnitudes):
        assert actual.dtype == dtype, name
        assert_sum_close(actual, want, scale, dtype, name)
    return grads, run


def assert_sum_close(actual, expected, magnitudes, dtype, name="output"):
    """A sum's RMS error within the tolerance of `dtype` relative to the RMS of `magnitudes`, the same sum
    of its terms' absolute values (the bound of floating-point summation), and no NaN."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not torch.isnan(actual).any(), f"{name}: contains NaN (unwritten elements?)"
    scale = magnitudes.double().pow(2).mean().sqrt().clamp_min(1e-30)
    error = float((actual.double() - expected.double()).pow(2).mean().sqrt() / scale)
    assert error <= TOLERANCE[dtype], (
        f"{name} ({dtype}): RMS error {error:.3g} of the terms' magnitudes > {TOLERANCE[dtype]:.1g}"
    )
