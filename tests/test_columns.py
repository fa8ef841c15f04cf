"""Codes concentrated on few features (AuxK codes among the dead features) take dense GEMMs over those
features (fastsae/ops/columns.py): when the path is chosen, and the decode and backward results on it
against the fp64 reference, on CPU (interpreter, for the sparse kernels of the other codes) and the GPU."""

import pytest
import torch

from fastsae import reference
from fastsae.ops import columns, decode, encode

from .utils import assert_close, check_encode_topk_backward, random_sae_weights


@pytest.fixture
def small_code_counts(monkeypatch):
    """The tiny interpreter shapes have few codes per token; let them take the dense path too."""
    monkeypatch.setattr(columns, "MIN_CODES_PER_TOKEN", 4)


@pytest.mark.usefixtures("small_code_counts")
def test_concentrated_columns_decision():
    F = 10_000
    touched = torch.tensor([3, 50, 51, 700, 9_999])
    idx = touched[torch.randint(0, 5, (64, 8))].to(torch.int32)
    found = columns.concentrated_columns(idx, F)
    assert found is not None
    assert torch.equal(found.features, idx.long().unique())
    assert torch.equal(found.position[found.features], torch.arange(found.features.numel()))
    untouched = torch.ones(F, dtype=torch.bool)
    untouched[found.features] = False
    assert (found.position[untouched] == -1).all()
    spread = torch.randint(0, F, (64, 8), dtype=torch.int32)  # ~500 features for 8 codes a token
    assert columns.concentrated_columns(spread, F) is None
    assert columns.concentrated_columns(idx[:, :3], F) is None  # too few codes per token to check
    with pytest.raises(ValueError, match=r"outside \[0, 10000\)"):
        columns.concentrated_columns(torch.where(idx == 700, F, idx), F)


# (B, d, F, k, k_aux, dead fraction): the GPU case is the GPT-2 training shape's AuxK at 5% dead.
CASES = [
    pytest.param("cpu", 37, 40, 300, 8, 24, 0.1, marks=pytest.mark.interpret),
    pytest.param("cuda", 4096, 768, 24576, 32, 384, 0.05, marks=pytest.mark.gpu),
]


@pytest.mark.usefixtures("small_code_counts")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device, B, d, F, k, k_aux, dead_fraction", CASES, ids=lambda v: None)
def test_auxk_codes_on_the_dense_path(device, B, d, F, k, k_aux, dead_fraction, dtype, deterministic):
    W_enc, b_enc, W_dec, b_dec = random_sae_weights(d, F, dtype=dtype, device=device)
    x = (torch.randn(B, d, dtype=torch.float64, device=device) + 1).to(dtype)
    dead = torch.rand(F, device=device) < dead_fraction
    vals, idx, aux_vals, aux_idx = encode.encode_topk(x, W_enc, b_enc, b_dec, k, k_aux, dead)
    assert columns.concentrated_columns(aux_idx, F) is not None, "the case must exercise the dense path"

    expected = reference.decode_sparse(aux_vals.double(), aux_idx, W_dec.double(), b_dec.double())
    assert_close(decode.decode_sparse(aux_vals, aux_idx, W_dec, b_dec), expected, dtype, "decode")

    grad_out = torch.randn(B, d, device=device, dtype=dtype)
    decode_grads = decode.decode_sparse_backward(grad_out, aux_vals, aux_idx, W_dec)
    expected = reference.decode_sparse_backward(grad_out.double(), aux_vals.double(), aux_idx, W_dec.double())
    for name, actual, want in zip(("dvals", "dW_dec"), decode_grads, expected):
        assert actual.dtype == dtype, name
        assert_close(actual, want, dtype, name)

    encode_grads, encode_again = check_encode_topk_backward(x, W_enc, b_dec, (vals, idx, aux_vals, aux_idx), dtype)

    if deterministic:
        again = decode.decode_sparse_backward(grad_out, aux_vals, aux_idx, W_dec) + encode_again()
        assert all(torch.equal(a, b) for a, b in zip(decode_grads + encode_grads, again)), "not bit-identical"
