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

On the H200 (bf16, the whole BatchTopK encode, same run) the grouped route took 0.92x / 0.90x / 0.95x
the dense route's time at the GPT-2 / AlphaFold3 / Llama-8B shapes (3.07 / 3.78 / 12.73 ms against
3.35 / 4.21 / 13.41; eager PyTorch 3.86 / 4.87 / 14.21), so it is the default. ROUTE, from the
environment variable FASTSAE_BATCHTOPK ("grouped", the default, or "dense"; read at import).

SPARSE_CODES, on unless FASTSAE_BATCHTOPK_SPARSE=0 (read at import): a `SparseAutoencoder` with
activation "batchtopk" trains on the sparse codes (its SAEOutput then carries vals and idx in training
mode, and acts is None), so the sparse decode and backward serve it as they serve TopK, data-parallel
replicas included (`SparseAutoencoder._batchtopk_replicated_sparse`). The same codes either way; eval
mode, compiling and graph capture keep the dense codes. On the H200 (bf16, GPT-2 shape, AuxK off, same
run) its training step took 5.2 ms against 19.9 ms on the dense codes and eager PyTorch's 7.6 ms.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import reference
from .auxk import KEY_SHIFT
from .filter import _ordered
from .launch import INTERPRET, cdiv, may_synchronize, next_power_of_2

ROUTE = os.environ.get("FASTSAE_BATCHTOPK", "grouped")
if ROUTE not in ("dense", "grouped"):
    raise ValueError(f"FASTSAE_BATCHTOPK must be 'dense' or 'grouped', got {ROUTE!r}")
SPARSE_CODES = os.environ.get("FASTSAE_BATCHTOPK_SPARSE", "1") != "0"
GROUP = 64  # codes per group: F / 64 maxima per row still hold the top k of most rows in distinct groups
# Each row's candidates for the sparse codes: its 4k largest. A row keeps k codes on average; the
# candidates fall short only for a row that keeps more than 4x the average.
CANDIDATES_PER_K = 4
# The batch's threshold among the candidates by a radix select in Triton (`_radix_select`: a histogram
# of 8 bits of every candidate's order key a pass, two passes for bf16 codes) instead of torch.topk
# over all B x c candidates; False: torch.topk. CPU tensors take torch.topk (no Triton there).
SELECT_KERNEL = True
DIGIT_BITS = 8
SELECT_ELEMENTS = 4096  # candidates a program of the select's passes reads: whole rows, at least one


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


@triton.jit
def _select_keys(vals_ptr, B, C, stride_vm, LOW_BITS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program p's rows of the candidates vals [B, C]: (uint32 keys in the values' order, NaN above
    everything as torch.topk ranks it, without the LOW_BITS that the dtype leaves constant; which
    entries exist; which are NaN), each [BLOCK_ROWS, BLOCK_C]."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_C)
    present = (rows < B)[:, None] & (cols < C)[None, :]
    values = tl.load(vals_ptr + rows.to(tl.int64)[:, None] * stride_vm + cols[None, :], mask=present, other=0.0)
    values = values.to(tl.float32)
    nan = present & (values != values)
    keys = (_ordered(values) ^ -(2**31)).to(tl.uint32, bitcast=True)  # signed order -> unsigned order
    keys = tl.where(nan, tl.full([BLOCK_ROWS, BLOCK_C], 0xFFFFFFFF, tl.uint32), keys) >> LOW_BITS
    return keys, present, nan


@triton.jit
def _digit_histogram_kernel(
    vals_ptr, B, C, stride_vm, state_ptr, hist_ptr, SHIFT: tl.constexpr, FIRST: tl.constexpr,
    LOW_BITS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Adds to hist [256] the count of each 8-bit digit (key >> SHIFT) of the candidates whose higher
    digits are the ones chosen so far (state[0]; all of them on the FIRST pass)."""
    keys, present, _ = _select_keys(vals_ptr, B, C, stride_vm, LOW_BITS, BLOCK_ROWS, BLOCK_C)
    if not FIRST:
        chosen = tl.load(state_ptr).to(tl.uint32, bitcast=True)
        present = present & ((keys >> (SHIFT + 8)) == chosen)
    digits = ((keys >> SHIFT) & 0xFF).to(tl.int32)
    counts = tl.histogram(tl.reshape(digits, [BLOCK]), 256, mask=tl.reshape(present, [BLOCK]))
    bins = tl.arange(0, 256)
    tl.atomic_add(hist_ptr + bins, counts, mask=counts > 0)


@triton.jit
def _choose_digit_kernel(hist_ptr, state_ptr, budget, FIRST: tl.constexpr):
    """One program after each histogram pass: the digit where the count from the top reaches the
    number still to take (`budget` on the FIRST pass, then state[1]); appends it to the chosen digits
    (state[0]) and leaves in state[1] how many of the candidates with those digits are to be taken."""
    bins = tl.arange(0, 256)
    counts = tl.load(hist_ptr + bins)
    if FIRST:
        chosen, wanted = 0, budget
    else:
        chosen, wanted = tl.load(state_ptr).to(tl.uint32, bitcast=True), tl.load(state_ptr + 1)
    at_or_above = tl.cumsum(counts, axis=0, reverse=True)
    digit = tl.sum((at_or_above >= wanted).to(tl.int32), axis=0) - 1  # at_or_above falls with the digit
    above = tl.sum(tl.where(bins > digit, counts, 0), axis=0)
    tl.store(state_ptr, ((chosen << 8) | digit.to(tl.uint32)).to(tl.int32, bitcast=True))
    tl.store(state_ptr + 1, wanted - above)


@triton.jit
def _keep_kernel(
    vals_ptr, B, C, stride_vm, state_ptr, keep_ptr, ties_ptr, flag_ptr, COMPLETE: tl.constexpr,
    LOW_BITS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """keep = the candidates above the threshold key (state[0]); ties_ptr[p] = how many of program p's
    equal it. Unless the candidates are COMPLETE rows, raises the flag where the answer may be wrong
    (the caller's fallback): a NaN candidate, or a row whose smallest candidate is above the threshold."""
    keys, present, nan = _select_keys(vals_ptr, B, C, stride_vm, LOW_BITS, BLOCK_ROWS, BLOCK_C)
    threshold = tl.load(state_ptr).to(tl.uint32, bitcast=True)
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_C)
    where = keep_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :]
    tl.store(where, (present & (keys > threshold)).to(tl.int8), mask=present)
    tl.store(ties_ptr + tl.program_id(0), tl.sum(tl.sum((present & (keys == threshold)).to(tl.int32), axis=1), axis=0))
    if not COMPLETE:  # (whole rows: NaN ranks first, as in the reference)
        smallest = tl.min(tl.where(present, keys, tl.full([BLOCK_ROWS, BLOCK_C], 0xFFFFFFFF, tl.uint32)), axis=1)
        unsure = tl.sum(((rows < B) & (smallest > threshold)).to(tl.int32), axis=0)
        unsure += tl.sum(tl.sum(nan.to(tl.int32), axis=1), axis=0)
        if unsure > 0:
            tl.store(flag_ptr, 1)


