"""Experimental: the encoder GEMM with the TopK encode's work in its epilogue (CUTLASS, Hopper only).

    pre, maxima = gemm_bias_group_max(xc, W_enc, b_enc, variant)    (`reference.gemm_bias_group_max`)
    select_topk_group_max(pre, maxima, group, k, vals, idx, flags)      (`reference.topk_activation`)
    gemm_bias_filter(xc, W_enc, b_enc, tau, count, key_buf, variant)   (`reference.gemm_bias_filter`)

pre is what cuBLAS's addmm writes (xc @ W_enc + b_enc rounded to bf16); maxima [ceil(F / group), B
rounded up to the tile's rows] fp32 holds the maximum of every `group` adjacent features of each row
(a group is the kernel's tile width), computed in the same epilogue from the rounded values; a kernel
with two groups a tile (64 features each) leaves them as [tiles, 2, rows] (`Variant.groups_per_tile`). The TopK
row filter (`filter.row_filter_topk`) reads the whole pre-activation once for exactly those maxima
before it reads the hot groups again; a GEMM that leaves them saves the rest of the row's read. Triton
GEMMs that did so (the pooled route, f5477b9) were slower than cuBLAS by more than that read; these are
CUTLASS's TMA warp-specialised kernels with an epilogue visitor tree (csrc/cutlass/), built only where
CUTLASS's headers are found (setup.py, the `cutlass` extra). Where they are built (and ROUTE is on, the
default), the TopK encode's tuner also times the row filter over their chunks and maxima
(`filter.group_max_configs`: bf16 weights, no AuxK stream), so that route is taken only where it
measures faster; `bench/bench_gemm.py` times each variant alone against cuBLAS's addmm.

select_topk_group_max is that route's select as a CUDA kernel of one warp per row
(csrc/cutlass/group_max_select_kernel.cuh): the row's k-th largest group maximum bounds its k-th largest
entry, the groups that reach it are read again and their entries at or above it gathered in the warp's shared
memory (cut to their k largest, the bound raised, whenever that buffer fills) and sorted in registers.
Rows it cannot finish (flags 1: a bound of -inf, fewer than k candidates: NaN entries) are left for the
caller's fallback. With SELECT_ROUTE on (the default), the tuner times it beside the Triton row kernel
(`filter.over_group_maxima`).

gemm_bias_filter is the threshold-first filter GEMM (`filter.filter_gemm`'s Triton kernel without AuxK
and positive counts): every entry of xc @ W_enc + b_enc (fp32) above its row's tau is appended to the row's
buffer as a `filter.to_key` key, its slot claimed by an atomic on the row's count; it writes nothing
[B, F]. The Triton filter GEMM ran its epilogue after each tile's matmul and measured slower than cuBLAS's
write and the row filter's read; CUTLASS's ping-pong kernel runs one warpgroup's epilogue beside the
other's matmul. It measured slower than the Triton filter GEMM, so the tuner times the filter route over
it (`filter.cutlass_filter_configs`) only with FILTER_ROUTE on.
"""

from __future__ import annotations

import importlib.util
import os
from typing import NamedTuple

import torch
from torch import Tensor


class Variant(NamedTuple):
    """A kernel of gemm_bias_group_max (csrc/cutlass/group_max_gemm_*.cu, named by its tile's rows x
    features): features per group (its tile's width over groups_per_tile), the rows its maxima are
    rounded up to (its tile's height), and whether the encode's tuner times the route over it (`routed`:
    not for a kernel that has not yet run on a GPU). Where a tile holds two groups its maxima are [tiles,
    2, rows]: group g at [g // 2, g % 2]."""

    name: str
    group: int
    tile_rows: int
    routed: bool = True
    groups_per_tile: int = 1


