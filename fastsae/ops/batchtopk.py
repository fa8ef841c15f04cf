"""BatchTopK's selection: of dense post-ReLU codes [B, F], keep the batch's B * k largest
(`reference.batch_topk`), without ranking all B * F of them.

`reference.batch_topk` runs torch.topk over the whole flattened batch: at the GPT-2 shape (B = 8192,
F = 24576, k = 32) that selects 262,144 of 201 million values, and it took most of the BatchTopK
encode on the H200 (3.37 ms, against 0.50 ms for the encoder GEMM). The grouped route finds a
threshold first and then ranks only the values above it:
1. the maximum of every group of GROUP consecutive codes of a row (the row's last F mod GROUP codes
   count as groups of one);
2. floor = the (B * k)-th largest of those maxima. Each maximum is a code of its own group, so at least
   B * k codes are >= floor: the batch's (B * k)-th largest code is >= floor, and every code the
   reference keeps is >= floor;
3. the positions of the codes >= floor (a few more than B * k when a row's largest codes share
   groups), and torch.topk among those alone. Exact: the same codes as the reference, up to which of
   equal codes at the threshold is kept (torch.topk's choice there too).
Where the floor is not positive (fewer positive group maxima than B * k: zeros would tie at it) or not
a number (NaN codes), the reference's route runs instead. Two host synchronisations: the floor's sign
and the number of positions; so while compiling or capturing a CUDA graph the reference's route runs.

Sparse codes (`functional.encode_batchtopk_sparse`, `select_among_candidates`): the TopK encode keeps
each row's CANDIDATES_PER_K * k largest codes, and the batch's B * k largest are chosen among those
alone, so no [B, F] tensor is made and the codes come out as (vals, idx) for the sparse decode and
backward. That is exact unless a row keeps more codes than its candidates: a row whose smallest
candidate is above the batch's threshold may have more codes above it, and then (detected, one host
synchronisation) the dense route runs instead.

Captured steps (`fastsae.graphs.CapturedStep`): a graph cannot wait for that check, and the sparse
codes' shapes are fixed, so the capture installs an `exactness_checkpoint`. The sparse routes then hand
their check's device flag to it (`exact`) instead of reading it; the capture ends its first graph there
and captures the rest of the step as a second one, and each replay reads the flag between the two,
running the step eagerly (this module's exact routes) where the codes would not be exact.

On the H200 (bf16, the whole BatchTopK encode, same run) the grouped route took 0.92x / 0.90x / 0.95x
the dense route's time at the GPT-2 / AlphaFold3 / Llama-8B shapes (3.07 / 3.78 / 12.73 ms against
3.35 / 4.21 / 13.41; eager PyTorch 3.86 / 4.87 / 14.21), so it is the default. ROUTE, from the
environment variable FASTSAE_BATCHTOPK ("grouped", the default, or "dense"; read at import).

SPARSE_CODES, on unless FASTSAE_BATCHTOPK_SPARSE=0 (read at import): a `SparseAutoencoder` with
activation "batchtopk" trains on the sparse codes (its SAEOutput then carries vals and idx in training
mode, and acts is None), so the sparse decode and backward serve it as they serve TopK, data-parallel
replicas included (`SparseAutoencoder._batchtopk_replicated_sparse`). The same codes either way; eval
mode, compiling and graph captures other than a CapturedStep's (below) keep the dense codes. On the
H200 (bf16, GPT-2 shape, AuxK off, same run) its training step took 5.2 ms against 19.9 ms on the
dense codes and eager PyTorch's 7.6 ms.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from .. import reference
from . import cutlass_gemm
from .launch import may_synchronize

ROUTE = os.environ.get("FASTSAE_BATCHTOPK", "grouped")
if ROUTE not in ("dense", "grouped"):
    raise ValueError(f"FASTSAE_BATCHTOPK must be 'dense' or 'grouped', got {ROUTE!r}")
SPARSE_CODES = os.environ.get("FASTSAE_BATCHTOPK_SPARSE", "1") != "0"
# A training SAE's sparse codes by the threshold-first route (`batch_filter.py`, filtering by the last
# batch's threshold): off unless FASTSAE_BATCHTOPK_THRESHOLD_FIRST=1 (read at import). Its GPU time is
# below the candidates' route's (about 0.89 against 1.14 ms at AlphaFold3's shape), but an eager call,
# which waits for its exactness check, measured slower on the H200 (bf16, 73600d9): 1.113 / 1.352 / 7.55
# ms at GPT-2 / AlphaFold3 / Llama-8B against 1.094 / 1.293 / 7.43; its launches after the GEMM are
# more than the host queues while the GEMM runs.
THRESHOLD_FIRST = os.environ.get("FASTSAE_BATCHTOPK_THRESHOLD_FIRST", "0") == "1"
GROUP = 64  # codes per group: F / 64 maxima per row still hold the top k of most rows in distinct groups
# Each row's candidates for the sparse codes: its 4k largest. A row keeps k codes on average; the
# candidates fall short only for a row that keeps more than 4x the average.
CANDIDATES_PER_K = 4


# The callback of the capture in progress (`exactness_checkpoint`), or None.
_checkpoint: Callable[[Tensor], None] | None = None


@contextlib.contextmanager
def exactness_checkpoint(callback: Callable[[Tensor], None]) -> Iterator[None]:
    """While the block captures a CUDA graph, the sparse BatchTopK routes call `callback` with their
    check's flag (a bool tensor, True where the codes are not exact) in place of reading it, and go on
    as if the codes were exact (`exact`)."""
    global _checkpoint
    previous, _checkpoint = _checkpoint, callback
    try:
        yield
    finally:
        _checkpoint = previous


def sparse_codes_possible(x: Tensor) -> bool:
    """Whether the sparse routes can answer for x now: they read their check on the host, or hand it to
    a capture's checkpoint."""
    return may_synchronize(x) or _checkpoint is not None


