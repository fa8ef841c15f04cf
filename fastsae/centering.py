"""Centering transforms for an SAE's input: the pre-encoder bias b_dec and, for very low effective
rank, PCA whitening.

Simon, Adams & Zou (ICML 2026) show that dimension-level outliers (a large mean offset mu in a few
dimensions) shift every feature's pre-activation by w_i . mu, killing features aligned against mu.
Setting b_dec to the geometric median of the activations centres the input and removes that.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

CHUNK_ROWS = 65536  # rows converted to float64 at a time: bounds the extra memory on big samples


def row_chunks(
    acts: Tensor, dtype: torch.dtype = torch.float64, device: torch.device | None = None
) -> Iterator[Tensor]:
    """acts in slices of CHUNK_ROWS rows, each converted to `dtype` on `device` (default: acts')."""
    for start in range(0, acts.shape[0], CHUNK_ROWS):
        yield acts[start : start + CHUNK_ROWS].to(device=device or acts.device, dtype=dtype)


def check_sample(acts: Tensor, name: str = "acts") -> None:
    """A clear error for a sample no statistic can be computed from: wrong rank, empty, NaN/inf."""
    if not isinstance(acts, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(acts).__name__}")
    if acts.dim() != 2:
        raise ValueError(f"{name} must be [n_tokens, d], got shape {tuple(acts.shape)}")
    if acts.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 tokens)")
    if not acts.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {acts.dtype}")
    if not bool(torch.isfinite(acts).all()):
        raise ValueError(f"{name} contains NaN or infinite values")


def _mean64(acts: Tensor, device: torch.device) -> Tensor:
    return sum(chunk.sum(0) for chunk in row_chunks(acts, device=device)) / acts.shape[0]


def mean(acts: Tensor) -> Tensor:
    """Per-dimension mean [d] (float64 accumulation), in acts' dtype."""
    check_sample(acts)
    return _mean64(acts, acts.device).to(acts.dtype)


def geometric_median(
    acts: Tensor, *, tol: float = 1e-7, max_iter: int = 500, eps: float = 1e-12, device: str | None = None
) -> Tensor:
    """Geometric median argmin_m sum_i ||acts_i - m|| by Weiszfeld's iteration, in float64, batched
    over rows on `device` (default: acts' device if it is a GPU, else the GPU when there is one; the
    sample is moved there chunk by chunk, never whole).

    Starts from the mean; stops when a step moves the estimate by less than `tol` times the sample's
    RMS spread, or after `max_iter` steps. Points that coincide with the estimate would get infinite
    weight: their distance is clamped at `eps` times the spread, the usual robust variant.
    Returns [d] in acts' dtype.
    """
    check_sample(acts)
    if device is None:
        device = acts.device if acts.is_cuda or not torch.cuda.is_available() else torch.device("cuda")
    estimate = _mean64(acts, device)
    spread = torch.sqrt(sum((c - estimate).pow(2).sum() for c in row_chunks(acts, device=device)) / acts.shape[0])
    scale = float(spread) if float(spread) > 0 else 1.0
    for _ in range(max_iter):
        weighted_sum = torch.zeros_like(estimate)
        weight_total = torch.zeros((), dtype=torch.float64, device=device)
        for chunk in row_chunks(acts, device=device):
            weights = 1.0 / (chunk - estimate).norm(dim=1).clamp_min(eps * scale)
            weighted_sum += weights @ chunk
            weight_total += weights.sum()
        new_estimate = weighted_sum / weight_total
        step = float((new_estimate - estimate).norm())
        estimate = new_estimate
        if step <= tol * scale:
            break
    return estimate.to(device=acts.device, dtype=acts.dtype)


def fit_whitening(acts: Tensor, center: Tensor, *, rel_eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """ZCA (PCA) whitening of acts - center: returns (whiten, unwhiten), both [d, d] float64, with
    (x - center) @ whiten having identity covariance and y @ unwhiten inverting it. Eigenvalues are
    floored at rel_eps times the largest so rank-deficient samples stay invertible."""
    check_sample(acts)
    center64 = center.to(device=acts.device, dtype=torch.float64)
    d = acts.shape[1]
    covariance = torch.zeros(d, d, dtype=torch.float64, device=acts.device)
    for chunk in row_chunks(acts):
        centred = chunk - center64
        covariance += centred.T @ centred
    covariance /= acts.shape[0]
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    eigenvalues = eigenvalues.clamp_min(rel_eps * float(eigenvalues.max().clamp_min(1e-30)))
    whiten = eigenvectors @ torch.diag(eigenvalues.rsqrt()) @ eigenvectors.T
    unwhiten = eigenvectors @ torch.diag(eigenvalues.sqrt()) @ eigenvectors.T
    return whiten, unwhiten
