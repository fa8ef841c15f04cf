"""The Triton sparse decode kernel (fastsae/ops/decode.py) against the fp64 reference: on CPU under
the Triton interpreter at tiny shapes, on the GPU at full ones. Outputs are poisoned with NaN first."""

import pytest
import torch

from fastsae import reference
from fastsae.ops import decode, scatter

from .utils import KERNEL_DEVICES, assert_close, random_sae_weights

# (B, d, F, k)
CASES = [
    pytest.param("cpu", 37, 40, 96, 8, marks=pytest.mark.interpret),
    pytest.param("cpu", 1, 24, 64, 64, marks=pytest.mark.interpret),
    pytest.param("cuda", 8192, 768, 24576, 32, marks=pytest.mark.gpu),
    pytest.param("cuda", 199, 4096, 131072, 64, marks=pytest.mark.gpu),
    pytest.param("cuda", 33, 100, 2000, 1024, marks=pytest.mark.gpu),
]


def _codes(B, F, k, dtype, device):
    vals = torch.rand(B, k, dtype=torch.float64, device=device)
    vals[vals < 0.2] = 0  # codes that did not fire: their gather is skipped
    idx = torch.rand(B, F, device=device).argsort(dim=1)[:, :k].to(torch.int32)  # on the GPU: [B, F] is large
    return vals.to(dtype=dtype), idx


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("device, B, d, F, k", CASES, ids=lambda v: None)
def test_decode_sparse_kernel(device, B, d, F, k, dtype, bias):
    vals, idx = _codes(B, F, k, dtype, device)
    _, _, W_dec, b_dec = random_sae_weights(d, F, dtype=dtype, device=device)
    b_dec = b_dec if bias else None
    out = decode.decode_sparse(vals, idx, W_dec, b_dec)
    expected = reference.decode_sparse(vals.double(), idx, W_dec.double(), None if b_dec is None else b_dec.double())
    assert out.dtype == dtype
    assert_close(out, expected, dtype)


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("cfg", decode._DECODE_CANDIDATES, ids=lambda cfg: "-".join(map(str, cfg.values())))
@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_decode_sparse_every_tile(device, cfg):
    """Each tile the tuner may pick for the decode, with k = 9 codes (not a multiple of any tile's codes at
    once), a batch and a d that are not multiples of its BLOCK_M and BLOCK_D, codes that did not fire, and an
    index outside [0, F) on a zero code (skipped, not read)."""
    B, d, F, k = 70, 72, 50, 9
    vals, idx = _codes(B, F, k, torch.float32, device)
    vals[3, 4], idx[3, 4] = 0.0, F + 7
    _, _, W_dec, b_dec = random_sae_weights(d, F, dtype=torch.float32, device=device)
    out = decode.decode_sparse(vals, idx, W_dec, b_dec, tile=cfg)
    idx[3, 4] = 0  # the reference indexes every code
    expected = reference.decode_sparse(vals.double(), idx, W_dec.double(), b_dec.double())
    assert_close(out, expected, torch.float32)


