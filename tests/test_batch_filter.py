"""The threshold-first BatchTopK codes (fastsae/ops/batch_filter.py) against the fp64 reference: on CPU
under the Triton interpreter at tiny shapes, on the GPU at full ones. Both filter routes, estimates above
and below the batch's threshold, ties at it, and every case that must hand the batch back (None)."""

import pytest
import torch

from fastsae import functional, reference
from fastsae.ops import batch_filter
from fastsae.testing import assert_batchtopk_matches

from .utils import KERNEL_DEVICES, random_sae_weights


def _problem(device, dtype=torch.float32):
    B, d, F, k = (24, 16, 128, 4) if device == "cpu" else (2048, 768, 24576, 32)
    x = (torch.randn(B, d, dtype=torch.float64, device=device) * 2 + 1).to(dtype)
    W_enc, b_enc, _, b_dec = random_sae_weights(d, F, dtype=dtype, device=device)
    return x, W_enc, b_enc, b_dec, k


def _batch_threshold(pre, k):
    return pre.flatten().topk(k * pre.shape[0]).values[-1].float()


def _route(name, k, n_features):
    return next(route for route in batch_filter.routes(k, n_features) if route[0] == name)


def _check_codes(vals, idx, pre, k, band):
    """The codes are the batch's B * k largest, each row's kept codes first in descending order with
    value 0 after them, on feature (row x width + slot) mod F."""
    B, n_features = pre.shape
    assert vals.shape == idx.shape == (B, batch_filter.codes_width(k, n_features)) and idx.dtype == torch.int32
    kept = vals > 0
    assert not (kept[:, 1:] & ~kept[:, :-1]).any(), "a kept code after an empty slot"
    assert (vals[:, :-1] >= vals[:, 1:]).all(), "a row's codes are not in descending order"
    spread = torch.arange(idx.numel(), device=idx.device).view_as(idx) % n_features
    assert (idx[~kept] == spread[~kept]).all(), "an empty slot's feature"
    assert_batchtopk_matches(reference.scatter_codes(vals, idx, n_features), pre, k, band)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("route", ["chunks", "gemm"])
