"""Property tests: the Triton kernels against the fp64 reference on problems hypothesis draws (shapes
down to 1, k from 1 to F, fp32 and bf16, strided views and storage offsets, tied columns, magnitudes
from 1e-3 to 1e3, a large mean offset, every route of the per-feature sums). Each test runs twice: on CPU tensors (the
Triton kernels under the interpreter at tiny shapes, the C++ death statistics natively; in CI, with a
bounded number of examples) and on CUDA at full shapes (the GPU script). A failure prints the
falsifying example, its seed included, and a blob for @reproduce_failure."""

import contextlib
import os
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastsae import functional, reference
from fastsae.ops import batchtopk, decode, decoder, encode, scatter
from fastsae.testing import assert_batchtopk_matches

from .utils import assert_close, assert_topk_matches, check_encode_topk_backward

# FASTSAE_PROPERTY_EXAMPLES raises the budget for a longer search than CI's.
EXAMPLES = settings(
    max_examples=int(os.environ.get("FASTSAE_PROPERTY_EXAMPLES", "10")),
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
DTYPES = st.sampled_from([torch.float32, torch.bfloat16])
# The largest (B, d, F) drawn per device: the interpreter runs kernels element by element.
SIZES = {"cpu": (20, 40, 80), "cuda": (2048, 1024, 8192)}
DEVICES = [pytest.param("cpu", marks=pytest.mark.interpret), pytest.param("cuda", marks=pytest.mark.gpu)]
# The per-feature sums behind the weight gradients (fastsae/ops/scatter.py), drawn per example.
FEATURE_SUMS_ROUTES = st.sampled_from(["atomic", "blocked"])


@contextlib.contextmanager
def _feature_sums_route(route):
    previous, scatter.ROUTE = scatter.ROUTE, route
    try:
        yield
    finally:
        scatter.ROUTE = previous


@st.composite
def encoder_problems(draw, device):
    """(x, W_enc, b_enc, b_dec) on `device` in one dtype, possibly strided views starting one element
    into their storage (pointers off the 16-byte alignment the kernels specialise on), with tied columns."""
    max_B, max_d, max_F = SIZES[device]
    B, d, F = draw(st.integers(1, max_B)), draw(st.integers(1, max_d)), draw(st.integers(1, max_F))
    dtype, seed = draw(DTYPES), draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    offset = draw(st.sampled_from([0.0, 50.0]))  # a mean offset in every dimension, centred by b_dec
    step = draw(st.sampled_from([1, 2]))  # 2: every tensor is a view with stride 2
    shift = draw(st.sampled_from([0, 1]))  # 1: every tensor's storage offset is one element
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    x = scale * randn(B, d * step + shift) + offset
    W_enc = randn(d * step, F * step + shift)
    if draw(st.booleans()):  # groups of identical columns: exactly tied pre-activations
        W_enc = W_enc[:, torch.arange(F * step + shift) % max(1, F // 3)].contiguous()
    b_enc, b_dec = 0.1 * scale * randn(F * step + shift), offset + scale * randn(d * step + shift)
    x, W_enc, b_enc, b_dec = (t.to(device, dtype) for t in (x, W_enc, b_enc, b_dec))
    return x[:, shift::step], W_enc[::step, shift::step], b_enc[shift::step], b_dec[shift::step]


def _pre64(x, W_enc, b_enc, b_dec):
    return reference.pre_activation(*(t.double() for t in (x, W_enc, b_enc, b_dec)))


@pytest.mark.parametrize("device", DEVICES)
@EXAMPLES
@given(data=st.data())
def test_encode_topk_properties(device, data):
    """Every route of the TopK encode, with AuxK over a random dead mask, gives the reference's top k, and the
    backward of those codes the reference's gradients."""
    x, W_enc, b_enc, b_dec = data.draw(encoder_problems(device), label="problem")
    F = W_enc.shape[1]
    k = data.draw(st.integers(1, F), label="k")
    k_aux = data.draw(st.integers(0, F), label="k_aux")
    dead_fraction = data.draw(st.sampled_from([0.0, 0.05, 0.5, 1.0]), label="dead fraction")
    dead = torch.rand(F, generator=torch.Generator().manual_seed(F)) < dead_fraction
    dead = dead.to(device)
    routes = [r for r in encode.topk_routes(k, k_aux, F) if r[0] != "sweep"]
    route = data.draw(st.sampled_from(routes), label="route")
    vals, idx, aux_vals, aux_idx = encode.encode_topk(x, W_enc, b_enc, b_dec, k, k_aux, dead if k_aux else None, route)
    pre = _pre64(x, W_enc, b_enc, b_dec)
    assert_topk_matches(vals, idx, pre, k, x.dtype)
    if k_aux:
        assert_topk_matches(aux_vals, aux_idx, pre.masked_fill(~dead, float("-inf")), k_aux, x.dtype, "aux")
    # The output gradients come from a drawn seed, so that a failing example replays exactly.
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="gradient seed"))
    with _feature_sums_route(data.draw(FEATURE_SUMS_ROUTES, label="feature sums")):
        codes = (vals, idx, aux_vals, aux_idx)
        check_encode_topk_backward(x, W_enc, b_dec, codes, x.dtype, generator)  # every gradient


@pytest.mark.parametrize("device", DEVICES)
@EXAMPLES
@given(data=st.data(), jump=st.booleans())
def test_encode_relu_properties(device, data, jump):
    """The dense ReLU / JumpReLU encode equals the reference away from its threshold."""
    x, W_enc, b_enc, b_dec = data.draw(encoder_problems(device), label="problem")
    threshold = W_enc.new_ones(W_enc.shape[1]).uniform_(0, 1) if jump else None
    acts = encode.encode_relu(x, W_enc, b_enc, b_dec, threshold)
    pre = _pre64(x, W_enc, b_enc, b_dec)
    cut = pre.new_zeros(()) if threshold is None else threshold.double()
    expected = torch.where(pre > cut, pre, 0.0)
    # Within the dtype's rounding of the threshold a pre-activation may fall either side: leave those out.
    band = {torch.float32: 1e-4, torch.bfloat16: 0.1}[x.dtype] * pre.abs().clamp_min(1.0)
    clear = (pre - cut).abs() > band
    assert_close(torch.where(clear, acts.double(), 0.0), torch.where(clear, expected, 0.0), x.dtype, "acts")


@pytest.mark.parametrize("device", DEVICES)
@EXAMPLES
@given(data=st.data())
def test_encode_batchtopk_properties(device, data):
    """BatchTopK codes (the ReLU encode, then the batch's B x k largest) are the reference's, up to
    values within rounding of the batch threshold."""
    x, W_enc, b_enc, b_dec = data.draw(encoder_problems(device), label="problem")
    k = data.draw(st.integers(1, W_enc.shape[1]), label="k")
    if device == "cuda":
        codes = functional.encode_batchtopk(x, W_enc, b_enc, b_dec, k)
    else:  # what functional.encode_batchtopk runs on CUDA, with the Triton encode under the interpreter
        codes = reference.batch_topk(encode.encode_relu(x, W_enc, b_enc, b_dec, None), k)
    pre = _pre64(x, W_enc, b_enc, b_dec)
    band = {torch.float32: 1e-4, torch.bfloat16: 0.1}[x.dtype] * float(pre.abs().max().clamp_min(1.0))
    assert_batchtopk_matches(codes, pre, k, band)


def _batch_codes(data, B: int, F: int, dtype, device, seed: int) -> torch.Tensor:
    """Post-ReLU codes [B, F] for the BatchTopK selections: drawn from few values (ties at the threshold,
    whole rows and columns of zeros) or continuous, and possibly a NaN."""
    generator = torch.Generator().manual_seed(seed)
    if data.draw(st.booleans(), label="tied"):
        acts = torch.randint(0, 4, (B, F), generator=generator).double()
    else:
        acts = torch.randn(B, F, generator=generator, dtype=torch.float64).relu()
    acts = acts.to(dtype=dtype, device=device)
    if data.draw(st.booleans(), label="nan"):
        acts[data.draw(st.integers(0, B - 1), label="nan row"), 0] = float("nan")
    return acts


@pytest.mark.parametrize("device", DEVICES)
@EXAMPLES
@given(dtype=DTYPES, seed=st.integers(0, 2**31 - 1), data=st.data())
def test_grouped_batch_topk_keeps_the_reference_codes(device, dtype, seed, data):
    """The grouped BatchTopK selection (fastsae/ops/batchtopk.py: a threshold on group maxima, then
    topk above it) keeps the same codes as the reference's topk over the whole batch: codes drawn from
    few values (ties at the threshold, whole rows and columns of zeros) or continuous, any group size,
    rows whose last codes form no whole group, NaN codes (the reference's route then)."""
    max_B, _, max_F = SIZES[device]
    B, F = data.draw(st.integers(1, max_B), label="B"), data.draw(st.integers(1, max_F), label="F")
    k = data.draw(st.integers(1, F), label="k")
    group = data.draw(st.sampled_from([1, 3, 8, 64]), label="group")
    acts = _batch_codes(data, B, F, dtype, device, seed)
    acts.requires_grad_(True)
    codes, expected = batchtopk.grouped_batch_topk(acts, k, group), reference.batch_topk(acts.detach(), k)
    codes.sum().backward()  # the gradient reaches each kept code once, and nothing else
    assert acts.grad.double().sum() == min(k * B, acts.numel()) and bool((acts.grad[codes.detach() != 0] == 1).all())
    codes = codes.detach()
    if acts.isnan().any():
        assert torch.equal(codes.isnan(), expected.isnan()), "NaN codes"
        codes, expected = codes.nan_to_num(-1.0), expected.nan_to_num(-1.0)
    fired = codes != 0
    assert torch.equal(codes[fired], acts.nan_to_num(-1.0)[fired]), "a kept code differs from its input"
    assert torch.equal(codes.flatten().sort().values, expected.flatten().sort().values), "different codes kept"


@pytest.mark.parametrize("device", DEVICES)
@EXAMPLES
@given(dtype=DTYPES, seed=st.integers(0, 2**31 - 1), data=st.data())
def test_batchtopk_among_candidates_keeps_the_reference_codes(device, dtype, seed, data):
    """The sparse BatchTopK selection (the batch's B x k largest among each row's c largest codes)
    keeps the reference's codes over whole rows, or answers None, and then only where a row's smallest
    candidate is above the batch threshold or a candidate is NaN: tied or continuous codes, any c."""
    max_B, _, max_F = SIZES[device]
    B, F = data.draw(st.integers(1, max_B), label="B"), data.draw(st.integers(1, max_F), label="F")
    k = data.draw(st.integers(1, F), label="k")
    width = data.draw(st.integers(k, F), label="candidates per row")
    acts = _batch_codes(data, B, F, dtype, device, seed)
    vals, idx = acts.topk(width, dim=1)
    keep = batchtopk.select_among_candidates(vals, k, complete=width == F)
    # As a CapturedStep's capture runs it: the check's flag goes to the checkpoint, unread, and the
    # selection goes on; the flag says what the host's check said.
    flags, capturing = [], mock.patch.object(batchtopk, "may_synchronize", lambda _tensor: False)
    with batchtopk.exactness_checkpoint(flags.append), capturing:
        captured_keep = batchtopk.select_among_candidates(vals, k, complete=width == F)
    assert [bool(flag) for flag in flags] == ([] if width == F else [keep is None]), "the checkpoint's flag"
    assert keep is None or torch.equal(captured_keep, keep), "the captured selection"
    expected = reference.batch_topk(acts, k)
    budget = min(k * B, acts.numel())
    if keep is None:
        threshold = vals.flatten().topk(budget).values.min()
        assert width < F and bool(vals.isnan().any() | (vals.amin(dim=1) > threshold).any()), "a needless fallback"
        return
    assert int(keep.sum()) == budget
    codes = torch.zeros_like(acts).scatter(1, idx, torch.where(keep, vals, 0))
    if acts.isnan().any():
        assert torch.equal(codes.isnan(), expected.isnan()), "NaN codes"
        codes, expected = codes.nan_to_num(-1.0), expected.nan_to_num(-1.0)
    assert torch.equal(codes.flatten().sort().values, expected.flatten().sort().values), "different codes kept"


@pytest.mark.parametrize("device", DEVICES)
@EXAMPLES
@given(data=st.data())
def test_encode_batchtopk_sparse_properties(device, data):
    """Sparse BatchTopK codes (the TopK encode's candidates, then the batch's B x k largest among them,
    or the dense route) are the reference's BatchTopK codes, up to values within rounding of the batch
    threshold; every code is a kept code or 0."""
    x, W_enc, b_enc, b_dec = data.draw(encoder_problems(device), label="problem")
    k = data.draw(st.integers(1, W_enc.shape[1]), label="k")
    vals, idx, aux_vals, _ = functional.encode_batchtopk_sparse(x, W_enc, b_enc, b_dec, k)
    assert aux_vals.shape == (x.shape[0], 0) and vals.shape == idx.shape and idx.dtype == torch.int32
    codes = reference.scatter_codes(vals, idx, W_enc.shape[1])  # a feature twice in a row would add up
    pre = _pre64(x, W_enc, b_enc, b_dec)
    band = {torch.float32: 1e-4, torch.bfloat16: 0.1}[x.dtype] * float(pre.abs().max().clamp_min(1.0))
    assert_batchtopk_matches(codes, pre, k, band)


@pytest.mark.parametrize("device", DEVICES)
@EXAMPLES
@given(dtype=DTYPES, seed=st.integers(0, 2**31 - 1), data=st.data())
def test_decoder_constraint_properties(device, dtype, seed, data):
    """The decoder constraint's kernels (the gradient's parallel part removed, rows renormalised, and
    both fused with Adam's step, moments in fp32 or the weights' dtype) equal the fp64 reference on
    rows of any length and scale, a zero row included."""
    F = data.draw(st.integers(1, 30 if device == "cpu" else 8192), label="F")
    # d >= 2: at d = 1 nothing lies across the row, the projected gradient is 0 up to rounding, and
    # Adam's step divides that rounding by sqrt(v) ~ it (as torch.optim.Adam would): nothing to compare.
    d = data.draw(st.integers(2, 40 if device == "cpu" else 4096), label="d")
    scale = data.draw(st.sampled_from([1e-3, 1.0, 1e3]), label="scale")
    step = data.draw(st.sampled_from([1, 2, 1000]), label="step")
    lr, beta1, beta2 = (data.draw(st.sampled_from(options), label=name) for name, options in
                        (("lr", [1e-4, 1e-2]), ("beta1", [0.0, 0.9]), ("beta2", [0.95, 0.999])))  # fmt: skip
    moments_dtype = data.draw(st.sampled_from([torch.float32, dtype]), label="moments dtype")
    generator = torch.Generator().manual_seed(seed)
    W = scale * torch.randn(F, d, generator=generator, dtype=torch.float64)
    if data.draw(st.booleans(), label="zero row"):
        W[0] = 0
    grad = torch.randn(F, d, generator=generator, dtype=torch.float64)
    m = 0.1 * torch.randn(F, d, generator=generator, dtype=torch.float64) * (step > 1)
    v = 0.01 * torch.rand(F, d, generator=generator, dtype=torch.float64) * (step > 1)
    W, grad = W.to(device, dtype), grad.to(device, dtype)
    m, v = m.to(device, moments_dtype), v.to(device, moments_dtype)

    projected = grad.clone()
    decoder.remove_parallel_grad_(W, projected)
    assert_close(projected, reference.remove_parallel_grad(W.double(), grad.double()), dtype, "projected grad")
    normalised = W.clone()
    decoder.normalize_rows_(normalised)
    assert_close(normalised, reference.normalize_decoder_rows(W.double()), dtype, "normalised rows")
    want = reference.decoder_adam(W.double(), grad.double(), m.double(), v.double(), step, lr, beta1, beta2, 1e-8)
    decoder.decoder_adam_(W, grad, m, v, step, lr, beta1, beta2, 1e-8)
    for name, got, expected in zip(("W_dec", "exp_avg", "exp_avg_sq"), (W, m, v), want):
        assert_close(got, expected, dtype, f"{name} after Adam")


@pytest.mark.parametrize("device", DEVICES)
@EXAMPLES
@given(dtype=DTYPES, seed=st.integers(0, 2**31 - 1), bias=st.booleans(), data=st.data())
def test_decode_sparse_properties(device, dtype, seed, bias, data):
    """Sparse decode of random codes (zeros, repeated features) and its backward (with d vals for every
    code or for the fired ones only) equal the reference."""
    max_B, max_d, max_F = SIZES[device]
    B, d, F = (data.draw(st.integers(1, largest), label=name) for name, largest in zip("BdF", (max_B, max_d, max_F)))
    k = data.draw(st.integers(1, min(F, 512)), label="k")
    generator = torch.Generator().manual_seed(seed)
    vals = torch.rand(B, k, generator=generator, dtype=torch.float64)
    vals[vals < 0.2] = 0
    idx = torch.randint(0, F, (B, k), generator=generator, dtype=torch.int32)
    W_dec = torch.randn(F, d, generator=generator, dtype=torch.float64)
    b_dec = torch.randn(d, generator=generator, dtype=torch.float64) if bias else None
    vals, idx, W_dec = vals.to(device, dtype), idx.to(device), W_dec.to(device, dtype)
    b_dec = None if b_dec is None else b_dec.to(device, dtype)
    if data.draw(st.booleans(), label="storage offset"):  # views starting one element into their storage
        vals, idx, W_dec = (torch.cat([t.new_zeros(1), t.flatten()])[1:].view_as(t) for t in (vals, idx, W_dec))
        b_dec = None if b_dec is None else torch.cat([b_dec.new_zeros(1), b_dec])[1:]
    out = decode.decode_sparse(vals, idx, W_dec, b_dec)
    expected = reference.decode_sparse(vals.double(), idx, W_dec.double(), None if b_dec is None else b_dec.double())
    assert_close(out, expected, dtype, "x_hat")
    grad_out = torch.randn(B, d, generator=generator, dtype=torch.float64).to(device, dtype)
    fired_only = data.draw(st.booleans(), label="fired only")  # d vals of codes > 0 only
    with _feature_sums_route(data.draw(FEATURE_SUMS_ROUTES, label="feature sums")):
        dvals, dW_dec = decode.decode_sparse_backward(grad_out, vals, idx, W_dec, fired_only)
    expected_dvals, expected_dW = reference.decode_sparse_backward(
        grad_out.double(), vals.double(), idx, W_dec.double(), fired_only
    )
    assert_close(dvals, expected_dvals, dtype, "dvals")
    assert_close(dW_dec, expected_dW, dtype, "dW_dec")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@EXAMPLES
@given(
    index_dtype=st.sampled_from([torch.int32, torch.int64]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_death_statistics_properties(device, index_dtype, dtype, seed, data):
    """The extension's fire counts (sparse, with and without values, and dense), tokens-since-fired
    update and dead mask equal the reference's."""
    B = data.draw(st.integers(1, 50 if device == "cpu" else 4096), label="B")
    F = data.draw(st.integers(1, 300 if device == "cpu" else 131072), label="F")
    k = data.draw(st.integers(1, min(F, 256)), label="k")
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, F, (B, k), generator=generator).to(device, index_dtype)
    vals = (torch.rand(B, k, generator=generator) - 0.3).clamp_min(0).to(device, dtype)  # ~30% did not fire
    assert torch.equal(functional.fire_counts(idx, F), reference.fire_counts(idx, F))
    counts = functional.fire_counts(idx, F, vals)
    assert torch.equal(counts, reference.fire_counts(idx, F, vals))
    acts = (torch.randn(min(B, 64), F, generator=generator) - 0.5).clamp_min(0).to(device, dtype)
    assert torch.equal(functional.fire_counts_dense(acts), reference.fire_counts_dense(acts))
    since = torch.randint(0, 10**6, (F,), generator=generator).to(device)
    expected = reference.update_since_fired(since, counts, B)
    functional.update_since_fired_(since, counts, B)
    assert torch.equal(since, expected)
    threshold = data.draw(st.integers(0, 10**6), label="threshold")
    assert torch.equal(functional.dead_mask(since, threshold), reference.dead_mask(since, threshold))
