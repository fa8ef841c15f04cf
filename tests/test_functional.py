"""The public custom ops against the reference: forward, every gradient, opcheck, bad input.

On CPU the ops' implementation is the reference, so these tests check the op plumbing (argument
handling, dtypes, autograd registration, fake impls); on CUDA they check the kernels."""

import pytest
import torch

from fastsae import functional as F
from fastsae import reference
from fastsae.ops import autoencoder as autoencoder_ops
from fastsae.ops import batchtopk as batchtopk_ops

from .utils import DEVICES, assert_close, assert_topk_matches, random_sae_weights

# (B, d, F, k): odd row counts, d not a power of two, k = 1 and k = F.
SHAPES = [(1, 24, 64, 1), (37, 40, 96, 8), (199, 33, 128, 128), (64, 64, 256, 32)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _ids(shape):
    return "B{}_d{}_F{}_k{}".format(*shape)


def _problem(shape, dtype, device):
    B, d, F_, _ = shape
    x = (torch.randn(B, d, dtype=torch.float64) * 2 + 1).to(device=device, dtype=dtype)
    return x, random_sae_weights(d, F_, dtype=dtype, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_encode_topk_forward(shape, dtype, device):
    x, (W_enc, b_enc, _, b_dec) = _problem(shape, dtype, device)
    k = shape[3]
    dead = torch.rand(shape[2], device=device) < 0.3
    k_aux = min(16, shape[2])
    codes = F.encode_topk(x, W_enc, b_enc, b_dec, k, k_aux=k_aux, dead_mask=dead)
    pre = reference.pre_activation(*(t.double() for t in (x, W_enc, b_enc, b_dec)))
    assert codes.vals.dtype == dtype and codes.vals.shape == (shape[0], k)
    assert_topk_matches(codes.vals, codes.idx, pre, k, dtype)
    assert_topk_matches(codes.aux_vals, codes.aux_idx, pre.masked_fill(~dead, float("-inf")), k_aux, dtype, "aux")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("threshold", [False, True], ids=["relu", "jumprelu"])
def test_encode_relu_forward(threshold, dtype, device):
    x, (W_enc, b_enc, _, b_dec) = _problem((37, 40, 96, 0), dtype, device)
    cut = torch.rand(96, device=device, dtype=dtype) if threshold else None
    acts = F.encode_relu(x, W_enc, b_enc, b_dec, cut)
    pre = reference.pre_activation(*(t.double() for t in (x, W_enc, b_enc, b_dec)))
    cut64 = torch.zeros((), dtype=torch.float64, device=device) if cut is None else cut.double()
    assert_close(acts, torch.where(pre > cut64, pre, 0.0), dtype, "acts")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_decode_sparse_forward(shape, dtype, device):
    B, d, F_, k = shape
    vals = torch.rand(B, k, device=device).to(dtype)
    idx = torch.stack([torch.randperm(F_)[:k] for _ in range(B)]).to(device=device, dtype=torch.int32)
    _, _, W_dec, b_dec = random_sae_weights(d, F_, dtype=dtype, device=device)
    out = F.decode_sparse(vals, idx, W_dec, b_dec)
    assert out.dtype == dtype
    assert_close(out, reference.decode_sparse(vals.double(), idx, W_dec.double(), b_dec.double()), dtype)


def test_decode_sparse_fired_only_gradient():
    """`fired_only`: the gradient w.r.t. vals is the plain one where vals > 0 and 0 elsewhere (zeros and
    negative values here); the weights' and the bias's gradients do not change."""
    B, d, n_features, k = 12, 16, 40, 6
    vals = torch.randn(B, k, dtype=torch.float64)
    vals[vals.abs() < 0.3] = 0
    idx = torch.randint(0, n_features, (B, k), dtype=torch.int32)
    W_dec, b_dec = torch.randn(n_features, d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    grad_out = torch.randn(B, d, dtype=torch.float64)
    grads = []
    for fired_only in (False, True):
        leaves = [t.clone().requires_grad_() for t in (vals, W_dec, b_dec)]
        F.decode_sparse(leaves[0], idx, leaves[1], leaves[2], fired_only=fired_only).backward(grad_out)
        grads.append([leaf.grad for leaf in leaves])
    (plain_vals, plain_W, plain_b), (fired_vals, fired_W, fired_b) = grads
    assert torch.equal(fired_vals, torch.where(vals > 0, plain_vals, 0.0))
    assert torch.equal(fired_W, plain_W) and torch.equal(fired_b, plain_b)


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_match_reference(device):
    """Every gradient of a TopK encode + sparse decode + AuxK against autograd of the reference."""
    B, d, F_, k, k_aux = 41, 20, 60, 5, 7
    x = torch.randn(B, d, dtype=torch.float64, device=device) + 2
    dead = torch.rand(F_, device=device) < 0.5

    def run(encode, decode, x, params):
        W_enc, b_enc, W_dec, b_dec = params
        vals, idx, aux_vals, aux_idx = encode(x, W_enc, b_enc, b_dec, k, k_aux, dead)
        recon = decode(vals, idx, W_dec, b_dec)
        aux = decode(aux_vals, aux_idx, W_dec, None)
        return reference.fvu(recon, x) + reference.fvu(aux, (x - recon).detach())

    grads = []
    for encode, decode in [
        (reference.encode_topk, reference.decode_sparse),
        (lambda *a: F.encode_topk(*a[:5], k_aux=a[5], dead_mask=a[6]), F.decode_sparse),
    ]:
        torch.manual_seed(0)
        params = [p.requires_grad_() for p in random_sae_weights(d, F_, device=device)]
        xr = x.clone().requires_grad_()
        grads.append(torch.autograd.grad(run(encode, decode, xr, params), [xr, *params]))
    for name, actual, expected in zip(("x", "W_enc", "b_enc", "W_dec", "b_dec"), grads[1], grads[0]):
        assert_close(actual, expected, torch.float64, f"d{name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["candidates", "outgrown", "wide"])
def test_encode_batchtopk_routes(case, device, monkeypatch):
    """The dense BatchTopK codes and their gradients are the reference's on each route: the sparse
    codes' candidates scattered into [B, F] (4k candidates, fewer than F); the whole-batch selection
    where a row keeps more codes than its 4k candidates ("outgrown": one row scaled up keeps most of
    its features) or where the candidates would be too wide."""
    B, d, F_ = 33, 256, 2560  # d wide enough that the rows' norms, and so the codes they keep, are alike
    k = {"candidates": 5, "outgrown": 5, "wide": 6}[case]
    assert batchtopk_ops.dense_from_candidates(k, F_) == (case != "wide")
    torch.manual_seed(0)
    x = torch.randn(B, d, dtype=torch.float64, device=device)
    W_enc, b_enc, _, b_dec = random_sae_weights(d, F_, device=device)
    if case == "outgrown":
        x[3] = x[3] * 50 + 40 * W_enc[:, :100].sum(dim=1)  # most of its pre-activations far above the rest
    pre = reference.pre_activation(x, W_enc, b_enc, b_dec)
    if case == "outgrown":
        assert int((pre[3] > pre.flatten().topk(B * k).values[-1]).sum()) > 4 * k, "the row keeps too few"
    whole_batch = []  # the whole-batch selections run
    monkeypatch.setattr(
        batchtopk_ops, "batch_topk", lambda acts, k: whole_batch.append(k) or reference.batch_topk(acts, k)
    )

    def reference_codes(x, W_enc, b_enc, b_dec, k):
        return reference.batch_topk(reference.encode_relu(x, W_enc, b_enc, b_dec), k)

    weights = torch.randn(B, F_, dtype=torch.float64, device=device)
    expected_grads, grads = [], []
    for encode, out in [(reference_codes, expected_grads), (F.encode_batchtopk, grads)]:
        inputs = [t.clone().requires_grad_() for t in (x, W_enc, b_enc, b_dec)]
        codes = encode(*inputs, k)
        out += [codes.detach(), *torch.autograd.grad((codes * weights).sum(), inputs)]
    assert whole_batch == ([] if case == "candidates" else [k]), "not the route expected"
    assert torch.equal(grads[0], expected_grads[0]), "different codes"
    for name, actual, expected in zip(("x", "W_enc", "b_enc", "b_dec"), grads[1:], expected_grads[1:]):
        assert_close(actual, expected, torch.float64, f"d{name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("padding", [0, 13], ids=["exact", "padded"])
@pytest.mark.parametrize("n_dead", [3, 25, 0])
def test_auxk_reconstruction_matches_the_fused_aux_codes(n_dead, padding, device):
    """The dense AuxK path over the dead features against decode_sparse of the reference encode's aux
    codes: value and every gradient, with fewer dead features than k_aux, more, and none; also from a
    fixed-length list padded with -1 (what a captured step passes)."""
    B, d, F_, k, k_aux = 41, 20, 60, 5, 7
    x = torch.randn(B, d, dtype=torch.float64, device=device) + 2
    features = torch.randperm(F_, device=device)[:n_dead]
    dead = torch.zeros(F_, dtype=torch.bool, device=device).index_fill_(0, features, True)
    features = torch.cat([features, features.new_full((padding,), -1)])
    params = [p.requires_grad_() for p in random_sae_weights(d, F_, device=device)]
    W_enc, b_enc, W_dec, b_dec = params
    x.requires_grad_()
    params.append(x)
    _, _, aux_vals, aux_idx = reference.encode_topk(x, W_enc, b_enc, b_dec, k, k_aux, dead)
    expected = reference.decode_sparse(aux_vals, aux_idx, W_dec, None)
    actual = F.auxk_reconstruction(x, W_enc, b_enc, b_dec, W_dec, features, k_aux)
    assert_close(actual, expected, torch.float64, "aux_recon")
    weights = torch.randn_like(expected)  # a loss whose gradient differs per element
    expected_grads = torch.autograd.grad((expected * weights).sum(), params, allow_unused=True, materialize_grads=True)
    actual_loss = (actual * weights).sum()
    actual_grads = torch.autograd.grad(actual_loss, params, retain_graph=True, materialize_grads=True)
    for name, got, want in zip(("W_enc", "b_enc", "W_dec", "b_dec", "x"), actual_grads, expected_grads):
        assert_close(got, want, torch.float64, f"d{name}")
    for needed, together in zip(params, actual_grads):  # each alone (the backward skips products not asked for)
        (alone,) = torch.autograd.grad(actual_loss, [needed], retain_graph=True, materialize_grads=True)
        assert_close(alone, together, torch.float64, "a gradient asked for alone")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dead", ["none", "few", "scarce", "padded"])
def test_topk_autoencoder_matches_its_three_calls(dead, device):
    """F.topk_autoencoder (one autograd node) against encode_topk + decode_sparse + auxk_reconstruction
    called apart: the values, and every gradient of a loss that also uses the codes' values; with dead
    features more than k_aux, fewer ("scarce") or padded."""
    B, d, F_, k, k_aux = 41, 20, 60, 5, 7
    x = (torch.randn(B, d, dtype=torch.float64, device=device) + 2).requires_grad_()
    dead_lists = {"few": torch.randperm(F_, device=device)[:25], "scarce": torch.randperm(F_, device=device)[:3]}
    features = dead_lists.get(dead)
    if dead == "padded":
        features = torch.cat([torch.randperm(F_, device=device)[:9], torch.full((6,), -1, device=device)])
    params = [p.requires_grad_() for p in random_sae_weights(d, F_, device=device)]
    W_enc, b_enc, W_dec, b_dec = params
    weights = [torch.randn(B, d, dtype=torch.float64, device=device) for _ in range(2)]

    def loss(recon, vals, aux_recon):
        aux_term = 0 if aux_recon is None else (aux_recon * weights[1]).sum()
        return (recon * weights[0]).sum() + vals.square().sum() + aux_term

    vals, idx, _, _ = F.encode_topk(x, W_enc, b_enc, b_dec, k)
    recon = F.decode_sparse(vals, idx, W_dec, b_dec)
    aux_recon = None if features is None else F.auxk_reconstruction(x, W_enc, b_enc, b_dec, W_dec, features, k_aux)
    expected = (recon, vals, idx, aux_recon)
    actual = F.topk_autoencoder(x, W_enc, b_enc, b_dec, W_dec, k, dead_features=features, k_aux=k_aux)
    for name, got, want in zip(("recon", "vals", "idx", "aux_recon"), actual, expected):
        assert (got is None) == (want is None), name
        if got is not None:
            assert_close(got, want, torch.float64, name)
    inputs = [x, *params]
    expected_grads = torch.autograd.grad(loss(recon, vals, aux_recon), inputs)
    actual_grads = torch.autograd.grad(loss(actual.recon, actual.vals, actual.aux_recon), inputs)
    for name, got, want in zip(("x", "W_enc", "b_enc", "W_dec", "b_dec"), actual_grads, expected_grads):
        assert_close(got, want, torch.float64, f"d{name}")


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["default", "sort_in_line", "operands_after_encode"])
@pytest.mark.parametrize("decoder_sums_beside", [False, True], ids=["decoder_sums_in_line", "decoder_sums_beside"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_topk_autoencoder_with_auxk_on_a_side_stream(dtype, decoder_sums_beside, layout, deterministic, monkeypatch):
    """F.AUXK_SIDE_STREAM: AuxK's forward and backward on a second stream (and dW_dec's sums with them,
    `DECODER_SUMS_ON_SIDE_STREAM`; the codes' sort on a third, or on the current one with
    `SORT_ON_OWN_STREAM` off; AuxK's operands gathered after the encode, `AUXK_OPERANDS_FIRST` off) give
    the same values and gradients as in line (bit for bit on the reproducible routes), with the other
    streams' outputs read only after they are written (a kernel on each stream, none waiting, would race
    here)."""
    monkeypatch.setattr(autoencoder_ops, "DECODER_SUMS_ON_SIDE_STREAM", decoder_sums_beside)
    monkeypatch.setattr(F, "SORT_ON_OWN_STREAM", layout != "sort_in_line")
    monkeypatch.setattr(F, "AUXK_OPERANDS_FIRST", layout != "operands_after_encode")
    B, d, F_, k, k_aux = 2048, 256, 4096, 32, 64
    x = (torch.randn(B, d, device="cuda") * 2 + 1).to(dtype).requires_grad_()
    params = [p.requires_grad_() for p in random_sae_weights(d, F_, dtype=dtype, device="cuda")]
    W_enc, b_enc, W_dec, b_dec = params
    features = torch.cat([torch.randperm(F_, device="cuda")[:300], torch.full((20,), -1, device="cuda")])
    weights = [torch.randn(B, d, device="cuda").to(dtype) for _ in range(2)]

    def run(side_stream):
        monkeypatch.setattr(F, "AUXK_SIDE_STREAM", side_stream)
        out = F.topk_autoencoder(x, W_enc, b_enc, b_dec, W_dec, k, dead_features=features, k_aux=k_aux)
        loss = (out.recon * weights[0]).float().sum() + (out.aux_recon * weights[1]).float().sum()
        return (out.recon, out.vals, out.idx, out.aux_recon, *torch.autograd.grad(loss, [x, *params]))

    in_line = run(False)
    F._side_streams.clear()
    beside = run(True)
    assert F._side_streams, "AuxK did not run on a side stream"
    names = ("recon", "vals", "idx", "aux_recon", "dx", "dW_enc", "db_enc", "dW_dec", "db_dec")
    for i, (name, got, want) in enumerate(zip(names, beside, in_line)):
        if deterministic or i < 4:  # the forward has no atomics
            assert torch.equal(got, want), name
        else:
            assert_close(got, want, dtype, name)


def test_gradcheck_fp64():
    """Finite differences through the custom ops' registered autograd, on tiny shapes."""
    B, d, F_, k = 6, 5, 9, 3
    x = torch.randn(B, d, dtype=torch.float64, requires_grad=True)
    W_enc, b_enc, W_dec, b_dec = [p.requires_grad_() for p in random_sae_weights(d, F_)]
    dead = torch.ones(F_, dtype=torch.bool)
    torch.autograd.gradcheck(lambda *a: F.encode_topk(*a, k, k_aux=2, dead_mask=dead)[::2], (x, W_enc, b_enc, b_dec))
    torch.autograd.gradcheck(lambda *a: F.encode_relu(*a), (x, W_enc, b_enc, b_dec))
    vals = torch.rand(B, k, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, F_, (B, k), dtype=torch.int32)
    torch.autograd.gradcheck(lambda v, w, b: F.decode_sparse(v, idx, w, b), (vals, W_dec, b_dec))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_every_op(device):
    """torch.library.opcheck: schema, fake impl, autograd registration and aot dispatch of each op."""
    B, d, F_, k = 13, 12, 40, 4
    x, (W_enc, b_enc, W_dec, b_dec) = _problem((B, d, F_, k), torch.float32, device)
    W_enc.requires_grad_()
    dead = torch.rand(F_, device=device) < 0.5
    vals, idx, aux_vals, aux_idx = torch.ops.fastsae.encode_topk(x, W_enc, b_enc, b_dec, k, 3, dead)
    grads = (torch.randn_like(vals), torch.randn_like(aux_vals))
    acts = F.encode_relu(x, W_enc, b_enc, b_dec).detach()
    joint_grads = (torch.randn(B, d, device=device), grads[0], x, W_enc.detach(), b_dec, W_dec, vals.detach(), idx)
    dead_features = torch.tensor([3, -1, 0], device=device)  # AuxK's, padded
    W_rows, dec_rows = torch.randn(2, 3, d, device=device)
    dead_grads = (dead_features, W_rows, torch.randn(3, device=device), dec_rows)
    features = torch.tensor([3, 17, 0, -1, 9], device=device)  # AuxK's dead features, one padding entry
    joint_args = (x, W_enc.detach(), b_enc, b_dec, W_dec, k, features, 3)
    _, joint_vals, joint_idx, _, *auxk_saved = torch.ops.fastsae.topk_autoencoder(*joint_args)
    grad_recon, grad_aux = torch.randn(2, B, d, device=device)
    joint_backward = (grad_recon, grads[0], grad_aux, x, W_enc.detach(), b_dec, W_dec, joint_vals, joint_idx)
    recompute_args = (grad_recon, grads[0], grad_aux, x, W_enc.detach(), b_enc, b_dec, W_dec, joint_vals, joint_idx)
    recompute_args += (features, 3)
    cases = [
        (torch.ops.fastsae.encode_topk, (x, W_enc, b_enc, b_dec, k, 3, dead)),
        (torch.ops.fastsae.encode_topk, (x, W_enc, b_enc, b_dec, k, 0, None)),
        (torch.ops.fastsae.encode_topk_positive_counts, (x, W_enc.detach(), b_enc, b_dec, k)),
        (
            torch.ops.fastsae.encode_topk_backward,
            (*grads, x, W_enc.detach(), b_dec, vals.detach(), idx, aux_vals.detach(), aux_idx, True),
        ),
        (  # dx not asked for: an empty tensor
            torch.ops.fastsae.encode_topk_backward,
            (*grads, x, W_enc.detach(), b_dec, vals.detach(), idx, aux_vals.detach(), aux_idx, False),
        ),
        (torch.ops.fastsae.encode_relu, (x, W_enc, b_enc, b_dec, None)),
        (torch.ops.fastsae.encode_relu_backward, (torch.randn_like(acts), x, W_enc.detach(), b_dec, acts)),
        (torch.ops.fastsae.decode_sparse, (vals.detach().requires_grad_(), idx, W_dec, b_dec)),
        (torch.ops.fastsae.decode_sparse_backward, (torch.randn(B, d, device=device), vals.detach(), idx, W_dec)),
        (torch.ops.fastsae.topk_autoencoder_backward, (*joint_grads, True, None, None, None, None)),
        (torch.ops.fastsae.topk_autoencoder_backward, (*joint_grads, False, *dead_grads)),
        (torch.ops.fastsae.topk_autoencoder, joint_args),
        (torch.ops.fastsae.topk_autoencoder_backward_with_auxk, (*joint_backward, *auxk_saved, True)),
        (torch.ops.fastsae.topk_autoencoder_backward_with_auxk, (*joint_backward, *auxk_saved, False)),
        (torch.ops.fastsae.topk_autoencoder_backward_recompute_auxk, (*recompute_args, True)),
        (torch.ops.fastsae.topk_autoencoder_backward_recompute_auxk, (*recompute_args, False)),
        (torch.ops.fastsae.reconstruction_sums, (torch.randn(B, d, device=device, requires_grad=True), x)),
        (
            torch.ops.fastsae.reconstruction_sums_backward,
            (*torch.randn(2, device=device), torch.randn(B, d, device=device), x, True, False),
        ),
        (
            torch.ops.fastsae.training_losses,
            (
                torch.randn(B, d, device=device, requires_grad=True),
                x,
                torch.randn(B, d, device=device),
                torch.tensor(2, device=device),
                4,
                0.5,
            ),
        ),
        (torch.ops.fastsae.training_losses, (torch.randn(B, d, device=device), x, None, None, 1, 0.5)),
        (
            torch.ops.fastsae.training_losses_backward,
            (
                *torch.randn(4, device=device),
                torch.rand(5, device=device) + 1,
                torch.randn(B, d, device=device),
                x,
                torch.randn(B, d, device=device),
                0.5,
                True,
                False,
                True,
            ),
        ),
        (
            torch.ops.fastsae.training_losses_backward,
            (
                torch.randn((), device=device),
                None,
                None,
                None,
                torch.rand(5, device=device) + 1,
                torch.randn(B, d, device=device),
                x,
                None,
                0.5,
                True,
                False,
                False,
            ),
        ),
        (torch.ops.fastsae.fire_counts, (idx, F_, vals.detach())),
        (torch.ops.fastsae.fire_counts_dense, (acts,)),
        (
            torch.ops.fastsae.update_since_fired,
            (torch.randint(0, 100, (F_,), device=device), torch.randint(0, 2, (F_,), device=device), B),
        ),
        (torch.ops.fastsae.dead_mask, (torch.randint(0, 100, (F_,), device=device), 50)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)