@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_codes_match_reference_for_estimates_about_the_threshold(device, route, dtype):
    """Exact for an estimate a little above the batch's threshold (within the margin) or below it: the
    estimate only decides how many entries the selection ranks. In bf16 the streaming route's
    pre-activations are bf16 values, thousands of which tie at the threshold."""
    x, W_enc, b_enc, b_dec, k = _problem(device, dtype)
    pre = reference.pre_activation(*(t.double() for t in (x, W_enc, b_enc, b_dec)))
    band = (1e-4 if dtype == torch.float32 else 1e-2) * float(pre.abs().max())
    threshold = _batch_threshold(pre, k)
    for scale in (1.05, 1.0, 0.95):
        codes = batch_filter.threshold_first_codes(
            x, W_enc, b_enc, b_dec, k, threshold * scale, route=_route(route, k, W_enc.shape[1])
        )
        assert codes is not None, f"estimate {scale} x the threshold was handed back"
        _check_codes(*codes, pre, k, band)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_ties_at_the_threshold_go_to_the_earlier_rows_then_larger_features(device):
    """Identical rows whose features come in identical pairs tie at every value, 2B entries a value:
    with k = 2j + 1 the batch keeps every row's 2j largest and B of the 2B entries at the next value,
    which the cut gives to the first B / 2 rows, both features of each pair."""
    x, W_enc, b_enc, b_dec, k = _problem(device)
    k -= 1 - k % 2  # odd
    half = W_enc.shape[1] // 2
    W_enc[:, half:], b_enc[half:] = W_enc[:, :half], b_enc[:half]
    x[:] = x[0]
    pre = reference.pre_activation(*(t.double() for t in (x, W_enc, b_enc, b_dec)))
    codes = batch_filter.threshold_first_codes(x, W_enc, b_enc, b_dec, k, _batch_threshold(pre, k) * 0.95)
    assert codes is not None
    vals, idx = codes
    per_row = (vals > 0).sum(dim=1).tolist()
    B = x.shape[0]
    assert per_row == [k + 1] * (B // 2) + [k - 1] * (B - B // 2), per_row
    pairs = torch.sort(idx[0, : k + 1] % half).values
    assert torch.equal(pairs[0::2], pairs[1::2]), "the first row did not keep both features of each pair"
    _check_codes(vals, idx, pre, k, band=1e-4)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_hands_back_what_it_cannot_answer_exactly(device, monkeypatch):
    """None for an estimate too far above the threshold (fewer than B * k survivors), one that lets
    nothing through (<= 0, NaN), a row with more survivors than its buffer or more kept codes than the
    codes' width, a non-finite input, and a batch beyond the buffers' bound."""
    x, W_enc, b_enc, b_dec, k = _problem(device)
    pre = reference.pre_activation(*(t.double() for t in (x, W_enc, b_enc, b_dec)))
    threshold = _batch_threshold(pre, k)

    def codes(x=x, estimate=threshold):
        return batch_filter.threshold_first_codes(x, W_enc, b_enc, b_dec, k, estimate)

    assert codes(estimate=threshold * 2) is None, "too high an estimate"
    assert codes(estimate=threshold * 0) is None and codes(estimate=threshold * float("nan")) is None
    crowded = x.clone()
    crowded[1] = b_dec + 1e3 * W_enc.sum(dim=1)  # about half its features far above the threshold
    with monkeypatch.context() as patch:
        patch.setattr(batch_filter, "MIN_SLOTS", 1)
        patch.setattr(batch_filter, "SLOTS_PER_K", 1)  # k slots a row: fewer than the crowded row's survivors
        assert codes(x=crowded) is None, "a row overflowing its buffer"
    with monkeypatch.context() as patch:
        patch.setattr(batch_filter, "codes_width", lambda k, n_features: 1)
        assert codes() is None, "rows keeping more codes than the codes' width"
    poisoned = x.clone()
    poisoned[2, 0] = float("nan")
    assert codes(x=poisoned) is None, "a NaN input"
    monkeypatch.setattr(batch_filter, "MAX_SLOTS", x.shape[0] - 1)
    assert codes() is None, "a batch beyond the buffers' bound"
    monkeypatch.undo()
    assert codes() is not None, "the batch itself was handed back"


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_tunes_on_a_positive_estimate_only(device, monkeypatch):
    """The first call for a shape, which times the routes on its own filter, hands the batch back before
    any work when its estimate keeps nothing (<= 0 or NaN: a training SAE's first batch), and a positive
    estimate's call tunes (the tuner stands in for itself here: under the interpreter it times nothing)."""
    x, W_enc, b_enc, b_dec, k = _problem(device)
    threshold = _batch_threshold(reference.pre_activation(*(t.double() for t in (x, W_enc, b_enc, b_dec))), k)
    timed = []
    monkeypatch.setattr(batch_filter, "needs_tuning", lambda key, candidates: not timed)
    monkeypatch.setattr(batch_filter, "tuned", lambda key, candidates, run: timed.append(key) or candidates[0])
    for estimate in (threshold * 0, threshold * 0 - 1, threshold * float("nan")):
        assert batch_filter.threshold_first_codes(x, W_enc, b_enc, b_dec, k, estimate) is None
    assert not timed, "tuned on an empty filter"
    assert batch_filter.threshold_first_codes(x, W_enc, b_enc, b_dec, k, threshold) is not None
    assert len(timed) == 1


@pytest.mark.gpu
def test_functional_threshold_route_has_the_candidates_route_gradients():
    """`functional.encode_batchtopk_sparse` with an estimate: the same codes and the same gradients
    (through the decoder, w.r.t. x and every encoder parameter) as without one."""
    x, W_enc, b_enc, b_dec, k = _problem("cuda")
    W_dec = torch.randn(W_enc.shape[1], W_enc.shape[0], device="cuda") / W_enc.shape[0] ** 0.5
    pre = reference.pre_activation(*(t.double() for t in (x, W_enc, b_enc, b_dec)))
    results = []
    for threshold in (None, _batch_threshold(pre, k)):
        inputs = [t.clone().requires_grad_() for t in (x, W_enc, b_enc, b_dec)]
        vals, idx, _, _ = functional.encode_batchtopk_sparse(*inputs, k, threshold=threshold)
        functional.decode_sparse(vals, idx, W_dec).square().sum().backward()
        codes = reference.scatter_codes(vals.detach(), idx, W_enc.shape[1])
        results.append((codes, *(t.grad for t in inputs)))
    for name, with_estimate, without in zip(("codes", "dx", "dW_enc", "db_enc", "db_dec"), results[1], results[0]):
        torch.testing.assert_close(with_estimate, without, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.gpu
def test_batchtopk_sae_filters_by_its_last_batch_threshold(monkeypatch):
    """With batchtopk.THRESHOLD_FIRST a training BatchTopK SAE on the GPU passes its last batch's
    threshold as the estimate: from the second step on its codes come from the threshold-first route,
    and it trains step by step like a twin that never takes it (the same codes, losses and gradients)."""
    import fastsae
    from fastsae.ops import batchtopk

    monkeypatch.setattr(batchtopk, "THRESHOLD_FIRST", True)

    cfg = fastsae.SAEConfig(d_in=256, n_features=8192, k=32, activation="batchtopk")
    saes = [fastsae.SparseAutoencoder(cfg).to("cuda") for _ in range(2)]
    saes[0].initialize(torch.randn(4096, cfg.d_in, device="cuda") + 1)
    saes[1].load_state_dict(saes[0].state_dict())
    optimizers = [torch.optim.Adam(sae.parameters(), lr=1e-4) for sae in saes]
    original = batch_filter.threshold_first_codes
    answered = []

    def recorded(*args, **kwargs):
        codes = original(*args, **kwargs)
        answered.append(codes is not None)
        return codes

    for step in range(4):
        x = torch.randn(2048, cfg.d_in, device="cuda") + 1
        outs = []
        for sae, optimizer, route in zip(saes, optimizers, (recorded, lambda *args, **kwargs: None)):
            monkeypatch.setattr(batch_filter, "threshold_first_codes", route)
            optimizer.zero_grad()
            out = sae(x)
            out.loss.backward()
            optimizer.step()
            outs.append(out)
        got, want = outs
        n = cfg.n_features
        codes = [reference.scatter_codes(out.vals.detach(), out.idx, n) for out in outs]
        torch.testing.assert_close(codes[0], codes[1], rtol=1e-3, atol=1e-3, msg=f"step {step} codes")
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-3, atol=1e-5, msg=f"step {step} loss")
        for (name, p), q in zip(saes[0].named_parameters(), saes[1].parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-2, atol=1e-5, msg=f"step {step} {name} gradient")
    assert answered == [False, True, True, True], answered