BACKWARD_CASES = [
    pytest.param("cpu", 37, 40, 96, 8, marks=pytest.mark.interpret),
    pytest.param("cuda", 8192, 768, 24576, 32, marks=pytest.mark.gpu),
    pytest.param("cuda", 33, 100, 2000, 1024, marks=pytest.mark.gpu),
]


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device, B, d, F, k", BACKWARD_CASES, ids=lambda v: None)
def test_decode_sparse_backward_kernel(device, B, d, F, k, dtype, deterministic):
    vals, idx = _codes(B, F, k, dtype, device)
    _, _, W_dec, _ = random_sae_weights(d, F, dtype=dtype, device=device)
    grad_out = torch.randn(B, d, device=device, dtype=dtype)
    dvals, dW_dec = decode.decode_sparse_backward(grad_out, vals, idx, W_dec)
    expected_dvals, expected_dW = reference.decode_sparse_backward(
        grad_out.double(), vals.double(), idx, W_dec.double()
    )
    assert dvals.dtype == dtype and dW_dec.dtype == dtype
    assert_close(dvals, expected_dvals, dtype, "dvals")
    assert_close(dW_dec, expected_dW, dtype, "dW_dec")
    if deterministic:
        assert torch.equal(decode.decode_sparse_backward(grad_out, vals, idx, W_dec)[1], dW_dec), "not bit-identical"


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("cfg", decode._dvals_candidates(), ids=lambda cfg: "-".join(map(str, cfg.values())))
@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_decode_sparse_backward_every_dvals_tile(device, cfg):
    """Each tile the tuner may pick for d vals, with k = 9 codes (not a multiple of any tile's codes per
    program or codes at once) and a d that is not a multiple of its BLOCK_D (fp32: fp64 weights take the
    reference)."""
    B, d, F, k = 70, 72, 50, 9
    vals, idx = _codes(B, F, k, torch.float32, device)
    _, _, W_dec, _ = random_sae_weights(d, F, dtype=torch.float32, device=device)
    grad_out = torch.randn(B, d, device=device)
    dvals = decode.sparse_dvals(grad_out, vals, idx, W_dec, cfg)
    expected, _ = reference.decode_sparse_backward(grad_out.double(), vals.double(), idx, W_dec.double())
    assert_close(dvals, expected, torch.float32, "dvals")
    # The TopK encode's coefficients from the same kernel: the ReLU's mask (`_codes` leaves some codes at
    # 0) over d vals + grad_vals (strided here).
    grad_vals = torch.randn(k, B, device=device).t()
    coef = decode.sparse_dvals(grad_out, vals, idx, W_dec, cfg, grad_vals=grad_vals)
    assert_close(coef, torch.where(vals.double() > 0, expected + grad_vals.double(), 0.0), torch.float32, "coef")
    assert (coef[vals == 0] == 0).all(), "a code that did not fire has a coefficient"
    # Only the fired codes' d vals, on codes where whole tiles did not fire (the first 40 rows: the loop
    # over d is skipped there) and some values are negative; the coefficients on the same codes.
    vals[:40] = 0
    vals[40:45] = -vals[40:45]
    expected, _ = reference.decode_sparse_backward(
        grad_out.double(), vals.double(), idx, W_dec.double(), fired_only=True
    )
    fired_only = decode.sparse_dvals(grad_out, vals, idx, W_dec, cfg, fired_only=True)
    assert_close(fired_only, expected, torch.float32, "fired-only dvals")
    assert (fired_only[vals <= 0] == 0).all() and (fired_only[vals > 0] != 0).all()
    coef = decode.sparse_dvals(grad_out, vals, idx, W_dec, cfg, grad_vals=grad_vals)
    assert_close(coef, torch.where(vals.double() > 0, expected + grad_vals.double(), 0.0), torch.float32, "coef")


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_decode_sparse_stops_after_the_last_nonzero_code(device):
    """Codes as BatchTopK's: each row's nonzero codes first, zeros after them (some rows all zero), over
    more codes than a program reads at once to find the last nonzero one; a NaN late in one row still
    reaches its output; no codes at all give the bias."""
    B, d, F, k = 37, 40, 300, 2 * decode.CODES_READ + 9
    vals, idx = _codes(B, F, k, torch.float32, device)
    vals[vals == 0] = 0.5
    kept = torch.randint(0, k + 1, (B, 1), device=device)
    kept[:5] = 0
    vals = torch.where(torch.arange(k, device=device) < kept, vals, 0.0)
    _, _, W_dec, b_dec = random_sae_weights(d, F, dtype=torch.float32, device=device)
    expected = reference.decode_sparse(vals.double(), idx, W_dec.double(), b_dec.double())
    assert_close(decode.decode_sparse(vals, idx, W_dec, b_dec), expected, torch.float32)
    vals[7, k - 3] = float("nan")
    out = decode.decode_sparse(vals, idx, W_dec, b_dec)
    assert out[7].isnan().all() and not out[8:].isnan().any()
    no_codes = decode.decode_sparse(vals[:, :0], idx[:, :0], W_dec, b_dec)  # (AuxK's when it has none)
    assert torch.equal(no_codes, b_dec.expand(B, d))


@pytest.mark.parametrize(
    "B, F, k", [(37, 96, 8), (1, 64, 64), (0, 50, 4), (300, 40000, 3)], ids=["gaps", "k=F", "empty", "int32-keys"]
)
@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_sort_by_feature(device, B, F, k):
    """The per-feature sums' CSR form of the codes: sorted by feature, then by token, with each feature's
    first position (features without codes, at the start, the end and between, included: the codes
    below use only the even features), against torch's sort and bincount."""
    if k == F:  # every feature in every row
        idx = torch.rand(B, F, device=device).argsort(dim=1).to(torch.int32)
    else:
        idx = (2 * torch.rand(B, F // 2, device=device).argsort(dim=1)[:, :k]).to(torch.int32)
    codes = scatter.sort_by_feature(idx, F)
    flat = idx.flatten().long()
    position = torch.arange(flat.numel(), device=device)
    expected_order = torch.sort(flat * flat.numel() + position).indices  # by feature, then by flat position
    assert torch.equal(codes.order, expected_order)
    assert torch.equal(codes.features, flat[expected_order].int())
    assert torch.equal(codes.tokens, (expected_order // k).int())
    expected_offsets = torch.cat([flat.new_zeros(1), torch.bincount(flat, minlength=F).cumsum(0)])
    assert torch.equal(codes.offsets.long(), expected_offsets)
    # with coefficients: the codes whose coefficient is 0 after every feature's range
    coef = torch.randint(0, 2, idx.shape, device=device).float()
    skipping = scatter.sort_by_feature(idx, F, coef)
    kept = coef.flatten() != 0
    kept_order = expected_order[kept[expected_order]]
    assert torch.equal(skipping.order[: kept_order.numel()], kept_order)
    expected_offsets = torch.cat([flat.new_zeros(1), torch.bincount(flat[kept], minlength=F).cumsum(0)])
    assert torch.equal(skipping.offsets.long(), expected_offsets)
    assert (skipping.features[kept_order.numel() :] == F).all(), "a skipped code inside a feature's range"


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_decode_sparse_strided_inputs(device):
    """Non-contiguous codes, decoder and bias (views with stride 2)."""
    B, d, F, k = 20, 24, 64, 4
    vals, idx = _codes(B, F, 2 * k, torch.float32, device)
    vals, idx = vals[:, ::2], idx[:, ::2]
    _, _, W_dec, b_dec = random_sae_weights(2 * d, F, dtype=torch.float32, device=device)
    W_dec, b_dec = W_dec[:, ::2], b_dec[::2]
    expected = reference.decode_sparse(vals.double(), idx, W_dec.double(), b_dec.double())
    assert_close(decode.decode_sparse(vals, idx, W_dec, b_dec), expected, torch.float32)
