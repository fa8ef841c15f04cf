"""Every bad input tried on the public API, and what the user sees: an exception that names the
problem, never a silent wrong result. One row per input; run `pytest tests/test_bad_input.py -v` to
read the table. Damaged checkpoint files and non-finite batches in training have their own tests in
test_sae.py (they need files and a training loop).

Index checks on sparse codes run on the device without a host synchronisation (torch._assert_async):
on CPU they raise at once, on CUDA a failure is a device-side assert at the next synchronisation.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastsae import SAEConfig, SparseAutoencoder
from fastsae import functional as F

from .utils import random_sae_weights

D, N_FEATURES, BATCH, K = 6, 20, 8, 4


def _good() -> dict:
    W_enc, b_enc, W_dec, b_dec = random_sae_weights(D, N_FEATURES, dtype=torch.float32)
    vals = torch.rand(BATCH, K)
    idx = torch.randint(0, N_FEATURES, (BATCH, K), dtype=torch.int32)
    x = torch.randn(BATCH, D)
    return dict(x=x, W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, vals=vals, idx=idx)


def _encode_topk(a, **change):
    args = {"x": a["x"], "W_enc": a["W_enc"], "b_enc": a["b_enc"], "b_dec": a["b_dec"], "k": K, **change}
    return F.encode_topk(**args)


def _decode_sparse(a, **change):
    args = {"vals": a["vals"], "idx": a["idx"], "W_dec": a["W_dec"], "b_dec": a["b_dec"], **change}
    return F.decode_sparse(**args)


def _adam(a, adam_step=F.adam_, **change):
    """An Adam step of W_dec (`F.adam_`, or `F.decoder_adam_`) from zero moments."""
    args = {"step": 1, "lr": 1e-3, **change}
    moments = torch.zeros_like(a["W_dec"]), torch.zeros_like(a["W_dec"])
    return adam_step(a["W_dec"], torch.randn_like(a["W_dec"]), *moments, args["step"], args["lr"], 0.9, 0.999, 1e-8)


def _with(tensor: torch.Tensor, position: tuple[int, int], value) -> torch.Tensor:
    out = tensor.clone()
    out[position] = value
    return out


# (what is wrong, the call, the exception, what its message says)
# fmt: off
BAD_INPUTS = [
    ("encode_topk: x is 1-D", lambda a: _encode_topk(a, x=a["x"][0]), ValueError, "x must have 2 dimension"),
    ("encode_topk: empty batch", lambda a: _encode_topk(a, x=a["x"][:0]), ValueError, "x is an empty batch"),
    ("encode_topk: integer x", lambda a: _encode_topk(a, x=a["x"].long()), ValueError, "x must be float32"),
    ("encode_topk: x is not a tensor", lambda a: _encode_topk(a, x=a["x"].tolist()), TypeError, "x must be a torch"),
    ("encode_topk: x has the wrong d", lambda a: _encode_topk(a, x=torch.randn(BATCH, D + 1)), ValueError,
     "x has 7 dimensions but W_enc expects d_in=6"),
    ("encode_topk: W_enc is 3-D", lambda a: _encode_topk(a, W_enc=a["W_enc"][None]), ValueError,
     "W_enc must have 2 dimension"),
    ("encode_topk: b_enc too short", lambda a: _encode_topk(a, b_enc=a["b_enc"][:3]), ValueError,
     "b_enc has 3 entries"),
    ("encode_topk: b_dec too short", lambda a: _encode_topk(a, b_dec=a["b_dec"][:3]), ValueError,
     "b_dec has 3 entries"),
    ("encode_topk: k > n_features", lambda a: _encode_topk(a, k=N_FEATURES + 1), ValueError,
     r"k must be in \[1, n_features=20\], got 21"),
    ("encode_topk: k = 0", lambda a: _encode_topk(a, k=0), ValueError, r"k must be in \[1"),
    ("encode_topk: k is a float", lambda a: _encode_topk(a, k=4.0), TypeError, "k must be an int"),
    ("encode_topk: k_aux without dead_mask", lambda a: _encode_topk(a, k_aux=4), ValueError,
     "k_aux > 0 needs dead_mask"),
    ("encode_topk: dead_mask of the wrong shape",
     lambda a: _encode_topk(a, k_aux=4, dead_mask=torch.ones(N_FEATURES - 1, dtype=torch.bool)), ValueError,
     "dead_mask must be bool"),
    ("encode_topk: tensors on two devices", lambda a: _encode_topk(a, x=a["x"].to("meta")), ValueError, "one device"),
    ("topk_autoencoder_by_dead_count: dead mask of the wrong shape", lambda a: F.topk_autoencoder_by_dead_count(
     a["x"], a["W_enc"], a["b_enc"], a["b_dec"], a["W_dec"], K, torch.ones(3, dtype=torch.bool), 2, [0, 8], True),
     ValueError, r"dead_mask must be bool of shape \(20,\)"),
    ("topk_autoencoder_by_dead_count: rungs out of order", lambda a: F.topk_autoencoder_by_dead_count(
     a["x"], a["W_enc"], a["b_enc"], a["b_dec"], a["W_dec"], K, torch.ones(N_FEATURES, dtype=torch.bool), 2,
     [8, 0], True), ValueError, "rungs must be list lengths"),
    ("encode_relu: threshold too short", lambda a: F.encode_relu(a["x"], a["W_enc"], a["b_enc"], a["b_dec"],
     torch.zeros(3)), ValueError, "threshold has 3 entries, expected n_features=20"),
    ("encode_batchtopk: k > n_features", lambda a: F.encode_batchtopk(a["x"], a["W_enc"], a["b_enc"], a["b_dec"],
     N_FEATURES + 1), ValueError, r"k must be in \[1, n_features=20\]"),
    ("encode_batchtopk_sparse: k > n_features", lambda a: F.encode_batchtopk_sparse(
     a["x"], a["W_enc"], a["b_enc"], a["b_dec"], N_FEATURES + 1), ValueError, r"k must be in \[1, n_features=20\]"),
    ("encode_batchtopk_sparse: empty batch", lambda a: F.encode_batchtopk_sparse(
     a["x"][:0], a["W_enc"], a["b_enc"], a["b_dec"], K), ValueError, "empty batch"),
    ("reconstruction_sums: shapes differ", lambda a: F.reconstruction_sums(a["x"][:, :3], a["x"]), ValueError,
     "must have the same shape"),
    ("reconstruction_sums: empty batch", lambda a: F.fvu(a["x"][:0], a["x"][:0]), ValueError, "empty batch"),
    ("reconstruction_sums: integer x", lambda a: F.mse(a["x"], a["idx"][:, :1].expand(BATCH, D)), ValueError,
     "x must be float32"),
    ("training_losses: shapes differ", lambda a: F.training_losses(a["x"][:, :3], a["x"]), ValueError,
     r"recon \(8, 3\) and x \(8, 6\) must have the same shape"),
    ("training_losses: empty batch", lambda a: F.training_losses(a["x"][:0], a["x"][:0]), ValueError, "empty batch"),
    ("training_losses: aux_recon without n_dead", lambda a: F.training_losses(a["x"], a["x"], a["x"]), ValueError,
     "n_dead must be a 0-d integer tensor"),
    ("training_losses: k_aux = 0", lambda a: F.training_losses(a["x"], a["x"], a["x"], torch.tensor(1), 0),
     ValueError, "k_aux must be a positive int"),
    ("decode_sparse: float idx", lambda a: _decode_sparse(a, idx=a["idx"].float()), ValueError,
     "idx must be int32 or int64"),
    ("decode_sparse: idx and vals shapes differ", lambda a: _decode_sparse(a, idx=a["idx"][:, :3]), ValueError,
     "idx has shape"),
    ("decode_sparse: empty batch", lambda a: _decode_sparse(a, vals=a["vals"][:0], idx=a["idx"][:0]), ValueError,
     "vals is an empty batch"),
    ("decode_sparse: more codes than features",
     lambda a: _decode_sparse(a, vals=torch.rand(BATCH, N_FEATURES + 1),
                              idx=torch.zeros(BATCH, N_FEATURES + 1, dtype=torch.int32)),
     ValueError, "k=21 codes per token but there are only 20 features"),
    ("decode_sparse: negative feature index", lambda a: _decode_sparse(a, idx=_with(a["idx"], (1, 2), -1)),
     RuntimeError, r"idx holds a feature index outside \[0, 20\)"),
    ("decode_sparse: feature index >= n_features", lambda a: _decode_sparse(a, idx=_with(a["idx"], (5, 0), 20)),
     RuntimeError, r"idx holds a feature index outside \[0, 20\)"),
    ("decode_sparse: b_dec too short", lambda a: _decode_sparse(a, b_dec=a["b_dec"][:5]), ValueError,
     "b_dec has 5 entries"),
    ("decode_sparse: fired_only not a bool", lambda a: _decode_sparse(a, fired_only=a["vals"] > 0), ValueError,
     "fired_only must be True or False"),
    ("decode_dense: acts of the wrong width", lambda a: F.decode_dense(torch.rand(BATCH, 19), a["W_dec"]), ValueError,
     "acts has 19 features"),
    ("decode_dense: b_dec too short", lambda a: F.decode_dense(torch.rand(BATCH, N_FEATURES), a["W_dec"],
     a["b_dec"][:5]), ValueError, "b_dec has 5 entries"),
    ("auxk_reconstruction: float feature list", lambda a: F.auxk_reconstruction(a["x"], a["W_enc"], a["b_enc"],
     a["b_dec"], a["W_dec"], torch.arange(5.0), 2), ValueError, "features must be an int64"),
    ("auxk_reconstruction: W_dec not [F, d]", lambda a: F.auxk_reconstruction(a["x"], a["W_enc"], a["b_enc"],
     a["b_dec"], a["W_dec"].T, torch.arange(5), 2), ValueError, r"W_dec must be \[n_features, d_in\]"),
    ("topk_autoencoder: k > n_features", lambda a: F.topk_autoencoder(a["x"], a["W_enc"], a["b_enc"], a["b_dec"],
     a["W_dec"], N_FEATURES + 1), ValueError, "k must be"),
    ("topk_autoencoder: float dead features", lambda a: F.topk_autoencoder(a["x"], a["W_enc"], a["b_enc"],
     a["b_dec"], a["W_dec"], 3, dead_features=torch.arange(5.0), k_aux=2), ValueError, "features must be an int64"),
    ("topk_autoencoder: dead features without k_aux", lambda a: F.topk_autoencoder(a["x"], a["W_enc"], a["b_enc"],
     a["b_dec"], a["W_dec"], 3, dead_features=torch.arange(5)), ValueError, "k_aux must be"),
    ("topk_autoencoder: W_dec not [F, d]", lambda a: F.topk_autoencoder(a["x"], a["W_enc"], a["b_enc"], a["b_dec"],
     a["W_dec"].T, 3), ValueError, r"W_dec must be \[n_features, d_in\]"),
    ("fire_counts: float idx", lambda a: F.fire_counts(a["idx"].float(), N_FEATURES), ValueError,
     "idx must be int32 or int64"),
    ("fire_counts: n_features = 0", lambda a: F.fire_counts(a["idx"], 0), ValueError, "n_features must be >= 1"),
    ("fire_counts: vals of another shape", lambda a: F.fire_counts(a["idx"], N_FEATURES, a["vals"][:, :2]), ValueError,
     "vals has shape"),
    ("fire_counts: feature index >= n_features", lambda a: F.fire_counts(_with(a["idx"], (0, 0), 25), N_FEATURES),
     RuntimeError, "fire_counts: idx holds 25"),
    ("fire_counts_dense: 1-D acts", lambda a: F.fire_counts_dense(torch.rand(N_FEATURES)), ValueError,
     "acts must have 2 dimension"),
    ("update_since_fired_: counts of another shape",
     lambda a: F.update_since_fired_(torch.zeros(N_FEATURES, dtype=torch.long), torch.zeros(3, dtype=torch.long), 8),
     RuntimeError, "update_since_fired: counts has shape"),
    ("update_since_fired_: negative token count",
     lambda a: F.update_since_fired_(torch.zeros(N_FEATURES, dtype=torch.long),
                                     torch.zeros(N_FEATURES, dtype=torch.long), -1),
     RuntimeError, "n_tokens must be >= 0"),
    ("remove_parallel_grad_: grad of another shape", lambda a: F.remove_parallel_grad_(a["W_dec"], a["W_dec"][:3]),
     ValueError, "grad has shape"),
    ("normalize_decoder_rows_: 1-D W_dec", lambda a: F.normalize_decoder_rows_(a["W_dec"][0]), ValueError,
     "W_dec must have 2 dimension"),
    ("adam_: a rate of one element per row", lambda a: _adam(a, lr=torch.full((N_FEATURES, 1), 1e-3)), ValueError,
     r"lr must be a number or a 0-dim tensor \(floating for lr\), got a 2-dim"),
    ("adam_: an integer rate tensor", lambda a: _adam(a, lr=torch.tensor(1)), ValueError,
     r"lr must be a number or a 0-dim tensor \(floating for lr\), got a 0-dim torch.int64"),
    ("decoder_adam_: a step count per row", lambda a: _adam(a, F.decoder_adam_, step=torch.ones(N_FEATURES)),
     ValueError, "step must be a number or a 0-dim tensor"),
    ("decoder_adam_: the rate on another device", lambda a: _adam(a, F.decoder_adam_, lr=torch.tensor(1e-3,
     device="meta")), ValueError, "all tensors must be on one device"),
    ("SAEConfig: k > n_features", lambda a: SAEConfig(d_in=D, n_features=N_FEATURES, k=N_FEATURES + 1), ValueError,
     r"k must be in \[1, n_features=20\]"),
    ("SAEConfig: fractional k", lambda a: SAEConfig(d_in=D, n_features=N_FEATURES, k=2.5), TypeError,
     r"k must be a whole number \(int\), got 2.5"),
    ("SAEConfig: n_features a bool", lambda a: SAEConfig(d_in=D, n_features=True, k=1), TypeError,
     "n_features must be a whole number"),
    ("SAEConfig: k_aux a fraction", lambda a: SAEConfig(d_in=D, n_features=N_FEATURES, k_aux=3.5), TypeError,
     "k_aux must be a whole number"),
    ("SAEConfig: dead_after_tokens infinite", lambda a: SAEConfig(d_in=D, n_features=N_FEATURES,
     dead_after_tokens=float("inf")), TypeError, "dead_after_tokens must be a whole number"),
    ("SAEConfig: coefficient a string", lambda a: SAEConfig(d_in=D, n_features=N_FEATURES, l1_coef="2"), TypeError,
     "l1_coef must be a real number"),
    ("SAEConfig: check_finite not a bool", lambda a: SAEConfig(d_in=D, n_features=N_FEATURES, check_finite=1),
     TypeError, "check_finite must be True or False"),
    ("SAEConfig: unknown activation", lambda a: SAEConfig(d_in=D, n_features=N_FEATURES, activation="gelu"),
     ValueError, "activation must be one of"),
    ("SparseAutoencoder: x of the wrong width",
     lambda a: SparseAutoencoder(SAEConfig(d_in=D, n_features=N_FEATURES, k=K))(torch.randn(BATCH, D + 1)),
     ValueError, r"x must be \[\.\.\., d_in=6\]"),
    ("SparseAutoencoder: NaN in x", lambda a: SparseAutoencoder(SAEConfig(d_in=D, n_features=N_FEATURES, k=K))(
     _with(a["x"], (2, 3), float("nan"))), ValueError, "x contains NaN or infinite values"),
    ("SparseAutoencoder.save: a directory", lambda a: SparseAutoencoder(SAEConfig(d_in=D, n_features=N_FEATURES,
     k=K)).save(Path(__file__).parent), IsADirectoryError, "is a directory: save writes one .safetensors file"),
    ("SparseAutoencoder.load: no such file", lambda a: SparseAutoencoder.load("/nonexistent/sae.safetensors"),
     FileNotFoundError, "no SAE checkpoint"),
]
# fmt: on


@pytest.mark.parametrize("call, error, message", [row[1:] for row in BAD_INPUTS], ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_raises_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call(_good())


def test_good_input_passes_every_check():
    """The table's good arguments themselves are accepted (so each row fails for its one change)."""
    a = _good()
    _encode_topk(a)
    F.encode_batchtopk_sparse(a["x"], a["W_enc"], a["b_enc"], a["b_dec"], K)
    _decode_sparse(a)
    F.decode_dense(torch.rand(BATCH, N_FEATURES), a["W_dec"], a["b_dec"])
    F.fire_counts(a["idx"], N_FEATURES, a["vals"])
    _adam(a, lr=torch.tensor(1e-3), step=torch.tensor(1.0))
    _adam(a, F.decoder_adam_)
