"""The decoder-constraint kernels (fastsae/ops/decoder.py) against the reference in fp64."""

import pytest
import torch

from fastsae import reference
from fastsae.ops import decoder

from .utils import assert_close

CASES = [
    pytest.param("cpu", 37, 40, marks=pytest.mark.interpret),
    pytest.param("cuda", 24576, 768, marks=pytest.mark.gpu),
    pytest.param("cuda", 1001, 4096, marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device, F, d", CASES, ids=lambda v: None)
def test_decoder_constraint_kernels(device, F, d, dtype):
    W = (torch.randn(F, d, dtype=torch.float64) * 3).to(device=device, dtype=dtype)
    grad = torch.randn(F, d, dtype=torch.float64).to(device=device, dtype=dtype)
    expected_grad = reference.remove_parallel_grad(W.double(), grad.double())
    decoder.remove_parallel_grad_(W, grad)
    assert_close(grad, expected_grad, dtype, "projected grad")
    expected_W = reference.normalize_decoder_rows(W.double())
    decoder.normalize_rows_(W)
    assert_close(W, expected_W, dtype, "normalised rows")
    assert torch.allclose(W.double().norm(dim=1), torch.ones(F, dtype=torch.float64, device=device), atol=1e-2)


@pytest.mark.parametrize("constrained", [True, False], ids=["decoder", "plain"])
@pytest.mark.parametrize("state_dtype", [torch.float32, None], ids=["fp32 moments", "moments in W's dtype"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device, F, d", CASES, ids=lambda v: None)
def test_adam_kernels(device, F, d, dtype, state_dtype, constrained):
    """The fused decoder step (projection, Adam, renormalisation) and the plain Adam step against the
    fp64 reference, at step 1, at a later step with non-zero moments, and with the count in a 0-dim
    tensor (the kernel computes the bias corrections from it: at step 1 they are smallest); the rate a
    number or a 0-dim tensor (which the kernel reads), with either count."""
    moments_dtype = state_dtype or dtype
    kernel, expected_step = (decoder.decoder_adam_, reference.decoder_adam)
    if not constrained:
        kernel, expected_step = decoder.adam_, reference.adam
    W = reference.normalize_decoder_rows(torch.randn(F, d, dtype=torch.float64)).to(device=device, dtype=dtype)
    counts = (torch.tensor(1.0, device=device), torch.tensor(9.0, device=device))  # the capturable SAEAdam's
    rate = torch.tensor(3e-3, device=device)  # as a scheduler sets it between a captured step's replays
    for step, lr in ((1, 1e-2), (7, rate), (counts[0], 1e-2), (counts[1], rate)):
        later_step = float(step) > 1  # zero moments at step 1, as torch.optim.Adam starts
        grad = torch.randn(F, d, dtype=torch.float64).to(device=device, dtype=dtype)
        m = (0.1 * torch.randn(F, d, dtype=torch.float64) * later_step).to(device=device, dtype=moments_dtype)
        v = (0.01 * torch.rand(F, d, dtype=torch.float64) * later_step).to(device=device, dtype=moments_dtype)
        want = expected_step(W.double(), grad.double(), m.double(), v.double(), step, lr, 0.9, 0.999, 1e-8)
        kernel(W, grad, m, v, step, lr, 0.9, 0.999, 1e-8)
        for name, got, expected in zip(("W", "exp_avg", "exp_avg_sq"), (W, m, v), want):
            assert_close(got, expected, dtype, f"{name} at step {step}")
        if constrained:
            norms = W.double().norm(dim=1)
            assert torch.allclose(norms, torch.ones(F, dtype=torch.float64, device=device), atol=1e-2)


@pytest.mark.parametrize("device, F, d", CASES, ids=lambda v: None)
def test_adam_kernels_with_beta1_zero_and_a_count_on_the_device(device, F, d):
    """beta1 = 0 (no first-moment averaging): the kernel's corrections from a count tensor (from step x
    log beta1, which is -inf) are the host's."""
    W = reference.normalize_decoder_rows(torch.randn(F, d, dtype=torch.float64)).to(device=device)
    grad = torch.randn(F, d, dtype=torch.float64).to(device=device, dtype=torch.float32)
    m, v = (0.1 * torch.rand(2, F, d, dtype=torch.float64)).to(device=device, dtype=torch.float32)
    step = torch.tensor(3.0, device=device)
    want = reference.adam(W.double(), grad.double(), m.double(), v.double(), 3, 1e-2, 0.0, 0.999, 1e-8)
    decoder.adam_(W, grad, m, v, step, 1e-2, 0.0, 0.999, 1e-8)
    for name, got, expected in zip(("W", "exp_avg", "exp_avg_sq"), (W, m, v), want):
        assert_close(got, expected, torch.float32, name)
