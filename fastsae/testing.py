"""Checks that the tests and the benchmarks share (the benchmarks check every provider before timing
it): how close a result is to its reference, and whether a TopK result is a correct top-k without
relying on the order of ties."""

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