# By the op's `variant` argument (csrc/cutlass/ops.cu dispatches on it). Cooperative: two
# warpgroups on one tile; ping-pong: each on a tile of its own, one's epilogue beside the other's matmul;
# clusters of two CTAs share W_enc's tiles by multicast. The GEMM alone on an H100 (bf16, 18ba460), ms at
# GPT-2 / AF3 / Llama-8B's shapes against cuBLAS's addmm 0.508 / 0.381 / 6.455:
#   cooperative_128x128 0.608 / 0.504 / 8.12     cooperative_128x64 (40eb821) 0.862 / 0.663 / 12.96
#   pingpong_128x128    0.511 / 0.430 / 8.91     pingpong_64x128 (40eb821)    0.679 / 0.588 / 13.47
#   cooperative_256x128 0.554 / 0.458 / 7.15     pingpong_128x128_cluster2    0.509 / 0.451 / 8.36
#   cooperative_128x256_cluster2 0.549 / 0.468 / 6.27 (faster than cuBLAS at Llama-8B's shape)
# The 64-wide and 64-high tiles were the slowest at every shape, and were removed (3493284 has them).
# Groups of 64 features from 128-wide tiles (`groups64`: the epilogue reduces each half of the tile into
# maxima of its own): at AF3's shape with k = 128 every one of a row's 128 groups of 128 reaches the k-th
# largest group maximum, so the select reads the whole pre-activation back; of 256 groups of 64, about
# half do. Compiled for sm_90a, not yet run on a GPU: routed only with FASTSAE_CUTLASS_GROUPS64=1 (read at
# import).
GROUPS64_ROUTE = os.environ.get("FASTSAE_CUTLASS_GROUPS64", "0") == "1"
VARIANTS = (
    Variant("cooperative_128x128", 128, 128),
    Variant("pingpong_128x128", 128, 128),
    Variant("cooperative_256x128", 128, 256),
    Variant("pingpong_128x128_cluster2", 128, 128),
    Variant("cooperative_128x256_cluster2", 256, 128),
    Variant("cooperative_128x128_groups64", 64, 128, routed=GROUPS64_ROUTE, groups_per_tile=2),
    Variant("pingpong_128x128_groups64", 64, 128, routed=GROUPS64_ROUTE, groups_per_tile=2),
)

# select_topk_group_max's limits (csrc/cutlass/group_max_select.cuh): groups a row, largest k (and at most
# one k per group), and the group widths it reads.
SELECT_MAX_GROUPS = 1024
SELECT_MAX_K = 256
SELECT_GROUPS = (64, 128, 256)

# gemm_bias_filter's kernels (csrc/cutlass/filter_gemm_*.cu), by its `variant` argument.
FILTER_VARIANTS = ("pingpong_128x128", "cooperative_128x128")

# The row filter over gemm_bias_group_max as a route of the TopK encode, where the extension is built:
# on unless FASTSAE_CUTLASS_ROUTES=0 (read at import). On an H100 (40eb821 and 7e44a77, each variant checked
# against its reference) the tuner took it over every route on cuBLAS at GPT-2's shape, twice (the encode
# 0.602 and 0.606 ms against the GEMM's 0.501 and 0.496), and the plain row filter at Llama-8B's.
ROUTE = os.environ.get("FASTSAE_CUTLASS_ROUTES", "1") != "0"
# select_topk_group_max as a select of that route (`filter.over_group_maxima`): on unless
# FASTSAE_CUTLASS_SELECT=0 (read at import). Its first version took 0.094 / 0.163 ms over the route's
# chunks at GPT-2 / AF3 on an H100 (cab2aa6), the best Triton row kernel 0.096 / 0.165. A second (packed
# bf16 compares with the bound, keys built only for the few pairs that pass) took 0.075 / 0.114 ms, 0.16x
# / 0.32x the GEMM (H100, 9a190cf), and the version now in group_max_select_kernel.cuh (each lane's passing
# pairs in one loop, the sort in registers by shuffles) 0.051 / 0.080 ms where the second took 0.071 / 0.108 in
# the same run (H100, b5e6806; GPU tests and compute-sanitizer's memcheck and racecheck clean): the tuner
# takes it at both shapes.
SELECT_ROUTE = os.environ.get("FASTSAE_CUTLASS_SELECT", "1") != "0"
# How that select raises its bound where its candidate buffer fills (its `raise_by_count` argument): by
# counting the buffer's keys at or above each trial bit, over values, then features where many tie (about
# 700 instructions a lane), instead of sorting the buffer (about 6,000; run on an H100, 6b4640f). The
# buffer fills at large k over few groups: about 690 entries of a Gaussian row reach the first bound at
# AF3's shape with k = 128, where the encode took 2.07x the GEMM. Compiled for sm_90a and checked by an
# emulation, not yet run on a GPU: off unless FASTSAE_CUTLASS_SELECT_RAISE_BY_COUNT=1 (read at import).
SELECT_RAISE_BY_COUNT = os.environ.get("FASTSAE_CUTLASS_SELECT_RAISE_BY_COUNT", "0") == "1"
# The filter route over gemm_bias_filter: off unless FASTSAE_CUTLASS_FILTER=1 (read at import); its GEMM
# alone took 1.04 / 1.21 ms against the Triton filter GEMM's 0.75 at GPT-2 / AF3 on an H100 (7e44a77).
FILTER_ROUTE = os.environ.get("FASTSAE_CUTLASS_FILTER", "0") == "1"

_loaded: list[bool] = []


def available() -> bool:
    """Whether the CUTLASS extension was built and loads (once per process)."""
    if not _loaded:
        spec = importlib.util.find_spec("fastsae._cutlass")
        if spec is not None and spec.origin is not None:
            torch.ops.load_library(spec.origin)
        _loaded.append(spec is not None and spec.origin is not None)
    return _loaded[0]