@triton.jit
def _keep_ties_kernel(
    vals_ptr, B, C, stride_vm, state_ptr, keep_ptr, ties_before_ptr,
    LOW_BITS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Keeps the first state[1] candidates equal to the threshold key, in row-major order (the same
    ones every run): program p's ties after the ties_before_ptr[p] of the programs before it."""
    keys, present, _ = _select_keys(vals_ptr, B, C, stride_vm, LOW_BITS, BLOCK_ROWS, BLOCK_C)
    tie = present & (keys == tl.load(state_ptr).to(tl.uint32, bitcast=True))
    rank = tl.load(ties_before_ptr + tl.program_id(0)) + tl.reshape(
        tl.cumsum(tl.reshape(tie.to(tl.int32), [BLOCK]), 0), [BLOCK_ROWS, BLOCK_C]
    )
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_C)
    where = keep_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :]
    tl.store(where, tl.full([BLOCK_ROWS, BLOCK_C], 1, tl.int8), mask=tie & (rank <= tl.load(state_ptr + 1)))


def _radix_select(codes: Tensor, budget: int, complete: bool) -> tuple[Tensor, Tensor]:
    """(keep mask [B, c] of the `budget` largest of codes [B, c] (1 <= budget < B * c), flag [1] int32:
    nonzero where `select_among_candidates` must answer None). The threshold's key is set 8 bits a
    pass from the top: a histogram of the digit over the candidates that match the digits chosen so
    far, and one program that chooses the next (the first where the count from the top reaches what
    is still to take); then the candidates above it are kept, and of those equal to it the first that
    complete the budget."""
    codes = codes if codes.stride(1) == 1 else codes.contiguous()
    B, C = codes.shape
    block_c = next_power_of_2(C)
    block_rows = max(1, SELECT_ELEMENTS // block_c)
    programs = cdiv(B, block_rows)
    low_bits = KEY_SHIFT[codes.dtype] // DIGIT_BITS * DIGIT_BITS  # whole digits that no value sets
    shape = dict(LOW_BITS=low_bits, BLOCK_ROWS=block_rows, BLOCK_C=block_c)
    whole = dict(shape, BLOCK=block_rows * block_c)
    shifts = range(32 - low_bits - DIGIT_BITS, -1, -DIGIT_BITS)  # the keys' digits, from the top
    hist = codes.new_zeros(len(shifts), 256, dtype=torch.int32)
    state = codes.new_empty(2, dtype=torch.int32)  # chosen digits, how many of those to take
    for i, shift in enumerate(shifts):
        _digit_histogram_kernel[(programs,)](
            codes, B, C, codes.stride(0), state, hist[i], SHIFT=shift, FIRST=i == 0, **whole, num_warps=4
        )  # fmt: skip
        _choose_digit_kernel[(1,)](hist[i], state, budget, FIRST=i == 0, num_warps=1)
    keep = codes.new_empty(B, C, dtype=torch.bool)
    ties = codes.new_empty(programs, dtype=torch.int32)
    flag = codes.new_zeros(1, dtype=torch.int32)
    _keep_kernel[(programs,)](
        codes, B, C, codes.stride(0), state, keep, ties, flag, COMPLETE=complete, **shape, num_warps=4
    )  # fmt: skip
    ties_before = ties.cumsum(0, dtype=torch.int32) - ties
    _keep_ties_kernel[(programs,)](codes, B, C, codes.stride(0), state, keep, ties_before, **whole, num_warps=4)
    return keep, flag


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
    if SELECT_KERNEL and (codes.is_cuda or INTERPRET) and codes.dtype in KEY_SHIFT and budget < flat.numel():
        keep, flag = _radix_select(codes, budget, complete)
        return None if bool(flag) else keep
    top = flat.topk(budget, sorted=False)
    if not complete:
        # torch.topk ranks NaN above every number, so a NaN candidate is among the kept values whenever
        # there is one, and then their minimum, the threshold, is NaN: one check covers both cases, with
        # no gather of the kept values and no pass over the candidates for NaN (launches before the
        # host synchronisation, which the host waits out: the H200 ran this select at 0.20 ms at the GPT-2
        # shape and 0.56 at AlphaFold3's against about 0.1 of kernels).
        threshold = top.values.min()
        if bool(threshold.isnan() | (codes.amin(dim=1) > threshold).any()):
            return None
    mask = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
    mask[top.indices] = True
    return mask.view_as(codes)
