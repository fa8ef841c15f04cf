"""Encoders: the fused TopK, ReLU and BatchTopK encode against eager PyTorch as SAE libraries write it,
its torch.compile, the cuBLAS GEMM x @ W_enc alone (the floor), and sparsify's encoder when installed.

bf16 weights and activations at the benchmark shapes (harness.SHAPES) plus a sweep over F and k. Every
provider's output is checked against the fp32 reference on the first rows before anything is timed.
"""

from __future__ import annotations

from functools import partial
from unittest import mock

import torch

from fastsae import functional as F
from fastsae import reference
from fastsae.ops import batch_filter, cutlass_gemm, filter, launch
from fastsae.testing import assert_batchtopk_matches, assert_close, assert_topk_matches

from .harness import SHAPES, Recorder, each_shape, measure, optional_sparsify, selected, selected_shapes, sweep_name

CHECK_ROWS = 256
ROUNDING_BAND = (
    0.05  # bf16 rounding of pre-activations of a few units: codes this close to the BatchTopK threshold may swap
)
# (d, F, B, k) beyond the three shapes: k from 8 to 512 at GPT-2 width and k = 64 / 128 at the AF3 and
# Llama-8B shapes, F from 8192 to 262144, B from 1024 to 65536, d from 384 to 4096 (a subset of that
# grid: every point costs tuning and three timings).
SWEEP_DIMS = [(768, 24576, 8192, k) for k in (8, 64, 128, 512)] + [
    (384, 16384, 16384, 64),
    (384, 16384, 16384, 128),
    (4096, 131072, 4096, 128),
    (768, 8192, 8192, 32),
    (768, 131072, 8192, 32),
    (768, 65536, 1024, 32),
    (384, 16384, 65536, 32),
    (4096, 65536, 8192, 128),
    (4096, 262144, 1024, 64),
]
EXTRA_SHAPES = {sweep_name(*dims): dims for dims in SWEEP_DIMS}  # by name, as bench.run --shapes selects them


def _torch_topk(x, W_enc, b_enc, b_dec, k):
    """What SAE libraries run: the dense pre-activation, ReLU, torch.topk."""
    pre = (x - b_dec) @ W_enc + b_enc
    return pre.relu().topk(k, dim=-1)


def _torch_batchtopk(x, W_enc, b_enc, b_dec, k):
    """BatchTopK as SAELens and dictionary_learning compute it: the dense post-ReLU codes, the B * k
    largest of the whole batch kept, the rest zero."""
    acts = ((x - b_dec) @ W_enc + b_enc).relu()
    flat = acts.flatten()
    top = flat.topk(k * x.shape[0])
    return torch.zeros_like(flat).scatter(0, top.indices, top.values).view_as(acts)


def _torch_relu(x, W_enc, b_enc, b_dec):
    return ((x - b_dec) @ W_enc + b_enc).relu()


def _torch_topk_positive_counts(x, W_enc, b_enc, b_dec, k):
    """The TopK codes and per-feature positive counts from one dense pre-activation."""
    pre = (x - b_dec) @ W_enc + b_enc
    vals, idx = pre.relu().topk(k, dim=-1)
    return vals, idx, (pre > 0).sum(dim=0)


def _two_pass_positive_counts(x, W_enc, b_enc, b_dec, k):
    """fastsae without the fused counts: the TopK encode, then a dense ReLU encode to count."""
    codes = F.encode_topk(x, W_enc, b_enc, b_dec, k)
    return codes.vals, codes.idx, F.fire_counts_dense(F.encode_relu(x, W_enc, b_enc, b_dec))


def _gemm(x, W_enc):
    return x @ W_enc


def _encode_topk_raising_by_count(x, W_enc, b_enc, b_dec, k):
    """fastsae's TopK encode with the warp select raising its bound by counting
    (`cutlass_gemm.SELECT_RAISE_BY_COUNT`, read at each call) where its buffer fills, for a comparison
    in the same process as the default: same tuned route, only the select's cut differs."""
    with mock.patch.object(cutlass_gemm, "SELECT_RAISE_BY_COUNT", True):
        return F.encode_topk(x, W_enc, b_enc, b_dec, k)


def _weights(d: int, n_features: int):
    """An initialised SAE's encoder: unit-norm decoder rows, W_enc = W_dec^T, small biases."""
    W_dec = reference.normalize_decoder_rows(torch.randn(n_features, d, device="cuda"))
    W_enc = W_dec.T.contiguous().bfloat16()
    b_enc = (0.01 * torch.randn(n_features, device="cuda")).bfloat16()
    b_dec = (0.1 * torch.randn(d, device="cuda")).bfloat16()
    return W_enc, b_enc, b_dec