def exact(inexact: Tensor) -> bool:
    """Whether the codes whose check gave `inexact` (a 0-dim bool tensor) are exact: read on the host
    (one synchronisation), or, while a checkpointed capture runs, handed to its checkpoint and taken as
    exact (each replay reads it before the rest of the step)."""
    if _checkpoint is not None and not may_synchronize(inexact):
        _checkpoint(inexact)
        return True
    return not bool(inexact)


def batch_topk(acts: Tensor, k: int) -> Tensor:
    """`reference.batch_topk(acts, k)` by ROUTE; the reference's route (no host synchronisation) while
    compiling or capturing a CUDA graph."""
    if ROUTE == "grouped" and may_synchronize(acts):
        return grouped_batch_topk(acts, k)
    return reference.batch_topk(acts, k)


def grouped_batch_topk(acts: Tensor, k: int, group: int = GROUP) -> Tensor:
    """`reference.batch_topk(acts, k)` through a threshold on group maxima (the module docstring)."""
    n_rows, n_features = acts.shape
    budget = min(k * n_rows, acts.numel())
    codes = acts.detach()  # the selection; the kept values are gathered from acts (gradients flow there)
    whole = n_features // group * group
    maxima = torch.cat([codes[:, :whole].reshape(n_rows, -1, group).amax(-1).flatten(), codes[:, whole:].flatten()])
    if budget >= maxima.numel():  # as many maxima as codes to keep: nothing to filter
        return reference.batch_topk(acts, k)
    floor = maxima.topk(budget, sorted=False).values.min()
    if not float(floor) > 0:  # zeros tie at the floor (all of them would be candidates) or NaN codes
        return reference.batch_topk(acts, k)
    flat_codes = codes.reshape(-1)
    positions = (flat_codes >= floor).nonzero().squeeze(1)
    keep = positions[flat_codes[positions].topk(budget, sorted=False).indices]
    flat = acts.reshape(-1)
    return torch.zeros_like(flat).scatter(0, keep, flat[keep]).view_as(acts)


def candidate_width(k: int, n_features: int) -> int:
    """Candidates per row for the sparse BatchTopK codes: CANDIDATES_PER_K * k, at most the row."""
    return min(n_features, CANDIDATES_PER_K * k)


def dense_from_candidates(k: int, n_features: int) -> bool:
    """Whether the dense BatchTopK codes (`functional.encode_batchtopk`) are the sparse codes scattered
    into [B, F]: where the candidates are within the limits of the TopK encode's warp select
    (`cutlass_gemm.select_topk_group_max`: at most SELECT_MAX_K, and at most one a group of the narrowest
    groups the encode's tuner routes it over). There the sparse route took about a third of the dense
    route's time on the H200 (bf16, 73600d9, 128 / 256 / 128 candidates: 1.09 / 7.43 / 1.29 ms at GPT-2 /
    Llama-8B / AlphaFold3 against 3.05 / 12.70 / 3.78), which leaves the [B, F] fill and scatter room.
    More candidates, or candidates a larger share of the row, take the TopK encode's slower routes: not
    timed against the dense route, which they keep."""
    narrowest = min(v.group for v in cutlass_gemm.VARIANTS if v.routed and v.group in cutlass_gemm.SELECT_GROUPS)
    most = min(cutlass_gemm.SELECT_MAX_K, n_features // narrowest)
    return candidate_width(k, n_features) <= most


def select_among_candidates(vals: Tensor, k: int, complete: bool) -> Tensor | None:
    """Which of the candidate codes vals [B, c] (post-ReLU; each row's c largest, from the TopK encode)
    are the batch's B * k largest: a bool mask [B, c] keeping the codes `reference.batch_topk` keeps
    over whole rows (up to which of equal codes at the threshold is kept). None where the candidates
    may not hold them all: a row whose smallest candidate is above the batch's threshold may have more
    codes above it, and NaN codes are ranked first by the reference (neither when the candidates are
    `complete` rows). One host synchronisation, for that check."""
    codes = vals.detach()
    flat = codes.reshape(-1)
    budget = min(k * codes.shape[0], flat.numel())
    top = flat.topk(budget, sorted=False)
    if not complete:
        # torch.topk ranks NaN above every number, so a NaN candidate is among the kept values whenever
        # there is one, and then their minimum, the threshold, is NaN: one check covers both cases, with
        # no gather of the kept values and no pass over the candidates for NaN (launches before the
        # host synchronisation, which the host waits out: the H200 ran this select at 0.20 ms at the GPT-2
        # shape and 0.56 at AlphaFold3's against about 0.1 of kernels).
        threshold = top.values.min()
        if not exact(threshold.isnan() | (codes.amin(dim=1) > threshold).any()):
            return None
    mask = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
    mask.index_fill_(0, top.indices, True)  # (an indexed assignment of True copies it from the host)
    return mask.view_as(codes)
