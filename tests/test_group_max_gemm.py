"""The experimental CUTLASS GEMM with group maxima (`fastsae.ops.group_max_gemm`) against its reference,
and the reference against a direct computation of what it defines."""

import pytest
import torch

from fastsae import reference
from fastsae.ops import encode, filter, group_max_gemm
from fastsae.testing import assert_positive_counts_match

from .utils import KERNEL_DEVICES, ROUNDING_BAND, assert_close, assert_topk_matches, random_sae_weights


def test_reference_maxima_are_each_rows_group_maxima():
    torch.manual_seed(0)
    B, d, F, group = 5, 16, 300, 128
    xc, W_enc, b_enc = torch.randn(B, d).bfloat16(), torch.randn(d, F).bfloat16(), torch.randn(F).bfloat16()
    pre, maxima = reference.gemm_bias_group_max(xc, W_enc, b_enc, group)
    assert pre.dtype == torch.bfloat16 and pre.shape == (B, F)
    assert_close(pre.double(), xc.double() @ W_enc.double() + b_enc.double(), torch.bfloat16, "pre")
    assert maxima.dtype == torch.float32 and maxima.shape == (3, 128)  # 3 groups, rows rounded up to 128
    for row in range(B):
        for g in range(3):
            assert maxima[g, row] == pre[row, g * group : (g + 1) * group].float().max()
    assert torch.isneginf(maxima[:, B:]).all()


def test_unbuilt_extension_fails_clearly():
    if group_max_gemm.available():
        pytest.skip("the CUTLASS extension is built here")
    x = torch.zeros(8, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="cutlass"):
        group_max_gemm.gemm_bias_group_max(x, x, x[0])


def _operands(B, d, F):
    xc = torch.randn(B, d, device="cuda").bfloat16()
    W_enc = (torch.randn(d, F, device="cuda") / d**0.5).bfloat16()
    return xc, W_enc, (0.1 * torch.randn(F, device="cuda")).bfloat16()


@pytest.mark.gpu
@pytest.mark.parametrize("variant", range(len(group_max_gemm.VARIANTS)), ids=[v.name for v in group_max_gemm.VARIANTS])
@pytest.mark.parametrize("shape", [(300, 72, 1000), (1024, 768, 4096), (129, 384, 16384), (1, 8, 8)], ids=str)
def test_matches_reference_on_cuda(shape, variant):
    if not group_max_gemm.available():
        pytest.skip("fastsae's CUTLASS extension is not built (the `cutlass` extra)")
    torch.manual_seed(0)
    B, d, F = shape
    _, group, tile_rows = group_max_gemm.VARIANTS[variant]
    xc, W_enc, b_enc = _operands(B, d, F)
    pre, maxima = group_max_gemm.gemm_bias_group_max(xc, W_enc, b_enc, variant)
    expected_pre, expected_maxima = reference.gemm_bias_group_max(xc, W_enc, b_enc, group, tile_rows)
    assert pre.shape == expected_pre.shape and maxima.shape == expected_maxima.shape
    assert_close(pre.double(), expected_pre.double(), torch.bfloat16, "pre")
    # The maxima are exactly those of the kernel's own (rounded) pre-activation, whatever its summation order.
    assert torch.equal(maxima[:, :B], reference.group_maxima(pre, group)[:, :B])
    assert_close(maxima[:, :B].double(), expected_maxima[:, :B].double(), torch.bfloat16, "maxima")