def takes(x: Tensor, W_enc: Tensor) -> bool:
    """Whether the op takes the encode of `x` by `W_enc`: CUDA, bf16 weights contiguous, d and F multiples
    of 8 (what the kernel checks, so that a route over it is offered only where it runs)."""
    d, F = W_enc.shape
    return x.is_cuda and W_enc.dtype == torch.bfloat16 and W_enc.is_contiguous() and d % 8 == 0 and F % 8 == 0


def gemm_bias_group_max(xc: Tensor, W_enc: Tensor, b_enc: Tensor, variant: int = 0) -> tuple[Tensor, Tensor]:
    """(pre [B, F] bf16, maxima [ceil(F / group), B rounded up to tile_rows] fp32, or [tiles, 2, rows]
    where the variant's tile holds two groups) by VARIANTS[variant], for bf16 CUDA operands xc [B, d],
    W_enc [d, F] and b_enc [F], d and F multiples of 8 (the kernel checks each)."""
    _require("gemm_bias_group_max")
    _check_gemm_operands("gemm_bias_group_max", xc, W_enc, b_enc)
    if not 0 <= variant < len(VARIANTS):
        raise ValueError(f"gemm_bias_group_max: variant must be in [0, {len(VARIANTS)}), got {variant}")
    return torch.ops.fastsae_cutlass.gemm_bias_group_max(xc, W_enc, b_enc, variant)


def maxima_by_group(maxima: Tensor, n_groups: int) -> Tensor:
    """`gemm_bias_group_max`'s maxima as [n_groups, rows], group g of a row at [g] (a copy where the
    kernel left them as [tiles, groups a tile, rows]), as `reference.group_maxima` lays them out."""
    return maxima if maxima.dim() == 2 else maxima.reshape(-1, maxima.shape[-1])[:n_groups]


