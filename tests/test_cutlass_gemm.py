"""The experimental CUTLASS GEMM with group maxima (`fastsae.ops.cutlass_gemm`) against its reference,
and the reference against a direct computation of what it defines."""

import weakref

import pytest
import torch

from fastsae import reference
from fastsae.ops import cutlass_gemm, encode, filter
from fastsae.testing import assert_positive_counts_match

from .utils import (
    KERNEL_DEVICES,
    ROUNDING_BAND,
    assert_close,
    assert_topk_matches,
    poisoned_outputs,
    random_sae_weights,
)


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
    if cutlass_gemm.available():
        pytest.skip("the CUTLASS extension is built here")
    x = torch.zeros(8, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="cutlass"):
        cutlass_gemm.gemm_bias_group_max(x, x, x[0])


def _operands(B, d, F):
    xc = torch.randn(B, d, device="cuda").bfloat16()
    W_enc = (torch.randn(d, F, device="cuda") / d**0.5).bfloat16()
    return xc, W_enc, (0.1 * torch.randn(F, device="cuda")).bfloat16()


@pytest.mark.gpu
@pytest.mark.parametrize("variant", range(len(cutlass_gemm.VARIANTS)), ids=[v.name for v in cutlass_gemm.VARIANTS])
@pytest.mark.parametrize("shape", [(300, 72, 1000), (1024, 768, 4096), (129, 384, 16384), (1, 8, 8)], ids=str)
def test_matches_reference_on_cuda(shape, variant):
    if not cutlass_gemm.available():
        pytest.skip("fastsae's CUTLASS extension is not built (the `cutlass` extra)")
    torch.manual_seed(0)
    B, d, F = shape
    kernel = cutlass_gemm.VARIANTS[variant]
    group, tile_rows = kernel.group, kernel.tile_rows
    xc, W_enc, b_enc = _operands(B, d, F)
    pre, maxima = cutlass_gemm.gemm_bias_group_max(xc, W_enc, b_enc, variant)
    expected_pre, expected_maxima = reference.gemm_bias_group_max(xc, W_enc, b_enc, group, tile_rows)
    n_groups, rows = expected_maxima.shape
    if kernel.groups_per_tile > 1:  # [tiles, groups a tile, rows]: group g at [g // 2, g % 2]
        assert maxima.shape == (-(-n_groups // kernel.groups_per_tile), kernel.groups_per_tile, rows)
        assert torch.isneginf(maxima.reshape(-1, rows)[n_groups:]).all(), "a group past F has a maximum"
        maxima = cutlass_gemm.maxima_by_group(maxima, n_groups)
    assert pre.shape == expected_pre.shape and maxima.shape == expected_maxima.shape
    assert_close(pre.double(), expected_pre.double(), torch.bfloat16, "pre")
    # The maxima are exactly those of the kernel's own (rounded) pre-activation, whatever its summation order.
    assert torch.equal(maxima[:, :B], reference.group_maxima(pre, group)[:, :B])
    assert_close(maxima[:, :B].double(), expected_maxima[:, :B].double(), torch.bfloat16, "maxima")


@pytest.mark.gpu
def test_bad_operands_fail_clearly():
    if not cutlass_gemm.available():
        pytest.skip("fastsae's CUTLASS extension is not built (the `cutlass` extra)")
    xc, W_enc, b_enc = _operands(64, 64, 256)
    with pytest.raises(ValueError, match="bfloat16"):
        cutlass_gemm.gemm_bias_group_max(xc.float(), W_enc, b_enc)
    with pytest.raises(ValueError, match="multiples of 8"):
        cutlass_gemm.gemm_bias_group_max(xc, W_enc[:, :250].contiguous(), b_enc[:250].contiguous())
    with pytest.raises(ValueError, match="CUDA"):
        cutlass_gemm.gemm_bias_group_max(xc.cpu(), W_enc, b_enc)
    with pytest.raises(ValueError, match="W_enc must be"):
        cutlass_gemm.gemm_bias_group_max(xc, W_enc[:32].contiguous(), b_enc)
    with pytest.raises(ValueError, match="variant must be"):
        cutlass_gemm.gemm_bias_group_max(xc, W_enc, b_enc, len(cutlass_gemm.VARIANTS))


def _exact_topk(pre, k):
    """The select's exact answer for bf16 `pre` [B, F]: each row's k largest (value, feature) keys, ties
    to the larger feature, NaN never (fp32-ordered keys, as the kernel's bf16 ones order), as (post-ReLU
    fp32 values, int32 features)."""
    features = torch.arange(pre.shape[1], device=pre.device, dtype=torch.int64)
    keys = (reference._flip_negatives(pre.float().view(torch.int32)).to(torch.int64) << 32) | features
    keys = keys.masked_fill(torch.isnan(pre), torch.iinfo(torch.int64).min)
    idx = keys.topk(k, dim=1).values & 0xFFFFFFFF
    return pre.gather(1, idx).float().relu(), idx.to(torch.int32)


# A variant for each width of group the select reads: 128 and 256 a tile's width, 64 half of one.
SELECT_VARIANTS = ("cooperative_128x128", "cooperative_128x256_cluster2", "cooperative_128x128_groups64")
SELECT_CASES = [(name, k, 24576) for name in SELECT_VARIANTS for k in (1, 32, 96)] + [
    ("cooperative_128x128", 128, 16384),
    ("cooperative_128x128_groups64", 128, 16384),
    ("cooperative_128x128_groups64", 16, 1088),  # 17 groups of 64: the last tile's second group lies past F
]


@pytest.mark.gpu
@pytest.mark.parametrize("raise_by_count", [False, True])
@pytest.mark.parametrize("variant_name, k, F", SELECT_CASES)
def test_select_topk_group_max_is_exact_on_cuda(variant_name, k, F, raise_by_count):
    """The warp-per-row select over the GEMM's own pre-activation and maxima (1003 rows: a partial block
    of rows; 96 groups of 256 is k = F / 256; k = 128 over 128 groups reads every group, and about 690
    entries of a row reach the first bound, more than the buffer holds, so most rows raise it, either
    way: `raise_by_count`; groups of 64 from the kernels with two a tile, whose maxima are [tiles, 2,
    rows]) returns exactly each row's k largest keys, sorted, into bf16 and fp32 codes and row views of a
    larger output, and leaves no row to the fallback."""
    if not cutlass_gemm.available():
        pytest.skip("fastsae's CUTLASS extension is not built (the `cutlass` extra)")
    torch.manual_seed(k)
    B, d = 1003, 768
    xc, W_enc, b_enc = _operands(B, d, F)
    variant = next(v for v, kernel in enumerate(cutlass_gemm.VARIANTS) if kernel.name == variant_name)
    group = cutlass_gemm.VARIANTS[variant].group
    pre, maxima = cutlass_gemm.gemm_bias_group_max(xc, W_enc, b_enc, variant)
    expected_vals, expected_idx = _exact_topk(pre, k)
    for dtype in (torch.bfloat16, torch.float32):
        vals = torch.full((B + 5, k), float("nan"), dtype=dtype, device="cuda")[5:]
        idx = torch.full((B, k), -1, dtype=torch.int32, device="cuda")
        flags = torch.full((B,), 7, dtype=torch.int8, device="cuda")
        cutlass_gemm.select_topk_group_max(pre, maxima, group, k, vals, idx, flags, raise_by_count)
        assert not flags.any(), f"{int(flags.bool().sum())} rows left to the fallback"
        assert torch.equal(idx, expected_idx)
        assert torch.equal(vals, expected_vals.to(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("raise_by_count", [False, True])
def test_select_topk_group_max_adversarial_rows_on_cuda(raise_by_count):
    """Rows that break a bound from the group maxima: the kernel flags exactly the rows it cannot select
    (all NaN, all -inf) and selects the others exactly, raising its bound over a full buffer either way
    (`raise_by_count`): a constant row (every entry ties: the buffer is cut some fifty times, by
    feature), a row whose largest 640 entries share five groups and tie (more than the 512 candidate
    slots reach the first bound), NaN entries among the largest (never selected; their groups' maxima
    NaN), all-negative values (codes of value 0), +inf entries, and random rows around them; maxima are
    the reference's, which NaN propagates."""
    if not cutlass_gemm.available():
        pytest.skip("fastsae's CUTLASS extension is not built (the `cutlass` extra)")
    torch.manual_seed(0)
    B, F, k, group = 16, 24576, 32, 128
    pre = torch.randn(B, F, device="cuda").bfloat16()
    pre[0] = float("nan")
    pre[1] = 1.0
    pre[2, :640] = (10 + torch.randint(0, 75, (640,), device="cuda") / 4).bfloat16()  # 75 values: ties
    pre[2, 5000:5044] = 12.0
    pre[3, torch.randperm(F, device="cuda")[:10]] = float("nan")  # fewer NaN groups than k: they are read
    pre[3, :64] = torch.where(torch.arange(64, device="cuda") % 2 == 0, float("nan"), 9.0).bfloat16()
    pre[4] = -pre[4].abs() - 1
    pre[5] = float("-inf")
    pre[6, [7, 700, 9000]] = float("inf")
    maxima = reference.group_maxima(pre, group).cuda()
    kth_group = maxima[:, 2].topk(k).values[-1]
    assert (pre[2].float() >= kth_group).sum() > 512, "row 2 would not overflow the candidate slots"
    vals = torch.full((B, k), float("nan"), device="cuda")
    idx = torch.full((B, k), -1, dtype=torch.int32, device="cuda")
    flags = torch.full((B,), 7, dtype=torch.int8, device="cuda")
    cutlass_gemm.select_topk_group_max(pre, maxima, group, k, vals, idx, flags, raise_by_count)
    assert flags.tolist() == [1, 0, 0, 0, 0, 1] + [0] * (B - 6)
    expected_vals, expected_idx = _exact_topk(pre, k)
    selected = flags == 0
    assert torch.equal(idx[selected], expected_idx[selected])
    assert torch.equal(vals[selected], expected_vals[selected])
    assert idx[1].tolist() == list(range(F - 1, F - 1 - k, -1)), "constant row: ties go to the larger feature"
    assert (vals[4] == 0).all()


@pytest.mark.gpu
def test_select_topk_group_max_bad_operands_fail_clearly():
    if not cutlass_gemm.available():
        pytest.skip("fastsae's CUTLASS extension is not built (the `cutlass` extra)")
    B, F, k = 8, 1024, 4
    pre = torch.randn(B, F, device="cuda").bfloat16()
    maxima = reference.group_maxima(pre, 128).cuda()
    vals, idx = torch.empty(B, k, device="cuda"), torch.empty(B, k, dtype=torch.int32, device="cuda")
    flags = torch.empty(B, dtype=torch.int8, device="cuda")
    select = cutlass_gemm.select_topk_group_max
    with pytest.raises(ValueError, match="pre must be"):
        select(pre.float(), maxima, 128, k, vals, idx, flags)
    with pytest.raises(ValueError, match="group must be"):
        select(pre, maxima, 32, k, vals, idx, flags)
    with pytest.raises(ValueError, match="k must be"):
        select(pre, maxima, 128, 9, torch.empty(B, 9, device="cuda"), idx, flags)  # 8 groups
    with pytest.raises(ValueError, match="maxima must be"):
        select(pre, maxima[:4], 128, k, vals, idx, flags)
    with pytest.raises(ValueError, match="maxima must be"):  # 16 groups of 64 need 8 tiles of two
        select(pre, maxima.view(4, 2, -1), 64, k, vals, idx, flags)
    with pytest.raises(ValueError, match="idx must be"):
        select(pre, maxima, 128, k, vals, idx[:, :2], flags)
    for wrong in (idx, vals.half()):  # the kernel writes bf16 or fp32 codes only
        with pytest.raises(ValueError, match="vals must be bfloat16 or float32"):
            select(pre, maxima, 128, k, wrong, idx, flags)
    with pytest.raises(ValueError, match="flags must be"):
        select(pre, maxima, 128, k, vals, idx, flags.int())
    with pytest.raises(ValueError, match="aligned"):
        select(pre[:, 4:], maxima, 128, k, vals, idx, flags)


def _maxima_route(monkeypatch, device):
    """The group-maxima GEMM: the CUTLASS op on the GPU (skipped where it is not built), its reference on
    CPU tensors, so that the interpreter runs the row kernel over given maxima."""
    monkeypatch.setattr(cutlass_gemm, "ROUTE", True)
    monkeypatch.setattr(cutlass_gemm, "SELECT_ROUTE", True)
    if device == "cpu":
        monkeypatch.setattr(cutlass_gemm, "available", lambda: True)
        made = []  # weak references to the chunks made so far

        def emulated(xc, W_enc, b_enc, variant):
            """(The route holds one chunk at a time: the op allocates each, and two chunks of 512 MB had
            put the encode above the benchmark's memory bound.)"""
            assert all(chunk() is None for chunk in made), "a chunk was held while the next was made"
            kernel = cutlass_gemm.VARIANTS[variant]
            pre, maxima = reference.gemm_bias_group_max(xc, W_enc, b_enc, kernel.group, kernel.tile_rows)
            if kernel.groups_per_tile > 1:  # the kernel's layout, [tiles, groups a tile, rows]
                tiles = -(-maxima.shape[0] // kernel.groups_per_tile)
                padded = maxima.new_full((tiles * kernel.groups_per_tile, maxima.shape[1]), float("-inf"))
                padded[: maxima.shape[0]] = maxima
                maxima = padded.view(tiles, kernel.groups_per_tile, -1)
            made.extend((weakref.ref(pre), weakref.ref(maxima)))
            return pre, maxima

        monkeypatch.setattr(cutlass_gemm, "gemm_bias_group_max", emulated)

        def emulated_select(pre, maxima, group, k, vals, idx, flags, raise_by_count):
            """The warp select's contract from its reference (either way of raising its bound): NaN rows
            flagged, the others written; the route asks for the way its switch names."""
            assert raise_by_count == cutlass_gemm.SELECT_RAISE_BY_COUNT, "the route ignored its switch"
            top_vals, top_idx = reference.topk_activation(pre.float(), k)
            nan_rows = torch.isnan(pre).any(dim=1)
            vals[~nan_rows], idx[~nan_rows] = top_vals[~nan_rows].to(vals.dtype), top_idx[~nan_rows]
            flags.copy_(nan_rows)

        monkeypatch.setattr(cutlass_gemm, "select_topk_group_max", emulated_select)
    elif not cutlass_gemm.available():
        pytest.skip("fastsae's CUTLASS extension is not built (the `cutlass` extra)")


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_row_filter_over_given_maxima(device, monkeypatch):
    """The row filter starting from the GEMM's group maxima (every configuration `group_max_configs`
    offers: each variant's groups, the select in the row program, after it or in the warp select, which
    the interpreter runs as its reference) in row chunks of at most 5 rows on CPU, the last one short:
    the reference's codes with no row left to the fallback, and the same positive counts."""
    _maxima_route(monkeypatch, device)
    B, d, F, k = (13, 32, 1000, 4) if device == "cpu" else (1003, 768, 24576, 32)
    if device == "cpu":
        monkeypatch.setattr(filter, "ROW_FILTER_CHUNK", 5 * F)
    x = (torch.randn(B, d, dtype=torch.float64, device=device) * 2 + 1).bfloat16()
    W_enc, b_enc, _, b_dec = random_sae_weights(d, F, dtype=torch.bfloat16, device=device)
    pre = reference.pre_activation(*(t.double() for t in (x, W_enc, b_enc, b_dec)))
    configs = filter.group_max_configs(k, 0, F)
    assert {cfg["SELECT"] for cfg in configs} == {True, False, "warp"}
    routed = {number for number, kernel in enumerate(cutlass_gemm.VARIANTS) if kernel.routed}
    assert {cfg["VARIANT"] for cfg in configs} == routed, "the route runs over the routed variants only"
    if device == "cpu":  # the emulated GEMM differs between variants only in its groups and rows
        layouts = {}
        for cfg in configs:
            kernel = cutlass_gemm.VARIANTS[cfg["VARIANT"]]
            others = tuple(sorted((key, value) for key, value in cfg.items() if key != "VARIANT"))
            layouts.setdefault((others, kernel.tile_rows, kernel.groups_per_tile), cfg)
        configs = list(layouts.values())
    for cfg in configs:
        outputs = poisoned_outputs(B, k, 0, device)
        counts = torch.zeros(F, dtype=torch.int32, device=device)
        flags = filter.row_filter_topk(x, W_enc, b_enc, b_dec, k, 0, None, counts, outputs, cfg)
        assert not flags.any(), f"{cfg}: rows left to the fallback"
        assert_topk_matches(outputs[0], outputs[1], pre, k, torch.bfloat16, f"{cfg}")
        assert_positive_counts_match(counts.long(), pre, ROUNDING_BAND[torch.bfloat16])
    assert all(("row_filter", cfg) in encode.topk_routes(k, 0, F, True) for cfg in configs)
    assert not filter.group_max_configs(k, 1, F), "AuxK has no maxima of its own"
    monkeypatch.setattr(cutlass_gemm, "SELECT_ROUTE", False)
    assert "warp" not in {cfg["SELECT"] for cfg in filter.group_max_configs(k, 0, F)}, "offered with its switch off"
    monkeypatch.setattr(cutlass_gemm, "ROUTE", False)
    assert not filter.group_max_configs(k, 0, F), "the route is offered with its switch off"


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("raise_by_count", [False, True])
def test_warp_select_route_leaves_flagged_rows_to_the_fallback(device, raise_by_count, monkeypatch):
    """Through the TopK encode, the warp select's route (either way of raising its bound) leaves the rows it
    flags (a NaN row) to the sweep, which writes them (NaN never selected: value 0), and the others are the
    reference's."""
    _maxima_route(monkeypatch, device)
    monkeypatch.setattr(cutlass_gemm, "SELECT_RAISE_BY_COUNT", raise_by_count)
    B, d, F, k = (13, 32, 1000, 4) if device == "cpu" else (1003, 768, 24576, 32)
    x = (torch.randn(B, d, dtype=torch.float64, device=device) * 2 + 1).bfloat16()
    x[3] = float("nan")
    W_enc, b_enc, _, b_dec = random_sae_weights(d, F, dtype=torch.bfloat16, device=device)
    route = next(("row_filter", c) for c in filter.group_max_configs(k, 0, F) if c["SELECT"] == "warp")
    outputs = poisoned_outputs(B, k, 0, device)
    flags = filter.row_filter_topk(x, W_enc, b_enc, b_dec, k, 0, None, None, outputs, route[1])
    assert flags.bool().tolist() == [row == 3 for row in range(B)]
    vals, idx, _, _ = encode.encode_topk(x, W_enc, b_enc, b_dec, k, 0, None, route=route)
    finite = torch.arange(B, device=device) != 3
    pre = reference.pre_activation(*(t.double() for t in (x, W_enc, b_enc, b_dec)))
    assert_topk_matches(vals[finite], idx[finite], pre[finite], k, torch.bfloat16)
    assert (vals[3] == 0).all(), "NaN pre-activations were selected"


def test_reference_filter_keeps_each_rows_entries_above_tau():
    torch.manual_seed(0)
    B, d, F = 4, 16, 40
    xc, W_enc, b_enc = torch.randn(B, d).bfloat16(), torch.randn(d, F).bfloat16(), torch.randn(F).bfloat16()
    xc[3] = float("nan")  # a NaN row passes no threshold
    tau = torch.tensor([0.5, float("-inf"), float("inf"), -1.0])
    count, keys = reference.gemm_bias_filter(xc, W_enc, b_enc, tau)
    pre = xc.float() @ W_enc.float() + b_enc.float()
    assert count.dtype == torch.int32 and count.tolist() == [int((pre[0] > 0.5).sum()), F, 0, 0]
    for row in range(B):
        expected = [(float(pre[row, f]), f) for f in range(F) if pre[row, f] > tau[row]]
        got = [(float(reference.key_values(key)), int(key & 0xFFFFFFFF)) for key in keys[row]]
        assert got == sorted(expected, reverse=True)


def _exact_operands(B, d, F, device):
    """bf16 operands whose products and sums are exact in fp32 in any order (multiples of 1/32, sums
    well below 2^19), so that the kernel's entries and the reference's are the same numbers."""
    xc = (torch.randint(-4, 5, (B, d), device=device) / 4).bfloat16()
    W_enc = (torch.randint(-4, 5, (d, F), device=device) / 8).bfloat16()
    return xc, W_enc, (torch.randint(-8, 9, (F,), device=device) / 8).bfloat16()


def _filter_thresholds(xc, W_enc, b_enc, cap):
    """Per row a threshold that keeps about cap / 2 entries; the first row keeps none (+inf), the second
    all (-inf: it overflows the buffer), and the third row is NaN (passes none)."""
    pre = xc.float() @ W_enc.float() + b_enc.float()
    tau = pre.topk(min(cap // 2, pre.shape[1]), dim=1).values[:, -1] - 1 / 64
    tau[0] = float("inf")
    if len(tau) > 1:
        tau[1] = float("-inf")
    if len(tau) > 2:
        xc[2] = float("nan")
    return tau


def _assert_filter_matches(count, key_buf, expected_count, expected_keys, name):
    assert torch.equal(count.cpu(), expected_count.cpu()), f"{name}: counts"
    cap = key_buf.shape[1]
    for row, expected in enumerate(expected_keys):
        kept = key_buf[row, : min(int(count[row]), cap)].cpu()
        if len(expected) <= cap:  # every entry above tau, in any order
            assert torch.equal(kept.sort(descending=True).values, expected.cpu()), f"{name}: row {row}"
        else:  # cap of them, each once
            assert kept.unique().numel() == cap and torch.isin(kept, expected.cpu()).all(), f"{name}: row {row}"


@pytest.mark.gpu
@pytest.mark.parametrize("variant", range(len(cutlass_gemm.FILTER_VARIANTS)), ids=cutlass_gemm.FILTER_VARIANTS)
@pytest.mark.parametrize("shape", [(300, 72, 1000), (1024, 768, 4096), (129, 384, 16384), (1, 8, 8)], ids=str)
def test_filter_matches_reference_on_cuda(shape, variant):
    """Every row's entries above its threshold, including rows with none, rows that overflow the buffer,
    a NaN row, partial tiles of rows and features; tau a view one float into its storage (the kernel loads
    it a float at a time)."""
    if not cutlass_gemm.available():
        pytest.skip("fastsae's CUTLASS extension is not built (the `cutlass` extra)")
    torch.manual_seed(0)
    B, d, F = shape
    cap = 64
    xc, W_enc, b_enc = _exact_operands(B, d, F, "cuda")
    tau = torch.cat([torch.zeros(1, device="cuda"), _filter_thresholds(xc, W_enc, b_enc, cap)])[1:]
    count = torch.zeros(B, dtype=torch.int32, device="cuda")
    key_buf = torch.full((B, cap), -1, dtype=torch.int64, device="cuda")
    cutlass_gemm.gemm_bias_filter(xc, W_enc, b_enc, tau, count, key_buf, variant)
    expected_count, expected_keys = reference.gemm_bias_filter(xc, W_enc, b_enc, tau)
    _assert_filter_matches(count, key_buf, expected_count, expected_keys, f"{shape} {variant}")


@pytest.mark.gpu
def test_filter_bad_operands_fail_clearly():
    if not cutlass_gemm.available():
        pytest.skip("fastsae's CUTLASS extension is not built (the `cutlass` extra)")
    xc, W_enc, b_enc = _operands(64, 64, 256)
    tau = torch.zeros(64, device="cuda")
    count = torch.zeros(64, dtype=torch.int32, device="cuda")
    key_buf = torch.empty(64, 32, dtype=torch.int64, device="cuda")
    with pytest.raises(ValueError, match="tau must be torch.float32"):
        cutlass_gemm.gemm_bias_filter(xc, W_enc, b_enc, tau.double(), count, key_buf)
    with pytest.raises(ValueError, match="must have xc's 64 rows"):
        cutlass_gemm.gemm_bias_filter(xc, W_enc, b_enc, tau, count[:63], key_buf)
    with pytest.raises(ValueError, match="key_buf must be torch.int64"):
        cutlass_gemm.gemm_bias_filter(xc, W_enc, b_enc, tau, count, key_buf.int())
    with pytest.raises(ValueError, match="variant must be"):
        cutlass_gemm.gemm_bias_filter(xc, W_enc, b_enc, tau, count, key_buf, len(cutlass_gemm.FILTER_VARIANTS))


def _filter_route(monkeypatch, device):
    """The CUTLASS filter GEMM: the op on the GPU (skipped where it is not built), its reference writing
    the buffers on CPU tensors, so that the interpreter runs the threshold pass and the select around it."""
    monkeypatch.setattr(cutlass_gemm, "FILTER_ROUTE", True)
    encode.topk_routes.cache_clear()  # routes built with the switch off
    if device == "cpu":
        monkeypatch.setattr(cutlass_gemm, "available", lambda: True)

        def emulated(xc, W_enc, b_enc, tau, count, key_buf, variant):
            expected_count, expected_keys = reference.gemm_bias_filter(xc, W_enc, b_enc, tau)
            count += expected_count
            for row, keys in enumerate(expected_keys):
                kept = keys[: key_buf.shape[1]]
                key_buf[row, : len(kept)] = kept.flip(0)  # any order

        monkeypatch.setattr(cutlass_gemm, "gemm_bias_filter", emulated)
    elif not cutlass_gemm.available():
        pytest.skip("fastsae's CUTLASS extension is not built (the `cutlass` extra)")


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_filter_route_over_cutlass(device, monkeypatch):
    """The filter route over the CUTLASS GEMM, every configuration `cutlass_filter_configs` offers: the
    reference's codes, a NaN row and rows driven below k survivors left to the fallback and recomputed by
    the encode; the route is offered only without AuxK and positive counts, and only with its switch on."""
    _filter_route(monkeypatch, device)
    B, d, F, k = (13, 32, 1000, 4) if device == "cpu" else (1003, 768, 24576, 32)
    x = (torch.randn(B, d, dtype=torch.float64, device=device) * 2 + 1).bfloat16()
    x[5] = float("nan")
    W_enc, b_enc, _, b_dec = random_sae_weights(d, F, dtype=torch.bfloat16, device=device)
    pre = reference.pre_activation(*(t.double() for t in (x, W_enc, b_enc, b_dec)))
    configs = filter.cutlass_filter_configs(k, 0, F)
    assert {cfg["VARIANT"] for cfg in configs} == set(range(len(cutlass_gemm.FILTER_VARIANTS)))
    # The emulated GEMM is every variant's: on CPU one variant's configurations cover the interpreter's part.
    for cfg in configs if device != "cpu" else [cfg for cfg in configs if cfg["VARIANT"] == 0]:
        outputs = poisoned_outputs(B, k, 0, device)
        flags = filter.filter_topk(x, W_enc, b_enc, b_dec, k, 0, None, None, outputs, cfg)
        assert flags.nonzero().flatten().tolist() == [5], f"{cfg}: only the NaN row is left to the fallback"
        done = flags == 0
        assert_topk_matches(outputs[0][done], outputs[1][done], pre[done], k, torch.bfloat16, f"{cfg}")
        vals, idx, _, _ = encode.encode_topk(x, W_enc, b_enc, b_dec, k, 0, None, route=("filter", cfg))
        assert_topk_matches(vals[done], idx[done], pre[done], k, torch.bfloat16, f"{cfg} through the encode")
        assert (vals[5] == 0).all(), "a NaN row fires nothing"
    # Fallbacks: buffers below the survivors (every row overflows), thresholds raised past every value.
    for overrides, margin_shift in (({"CAP": k // 2}, 0.0), ({}, 1e3)):
        cfg = {**configs[0], **overrides}
        outputs = poisoned_outputs(B, k, 0, device)
        flags = filter.filter_topk(x, W_enc, b_enc, b_dec, k, 0, None, None, outputs, cfg, margin_shift)
        assert flags.bool().all(), f"{cfg}, margin {margin_shift}: a row was not flagged"
        vals, idx, _, _ = encode.encode_topk(x, W_enc, b_enc, b_dec, k, 0, None, route=("filter", cfg))
        done = torch.ones(B, dtype=torch.bool, device=device)
        done[5] = False
        assert_topk_matches(vals[done], idx[done], pre[done], k, torch.bfloat16, f"{cfg} recomputed")
    routes = encode.topk_routes(k, 0, F, True)
    assert all(("filter", cfg) in routes for cfg in configs)
    assert not any(("filter", cfg) in encode.topk_routes(k, 0, F, True, True) for cfg in configs), "counting"
    assert not filter.cutlass_filter_configs(k, 1, F), "the filter GEMM keeps no AuxK candidates"
    monkeypatch.setattr(cutlass_gemm, "FILTER_ROUTE", False)
    assert not filter.cutlass_filter_configs(k, 0, F), "the route is offered with its switch off"
    encode.topk_routes.cache_clear()  # routes built with the switch on
