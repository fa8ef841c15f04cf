"""Property tests: the Triton kernels against the fp64 reference on problems hypothesis draws (shapes
down to 1, k from 1 to F, fp32 and bf16, strided views, tied columns, magnitudes from 1e-3 to 1e3, a
large mean offset). The Triton kernels run under the interpreter at tiny shapes, the C++ death
statistics natively, with a bounded number of examples so CI stays fast; a failure prints the
falsifying example, its seed included, and a blob for @reproduce_failure."""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastsae import functional, reference
from fastsae.ops import decode, encode

from .utils import assert_close, assert_topk_matches, check_encode_topk_backward

# FASTSAE_PROPERTY_EXAMPLES raises the budget for a longer search than CI's.
EXAMPLES = settings(
    max_examples=int(os.environ.get("FASTSAE_PROPERTY_EXAMPLES", "10")),
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
DTYPES = st.sampled_from([torch.float32, torch.bfloat16])


@st.composite
def encoder_problems(draw):
    """(x, W_enc, b_enc, b_dec) on the CPU in one dtype, possibly strided views, with tied columns."""
    B, d, F = draw(st.integers(1, 20)), draw(st.integers(1, 40)), draw(st.integers(1, 80))
    dtype, seed = draw(DTYPES), draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    offset = draw(st.sampled_from([0.0, 50.0]))  # a mean offset in every dimension, centred by b_dec
    step = draw(st.sampled_from([1, 2]))  # 2: every tensor is a view with stride 2
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    x = scale * randn(B, d * step) + offset
    W_enc = randn(d * step, F * step)
    if draw(st.booleans()):  # groups of identical columns: exactly tied pre-activations
        W_enc = W_enc[:, torch.arange(F * step) % max(1, F // 3)].contiguous()
    b_enc, b_dec = 0.1 * scale * randn(F * step), offset + scale * randn(d * step)
    x, W_enc, b_enc, b_dec = x[:, ::step], W_enc[::step, ::step], b_enc[::step], b_dec[::step]
    return tuple(t.to(dtype) for t in (x, W_enc, b_enc, b_dec))


def _pre64(x, W_enc, b_enc, b_dec):
    return reference.pre_activation(*(t.double() for t in (x, W_enc, b_enc, b_dec)))


@pytest.mark.interpret  # Triton kernels on CPU tensors
@EXAMPLES
@given(problem=encoder_problems(), data=st.data())
def test_encode_topk_properties(problem, data):
    """Every route of the TopK encode, with AuxK over a random dead mask, gives the reference's top k,
    and the backward of those codes the reference's gradients."""
    x, W_enc, b_enc, b_dec = problem
    F = W_enc.shape[1]
    k = data.draw(st.integers(1, F), label="k")
    k_aux = data.draw(st.integers(0, F), label="k_aux")
    dead = torch.tensor(data.draw(st.lists(st.booleans(), min_size=F, max_size=F), label="dead"))
    route = data.draw(st.sampled_from([r for r in encode.topk_routes(k, k_aux, F) if r[0] != "sweep"]), label="route")
    vals, idx, aux_vals, aux_idx = encode.encode_topk(x, W_enc, b_enc, b_dec, k, k_aux, dead if k_aux else None, route)
    pre = _pre64(x, W_enc, b_enc, b_dec)
    assert_topk_matches(vals, idx, pre, k, x.dtype)
    if k_aux:
        assert_topk_matches(aux_vals, aux_idx, pre.masked_fill(~dead, float("-inf")), k_aux, x.dtype, "aux")
    check_encode_topk_backward(x, W_enc, b_dec, (vals, idx, aux_vals, aux_idx), x.dtype)  # every gradient


@pytest.mark.interpret  # Triton kernels on CPU tensors
@EXAMPLES
@given(problem=encoder_problems(), jump=st.booleans())
def test_encode_relu_properties(problem, jump):
    """The dense ReLU / JumpReLU encode equals the reference away from its threshold."""
    x, W_enc, b_enc, b_dec = problem
    threshold = W_enc.new_ones(W_enc.shape[1]).uniform_(0, 1) if jump else None
    acts = encode.encode_relu(x, W_enc, b_enc, b_dec, threshold)
    pre = _pre64(x, W_enc, b_enc, b_dec)
    cut = torch.zeros((), dtype=torch.float64) if threshold is None else threshold.double()
    expected = torch.where(pre > cut, pre, 0.0)
    # Within the dtype's rounding of the threshold a pre-activation may fall either side: leave those out.
    band = {torch.float32: 1e-4, torch.bfloat16: 0.1}[x.dtype] * pre.abs().clamp_min(1.0)
    clear = (pre - cut).abs() > band
    assert_close(torch.where(clear, acts.double(), 0.0), torch.where(clear, expected, 0.0), x.dtype, "acts")


@pytest.mark.interpret  # Triton kernels on CPU tensors
@EXAMPLES
@given(
    B=st.integers(1, 20),
    d=st.integers(1, 40),
    F=st.integers(1, 80),
    dtype=DTYPES,
    seed=st.integers(0, 2**31 - 1),
    bias=st.booleans(),
    data=st.data(),
)
def test_decode_sparse_properties(B, d, F, dtype, seed, bias, data):
    """Sparse decode of random codes (zeros, repeated features) and its backward equal the reference."""
    k = data.draw(st.integers(1, F), label="k")
    generator = torch.Generator().manual_seed(seed)
    vals = torch.rand(B, k, generator=generator, dtype=torch.float64)
    vals[vals < 0.2] = 0
    idx = torch.randint(0, F, (B, k), generator=generator, dtype=torch.int32)
    W_dec = torch.randn(F, d, generator=generator, dtype=torch.float64)
    b_dec = torch.randn(d, generator=generator, dtype=torch.float64) if bias else None
    vals, W_dec = vals.to(dtype), W_dec.to(dtype)
    b_dec = None if b_dec is None else b_dec.to(dtype)
    out = decode.decode_sparse(vals, idx, W_dec, b_dec)
    expected = reference.decode_sparse(vals.double(), idx, W_dec.double(), None if b_dec is None else b_dec.double())
    assert_close(out, expected, dtype, "x_hat")
    grad_out = torch.randn(B, d, generator=generator, dtype=torch.float64).to(dtype)
    dvals, dW_dec = decode.decode_sparse_backward(grad_out, vals, idx, W_dec)
    expected_dvals, expected_dW = reference.decode_sparse_backward(
        grad_out.double(), vals.double(), idx, W_dec.double()
    )
    assert_close(dvals, expected_dvals, dtype, "dvals")
    assert_close(dW_dec, expected_dW, dtype, "dW_dec")


@EXAMPLES
@given(
    B=st.integers(1, 50),
    F=st.integers(1, 300),
    index_dtype=st.sampled_from([torch.int32, torch.int64]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_death_statistics_properties(B, F, index_dtype, dtype, seed, data):
    """The extension's fire counts (sparse, with and without values, and dense), tokens-since-fired
    update and dead mask equal the reference's."""
    k = data.draw(st.integers(1, F), label="k")
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, F, (B, k), generator=generator).to(index_dtype)
    vals = (torch.rand(B, k, generator=generator) - 0.3).clamp_min(0).to(dtype)  # ~30% did not fire
    assert torch.equal(functional.fire_counts(idx, F), reference.fire_counts(idx, F))
    counts = functional.fire_counts(idx, F, vals)
    assert torch.equal(counts, reference.fire_counts(idx, F, vals))
    acts = (torch.randn(B, F, generator=generator) - 0.5).clamp_min(0).to(dtype)
    assert torch.equal(functional.fire_counts_dense(acts), reference.fire_counts_dense(acts))
    since = torch.randint(0, 10**6, (F,), generator=generator)
    expected = reference.update_since_fired(since, counts, B)
    functional.update_since_fired_(since, counts, B)
    assert torch.equal(since, expected)
    threshold = data.draw(st.integers(0, 10**6), label="threshold")
    assert torch.equal(functional.dead_mask(since, threshold), reference.dead_mask(since, threshold))
