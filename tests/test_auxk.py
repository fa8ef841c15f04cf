"""The dense AuxK path's row top-k (fastsae/ops/auxk.py) against torch.topk, and
`functional.auxk_reconstruction` with it and without it (FASTSAE_AUXK_ROW_TOPK)."""

import pytest
import torch

from fastsae import functional as F
from fastsae.ops import auxk

from .utils import KERNEL_DEVICES, assert_close, random_sae_weights

CASES = [
    pytest.param("cpu", 7, 100, marks=pytest.mark.interpret),
    pytest.param("cpu", 3, 2000, marks=pytest.mark.interpret),  # one row per program, the longest rows
    pytest.param("cuda", 8192, 1232, marks=pytest.mark.gpu),  # the GPT-2 step's dead features
    pytest.param("cuda", 1001, 2048, marks=pytest.mark.gpu),
]


def _check(pre, idx, k):
    """idx [B, k] are distinct indices of entries whose values are the row's k largest (NaN as -inf)."""
    assert idx.shape == (pre.shape[0], k) and idx.dtype == torch.int64
    assert ((idx >= 0) & (idx < pre.shape[1])).all()
    assert (idx.sort(dim=1).values.diff(dim=1) > 0).all(), "an index chosen twice"
    scores = pre.float().nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    got = scores.gather(1, idx).sort(dim=1).values
    want = scores.topk(k, dim=1).values.sort(dim=1).values
    assert torch.equal(got, want), "not the k largest values"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("device, B, n", CASES, ids=lambda v: None)
def test_row_topk_indices(device, B, n, dtype):
    """Gaussian rows (bf16 and fp16 values tie often), with -inf padding, NaN entries and a column
    slice of a wider matrix (strides), for k = 1, a middle k and k = n."""
    wide = torch.randn(B, n + 5, device=device).to(dtype)
    pre = wide[:, 2 : n + 2]
    pre[:, -3:] = float("-inf")
    pre[0, 1] = float("nan")
    for k in (1, min(n, 384) // 3 + 1, n):
        _check(pre, auxk.row_topk_indices(pre, k), k)
    # Values that differ only in their lowest mantissa bits (largest first): all of a key's bits count.
    close = (1 - torch.arange(n, device=device) * 2.0**-22).to(dtype).expand(B, n)
    _check(close, auxk.row_topk_indices(close, min(n, 384) // 3 + 1), min(n, 384) // 3 + 1)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_row_topk_ties_go_to_the_larger_index(device):
    """Rows of few distinct values: the ties at the k-th value that complete k are those of largest index;
    the last row has one value throughout (the benchmark's dead features, silenced by their bias)."""
    pre = (torch.arange(6 * 40, device=device).reshape(6, 40) % 5).float()  # values 0..4, each 8 times a row
    pre[5] = -1e4
    for k in (1, 3, 8, 9, 20, 40):
        idx = auxk.row_topk_indices(pre, k)
        _check(pre, idx, k)
        for row in range(6):
            kth = pre[row].topk(k).values[-1]
            tied = (pre[row] == kth).nonzero().squeeze(1)
            chosen = idx[row][pre[row, idx[row]] == kth]
            assert torch.equal(chosen.sort().values, tied[-chosen.numel() :]), (k, row)


def test_row_topk_rejects_what_it_cannot_hold():
    with pytest.raises(ValueError, match="k <= n"):
        auxk.row_topk_indices(torch.zeros(2, 4), 5)
    with pytest.raises(ValueError, match=f"n <= {auxk.MAX_ROW}"):
        auxk.row_topk_indices(torch.zeros(1, auxk.MAX_ROW + 1), 2)


@pytest.mark.gpu
def test_auxk_reconstruction_with_the_row_topk(monkeypatch):
    """F.auxk_reconstruction (values and gradients) with the row top-k as with torch.topk, on fp32 data
    (no ties: both select the same features)."""
    d, n_features, B, k_aux = 64, 4096, 512, 96
    W_enc, b_enc, W_dec, b_dec = (t.cuda().float().requires_grad_() for t in random_sae_weights(d, n_features))
    x = torch.randn(B, d, device="cuda")
    features = torch.randperm(n_features, device="cuda")[:1000]
    results = []
    for row_topk in (False, True):
        monkeypatch.setattr(auxk, "ROW_TOPK", row_topk)
        out = F.auxk_reconstruction(x, W_enc, b_enc, b_dec, W_dec, features, k_aux)
        grads = torch.autograd.grad(out.square().sum(), (W_enc, b_enc, W_dec, b_dec))
        results.append((out, *grads))
    for name, got, want in zip(("recon", "dW_enc", "db_enc", "dW_dec", "db_dec"), results[1], results[0]):
        assert_close(got, want, torch.float32, name)


@pytest.mark.parametrize("shortcut", [False, True], ids=["select", "shortcut"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device, B, n", CASES, ids=lambda v: None)
def test_row_topk_codes(device, B, n, dtype, shortcut, monkeypatch):
    """The codes the row top-k writes are the ReLU of the entries `row_topk_indices` selects, scattered
    into zeros (ties included: the same selection; the input's dtype, as the SAE's weights share one),
    with padding columns beyond n
    (zeros whatever they hold) and negative, -inf and NaN entries. With `auxk.CODES_WITHOUT_SELECTION`
    (`shortcut`), rows shifted down to a few positive entries take it where k reaches their count."""
    monkeypatch.setattr(auxk, "CODES_WITHOUT_SELECTION", shortcut)
    n_out = min(n + 5, auxk.MAX_ROW)
    for shift in (0.0, -2.0):
        pre = (torch.randn(B, n_out, device=device) + shift).to(dtype)
        pre[:, :2] = float("-inf")
        pre[0, 3] = float("nan")
        pre[1 % B, :] = pre[1 % B, 5]  # a row of ties
        for k in (1, min(n, 384) // 3 + 1, n):
            idx = auxk.row_topk_indices(pre[:, :n], k)
            expected = torch.zeros_like(pre).scatter_(1, idx, pre.gather(1, idx).relu())
            got = auxk.row_topk_codes(pre, n, k, dtype)
            assert got.dtype == dtype and got.shape == (B, n_out)
            same_nans = torch.equal(got.isnan(), expected.isnan())
            assert same_nans and torch.equal(got.nan_to_num(), expected.nan_to_num()), (shift, k)
    with pytest.raises(ValueError, match="n_out"):
        auxk.row_topk_codes(pre[:, : n - 1], n, 1, torch.bfloat16)
