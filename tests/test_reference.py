"""The reference's hand-written backward formulas against autograd of its own forward, in fp64."""

import pytest
import torch

from fastsae import reference

from .utils import assert_close, random_sae_weights

SHAPES = [(1, 5, 7, 1), (37, 12, 40, 5), (64, 9, 16, 16)]  # (B, d, F, k); k == F in the last


def _ids(shape):
    return "B{}_d{}_F{}_k{}".format(*shape)


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_encode_topk_backward_matches_autograd(shape):
    B, d, F, k = shape
    x = torch.randn(B, d, dtype=torch.float64, requires_grad=True)
    params = [p.requires_grad_() for p in random_sae_weights(d, F)]
    W_enc, b_enc, _, b_dec = params
    k_aux = min(3, F)
    dead = torch.rand(F) < 0.5
    vals, idx, aux_vals, aux_idx = reference.encode_topk(x, W_enc, b_enc, b_dec, k, k_aux, dead)
    grad_vals, grad_aux = torch.randn_like(vals), torch.randn_like(aux_vals)
    expected = torch.autograd.grad((vals * grad_vals).sum() + (aux_vals * grad_aux).sum(), (x, W_enc, b_enc, b_dec))
    actual = reference.encode_topk_backward(grad_vals, grad_aux, x, W_enc, b_dec, vals, idx, aux_vals, aux_idx)
    for name, a, e in zip(("dx", "dW_enc", "db_enc", "db_dec"), actual, expected):
        assert_close(a, e, torch.float64, name)


@pytest.mark.parametrize("threshold", [False, True], ids=["relu", "jumprelu"])
def test_encode_relu_backward_matches_autograd(threshold):
    x = torch.randn(23, 10, dtype=torch.float64, requires_grad=True)
    W_enc, b_enc, _, b_dec = [p.requires_grad_() for p in random_sae_weights(10, 30)]
    cut = torch.rand(30, dtype=torch.float64) if threshold else None
    acts = reference.encode_relu(x, W_enc, b_enc, b_dec, cut)
    grad = torch.randn_like(acts)
    expected = torch.autograd.grad((acts * grad).sum(), (x, W_enc, b_enc, b_dec))
    actual = reference.encode_relu_backward(grad, x, W_enc, b_dec, acts)
    for name, a, e in zip(("dx", "dW_enc", "db_enc", "db_dec"), actual, expected):
        assert_close(a, e, torch.float64, name)


def test_decode_sparse_backward_matches_autograd():
    B, d, F, k = 29, 11, 50, 6
    vals = torch.rand(B, k, dtype=torch.float64, requires_grad=True)
    idx = torch.stack([torch.randperm(F)[:k] for _ in range(B)]).to(torch.int32)
    idx[:, 0] = 3  # one feature in every row: dW_dec must sum contributions
    W_dec = torch.randn(F, d, dtype=torch.float64, requires_grad=True)
    out = reference.decode_sparse(vals, idx, W_dec)
    grad = torch.randn_like(out)
    expected = torch.autograd.grad((out * grad).sum(), (vals, W_dec))
    actual = reference.decode_sparse_backward(grad, vals, idx, W_dec)
    for name, a, e in zip(("dvals", "dW_dec"), actual, expected):
        assert_close(a, e, torch.float64, name)


