"""The reconstruction loss's sums and their gradients (fastsae/ops/loss.py, `F.reconstruction_sums`) against
the reference in fp64, and the module's MSE / FVU / AuxK FVU built on them."""

import pytest
import torch

from fastsae import functional as F
from fastsae import reference
from fastsae.ops import loss

from .utils import DEVICES, assert_close

CASES = [
    pytest.param("cpu", 37, 40, marks=pytest.mark.interpret),
    pytest.param("cpu", 5, 1500, marks=pytest.mark.interpret),  # rows wider than a tile: the loop over d
    pytest.param("cuda", 8192, 768, marks=pytest.mark.gpu),
    pytest.param("cuda", 4097, 4096, marks=pytest.mark.gpu),
]
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]


def _pair(n, d, dtypes, device, strided):
    """(x_hat, x) [n, d]; x with an outlier dimension (mean 1e3: the spread must come from deviations,
    not raw moments) and, when `strided`, both as transposed views."""
    x = torch.randn(n, d, dtype=torch.float64)
    x[:, 0] += 1e3
    x_hat = x + 0.3 * torch.randn(n, d, dtype=torch.float64)
    if strided:
        return tuple(t.t().contiguous().to(device, dtype).t() for t, dtype in zip((x_hat, x), dtypes))
    return tuple(t.to(device, dtype) for t, dtype in zip((x_hat, x), dtypes))


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda v: f"{v[0]}-{v[1]}")
@pytest.mark.parametrize("device, n, d", CASES, ids=lambda v: None)
def test_reconstruction_sums_kernels(device, n, d, dtypes, strided):
    """Both sums from the inputs' own values, summed in fp32 (so at fp32's tolerance whatever their
    dtype), and each gradient, alone or with the other, in its input's dtype."""
    x_hat, x = _pair(n, d, dtypes, device, strided)
    error, deviations = loss.reconstruction_sums(x_hat, x)
    want_error, want_deviations = reference.reconstruction_sums(x_hat.double(), x.double())
    assert error.dtype == deviations.dtype == torch.float32
    # fastsae::reconstruction_sums returns them: a custom op's outputs may not share memory
    assert error.untyped_storage().data_ptr() != deviations.untyped_storage().data_ptr()
    assert_close(error, want_error, torch.float32, "squared error")
    assert_close(deviations, want_deviations, torch.float32, "squared deviations")
    grad_error, grad_deviations = torch.randn(2, dtype=torch.float64, device=device)
    want = reference.reconstruction_sums_backward(grad_error, grad_deviations, x_hat.double(), x.double())
    for asked in [(True, False), (False, True), (True, True)]:
        grads = loss.reconstruction_sums_backward(grad_error.float(), grad_deviations.float(), x_hat, x, *asked)
        for name, got, expected, wanted, dtype in zip(("d x_hat", "d x"), grads, want, asked, dtypes):
            if wanted:
                assert got.dtype == dtype, name
                # d x holds x - mean(x), whose fp32 mean in the outlier column (about 1e3) is off by about
                # 1e-4 of that column's deviations from rounding alone: bf16's tolerance for it.
                assert_close(got, expected, torch.bfloat16 if name == "d x" else dtype, name)
            else:
                assert got.numel() == 0, f"{name} was not asked for"


@pytest.mark.parametrize("device", DEVICES)
def test_losses_and_their_gradients_match_the_reference(device):
    """F.mse, F.fvu and F.auxk_loss (through `F.reconstruction_sums`: the kernels on CUDA) and the
    gradient of a loss mixing them, against the reference's formulas under autograd in fp64."""
    x_hat, x = _pair(300, 96, (torch.bfloat16, torch.bfloat16), device, strided=False)
    x_hat.requires_grad_()
    n_dead = torch.tensor(50, device=device)
    got = (F.mse(x_hat, x), F.fvu(x_hat, x), F.auxk_loss(x_hat, x, n_dead, 64))
    (got[0] + 2 * got[1] + 3 * got[2]).backward()
    x_hat64 = x_hat.detach().double().requires_grad_()
    want = (reference.mse(x_hat64, x.double()), reference.fvu(x_hat64, x.double()),
            reference.auxk_loss(x_hat64, x.double(), n_dead, 64))  # fmt: skip
    (want[0] + 2 * want[1] + 3 * want[2]).backward()
    for name, value, expected in zip(("mse", "fvu", "auxk"), got, want):
        assert value.dtype == torch.float32, name
        assert_close(value, expected, torch.float32, name)
    assert_close(x_hat.grad, x_hat64.grad, torch.bfloat16, "d x_hat")


def test_fvu_of_one_token_is_nan():
    x = torch.randn(1, 8)
    assert torch.isnan(F.fvu(x + 1, x))