def select_topk_group_max(
    pre: Tensor,
    maxima: Tensor,
    group: int,
    k: int,
    vals: Tensor,
    idx: Tensor,
    flags: Tensor,
    raise_by_count: bool = False,
) -> None:
    """Writes each row's k largest entries of pre [rows, F] (bf16, CUDA, rows contiguous and 16-byte
    aligned) into vals [rows, k] (post-ReLU, bf16 or fp32) and idx [rows, k] (int32), largest first, as
    `reference.topk_activation` selects them with ties to the larger feature, from `maxima` [ceil(F /
    group), >= rows] or [tiles, groups a tile, >= rows] (fp32: `gemm_bias_group_max`'s for that pre);
    flags [rows] (int8) gets 1 for each row it left unwritten, for the caller to recompute, and 0 for the
    others. `raise_by_count`: the kernel's version that raises its bound over a full candidate buffer by
    counting (SELECT_RAISE_BY_COUNT)."""
    _require("select_topk_group_max")
    op = "select_topk_group_max"
    _check_operand(op, "pre", pre, torch.bfloat16, 2, pre.device, rows_contiguous=True)
    rows, F = pre.shape
    if pre.stride(0) % 8 or pre.data_ptr() % 16 or F % 8:
        raise ValueError(f"{op}: pre's rows must start 16-byte aligned and hold a multiple of 8 features")
    if group not in SELECT_GROUPS:
        raise ValueError(f"{op}: group must be one of {SELECT_GROUPS}, got {group}")
    n_groups = -(-F // group)
    if n_groups > SELECT_MAX_GROUPS:
        raise ValueError(f"{op}: at most {SELECT_MAX_GROUPS} groups a row, got {n_groups}")
    if not 1 <= k <= min(SELECT_MAX_K, n_groups):
        raise ValueError(f"{op}: k must be in [1, min({SELECT_MAX_K}, groups = {n_groups})], got {k}")
    if maxima.dim() == 2:  # one group a tile
        maxima = maxima.unsqueeze(1)
    _check_operand(op, "maxima", maxima, torch.float32, 3, pre.device, rows_contiguous=True)
    per_tile = maxima.shape[1]
    if per_tile not in (1, 2) or maxima.shape[0] != -(-n_groups // per_tile) or maxima.shape[2] < rows:
        raise ValueError(
            f"{op}: maxima must be [{n_groups}, >= {rows}] or [tiles, 2, >= {rows}] with 2 * tiles >= "
            f"{n_groups}, got {list(maxima.shape)}"
        )
    if vals.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"{op}: vals must be bfloat16 or float32, got {vals.dtype}")
    _check_operand(op, "vals", vals, vals.dtype, 2, pre.device, rows_contiguous=True)
    _check_operand(op, "idx", idx, torch.int32, 2, pre.device, rows_contiguous=True)
    for name, t in (("vals", vals), ("idx", idx)):
        if tuple(t.shape) != (rows, k):
            raise ValueError(f"{op}: {name} must be [{rows}, {k}], got {list(t.shape)}")
    _check_operand(op, "flags", flags, torch.int8, 1, pre.device)
    if flags.shape[0] != rows:
        raise ValueError(f"{op}: flags must have pre's {rows} rows, got {flags.shape[0]}")
    torch.ops.fastsae_cutlass.select_topk_group_max(pre, maxima, group, k, vals, idx, flags, raise_by_count)


def gemm_bias_filter(
    xc: Tensor, W_enc: Tensor, b_enc: Tensor, tau: Tensor, count: Tensor, key_buf: Tensor, variant: int = 0
) -> None:
    """Appends each entry of xc @ W_enc + b_enc (fp32) above tau[row] to key_buf [B, cap] (int64 keys),
    counting in count (int32 [B], which the caller zeroes) by FILTER_VARIANTS[variant]; operands as
    gemm_bias_group_max's, tau fp32 [B]."""
    _require("gemm_bias_filter")
    _check_gemm_operands("gemm_bias_filter", xc, W_enc, b_enc)
    B = xc.shape[0]
    for name, t, dtype, dim in (("tau", tau, torch.float32, 1), ("count", count, torch.int32, 1),
                                ("key_buf", key_buf, torch.int64, 2)):  # fmt: skip
        _check_operand("gemm_bias_filter", name, t, dtype, dim, xc.device)
        if t.shape[0] != B:
            raise ValueError(f"gemm_bias_filter: {name} must have xc's {B} rows, got {t.shape[0]}")
    if not 1 <= key_buf.shape[1] < 2**31:
        raise ValueError(f"gemm_bias_filter: key_buf must have 1 to 2^31 - 1 slots a row, got {key_buf.shape[1]}")
    if not 0 <= variant < len(FILTER_VARIANTS):
        raise ValueError(f"gemm_bias_filter: variant must be in [0, {len(FILTER_VARIANTS)}), got {variant}")
    torch.ops.fastsae_cutlass.gemm_bias_filter(xc, W_enc, b_enc, tau, count, key_buf, variant)


# The kernels check their operands too (csrc/cutlass/ops.cu), but a failed check there crashed the process
# on the H100 (a segmentation fault at the second failed check in a process, 40eb821): here they are
# checked before the op is called.
def _check_gemm_operands(op: str, xc: Tensor, W_enc: Tensor, b_enc: Tensor) -> None:
    """xc [B, d], W_enc [d, F] and b_enc [F]: bf16, contiguous, on xc's CUDA device; d and F multiples of 8
    (16-byte rows for TMA); B, d, F in [1, 2^31)."""
    for name, t, dim in (("xc", xc, 2), ("W_enc", W_enc, 2), ("b_enc", b_enc, 1)):
        _check_operand(op, name, t, torch.bfloat16, dim, xc.device)
    (B, d), F = xc.shape, W_enc.shape[1]
    if W_enc.shape[0] != d:
        raise ValueError(f"{op}: W_enc must be [{d}, F], got {list(W_enc.shape)}")
    if b_enc.shape[0] != F:
        raise ValueError(f"{op}: b_enc must have {F} entries, got {b_enc.shape[0]}")
    if d % 8 or F % 8:
        raise ValueError(f"{op}: d and F must be multiples of 8 (16-byte rows for TMA), got d = {d}, F = {F}")
    if not (1 <= B < 2**31 and 1 <= d < 2**31 and 1 <= F < 2**31):
        raise ValueError(f"{op}: B, d and F must be in [1, 2^31), got {B}, {d}, {F}")


def _check_operand(
    op: str, name: str, t: Tensor, dtype: torch.dtype, dim: int, device: torch.device, rows_contiguous: bool = False
) -> None:
    """`t` is a CUDA tensor of `dtype` with `dim` dimensions on `device`, contiguous (or, with
    `rows_contiguous`, each row contiguous: a view of a chunk of rows)."""
    if not t.is_cuda:
        raise ValueError(f"{op}: {name} must be a CUDA tensor, got {t.device}")
    if t.device != device:
        raise ValueError(f"{op}: {name} must be on xc's device {device}, got {t.device}")
    if t.dtype != dtype:
        raise ValueError(f"{op}: {name} must be {dtype}, got {t.dtype}")
    if t.dim() != dim:
        raise ValueError(f"{op}: {name} must have {dim} dimensions, got {list(t.shape)}")
    if rows_contiguous:
        if t.stride(-1) != 1:
            raise ValueError(f"{op}: {name}'s rows must be contiguous")
    elif not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous")


def _require(op: str) -> None:
    if not available():
        raise RuntimeError(
            f"{op} needs fastsae's CUTLASS extension, which this install did not build: install "
            "the `cutlass` extra (nvidia-cutlass) and rebuild fastsae with a CUDA torch"
        )
