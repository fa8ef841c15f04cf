"""The comparison helpers and the one tolerance table that every test uses."""

import pytest
import torch

# Relative RMS error allowed against an fp64 reference, by the dtype of the tested computation.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
]

# Where the Triton kernels themselves run: CPU tensors under TRITON_INTERPRET=1, or the GPU.
KERNEL_DEVICES = [
    pytest.param("cpu", id="interpret", marks=pytest.mark.interpret),
    pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
]


def relative_rms_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double().to(actual.device)
    return float((actual - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt().clamp_min(1e-30))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str = "output") -> None:
    """Shape equal, no NaN (outputs are poisoned with NaN before kernels write them), and relative RMS
    error within TOLERANCE[dtype]."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not torch.isnan(actual).any(), f"{name}: contains NaN (unwritten elements?)"
    error = relative_rms_error(actual, expected)
    assert error <= TOLERANCE[dtype], f"{name}: relative RMS error {error:.3g} > {TOLERANCE[dtype]:.1g} ({dtype})"


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
    """TopK checked without relying on tie order: sorted values equal the reference's top-k, and each
    fired code's (value > 0) own pre-activation equals its value, with no feature fired twice in a row.
    Codes of value 0 did not fire; their index is unspecified."""
    expected = pre.double().topk(k, dim=1).values.relu()
    assert_close(vals.double().sort(dim=1, descending=True).values, expected, dtype, f"{name} values")
    assert idx.dtype == torch.int32
    idx, pre, fired = idx.long().to(pre.device), pre.double(), vals.to(pre.device) > 0
    assert ((idx >= 0) & (idx < pre.shape[1])).all(), f"{name}: index out of range"
    gathered = torch.where(fired, pre.gather(1, idx), 0.0)
    assert_close(vals.double().to(pre.device), gathered, dtype, f"{name} gathered pre-activations")
    fired_idx = torch.where(fired, idx, -1 - torch.arange(idx.shape[1], device=idx.device))  # unique fillers
    assert (fired_idx.sort(dim=1).values.diff(dim=1) > 0).all(), f"{name}: a feature fired twice in a row"


def check_encode_topk_backward(x, W_enc, b_dec, codes, dtype):
    """`ops.encode.encode_topk_backward` of random output gradients for `codes` (vals, idx, aux_vals,
    aux_idx), every gradient checked against `reference.encode_topk_backward` in fp64. Returns the
    gradients and a function that recomputes them (for repeatability checks)."""
    from fastsae import reference
    from fastsae.ops import encode

    vals, _, aux_vals, _ = codes
    grad_vals, grad_aux = torch.randn_like(vals), torch.randn_like(aux_vals)
    saved = (x, W_enc, b_dec, *codes)

    def run():
        return encode.encode_topk_backward(grad_vals, grad_aux, *saved, True)

    grads = run()
    expected = reference.encode_topk_backward(
        grad_vals.double(), grad_aux.double(), *(t.double() if t.is_floating_point() else t for t in saved)
    )
    for name, actual, want in zip(("dx", "dW_enc", "db_enc", "db_dec"), grads, expected):
        assert actual.dtype == dtype, name
        assert_close(actual, want, dtype, name)
    return grads, run