def _bench_topk(recorder: Recorder, shape: str, d: int, n_features: int, n_rows: int, k: int, full: bool, sparsify):
    x = torch.randn(n_rows, d, device="cuda").bfloat16()
    W_enc, b_enc, b_dec = _weights(d, n_features)
    pre = reference.pre_activation(x[:CHECK_ROWS], W_enc, b_enc, b_dec)  # fp32
    providers = {
        "fastsae": partial(F.encode_topk, x, W_enc, b_enc, b_dec, k),
        "torch": partial(_torch_topk, x, W_enc, b_enc, b_dec, k),
    }
    if cutlass_gemm.available() and not cutlass_gemm.SELECT_RAISE_BY_COUNT:
        providers["fastsae_raise_by_count"] = partial(_encode_topk_raising_by_count, x, W_enc, b_enc, b_dec, k)
    if full:
        providers["compile"] = partial(torch.compile(_torch_topk), x, W_enc, b_enc, b_dec, k)
        if sparsify is not None:
            coder = sparsify.SparseCoder(d, sparsify.SparseCoderConfig(num_latents=n_features, k=k), device="cuda")
            coder = coder.to(torch.bfloat16)
            with torch.no_grad():
                coder.encoder.weight.copy_(W_enc.T)
                coder.encoder.bias.copy_(b_enc)
                coder.b_dec.copy_(b_dec)
            providers["sparsify"] = partial(coder.encode, x)
    providers = selected(providers)
    for name, fn in providers.items():
        vals, idx = fn()[:2]
        assert_topk_matches(vals[:CHECK_ROWS], idx[:CHECK_ROWS], pre, k, 2e-2, f"encode_topk {shape} {name}")
    print(f"encode_topk {shape}: tuned routes {launch.tuned_choices('encode_topk', d, n_features)}")
    gemm_expected = x[:CHECK_ROWS].float() @ W_enc.float()
    assert_close(_gemm(x, W_enc)[:CHECK_ROWS].float(), gemm_expected, 2e-2, f"encode_topk {shape} cublas_gemm")
    for name, fn in providers.items():
        timing = measure(fn)
        if name == "fastsae":  # never the whole [B, F] pre-activation: at most one dense chunk of it
            dense_mb = n_rows * n_features * 2 / 2**20
            # the dense route's chunk (fp32 at most) and its topk
            chunk_mb = 2 * filter.PRE_ACTIVATION_CHUNK * 4 / 2**20
            bound = max(0.5 * dense_mb, chunk_mb)
            assert timing["peak_mem_mb"] < bound, f"fastsae encode_topk {shape}: {timing['peak_mem_mb']} MB"
        recorder.record("encode_topk", shape, name, timing)
    recorder.record("encode_topk", shape, "cublas_gemm", measure(partial(_gemm, x, W_enc)))


def _bench_relu(recorder: Recorder, shape: str, d: int, n_features: int, n_rows: int):
    x = torch.randn(n_rows, d, device="cuda").bfloat16()
    W_enc, b_enc, b_dec = _weights(d, n_features)
    expected = reference.encode_relu(x[:CHECK_ROWS], W_enc, b_enc, b_dec).float()
    providers = {
        "fastsae": partial(F.encode_relu, x, W_enc, b_enc, b_dec),
        "torch": partial(_torch_relu, x, W_enc, b_enc, b_dec),
        "compile": partial(torch.compile(_torch_relu), x, W_enc, b_enc, b_dec),
    }
    providers = selected(providers)
    for name, fn in providers.items():
        assert_close(fn()[:CHECK_ROWS].float(), expected, 2e-2, f"encode_relu {shape} {name}")
    for name, fn in providers.items():
        recorder.record("encode_relu", shape, name, measure(fn))
    recorder.record("encode_relu", shape, "cublas_gemm", measure(partial(_gemm, x, W_enc)))


def _dense_route_batchtopk(x, W_enc, b_enc, b_dec, k):
    return reference.batch_topk(F.encode_relu(x, W_enc, b_enc, b_dec), k)


