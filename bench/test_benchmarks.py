"""The kernel benchmarks as pytest-benchmark tests: each public op (and the training step) against the
PyTorch a user would otherwise write, output checked before it is timed.

    python -m pytest bench --benchmark-only --benchmark-json=bench/results/pytest-benchmark.json   (GPU)
    python -m pytest bench --benchmark-disable -q        (CPU: every benchmark runs once, as a smoke test)

On a GPU they run at the benchmark shapes (harness.SHAPES) in bf16 and synchronise inside the timed
call; on a CPU at one tiny shape in fp32, where fastsae's ops run their PyTorch reference. `python -m
bench.run` remains the harness whose CSV and plots bench/results holds (do_bench medians, peak memory).
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

import fastsae
from fastsae import functional as F
from fastsae import reference
from fastsae.testing import assert_close, assert_topk_matches

from .bench_decode import _embedding_bag
from .bench_encode import _torch_batchtopk, _torch_relu, _torch_topk
from .harness import SHAPES, sae_train_step

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
TOLERANCE = 2e-2 if DEVICE == "cuda" else 1e-5
BENCH_SHAPES = SHAPES if DEVICE == "cuda" else {"tiny": (32, 256, 64, 8)}  # (d, F, B, k)


def _timed(fn):
    """`fn` as one timed call: on a GPU it waits for the kernels, so the wall clock measures them."""

    def call():
        out = fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    return call


def _problem(shape: str):
    d, n_features, n_rows, k = BENCH_SHAPES[shape]
    W_dec = reference.normalize_decoder_rows(torch.randn(n_features, d, device=DEVICE))
    x = (torch.randn(n_rows, d, device=DEVICE) + 0.5).to(DTYPE)
    b_enc = (0.01 * torch.randn(n_features, device=DEVICE)).to(DTYPE)
    b_dec = (0.1 * torch.randn(d, device=DEVICE)).to(DTYPE)
    return x, W_dec.T.contiguous().to(DTYPE), b_enc, b_dec, W_dec.to(DTYPE), k


@pytest.mark.parametrize("provider", ["fastsae", "torch"])
@pytest.mark.parametrize("shape", list(BENCH_SHAPES))
def test_encode_topk(benchmark, shape, provider):
    x, W_enc, b_enc, b_dec, _, k = _problem(shape)
    fn = {"fastsae": partial(F.encode_topk, x, W_enc, b_enc, b_dec, k),
          "torch": partial(_torch_topk, x, W_enc, b_enc, b_dec, k)}  # fmt: skip
    vals, idx = fn[provider]()[:2]
    assert_topk_matches(vals[:256], idx[:256], reference.pre_activation(x[:256], W_enc, b_enc, b_dec), k, TOLERANCE)
    benchmark.group = f"encode_topk {shape}"
    benchmark(_timed(fn[provider]))


@pytest.mark.parametrize("provider", ["fastsae", "torch"])
@pytest.mark.parametrize("op", ["encode_relu", "encode_batchtopk"])
@pytest.mark.parametrize("shape", list(BENCH_SHAPES))
def test_dense_encodes(benchmark, shape, op, provider):
    x, W_enc, b_enc, b_dec, _, k = _problem(shape)
    pre = reference.pre_activation(x, W_enc, b_enc, b_dec).relu()
    if op == "encode_relu":
        fn = {"fastsae": partial(F.encode_relu, x, W_enc, b_enc, b_dec),
              "torch": partial(_torch_relu, x, W_enc, b_enc, b_dec)}  # fmt: skip
        expected = pre
    else:
        fn = {"fastsae": partial(F.encode_batchtopk, x, W_enc, b_enc, b_dec, k),
              "torch": partial(_torch_batchtopk, x, W_enc, b_enc, b_dec, k)}  # fmt: skip
        expected = reference.batch_topk(pre, k)
    assert_close(fn[provider]().float(), expected, TOLERANCE, f"{op} {shape} {provider}")
    benchmark.group = f"{op} {shape}"
    benchmark(_timed(fn[provider]))


@pytest.mark.parametrize("provider", ["fastsae", "embedding_bag"])
@pytest.mark.parametrize("shape", list(BENCH_SHAPES))
def test_decode_sparse(benchmark, shape, provider):
    _, _, _, _, W_dec, k = _problem(shape)
    n_features, n_rows = W_dec.shape[0], BENCH_SHAPES[shape][2]
    vals = torch.rand(n_rows, k, device=DEVICE).to(DTYPE)
    idx = torch.randint(0, n_features, (n_rows, k), device=DEVICE, dtype=torch.int32)
    fn = {"fastsae": partial(F.decode_sparse, vals, idx, W_dec),
          "embedding_bag": partial(_embedding_bag, vals, idx, W_dec)}  # fmt: skip
    assert_close(fn[provider]().float(), reference.decode_sparse(vals, idx, W_dec).float(), TOLERANCE, "decode")
    benchmark.group = f"decode_sparse {shape}"
    benchmark(_timed(fn[provider]))


@pytest.mark.parametrize("provider", ["fastsae", "bincount"])
@pytest.mark.parametrize("shape", list(BENCH_SHAPES))
def test_fire_counts(benchmark, shape, provider):
    _, n_features, n_rows, k = BENCH_SHAPES[shape]
    idx = torch.randint(0, n_features, (n_rows, k), device=DEVICE, dtype=torch.int32)
    fn = {"fastsae": partial(F.fire_counts, idx, n_features),
          "bincount": lambda: torch.bincount(idx.flatten(), minlength=n_features)}  # fmt: skip
    assert torch.equal(fn[provider](), torch.bincount(idx.flatten(), minlength=n_features))
    benchmark.group = f"fire_counts {shape}"
    benchmark(_timed(fn[provider]))


@pytest.mark.parametrize("shape", list(BENCH_SHAPES))
def test_train_step(benchmark, shape):
    """fastsae's module through one README training step (forward, backward, Adam, decoder constraint)."""
    x, *_ = _problem(shape)
    d, n_features, _, k = BENCH_SHAPES[shape]
    dtype = "bfloat16" if DEVICE == "cuda" else "float32"
    sae = fastsae.SparseAutoencoder(fastsae.SAEConfig(d_in=d, n_features=n_features, k=k, dtype=dtype,
                                                      check_finite=False)).to(DEVICE).initialize(x)  # fmt: skip
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4)
    first = float(sae_train_step(sae, optimizer, x).fvu.detach())
    assert 0 <= first < 2, f"train_step {shape}: FVU {first}"
    benchmark.group = f"train_step {shape}"
    benchmark(_timed(partial(sae_train_step, sae, optimizer, x)))
