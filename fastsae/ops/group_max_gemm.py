"""Experimental: the encoder GEMM with each row's group maxima from its epilogue (CUTLASS, Hopper only).

    pre, maxima = gemm_bias_group_max(xc, W_enc, b_enc)      (`reference.gemm_bias_group_max`)

pre is what cuBLAS's addmm writes (xc @ W_enc + b_enc rounded to bf16); maxima [ceil(F / GROUP),
ceil(B / 128) * 128] fp32 holds the maximum of every GROUP adjacent features of each row, computed in the
same epilogue from the rounded values. The TopK row filter (`filter.row_filter_topk`) reads the whole
pre-activation once for exactly those maxima before it reads the hot groups again; a GEMM that leaves
them costs the rest of the row's read. Triton GEMMs that did so (the pooled route, f5477b9) were slower
than cuBLAS by more than that read; this one is CUTLASS's TMA warp-specialised kernel with an epilogue
visitor tree (csrc/cutlass/group_max_gemm.cu), built only where CUTLASS's headers are found (setup.py,
the `cutlass` extra). Where it is built, the TopK encode's tuner also times the row filter over its
chunks and maxima (`filter.group_max_configs`: bf16 weights, no AuxK stream), so it is taken only where
it measures faster; `bench/bench_gemm.py` times the GEMM alone against cuBLAS's addmm.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

GROUP = 128  # features per group: the kernel's tile width (csrc/cutlass/group_max_gemm.cu)

_loaded: list[bool] = []


def available() -> bool:
    """Whether the CUTLASS extension was built and loads (once per process)."""
    if not _loaded:
        spec = importlib.util.find_spec("fastsae._cutlass")
        if spec is not None and spec.origin is not None:
            torch.ops.load_library(spec.origin)
        _loaded.append(spec is not None and spec.origin is not None)
    return _loaded[0]


def gemm_bias_group_max(xc: Tensor, W_enc: Tensor, b_enc: Tensor) -> tuple[Tensor, Tensor]:
    """(pre [B, F] bf16, maxima [ceil(F / GROUP), ceil(B / 128) * 128] fp32) for bf16 CUDA operands xc
    [B, d], W_enc [d, F] and b_enc [F], d and F multiples of 8 (the kernel checks each)."""
    if not available():
        raise RuntimeError(
            "gemm_bias_group_max needs fastsae's CUTLASS extension, which this install did not build: install "
            "the `cutlass` extra (nvidia-cutlass) and rebuild fastsae with a CUDA torch"
        )
    return torch.ops.fastsae_cutlass.gemm_bias_group_max(xc, W_enc, b_enc)