def _bench_batchtopk(recorder: Recorder, shape: str, d: int, n_features: int, n_rows: int, k: int):
    """BatchTopK codes (the batch's B * k largest): the whole batch decides each code, so the check
    covers every row."""
    x = torch.randn(n_rows, d, device="cuda").bfloat16()
    W_enc, b_enc, b_dec = _weights(d, n_features)
    # A training step's estimate of its batch threshold: the threshold of another batch drawn the same way
    # (a BatchTopK SAE keeps a running one; fastsae_threshold filters by it).
    estimate = reference.pre_activation(torch.randn_like(x), W_enc, b_enc, b_dec).flatten().topk(n_rows * k)
    estimate = estimate.values[-1].float()
    assert batch_filter.threshold_first_codes(x, W_enc, b_enc, b_dec, k, estimate) is not None, (
        f"encode_batchtopk {shape}: the threshold-first route handed the batch back"
    )
    pre = reference.pre_activation(x, W_enc, b_enc, b_dec)
    providers = {
        "fastsae": partial(F.encode_batchtopk, x, W_enc, b_enc, b_dec, k),
        # The selection's dense route (FASTSAE_BATCHTOPK=dense: torch.topk over the batch), beside the default.
        "fastsae_dense": partial(_dense_route_batchtopk, x, W_enc, b_enc, b_dec, k),
        # Sparse codes: each row's 4k candidates from the TopK encode, the batch's B * k largest among them.
        "fastsae_sparse": partial(F.encode_batchtopk_sparse, x, W_enc, b_enc, b_dec, k),
        # Sparse codes, threshold-first: one filtering pass against the estimate, then an exact selection.
        "fastsae_threshold": partial(F.encode_batchtopk_sparse, x, W_enc, b_enc, b_dec, k, estimate),
        "torch": partial(_torch_batchtopk, x, W_enc, b_enc, b_dec, k),
    }
    providers = selected(providers)
    for name, fn in providers.items():  # bf16 rounding may swap the codes at the batch's threshold
        codes = fn()
        if isinstance(codes, F.TopKCodes):
            codes = reference.scatter_codes(codes.vals, codes.idx, n_features)
        assert_batchtopk_matches(codes, pre, k, ROUNDING_BAND, f"encode_batchtopk {shape} {name}")
        del codes
    del pre
    for name, fn in providers.items():
        recorder.record("encode_batchtopk", shape, name, measure(fn))
    recorder.record("encode_batchtopk", shape, "cublas_gemm", measure(partial(_gemm, x, W_enc)))


def _bench_positive_counts(recorder: Recorder, shape: str, d: int, n_features: int, n_rows: int, k: int):
    """TopK codes plus per-feature counts of positive pre-activations (what measure_death needs)."""
    x = torch.randn(n_rows, d, device="cuda").bfloat16()
    W_enc, b_enc, b_dec = _weights(d, n_features)
    pre = reference.pre_activation(x, W_enc, b_enc, b_dec)  # fp32, all rows: the counts cover the batch
    expected_counts = (pre > 0).sum(dim=0)
    pre = pre[:CHECK_ROWS]
    providers = {
        "fastsae": partial(F.encode_topk_positive_counts, x, W_enc, b_enc, b_dec, k),
        "fastsae_two_pass": partial(_two_pass_positive_counts, x, W_enc, b_enc, b_dec, k),
        "torch": partial(_torch_topk_positive_counts, x, W_enc, b_enc, b_dec, k),
    }
    what = f"encode_topk_positive_counts {shape}"
    providers = selected(providers)
    for name, fn in providers.items():
        vals, idx, counts = fn()
        assert_topk_matches(vals[:CHECK_ROWS], idx[:CHECK_ROWS], pre, k, 2e-2, f"{what} {name}")
        # bf16 pre-activations within rounding of 0 (about 0.3% of them) may count either way.
        assert_close(counts.double(), expected_counts.double(), 1e-2, f"{what} {name} counts")
    del pre, expected_counts
    for name, fn in providers.items():
        recorder.record("encode_topk_positive_counts", shape, name, measure(fn))
    recorder.record("encode_topk_positive_counts", shape, "cublas_gemm", measure(partial(_gemm, x, W_enc)))


def run(recorder: Recorder) -> None:
    """TopK at the three shapes and over the sweep first (the rows an interrupted run should keep),
    then the ReLU and BatchTopK encodes and the positive counts."""
    sparsify = optional_sparsify()
    for shape, (d, n_features, n_rows, k) in selected_shapes(SHAPES).items():
        with each_shape(shape):
            _bench_topk(recorder, shape, d, n_features, n_rows, k, full=True, sparsify=sparsify)
    for shape, (d, n_features, n_rows, k) in selected_shapes(EXTRA_SHAPES).items():
        with each_shape(shape):
            _bench_topk(recorder, shape, d, n_features, n_rows, k, full=False, sparsify=None)
    for shape, (d, n_features, n_rows, k) in selected_shapes(SHAPES).items():
        with each_shape(shape):
            _bench_relu(recorder, shape, d, n_features, n_rows)
            _bench_batchtopk(recorder, shape, d, n_features, n_rows, k)
            _bench_positive_counts(recorder, shape, d, n_features, n_rows, k)
