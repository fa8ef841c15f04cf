"""Checks that the tests and the benchmarks share (the benchmarks check every provider before timing
it): how close a result is to its reference, and whether a TopK result is a correct top-k without
relying on the order of ties, whether BatchTopK codes are the batch's largest up to rounding at its
threshold, and whether per-feature counts of positive pre-activations are right up
to the tokens whose pre-activation rounding can flip."""

from __future__ import annotations

import torch
from torch import Tensor


def relative_rms_error(actual: Tensor, expected: Tensor) -> float:
    """||actual - expected||_rms / ||expected||_rms, computed in fp64 on actual's device."""
    actual, expected = actual.detach().double(), expected.detach().double().to(actual.device)
    return float((actual - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt().clamp_min(1e-30))


def assert_close(actual: Tensor, expected: Tensor, tolerance: float, name: str = "output") -> None:
    """Equal shapes, no NaN (an unwritten element of a NaN-poisoned output), and a relative RMS error
    within `tolerance`; else AssertionError naming `name`."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not torch.isnan(actual).any(), f"{name}: contains NaN (unwritten elements?)"
    error = relative_rms_error(actual, expected)
    assert error <= tolerance, f"{name}: relative RMS error {error:.3g} > {tolerance:.1g}"


def assert_topk_matches(vals: Tensor, idx: Tensor, pre: Tensor, k: int, tolerance: float, name: str = "topk") -> None:
    """vals/idx [B, k] are the top-k of relu(pre [B, F]): the sorted values equal the reference's
    top-k, each fired code's (value > 0) own pre-activation equals its value, and no feature fires
    twice in a row. Codes of value 0 did not fire; their index is unspecified."""
    expected = pre.double().topk(k, dim=1).values.relu()
    assert_close(vals.double().sort(dim=1, descending=True).values, expected, tolerance, f"{name} values")
    idx, pre, fired = idx.long().to(pre.device), pre.double(), vals.to(pre.device) > 0
    assert ((idx >= 0) & (idx < pre.shape[1])).all(), f"{name}: index out of range"
    gathered = torch.where(fired, pre.gather(1, idx), 0.0)
    assert_close(vals.double().to(pre.device), gathered, tolerance, f"{name} gathered pre-activations")
    fired_idx = torch.where(fired, idx, -1 - torch.arange(idx.shape[1], device=idx.device))  # unique fillers
    assert (fired_idx.sort(dim=1).values.diff(dim=1) > 0).all(), f"{name}: a feature fired twice in a row"


def assert_positive_counts_match(counts: Tensor, pre: Tensor, band: float, name: str = "positive counts") -> None:
    """counts [F] are the per-feature numbers of tokens with pre [B, F] > 0, except that a token whose
    |pre| <= band (within the kernel's rounding of 0) may count either way."""
    pre = pre.double().to(counts.device)
    near_zero = (pre.abs() <= band).sum(dim=0)
    difference = (counts.long() - (pre > 0).sum(dim=0)).abs()
    assert (difference <= near_zero).all(), f"{name}: off by {int(difference.max())} beyond tokens within {band} of 0"


def assert_batchtopk_matches(codes: Tensor, pre: Tensor, k: int, band: float, name: str = "batchtopk") -> None:
    """codes [B, F] are BatchTopK codes of pre [B, F]: each fired code (value > 0) equals its own
    pre-activation, at most B * k fire, and the fired set is the batch's B * k largest post-ReLU values
    up to entries within `band` of the threshold (rounding there may swap which of them fire)."""
    assert codes.shape == pre.shape, f"{name}: shape {tuple(codes.shape)} != {tuple(pre.shape)}"
    codes, pre = codes.double(), pre.double().to(codes.device)
    fired = codes > 0
    budget = min(k * pre.shape[0], pre.numel())
    assert int(fired.sum()) <= budget, f"{name}: {int(fired.sum())} codes fired, more than B * k = {budget}"
    threshold = float(pre.flatten().topk(budget).values[-1].clamp_min(0))
    if fired.any():  # (the RMS error of nothing is undefined)
        assert_close(codes[fired], pre[fired], 2e-2, f"{name} fired values")
    assert bool((pre[fired] >= threshold - band).all()), f"{name}: a code below the batch threshold fired"
    missed = (pre > threshold + band) & ~fired
    assert not bool(missed.any()), f"{name}: {int(missed.sum())} values above the batch threshold did not fire"