def test_decode_sparse_equals_dense_decode():
    B, d, F, k = 17, 8, 33, 4
    vals, idx = torch.rand(B, k, dtype=torch.float64), torch.randint(0, F, (B, k), dtype=torch.int32)
    W_dec, b_dec = torch.randn(F, d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    dense = reference.scatter_codes(vals, idx, F)
    assert_close(
        reference.decode_sparse(vals, idx, W_dec, b_dec), reference.decode_dense(dense, W_dec, b_dec), torch.float64
    )


def test_topk_values_are_post_relu_and_aux_only_selects_dead():
    pre = torch.randn(50, 20, dtype=torch.float64) - 1.0
    vals, idx = reference.topk_activation(pre, 8)
    assert (vals >= 0).all() and (vals == 0).any()
    x = torch.randn(50, 6, dtype=torch.float64)
    W_enc, b_enc, _, b_dec = random_sae_weights(6, 20)
    dead = torch.zeros(20, dtype=torch.bool)
    dead[[2, 5]] = True
    _, _, aux_vals, aux_idx = reference.encode_topk(x, W_enc, b_enc, b_dec, 4, 5, dead)
    fired_aux = aux_idx[aux_vals > 0].long()
    assert dead[fired_aux].all()


def test_batch_topk_keeps_batch_budget():
    acts = torch.rand(10, 40, dtype=torch.float64)
    codes = reference.batch_topk(acts, 3)
    assert int((codes > 0).sum()) == 30
    threshold = codes[codes > 0].min()
    assert (acts[codes == 0] <= threshold).all()


def test_losses_on_known_values():
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0]], dtype=torch.float64)
    x_hat = x + torch.tensor([[1.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    assert float(reference.mse(x_hat, x)) == pytest.approx(0.5)
    # total variance around the batch mean (2, 4): 1 + 4 + 1 + 4 = 10; error 2.
    assert float(reference.fvu(x_hat, x)) == pytest.approx(0.2)
    assert torch.isnan(reference.fvu(x[:1], x[:1]))
    scale_half = reference.auxk_loss(x_hat, x, torch.tensor(2), 4)
    assert float(scale_half) == pytest.approx(0.1)
    assert float(reference.auxk_loss(x_hat, x, torch.tensor(0), 4)) == 0.0


def test_l1_penalty_is_decoder_weighted_and_scale_free():
    """Per token sum_f acts_f ||W_dec_f||, batch mean, over sqrt(d * total variance): rescaling the
    activations and codes together leaves it unchanged, and a decoder row's norm weighs its code."""
    acts = torch.rand(10, 7, dtype=torch.float64)
    W_dec = torch.randn(7, 5, dtype=torch.float64)
    x = torch.randn(10, 5, dtype=torch.float64) + 3
    expected = (acts * W_dec.norm(dim=1)).sum(1).mean() / (5 * (x - x.mean(0)).pow(2).sum(1).mean()).sqrt()
    assert torch.allclose(reference.l1_penalty(acts, W_dec, x), expected)
    assert torch.allclose(reference.l1_penalty(100 * acts, W_dec, 100 * x), expected)
    doubled = W_dec.clone()
    doubled[2] *= 2
    only_two = torch.zeros_like(acts)
    only_two[:, 2] = acts[:, 2]
    assert torch.allclose(reference.l1_penalty(only_two, doubled, x), 2 * reference.l1_penalty(only_two, W_dec, x))


def test_jumprelu_threshold_gradients_are_the_straight_through_estimates():
    """Rajamanoharan et al. 2024: d/dtheta of pre * H(pre - theta) is -theta/eps * K((pre - theta)/eps)
    and of H(pre - theta) is -1/eps * K(...), K the unit rectangle; pre gets H from the codes, nothing
    from the L0."""
    pre = torch.tensor([[0.50, 0.10, 0.30], [0.26, 0.00, 0.90]], dtype=torch.float64, requires_grad=True)
    threshold = torch.tensor([0.25, 0.20, 0.30], dtype=torch.float64, requires_grad=True)
    codes = reference.jumprelu(pre, threshold, bandwidth=0.1)
    assert torch.equal(codes.detach(), torch.tensor([[0.5, 0.0, 0.0], [0.26, 0.0, 0.9]], dtype=torch.float64))
    codes.sum().backward()
    # Within the window |pre - theta| < 0.05: (1, 0) [0.5 - 0.25 no], (0, 2) yes, (1, 0) 0.01 yes, (0, 1) 0.1 no.
    assert torch.allclose(threshold.grad, torch.tensor([-0.25 / 0.1, 0.0, -0.3 / 0.1], dtype=torch.float64))
    assert torch.equal(pre.grad, torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 1.0]], dtype=torch.float64))
    threshold.grad, pre.grad = None, None
    l0 = reference.l0_penalty(pre, threshold, bandwidth=0.1)
    assert float(l0.detach()) == pytest.approx(1.5)  # (1 + 2) codes over 2 tokens
    l0.backward()
    assert torch.allclose(threshold.grad, torch.tensor([-0.5 / 0.1, 0.0, -0.5 / 0.1], dtype=torch.float64))
    assert pre.grad is None or not pre.grad.any()


def test_decoder_constraint():
    W = torch.randn(30, 7, dtype=torch.float64) * 3
    normalized = reference.normalize_decoder_rows(W)
    assert torch.allclose(normalized.norm(dim=1), torch.ones(30, dtype=torch.float64))
    grad = torch.randn_like(W)
    projected = reference.remove_parallel_grad(W, grad)
    assert torch.allclose((projected * W).sum(1), torch.zeros(30, dtype=torch.float64), atol=1e-12)
    # The orthogonal part is untouched.
    orthogonal = grad - (grad * W).sum(1, keepdim=True) / (W * W).sum(1, keepdim=True) * W
    assert_close(projected, orthogonal, torch.float64)


def test_fire_count_statistics():
    idx = torch.tensor([[0, 2], [2, 3]])
    vals = torch.tensor([[1.0, 0.0], [0.5, 2.0]])
    assert reference.fire_counts(idx, 5, vals).tolist() == [1, 0, 1, 1, 0]
    assert reference.fire_counts(idx, 5).tolist() == [1, 0, 2, 1, 0]
    acts = torch.tensor([[0.0, 1.0, -1.0], [2.0, 3.0, 0.0]])
    assert reference.fire_counts_dense(acts).tolist() == [1, 2, 0]
    since = reference.update_since_fired(torch.tensor([5, 7, 0]), torch.tensor([0, 3, 0]), 10)
    assert since.tolist() == [15, 0, 10]
    assert reference.dead_mask(since, 10).tolist() == [True, False, False]
