"""The TopK training node's backward kernel path (fastsae/ops/autoencoder.py) against the fp64 reference:
on CPU under the Triton interpreter at tiny shapes, on the GPU at full ones, on each route of the
per-feature sums, with and without AuxK's dead-feature gradients. Outputs are poisoned with NaN first."""

import pytest
import torch

from fastsae import reference
from fastsae.ops import autoencoder, scatter

from .utils import assert_close, random_sae_weights

# (B, d, F, k): the GPT-2 and AlphaFold3 widths and the Llama-8B d at few tokens, with fewer codes than
# features (at full F the fp64 reference needs 28 GB); the blocked route by default at these widths, the
# atomic one at the interpreter's (tests/test_properties.py draws both routes on the GPU).
CASES = [
    pytest.param("cpu", 37, 40, 96, 8, marks=pytest.mark.interpret),
    pytest.param("cuda", 4096, 768, 24576, 32, marks=pytest.mark.gpu),
    pytest.param("cuda", 2048, 384, 16384, 32, marks=pytest.mark.gpu),
    pytest.param("cuda", 199, 4096, 32768, 64, marks=pytest.mark.gpu),
]


def _dead_gradients(n_dead, F, d, dtype, device):
    """AuxK's gradients over `n_dead` dead features, feature 0 among them, in a list padded with -1
    whose padding rows hold garbage (they must be ignored)."""
    features = torch.cat([torch.zeros(1, dtype=torch.int64), torch.randperm(F - 1)[: n_dead - 1] + 1])
    dead = torch.cat([features[torch.randperm(n_dead)], torch.full((3,), -1)]).to(device)
    n = dead.shape[0]
    W_rows = torch.randn(n, d, device=device).to(dtype)
    b_sums = torch.randn(n, device=device)
    dec_rows = torch.randn(n, d, device=device).to(dtype)
    return dead, W_rows, b_sums, dec_rows


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("with_dead", [False, True], ids=["no-auxk", "auxk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device, B, d, F, k", CASES, ids=lambda v: None)
def test_topk_autoencoder_backward_kernel(device, B, d, F, k, dtype, with_dead, deterministic):
    """dx, dW_enc, db_enc, db_dec and dW_dec against `reference.topk_autoencoder_backward` in fp64;
    bit-identical from run to run on the blocked route."""
    x = (torch.randn(B, d, device=device) * 2 + 1).to(dtype)
    W_enc, _, W_dec, b_dec = random_sae_weights(d, F, dtype=dtype, device=device)
    vals = torch.rand(B, k, dtype=torch.float64, device=device)
    vals[vals < 0.2] = 0  # codes that did not fire pass no gradient to the encoder
    vals = vals.to(dtype)
    idx = torch.rand(B, F, device=device).argsort(dim=1)[:, :k].to(torch.int32)
    grad_recon, grad_vals = torch.randn(B, d, device=device).to(dtype), torch.randn(B, k, device=device).to(dtype)
    dead = _dead_gradients(min(F // 4, 200), F, d, dtype, device) if with_dead else (None,) * 4
    args = (grad_recon, grad_vals, x, W_enc, b_dec, W_dec, vals, idx)

    def run():
        return autoencoder.topk_autoencoder_backward(*args, True, *dead)

    grads = run()
    in_fp64 = [t.double() if t is not None and t.is_floating_point() else t for t in (*args, *dead)]
    expected = reference.topk_autoencoder_backward(*in_fp64)
    for name, got, want, like in zip(("dx", "dW_enc", "db_enc", "db_dec", "dW_dec"), grads, expected,
                                     (x, W_enc, W_enc, b_dec, W_dec)):  # fmt: skip
        assert got.dtype == like.dtype, name
        assert_close(got, want, dtype, name)
    if deterministic:
        assert all(torch.equal(a, b) for a, b in zip(grads, run())), "not bit-identical"


@pytest.mark.interpret
def test_topk_autoencoder_backward_reads_auxk_gradients_after_joining_their_stream(monkeypatch):
    """With AuxK's gradients still computed on a side stream (`functional.AUXK_SIDE_STREAM`), the
    backward reads them only after it waits for the event recorded there behind AuxK's backward: here
    that wait writes them, and the gradients match the reference only if no sum read them before. The
    whole stream is joined before the backward returns."""
    B, d, F, k, dtype = 37, 40, 96, 8, torch.float32
    x = torch.randn(B, d) * 2 + 1
    W_enc, _, W_dec, b_dec = random_sae_weights(d, F, dtype=dtype)
    vals = torch.rand(B, k)
    idx = torch.rand(B, F).argsort(dim=1)[:, :k].to(torch.int32)
    args = (torch.randn(B, d), torch.randn(B, k), x, W_enc, b_dec, W_dec, vals, idx)
    dead, *gradients = _dead_gradients(20, F, d, dtype, "cpu")
    written_late = [torch.full_like(g, float("nan")) for g in gradients]
    auxk_done = object()  # stands for the event: only the wait sees it

    class Side:  # stands for the stream
        def record_event(self):
            return auxk_done

    side = Side()
    waits = []

    def join_event(event, *made_there):
        waits.append(event)
        for late, gradient in zip(written_late, gradients):
            late.copy_(gradient)

    monkeypatch.setattr(autoencoder, "join_event", join_event)
    monkeypatch.setattr(autoencoder, "join_stream", lambda stream, *made_there: waits.append(stream))
    monkeypatch.setattr(autoencoder, "DECODER_SUMS_ON_SIDE_STREAM", False)
    grads = autoencoder.topk_autoencoder_backward(*args, True, dead, *written_late, side=side)
    expected = reference.topk_autoencoder_backward(*(t.double() for t in args[:-1]), idx, dead,
                                                   *(g.double() for g in gradients))  # fmt: skip
    assert waits == [auxk_done, side]
    for name, got, want in zip(("dx", "dW_enc", "db_enc", "db_dec", "dW_dec"), grads, expected):
        assert_close(got, want, dtype, name)


@pytest.mark.interpret
def test_topk_autoencoder_backward_takes_the_callers_sort(monkeypatch):
    """Given the codes already sorted by feature (`functional.SORT_IN_FORWARD`), the blocked route's
    backward uses that sort (here: it never sorts again) and gives the reference's gradients."""
    B, d, F, k, dtype = 37, 40, 96, 8, torch.float32
    W_enc, _, W_dec, b_dec = random_sae_weights(d, F, dtype=dtype)
    idx = torch.rand(B, F).argsort(dim=1)[:, :k].to(torch.int32)
    args = (torch.randn(B, d), torch.randn(B, k), torch.randn(B, d), W_enc, b_dec, W_dec, torch.rand(B, k), idx)
    dead, *gradients = _dead_gradients(20, F, d, dtype, "cpu")
    monkeypatch.setattr(scatter, "ROUTE", "blocked")
    by_feature = scatter.sort_by_feature(idx, F)

    def no_sort(*_):
        raise AssertionError("the codes were sorted again")

    monkeypatch.setattr(autoencoder, "sort_by_feature", no_sort)
    monkeypatch.setattr(scatter, "sort_by_feature", no_sort)
    grads = autoencoder.topk_autoencoder_backward(*args, True, dead, *gradients, by_feature=by_feature)
    expected = reference.topk_autoencoder_backward(*(t.double() for t in args[:-1]), idx, dead,
                                                   *(g.double() for g in gradients))  # fmt: skip
    for name, got, want in zip(("dx", "dW_enc", "db_enc", "db_dec", "dW_dec"), grads, expected):
        assert_close(got, want, dtype, name)
