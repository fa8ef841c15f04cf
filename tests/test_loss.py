"""The reconstruction loss's sums and their gradients (fastsae/ops/loss.py, `F.reconstruction_sums`) against
the reference in fp64, the MSE / FVU / AuxK FVU built on them, and a TopK SAE's training losses in one node
(`F.training_losses`)."""

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


def _auxk_triple(n, d, dtypes, device, strided):
    """(recon, x, aux_recon): `_pair`'s, and AuxK's reconstruction of part of the residual x - recon."""
    recon, x = _pair(n, d, dtypes, device, strided)
    aux = 0.5 * (x.double() - recon.double()) + 0.1 * torch.randn(n, d, dtype=torch.float64, device=device)
    return recon, x, aux.to(dtypes[0])


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda v: f"{v[0]}-{v[1]}")
@pytest.mark.parametrize("device, n, d", CASES, ids=lambda v: None)
def test_training_losses_kernels(device, n, d, dtypes, strided, monkeypatch):
    """The three launches' losses and sums, with AuxK and without, and the backward's three gradients,
    alone and together, from all four losses' gradients or the loss's alone (the others None), against
    the reference in fp64. The outlier column (mean 1e3) checks that the spreads come out exact from the
    programs' merged means; under the interpreter, partial means of a few columns a program of the merge
    drive its grid over the columns."""
    if device == "cpu":
        monkeypatch.setattr(loss, "MERGE_ELEMENTS", 64)
    recon, x, aux = _auxk_triple(n, d, dtypes, device, strided)
    n_dead = torch.tensor(40, device=device)
    for aux_recon in (aux, None):
        *losses, sums = loss.training_losses(recon, x, aux_recon, n_dead, 64, 0.25)
        as64 = None if aux_recon is None else aux_recon.double()
        *want_losses, want_sums = reference.training_losses(recon.double(), x.double(), as64, n_dead, 64, 0.25)
        assert all(t.dtype == torch.float32 for t in (*losses, sums))
        assert_close(torch.stack(losses), torch.stack(want_losses), torch.float32, "losses")
        assert_close(sums, want_sums, torch.float32, "sums")
        # positive: the FVU's and the MSE's shares of d recon, of like size here, add up rather than cancel
        grad = torch.rand(4, dtype=torch.float64, device=device) + 0.5
        for given in [(True,) * 4, (True, False, False, False)]:
            grad_given = grad * torch.tensor(given, dtype=torch.float64, device=device)
            want = reference.training_losses_backward(grad_given, want_sums, recon.double(), x.double(), as64, 0.25)
            grads_in = [g.float() if wanted else None for g, wanted in zip(grad, given)]
            for asked in [(True, False, False), (False, True, False), (False, False, True), (True, True, True)]:
                grads = loss.training_losses_backward(*grads_in, sums, recon, x, aux_recon, 0.25, *asked)
                for name, got, expected, wanted in zip(("d recon", "d x", "d aux_recon"), grads, want, asked):
                    if wanted and expected is not None:
                        # d x holds x - mean(x): bf16's tolerance, as in test_reconstruction_sums_kernels
                        tolerance = torch.bfloat16 if name == "d x" else recon.dtype
                        assert_close(got, expected, tolerance, name)
                    else:
                        assert got.numel() == 0, f"{name} was not asked for (or there is no aux_recon)"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_dead", [0, 40, 200])
def test_training_losses_match_the_losses_they_mix(device, n_dead):
    """F.training_losses is the MSE, the FVU and AuxK's loss of the detached residual (the reference's
    separate functions), with loss = fvu + auxk_coef * auxk, and so are its gradients w.r.t. recon, x and
    aux_recon under autograd in fp64 (AuxK's weight clamped at 1, and 0 with no dead feature)."""
    recon, x, aux = _auxk_triple(300, 96, (torch.bfloat16, torch.float32), device, strided=False)
    for t in (recon, x, aux):
        t.requires_grad_()
    dead = torch.tensor(n_dead, device=device)
    got = F.training_losses(recon, x, aux, dead, 64, 0.25)
    (got.loss + 2 * got.mse + 3 * got.fvu + 4 * got.auxk).backward()
    recon64, x64, aux64 = (t.detach().double().requires_grad_() for t in (recon, x, aux))
    fvu = reference.fvu(recon64, x64)
    auxk = reference.auxk_loss(aux64, (x64 - recon64).detach(), dead, 64)
    want = (fvu + 0.25 * auxk, reference.mse(recon64, x64), fvu, auxk)
    (want[0] + 2 * want[1] + 3 * want[2] + 4 * want[3]).backward()
    for name, value, expected in zip(got._fields, got, want):
        assert value.dtype == torch.float32, name
        assert_close(value, expected, torch.float32, name)
    for name, t, t64 in (("d recon", recon, recon64), ("d x", x, x64), ("d aux_recon", aux, aux64)):
        assert_close(t.grad, t64.grad, torch.bfloat16, name)
    without = F.training_losses(recon, x)
    assert float(without.auxk) == 0.0 and torch.equal(without.loss, without.fvu)


def test_training_losses_of_one_token_are_nan():
    """One token has no spread: its FVUs (so the loss) are NaN, its MSE is not, and only the MSE has a
    gradient."""
    x = torch.randn(1, 8)
    recon = (x + 1).requires_grad_()
    out = F.training_losses(recon, x, torch.zeros(1, 8), torch.tensor(3), 4)
    assert torch.isnan(out.fvu) and torch.isnan(out.auxk) and torch.isnan(out.loss)
    assert_close(out.mse, torch.tensor(1.0), torch.float32, "mse")
    out.mse.backward()
    assert_close(recon.grad, torch.full((1, 8), 2 / 8), torch.float32, "d recon")