@pytest.mark.gpu
def test_bad_operands_fail_clearly():
    if not group_max_gemm.available():
        pytest.skip("fastsae's CUTLASS extension is not built (the `cutlass` extra)")
    xc, W_enc, b_enc = _operands(64, 64, 256)
    with pytest.raises(RuntimeError, match="bfloat16"):
        group_max_gemm.gemm_bias_group_max(xc.float(), W_enc, b_enc)
    with pytest.raises(RuntimeError, match="multiples of 8"):
        group_max_gemm.gemm_bias_group_max(xc, W_enc[:, :250].contiguous(), b_enc[:250].contiguous())
    with pytest.raises(RuntimeError, match="CUDA"):
        group_max_gemm.gemm_bias_group_max(xc.cpu(), W_enc, b_enc)
    with pytest.raises(RuntimeError, match="W_enc must be"):
        group_max_gemm.gemm_bias_group_max(xc, W_enc[:32].contiguous(), b_enc)
    with pytest.raises(RuntimeError, match="variant must be"):
        group_max_gemm.gemm_bias_group_max(xc, W_enc, b_enc, len(group_max_gemm.VARIANTS))


def _maxima_route(monkeypatch, device):
    """The group-maxima GEMM: the CUTLASS op on the GPU (skipped where it is not built), its reference on
    CPU tensors, so that the interpreter runs the row kernel over given maxima."""
    monkeypatch.setattr(group_max_gemm, "ROUTE", True)
    if device == "cpu":
        monkeypatch.setattr(group_max_gemm, "available", lambda: True)

        def emulated(xc, W_enc, b_enc, variant):
            _, group, tile_rows = group_max_gemm.VARIANTS[variant]
            return reference.gemm_bias_group_max(xc, W_enc, b_enc, group, tile_rows)

        monkeypatch.setattr(group_max_gemm, "gemm_bias_group_max", emulated)
    elif not group_max_gemm.available():
        pytest.skip("fastsae's CUTLASS extension is not built (the `cutlass` extra)")


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_row_filter_over_given_maxima(device, monkeypatch):
    """The row filter starting from the GEMM's group maxima (every configuration `group_max_configs`
    offers: each variant's groups, the select in the row program or after it) in row chunks of at most
    5 rows on CPU, the last one short: the reference's codes with no row left to the fallback, and the
    same positive counts."""
    _maxima_route(monkeypatch, device)
    B, d, F, k = (13, 32, 1000, 4) if device == "cpu" else (1003, 768, 24576, 32)
    if device == "cpu":
        monkeypatch.setattr(filter, "ROW_FILTER_CHUNK", 5 * F)
    x = (torch.randn(B, d, dtype=torch.float64, device=device) * 2 + 1).bfloat16()
    W_enc, b_enc, _, b_dec = random_sae_weights(d, F, dtype=torch.bfloat16, device=device)
    pre = reference.pre_activation(*(t.double() for t in (x, W_enc, b_enc, b_dec)))
    configs = filter.group_max_configs(k, 0, F)
    assert {cfg["SELECT"] for cfg in configs} == {True, False}
    assert {cfg["VARIANT"] for cfg in configs} == set(range(len(group_max_gemm.VARIANTS)))
    for cfg in configs:
        outputs = tuple(
            torch.full((B, k), float("nan"), device=device) if floating else
            torch.full((B, k), -1, dtype=torch.int32, device=device)
            for floating in (True, False)
        ) + (torch.empty(B, 0, device=device), torch.empty(B, 0, dtype=torch.int32, device=device))  # fmt: skip
        counts = torch.zeros(F, dtype=torch.int32, device=device)
        flags = filter.row_filter_topk(x, W_enc, b_enc, b_dec, k, 0, None, counts, outputs, cfg)
        assert not flags.any(), f"{cfg}: rows left to the fallback"
        assert_topk_matches(outputs[0], outputs[1], pre, k, torch.bfloat16, f"{cfg}")
        assert_positive_counts_match(counts.long(), pre, ROUNDING_BAND[torch.bfloat16])
    assert all(("row_filter", cfg) in encode.topk_routes(k, 0, F, True) for cfg in configs)
    assert not filter.group_max_configs(k, 1, F), "AuxK has no maxima of its own"
    monkeypatch.setattr(group_max_gemm, "ROUTE", False)
    assert not filter.group_max_configs(k, 0, F), "the route is off by default"
