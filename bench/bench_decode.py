"""Sparse decode: fastsae's kernel against F.embedding_bag (what sparsify's eager path and most users
call), a gather-and-sum in eager PyTorch, and sparsify's Triton decoder when installed.

bf16 codes and decoder at the benchmark shapes (harness.SHAPES) (B tokens, k codes each, W_dec [F, d]).
Outputs are checked against the fp32 reference before timing.
"""

from __future__ import annotations

from functools import partial

import torch

from fastsae import functional as F
from fastsae import reference
from fastsae.testing import assert_close

from .harness import SHAPES, Recorder, each_shape, measure, optional_sparsify, selected, selected_shapes


def _gather_sum(vals, idx, W_dec):
    return (W_dec[idx.long()] * vals[..., None]).sum(1)


def _embedding_bag(vals, idx, W_dec):
    return torch.nn.functional.embedding_bag(idx.long(), W_dec, per_sample_weights=vals, mode="sum")


EXTRA_SHAPES: dict = {}  # no shapes beyond harness.SHAPES


def _bench_shape(recorder: Recorder, shape: str, d: int, n_features: int, n_rows: int, k: int, sparsify) -> None:
    """The sparse decode's rows at one shape (`run`)."""
    W_dec = reference.normalize_decoder_rows(torch.randn(n_features, d, device="cuda")).bfloat16()
    vals = torch.rand(n_rows, k, device="cuda").bfloat16()
    idx = torch.randint(0, n_features, (n_rows, k), device="cuda", dtype=torch.int32)
    expected = reference.decode_sparse(vals, idx, W_dec).float()
    providers = {
        "fastsae": partial(F.decode_sparse, vals, idx, W_dec),
        "embedding_bag": partial(_embedding_bag, vals, idx, W_dec),
        "torch": partial(_gather_sum, vals, idx, W_dec),
    }
    if sparsify is not None:
        providers["sparsify"] = partial(sparsify.utils.triton_decode, idx.long(), vals, W_dec.mT)
    providers = selected(providers)
    for name, fn in providers.items():
        assert_close(fn().float(), expected, 2e-2, f"decode_sparse {shape} {name}")
    for name, fn in providers.items():
        recorder.record("decode_sparse", shape, name, measure(fn))


def run(recorder: Recorder) -> None:
    sparsify = optional_sparsify()
    for shape, (d, n_features, n_rows, k) in selected_shapes(SHAPES).items():
        with each_shape(shape):
            _bench_shape(recorder, shape, d, n_features, n_rows, k, sparsify)
