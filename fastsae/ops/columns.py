"""Codes concentrated on few features go through dense GEMMs over just those features.

AuxK codes are the extreme case: k_aux = d/2 codes per token (384 at GPT-2 width, 2048 at Llama-8B)
chosen among the few features that are dead (5% of F, say). Per code, the sparse kernels gather or
atomically add one d-long row, B * k_aux * d operations that cost more than the encoder GEMM itself
(measured on the H200 at the GPT-2 shape: the atomic per-feature sums took 2.4 ms per call against a
0.5 ms encoder GEMM). Over the n distinct features the codes touch, a dense [B, n] code matrix is at
least 1/8 full, and cuBLAS does the same sums as three GEMMs of width n.

`concentrated_columns` decides and returns the features; the decode and per-feature-sum launchers
call it first and take the dense path when it returns something.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Below this many codes per token the sparse kernels' work is small, and the check (a scan of the
# indices and a host sync for n) would cost more than it could save.
MIN_CODES_PER_TOKEN = 128
# Dense over the touched features when the [B, n] code matrix is at least this full.
MIN_DENSITY = 1 / 8


@dataclass
class Columns:
    """The n distinct features that codes touch (ascending) and each feature's position among them."""

    features: Tensor  # [n] int64
    position: Tensor  # [F] int64; -1 for features no code touches

    def dense_codes(self, vals: Tensor, idx: Tensor, dtype: torch.dtype) -> Tensor:
        """The codes as a dense [B, n] matrix. A feature appears at most once among a token's codes
        that fired; repeats (AuxK slots without a dead candidate: value 0 at index 0) add zeros. The
        flat 1-D scatter_add is deterministic under torch.use_deterministic_algorithms."""
        B = vals.shape[0]
        n = self.features.shape[0]
        flat = self.position[idx.long()] + n * torch.arange(B, device=idx.device)[:, None]
        codes = torch.zeros(B * n, dtype=dtype, device=vals.device)
        return codes.scatter_add_(0, flat.flatten(), vals.to(dtype).flatten()).view(B, n)

    def gather(self, dense: Tensor, idx: Tensor) -> Tensor:
        """dense [B, n] read back at each code's feature: [B, K]."""
        return dense.gather(1, self.position[idx.long()])

    @staticmethod
    def feature_sums(rows: Tensor, codes: Tensor, center: Tensor | None) -> tuple[Tensor, Tensor]:
        """`scatter.feature_sums` restricted to these features, from their fp32 `dense_codes`:
        ([n, d], [n]) in fp32, one GEMM in the rows' dtype (fp32 accumulation). Rows are centred in
        fp32 before the cast."""
        centered = rows.float() - center.float() if center is not None else rows
        sums = codes.t().to(rows.dtype) @ centered.to(rows.dtype)
        return sums.float(), codes.sum(dim=0)


def concentrated_columns(idx: Tensor, n_features: int) -> Columns | None:
    """The features that the codes idx [B, K] touch, when few enough for the dense path (see the
    module docstring), else None. Synchronises with the device once (n is a tensor size), so it
    answers None while a CUDA graph is being captured; an index outside [0, F) raises here, where the
    sparse kernels would skip it."""
    B, K = idx.shape
    if K < MIN_CODES_PER_TOKEN or B == 0:
        return None
    if idx.is_cuda and torch.cuda.is_current_stream_capturing():
        return None  # a CUDA graph being captured cannot hand n to the host: the sparse kernels run
    flat = idx.flatten().long()
    used = torch.zeros(n_features, dtype=torch.bool, device=idx.device)
    used[flat.clamp(0, n_features - 1)] = True
    low, high = flat.aminmax()
    n, low, high = torch.stack([used.sum(), low, high]).tolist()
    if low < 0 or high >= n_features:
        raise ValueError(f"idx holds feature indices in [{low}, {high}], outside [0, {n_features})")
    if n * MIN_DENSITY > K:
        return None
    position = used.long().cumsum(0) - 1
    return Columns(features=used.nonzero().squeeze(1), position=position.masked_fill_(~used, -1))
