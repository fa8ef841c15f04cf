"""The Triton encoder kernels (fastsae/ops/encode.py) against the fp64 reference: on CPU under the
Triton interpreter at tiny shapes, on the GPU at full ones. Outputs are poisoned with NaN / -1 first."""

import os
import subprocess
import sys

import pytest
import torch

from fastsae import reference
from fastsae.ops import encode, filter, scatter
from fastsae.ops.filter import filter_topk, row_filter_topk
from fastsae.testing import assert_positive_counts_match, relative_rms_error

from .utils import (
    KERNEL_DEVICES,
    ROUNDING_BAND,
    TOLERANCE,
    assert_close,
    assert_topk_matches,
    check_encode_topk_backward,
    poisoned_outputs,
    random_sae_weights,
)

# (B, d, F, k, k_aux): odd rows, d not a power of two, k = 1, k = F, AuxK on and off. The GPU cases add
# the real shapes' widths, small batches (features split over programs) and k up to 1024.
INTERPRET_CASES = [(37, 40, 300, 8, 16), (1, 24, 64, 1, 0), (20, 33, 48, 48, 5)]
GPU_CASES = [
    (199, 100, 4099, 32, 50),
    (1000, 768, 24576, 32, 384),
    (256, 4096, 32768, 64, 0),
    (512, 256, 16384, 64, 2048),
    (37, 128, 4096, 1024, 0),
]
CASES = [pytest.param("cpu", *c, marks=pytest.mark.interpret) for c in INTERPRET_CASES] + [
    pytest.param("cuda", *c, marks=pytest.mark.gpu) for c in GPU_CASES
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _case_id(value):
    return str(value).replace("torch.", "") if isinstance(value, torch.dtype) else None


def _problem(B, d, F, dtype, device):
    x = (torch.randn(B, d, dtype=torch.float64, device=device) * 2 + 1).to(dtype=dtype)
    W_enc, b_enc, _, b_dec = random_sae_weights(d, F, dtype=dtype, device=device)
    return x, W_enc, b_enc, b_dec


def _pre64(x, W_enc, b_enc, b_dec):
    return reference.pre_activation(*(t.double() for t in (x, W_enc, b_enc, b_dec)))


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("dtype", DTYPES, ids=_case_id)
@pytest.mark.parametrize("device, B, d, F, k, k_aux", CASES, ids=lambda v: None)
def test_encode_topk_kernel(device, B, d, F, k, k_aux, dtype):
    x, W_enc, b_enc, b_dec = _problem(B, d, F, dtype, device)
    dead = torch.rand(F, device=device) < 0.3
    vals, idx, aux_vals, aux_idx = encode.encode_topk(x, W_enc, b_enc, b_dec, k, k_aux, dead if k_aux else None)
    pre = _pre64(x, W_enc, b_enc, b_dec)
    assert vals.dtype == dtype and vals.shape == (B, k) and aux_vals.shape == (B, k_aux)
    assert_topk_matches(vals, idx, pre, k, dtype)
    if k_aux:
        assert_topk_matches(aux_vals, aux_idx, pre.masked_fill(~dead, float("-inf")), k_aux, dtype, "aux")


ROUTE_CASES = [pytest.param("cpu", *c, marks=pytest.mark.interpret) for c in INTERPRET_CASES[:2]] + [
    pytest.param("cuda", *c, marks=pytest.mark.gpu) for c in GPU_CASES[:3]
]


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("route", ["filter", "row_filter", "sweep", "dense"])
@pytest.mark.parametrize("device, B, d, F, k, k_aux", ROUTE_CASES, ids=lambda v: None)
def test_encode_topk_routes(device, B, d, F, k, k_aux, route):
    """Every route the tuner may pick (the threshold-first filter in each of its configurations, the
    row filter over cuBLAS chunks, the sweep, the dense cuBLAS + torch.topk chunks) gives the
    reference's top-k."""
    x, W_enc, b_enc, b_dec = _problem(B, d, F, torch.bfloat16, device)
    dead = torch.rand(F, device=device) < 0.3
    pre = _pre64(x, W_enc, b_enc, b_dec)
    candidates = [c for c in encode.topk_routes(k, k_aux, F) if c[0] == route]
    assert candidates, f"no {route} route for k={k}"
    for candidate in candidates:
        vals, idx, aux_vals, aux_idx = encode.encode_topk(
            x, W_enc, b_enc, b_dec, k, k_aux, dead if k_aux else None, route=candidate
        )
        assert_topk_matches(vals, idx, pre, k, torch.bfloat16, f"{candidate}")
        if k_aux:
            assert_topk_matches(aux_vals, aux_idx, pre.masked_fill(~dead, float("-inf")), k_aux, torch.bfloat16, "aux")


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_dense_route_in_row_chunks(device, monkeypatch):
    """The dense route writes every row chunk's pre-activations into one buffer, which its AuxK selection
    masks in place: with chunks of at most 5 rows (the last one short) the codes, the AuxK codes and the
    positive counts are still the reference's, so no chunk reads what the next one wrote."""
    B, d, F, k, k_aux = (13, 32, 300, 8, 6) if device == "cpu" else (1003, 768, 24576, 32, 64)
    monkeypatch.setattr(encode, "PRE_ACTIVATION_CHUNK", 5 * F)
    x, W_enc, b_enc, b_dec = _problem(B, d, F, torch.float32, device)
    dead = torch.rand(F, device=device) < 0.3
    pre = _pre64(x, W_enc, b_enc, b_dec)
    vals, idx, aux_vals, aux_idx = encode.encode_topk(x, W_enc, b_enc, b_dec, k, k_aux, dead, route=("dense", {}))
    assert_topk_matches(vals, idx, pre, k, torch.float32)
    assert_topk_matches(aux_vals, aux_idx, pre.masked_fill(~dead, float("-inf")), k_aux, torch.float32, "aux")
    vals, idx, counts = encode.encode_topk_positive_counts(x, W_enc, b_enc, b_dec, k, route=("dense", {}))
    assert_topk_matches(vals, idx, pre, k, torch.float32, "with counts")
    assert_positive_counts_match(counts, pre, ROUNDING_BAND[torch.float32])


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("k, n_features, cap", [(8, 4096, 512), (32, 2048, 1024), (3, 60, 512)])
def test_thresholds_are_the_group_maxima_bound(device, k, n_features, cap):
    """Each row's threshold is the rank-th largest maximum of the subset's groups (torch computes them
    from the same matmul) minus the rounding margin, and a lower bound on the row's k-th largest
    pre-activation; dead-feature thresholds (`columns`, `valid`) take only the valid features."""
    B, d = (64, 48) if device == "cpu" else (4096, 768)
    x, W_enc, b_enc, b_dec = _problem(B, d, n_features, torch.float32, device)
    xc = filter.center(x, b_dec, W_enc.dtype)
    valid = torch.rand(n_features, device=device) < 0.5
    columns = torch.sort(valid.to(torch.uint8), descending=True, stable=True).indices
    for subset_columns, subset_valid in [(None, None), (columns, valid[columns])]:
        tau = filter.thresholds(xc, W_enc, b_enc, k, cap, subset_columns, subset_valid)
        n = n_features if subset_columns is None else int(valid.sum())
        rank = max(k, min(filter.MIN_RANK, n_features // 64))
        size, group = filter.subset_plan(rank, n_features, cap)
        order = torch.arange(n_features, device=device) if subset_columns is None else subset_columns
        pre = torch.addmm(b_enc[order[:size]], xc, W_enc[:, order[:size]])
        if subset_valid is not None:
            pre.masked_fill_(~subset_valid[:size], float("-inf"))
        maxima = pre.view(B, size // group, group).amax(dim=2).float()
        if maxima.shape[1] >= rank:
            # The bisection stops at any value with exactly `rank` maxima at or above it: between the
            # rank-th and the next largest maximum, less the margin.
            top = maxima.topk(min(rank + 1, maxima.shape[1]), dim=1).values
            bounds = [top[:, rank - 1], top[:, -1] if top.shape[1] > rank else top[:, rank - 1]]
            highest, lowest = (v - filter.MARGIN.value * torch.maximum(v.abs(), top[:, 0].abs()) for v in bounds)
            slack = 1e-6 * top[:, 0].abs()
            finite = highest > float("-inf")
            assert (tau[~finite] == float("-inf")).all(), "a finite threshold where the subset has none"
            assert (tau[finite] <= highest[finite] + slack[finite]).all(), "a threshold above the rank-th maximum"
            assert (tau[finite] >= lowest[finite] - slack[finite]).all(), "a threshold below the next maximum"
        else:
            assert (tau == float("-inf")).all(), "a finite threshold from fewer groups than the rank"
        full = _pre64(x, W_enc, b_enc, b_dec)
        if subset_valid is not None:
            full = full.masked_fill(~valid, float("-inf"))
        if n >= k:
            kth = full.topk(k, dim=1).values[:, -1]
            assert (tau.double() <= kth).all(), "a threshold above the row's k-th largest pre-activation"


def _first_route(name, k, k_aux, n_features, **overrides):
    cfg = next(cfg for route, cfg in encode.topk_routes(k, k_aux, n_features) if route == name)
    return name, {**cfg, **overrides}


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("name, select", [("filter", None), ("row_filter", True), ("row_filter", False)])
@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_filter_fallbacks(device, name, select):
    """Rows a filter route cannot finish are flagged on the device and recomputed by the sweep: rows
    whose buffer overflows (a capacity below the survivors), rows left with fewer than k survivors
    (thresholds raised past the k-th value: the filter GEMM's margin only), NaN rows (never selected:
    value 0) and AuxK with fewer dead features than k_aux (not a failure: the rest are empty codes).
    The row filter flags them in its row program or in its select launch (`select`)."""
    B, d, F, k, k_aux = (8, 32, 256, 8, 6) if device == "cpu" else (1000, 768, 24576, 32, 64)
    x, W_enc, b_enc, b_dec = _problem(B, d, F, torch.float32, device)
    x[3] = float("nan")
    x[5] = b_dec  # a constant row: its pre-activation is b_enc
    dead = torch.zeros(F, dtype=torch.bool, device=device)
    dead[torch.randperm(F, device=device)[: k_aux // 2]] = True  # fewer dead features than k_aux
    pre = _pre64(x, W_enc, b_enc, b_dec)
    finite = torch.ones(B, dtype=torch.bool, device=device)
    finite[3] = False
    cases = [({"CAP": k // 2}, 0.0), ({}, 1e3), ({}, 0.0)] if name == "filter" else [({"CAP": k // 2}, 0.0), ({}, 0.0)]
    for overrides, margin_shift in cases:
        route = _first_route(name, k, k_aux, F, **overrides, **({} if select is None else {"SELECT": select}))
        outputs = poisoned_outputs(B, k, k_aux, device)
        if name == "filter":
            flags = filter_topk(x, W_enc, b_enc, b_dec, k, k_aux, dead, None, outputs, route[1], margin_shift)
        else:
            flags = row_filter_topk(x, W_enc, b_enc, b_dec, k, k_aux, dead, None, outputs, route[1])
        flagged = flags.bool()
        assert flagged[3], "the NaN row was not flagged"
        assert int(flagged.sum()) == (1 if (not overrides and not margin_shift) else B), (overrides, margin_shift)
        assert not torch.isnan(outputs[0][~flagged]).any(), "an unflagged row was left unwritten"
        vals, idx, aux_vals, aux_idx = encode.encode_topk(x, W_enc, b_enc, b_dec, k, k_aux, dead, route=route)
        assert_topk_matches(vals[finite], idx[finite], pre[finite], k, torch.float32)
        assert (vals[3] == 0).all() and (aux_vals[3] == 0).all(), "NaN pre-activations were selected"
        dead_pre = pre.masked_fill(~dead, float("-inf"))[finite]
        assert_topk_matches(aux_vals[finite], aux_idx[finite], dead_pre, k_aux, torch.float32, "aux")
        # Beyond the dead features every AuxK code is empty (value 0); the fired ones are dead features.
        assert (aux_vals[:, k_aux // 2 :] == 0).all()
        assert dead[aux_idx.long()][aux_vals > 0].all()


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("select", [True, False], ids=["select_in_row_program", "select_launch"])
@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_row_filter_in_rounds_and_row_chunks(device, select, monkeypatch):
    """The row filter reads the groups whose maximum reaches the threshold again in rounds of
    ROW_FILTER_REREAD entries, and takes the batch in row chunks of ROW_FILTER_CHUNK entries: with
    rounds of two groups every row takes many rounds (AuxK with few dead features makes every group with
    a dead feature hot), with chunks of at most 5 rows the last one is short, and the codes are still the
    reference's, with no row left to the fallback, whether each chunk's select runs in the row program
    or in a launch of its own after it (`select`: the chunks reuse one buffer)."""
    B, d, F, k, k_aux = (13, 32, 300, 8, 6) if device == "cpu" else (1003, 768, 24576, 32, 64)
    x, W_enc, b_enc, b_dec = _problem(B, d, F, torch.float32, device)
    dead = torch.zeros(F, dtype=torch.bool, device=device)
    dead[torch.randperm(F, device=device)[: 3 * k_aux]] = True
    route = _first_route("row_filter", k, k_aux, F, SELECT=select)
    monkeypatch.setattr(filter, "ROW_FILTER_REREAD", 2 * route[1]["GROUP"])
    monkeypatch.setattr(filter, "ROW_FILTER_CHUNK", 5 * F)
    outputs = poisoned_outputs(B, k, k_aux, device)
    flags = row_filter_topk(x, W_enc, b_enc, b_dec, k, k_aux, dead, None, outputs, route[1])
    assert not flags.any(), "rows left to the fallback: the rounds missed survivors"
    vals, idx, aux_vals, aux_idx = outputs
    pre = _pre64(x, W_enc, b_enc, b_dec)
    assert_topk_matches(vals, idx, pre, k, torch.float32)
    assert_topk_matches(aux_vals, aux_idx, pre.masked_fill(~dead, float("-inf")), k_aux, torch.float32, "aux")


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_row_filter_skips_only_the_chunks_past_the_features(device):
    """F = 9000 is read as a row of 16384 in chunks of ROW_FILTER_READ = 4096: the kernel reads 3 chunks
    and skips the fourth, which holds no feature (its group maxima, never written, are masked out of the
    bound). The largest pre-activations sit in the last, partial chunk, so a chunk skipped too many
    would lose them, and a skipped group's unwritten maximum in the bound would change the codes."""
    B, d, F, k = (4, 16, 9000, 8) if device == "cpu" else (512, 64, 9000, 32)
    x, W_enc, b_enc, b_dec = _problem(B, d, F, torch.float32, device)
    b_enc[8192:] += 3.0
    route = _first_route("row_filter", k, 0, F)
    assert filter._row_filter_width(F, route[1]["N_GROUPS"]) == 16384
    outputs = (x.new_empty(B, k), x.new_empty(B, k, dtype=torch.int32), x.new_empty(B, 0), x.new_empty(B, 0))
    flags = row_filter_topk(x, W_enc, b_enc, b_dec, k, 0, None, None, outputs, route[1])
    assert not flags.any()
    assert (outputs[1] >= 8192).any(), "the test's largest pre-activations are in the last chunk"
    assert_topk_matches(outputs[0], outputs[1], _pre64(x, W_enc, b_enc, b_dec), k, torch.float32)


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_row_filter_reads_groups_wider_than_a_read(device, monkeypatch):
    """Beyond F = 2^22 a row's 1024 groups are wider than ROW_FILTER_READ, and the kernel reads one
    group at a time (no read of zero groups, which does not compile): here with reads of 2 features
    against groups of 4 or more, the codes are still the reference's."""
    B, d, F, k, k_aux = (5, 16, 300, 8, 6) if device == "cpu" else (64, 64, 5000, 32, 16)
    x, W_enc, b_enc, b_dec = _problem(B, d, F, torch.float32, device)
    dead = torch.rand(F, device=device) < 0.3
    route = _first_route("row_filter", k, k_aux, F)
    monkeypatch.setattr(filter, "ROW_FILTER_READ", route[1]["GROUP"] // 2)
    outputs = poisoned_outputs(B, k, k_aux, device)
    flags = row_filter_topk(x, W_enc, b_enc, b_dec, k, k_aux, dead, None, outputs, route[1])
    assert not flags.any()
    pre = _pre64(x, W_enc, b_enc, b_dec)
    assert_topk_matches(outputs[0], outputs[1], pre, k, torch.float32)
    assert_topk_matches(outputs[2], outputs[3], pre.masked_fill(~dead, float("-inf")), k_aux, torch.float32, "aux")


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("select", [True, False], ids=["select_in_row_program", "select_launch"])
@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_row_filter_raises_its_bound_when_survivors_share_groups(device, select):
    """When a row's largest values share groups (features whose encoder columns nearly agree, as
    training makes them), far more than CAP entries reach the k-th largest group maximum, and where
    they tie (bias steps of 0.01 here; bf16 rounding in a trained SAE) more than CAP may equal the
    k-th value itself (row 0, whose pre-activation is the bias: a quarter of the features tie): the
    kernel raises the bound by bisection over those groups, over values then over the tied features,
    and selects exactly, leaving no row (AuxK's included) to the fallback, whose single pass over F
    costs milliseconds per flagged row block. The same whether the select runs in the row program or
    after it (`select`)."""
    B, d, F, k, k_aux = (6, 16, 16384, 8, 6) if device == "cpu" else (1000, 768, 24576, 32, 64)
    route = _first_route("row_filter", k, k_aux, F, SELECT=select)
    group = route[1]["GROUP"]
    x, W_enc, b_enc, b_dec = _problem(B, d, F, torch.float32, device)
    features = torch.arange(F, device=device)
    W_enc = W_enc[:, features // group * group].contiguous()  # a group's columns are its first one's
    b_enc = 1e-2 * torch.randint(0, 4, (F,), device=device).float()  # four values inside a group
    x[0] = b_dec
    dead = (features // group) % 2 == 1  # every other group dead
    pre = _pre64(x, W_enc, b_enc, b_dec)
    dead_pre = pre.masked_fill(~dead, float("-inf"))
    for values, top, cap in ((pre, k, route[1]["CAP"]), (dead_pre, k_aux, route[1]["AUX_CAP"])):
        kth_maximum = values.view(B, F // group, group).amax(dim=2).topk(top, dim=1).values[:, -1:]
        assert ((values >= kth_maximum).sum(dim=1) > cap).all(), "the first bound would not overflow every row"
        assert (values[0] == values[0].topk(top).values[-1]).sum() > cap, "row 0's k-th value is not tied enough"
    outputs = poisoned_outputs(B, k, k_aux, device)
    flags = row_filter_topk(x, W_enc, b_enc, b_dec, k, k_aux, dead, None, outputs, route[1])
    assert not flags.any(), f"{int(flags.sum())} of {B} rows left to the fallback"
    vals, idx, aux_vals, aux_idx = outputs
    assert_topk_matches(vals, idx, pre, k, torch.float32)
    assert_topk_matches(aux_vals, aux_idx, dead_pre, k_aux, torch.float32, "aux")


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_row_filter_bound_keeps_about_k(device):
    """The row filter's bound comes from the whole row: on Gaussian pre-activations about k entries pass
    it, so its smallest buffer (2k, at least 64) overflows no row and nothing is left to the fallback."""
    B, d, F, k = (16, 48, 4096, 32) if device == "cpu" else (4096, 768, 24576, 32)
    x, W_enc, b_enc, b_dec = _problem(B, d, F, torch.float32, device)
    route = _first_route("row_filter", k, 0, F)
    assert route[1]["CAP"] == 64
    outputs = (x.new_empty(B, k), x.new_empty(B, k, dtype=torch.int32), x.new_empty(B, 0), x.new_empty(B, 0))
    flags = row_filter_topk(x, W_enc, b_enc, b_dec, k, 0, None, None, outputs, route[1])
    assert not flags.any(), f"{int(flags.sum())} of {B} rows kept more than {route[1]['CAP']} entries"
    assert_topk_matches(outputs[0], outputs[1], _pre64(x, W_enc, b_enc, b_dec), k, torch.float32)


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_encode_topk_kernel_ties_and_all_dead(device):
    """Duplicated encoder columns give exactly tied pre-activations; every feature dead makes the AuxK
    candidates the plain top-k_aux."""
    B, d, F, k = 24, 32, 64, 8
    x, W_enc, b_enc, b_dec = _problem(B, d, F, torch.float32, device)
    W_enc = W_enc[:, torch.arange(F) % 8].contiguous()  # 8 distinct columns, each 8 times
    b_enc = torch.zeros_like(b_enc)
    dead = torch.ones(F, dtype=torch.bool, device=device)
    route = _first_route("row_filter", k, 12, F)
    vals, idx, aux_vals, aux_idx = encode.encode_topk(x, W_enc, b_enc, b_dec, k, 12, dead, route=route)
    pre = _pre64(x, W_enc, b_enc, b_dec)
    assert_topk_matches(vals, idx, pre, k, torch.float32)
    assert_topk_matches(aux_vals, aux_idx, pre, 12, torch.float32, "aux")


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("dtype", DTYPES, ids=_case_id)
@pytest.mark.parametrize(
    "device, B, d, F, k",
    [
        pytest.param("cpu", 37, 40, 300, 8, marks=pytest.mark.interpret),
        pytest.param("cuda", 1000, 768, 24576 + 5, 32, marks=pytest.mark.gpu),
        pytest.param("cuda", 37, 128, 4096, 1024, marks=pytest.mark.gpu),
    ],
    ids=lambda v: None,
)
def test_encode_topk_positive_counts_kernel(device, B, d, F, k, dtype):
    """Per-feature counts of tokens with a positive pre-activation, from the TopK pass: equal to the
    fp64 reference's except for tokens within rounding of 0; the codes are the plain TopK's."""
    x, W_enc, b_enc, b_dec = _problem(B, d, F, dtype, device)
    vals, idx, counts = encode.encode_topk_positive_counts(x, W_enc, b_enc, b_dec, k)
    pre = _pre64(x, W_enc, b_enc, b_dec)
    assert counts.dtype == torch.int64 and counts.shape == (F,)
    assert_topk_matches(vals, idx, pre, k, dtype)
    assert_positive_counts_match(counts, pre, ROUNDING_BAND[dtype])


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("dtype", DTYPES, ids=_case_id)
@pytest.mark.parametrize("threshold", [False, True], ids=["relu", "jumprelu"])
@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_encode_relu_kernel(device, threshold, dtype):
    B, d, F = (37, 40, 96) if device == "cpu" else (1000, 768, 24576 + 5)
    x, W_enc, b_enc, b_dec = _problem(B, d, F, dtype, device)
    cut = torch.rand(F, device=device, dtype=dtype) if threshold else None
    acts = encode.encode_relu(x, W_enc, b_enc, b_dec, cut)
    pre = _pre64(x, W_enc, b_enc, b_dec)
    cut64 = torch.zeros((), dtype=torch.float64, device=device) if cut is None else cut.double()
    assert acts.dtype == dtype
    expected = torch.where(pre > cut64, pre, 0.0)
    # Near its threshold a pre-activation may fire in one precision and not the other, a jump of the
    # threshold's size; there either outcome is right.
    band = ROUNDING_BAND[dtype] * pre.abs().clamp_min(1.0)
    at_threshold = (pre - cut64).abs() <= band
    fired_there, pre_there = acts[at_threshold].double(), pre[at_threshold]
    outcome_ok = (fired_there == 0) | ((fired_there - pre_there).abs() <= band[at_threshold])
    assert outcome_ok.all(), "acts at the threshold: neither 0 nor the pre-activation"
    assert_close(torch.where(at_threshold, expected, acts.double()), expected, dtype, "acts")


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_fp32_centering_keeps_outlier_signal(device):
    """gamma ~ 50: two dimensions sit at |mean| ~ 280 with unit std. With fp32 inputs and bf16 weights,
    the kernels centre in fp32 before casting, matching the fp64 reference; the naive
    bf16(x) - bf16(b_dec) rounds the outliers to a spacing of 2 and loses their per-token signal."""
    B, d, F, k = (48, 64, 128, 8) if device == "cpu" else (4096, 768, 24576, 32)
    mean = torch.zeros(d, dtype=torch.float64)
    mean[:2] = 50 * d**0.5 / 2**0.5  # ||mean|| / ||std|| = 50
    x = (mean + torch.randn(B, d, dtype=torch.float64)).float().to(device)
    W_enc, b_enc, _, _ = random_sae_weights(d, F, dtype=torch.bfloat16, device=device)
    b_dec = (mean + 0.1 * torch.randn(d, dtype=torch.float64)).float().to(device)
    gamma = float(mean.norm() / torch.ones(d).norm())
    assert 45 < gamma < 55

    pre = _pre64(x, W_enc, b_enc, b_dec)
    expected = pre.relu()
    naive_pre = (x.bfloat16() - b_dec.bfloat16()).double() @ W_enc.double() + b_enc.double()
    naive_error = relative_rms_error(naive_pre.relu(), expected)
    fused_error = relative_rms_error(encode.encode_relu(x, W_enc, b_enc, b_dec, None), expected)
    assert fused_error <= TOLERANCE[torch.bfloat16]
    assert naive_error > 10 * fused_error, f"naive {naive_error:.3g} vs fused {fused_error:.3g}"
    vals, idx, _, _ = encode.encode_topk(x, W_enc, b_enc, b_dec, k, 0, None)
    assert_topk_matches(vals, idx, pre, k, torch.bfloat16)


@pytest.mark.gpu
def test_offsets_beyond_int32():
    """B * F > 2^31: the dense ReLU output and the TopK sweep index past int32 offsets."""
    B, d, F, k = 2**17 + 3, 64, 2**14, 16
    x, W_enc, b_enc, b_dec = _problem(B, d, F, torch.bfloat16, "cuda")
    assert B * F > 2**31
    tail = slice(B - 64, B)
    pre = _pre64(x[tail], W_enc, b_enc, b_dec)
    acts = encode.encode_relu(x, W_enc, b_enc, b_dec, None)
    assert_close(acts[tail], pre.relu(), torch.bfloat16, "acts (last rows)")
    del acts
    vals, idx, _, _ = encode.encode_topk(x, W_enc, b_enc, b_dec, k, 0, None)
    assert_topk_matches(vals[tail], idx[tail], pre, k, torch.bfloat16)


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_case_id)
@pytest.mark.parametrize(
    "device, B, d, F, k, k_aux",
    [
        pytest.param("cpu", 37, 40, 96, 8, 5, marks=pytest.mark.interpret),
        pytest.param("cpu", 37, 40, 96, 8, 0, marks=pytest.mark.interpret),
        pytest.param("cuda", 4096, 768, 24576, 32, 384, marks=pytest.mark.gpu),
        pytest.param("cuda", 199, 100, 4099, 64, 0, marks=pytest.mark.gpu),
    ],
    ids=lambda v: None,
)
def test_encode_topk_backward_kernel(device, B, d, F, k, k_aux, dtype, deterministic):
    """Every gradient of the TopK encode (with AuxK codes) against the reference's dense formulas in fp64."""
    x, W_enc, b_enc, b_dec = _problem(B, d, F, dtype, device)
    dead = torch.rand(F, device=device) < 0.5
    codes = encode.encode_topk(x, W_enc, b_enc, b_dec, k, k_aux, dead if k_aux else None)
    grads, run_again = check_encode_topk_backward(x, W_enc, b_dec, codes, dtype)
    if deterministic:
        assert all(torch.equal(a, b) for a, b in zip(grads, run_again())), "not bit-identical"


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("splits", [1, 2, 64])
def test_weighted_sums_over_feature_splits(device, splits, monkeypatch):
    """W_enc @ db_enc (the centring's gradient, negated, on the feature sums' atomic route), read in the
    weights' dtype and summed in fp32 over feature splits: one, two (the last one short) or as many as
    programs of 512 features (a partial one last), on a W_enc with strides (a transposed view) and an F
    that is no multiple of 512."""
    d, F = 24, 1300
    monkeypatch.setattr(scatter, "WEIGHTED_SUMS_FEATURES", 512)
    monkeypatch.setattr(scatter, "WEIGHTED_SUMS_SPLITS", splits)
    W_enc = torch.randn(F, d, device=device).bfloat16().t()
    db_enc = torch.randn(F, device=device)
    out = scatter.weighted_sums(W_enc, db_enc)
    assert out.dtype == torch.float32 and out.shape == (d,)
    assert_close(out, W_enc.double() @ db_enc.double(), torch.float32, "W_enc @ db_enc")


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_strided_inputs(device):
    """Non-contiguous x, W_enc and bias / threshold / mask vectors (views with stride 2), forward and
    backward (a strided b_dec once gave a wrong dW_enc)."""
    B, d, F, k = 20, 24, 64, 4
    x, W_enc, b_enc, b_dec = _problem(B, 2 * d, 2 * F, torch.float32, device)
    x, W_enc, b_enc, b_dec = x[:, ::2], W_enc[::2, ::2], b_enc[::2], b_dec[::2]
    cut = torch.rand(2 * F, device=device)[::2]
    dead = (torch.rand(2 * F, device=device) < 0.5)[::2]
    pre = _pre64(x, W_enc, b_enc, b_dec)
    vals, idx, aux_vals, aux_idx = encode.encode_topk(x, W_enc, b_enc, b_dec, k, 6, dead)
    assert_topk_matches(vals, idx, pre, k, torch.float32)
    assert_topk_matches(aux_vals, aux_idx, pre.masked_fill(~dead, float("-inf")), 6, torch.float32, "aux")
    check_encode_topk_backward(x, W_enc, b_dec, (vals, idx, aux_vals, aux_idx), torch.float32)
    acts = encode.encode_relu(x, W_enc, b_enc, b_dec, cut)
    assert_close(acts, torch.where(pre > cut.double(), pre, 0.0), torch.float32, "jumprelu acts")


@pytest.mark.parametrize("setting", ["0", "-5", "lots", "1e9"])
def test_row_filter_chunk_setting_is_checked(setting):
    """FASTSAE_ROW_FILTER_CHUNK (the row filter's chunk of pre-activations, read at import) that is not a
    positive whole number is a clear error naming it, not a chunk of no rows or a crash later."""
    env = {**os.environ, "FASTSAE_ROW_FILTER_CHUNK": setting}
    result = subprocess.run(
        [sys.executable, "-c", "import fastsae.ops.filter"], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert "FASTSAE_ROW_FILTER_CHUNK must be a positive whole number" in result.stderr
    assert repr(setting) in result.stderr
