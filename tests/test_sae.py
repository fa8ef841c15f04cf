"""SparseAutoencoder: against the reference, training, save/load, compile, bad input."""

import copy
import os
import re
import signal
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch._dynamo.testing import CompileCounterWithBackend

import fastsae
from fastsae import reference

from .utils import DEVICES, assert_close

README = Path(__file__).resolve().parent.parent / "README.md"


def _sae(device="cpu", dtype="float64", **overrides):
    cfg = fastsae.SAEConfig(**{"d_in": 24, "n_features": 96, "k": 6, "dtype": dtype, **overrides})
    sae = fastsae.SparseAutoencoder(cfg).to(device)
    sae.initialize(torch.randn(300, cfg.d_in, dtype=torch.float64, device=device) + 3)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
    return sae


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ["topk", "relu", "jumprelu", "batchtopk"])
def test_forward_matches_reference(activation, device):
    sae = _sae(device, activation=activation)
    if activation == "jumprelu":
        with torch.no_grad():
            sae.threshold.uniform_(0, 0.5)
    x = torch.randn(37, 24, dtype=torch.float64, device=device) + 3
    out = sae(x)
    params = (sae.W_enc, sae.b_enc, sae.b_dec)
    pre = reference.pre_activation(x, *params)
    if activation == "topk":
        vals, _ = reference.topk_activation(pre, 6)
        assert_close(out.vals.sort(1).values, vals.sort(1).values, torch.float64, "vals")
        recon = reference.decode_sparse(out.vals, out.idx, sae.W_dec, sae.b_dec)
    else:
        threshold = sae.threshold if activation == "jumprelu" else None
        acts = reference.encode_relu(x, sae.W_enc, sae.b_enc, sae.b_dec, threshold)
        if activation == "batchtopk":  # a training BatchTopK SAE's codes are sparse (vals, idx)
            acts = reference.batch_topk(acts, 6)
            assert out.acts is None
            assert_close(reference.scatter_codes(out.vals, out.idx, acts.shape[1]), acts, torch.float64, "codes")
        else:
            assert_close(out.acts, acts, torch.float64, "acts")
        recon = reference.decode_dense(acts, sae.W_dec, sae.b_dec)
    assert_close(out.recon, recon, torch.float64, "recon")
    assert_close(out.fvu, reference.fvu(recon, x), torch.float64, "fvu")
    assert_close(out.mse, reference.mse(recon, x), torch.float64, "mse")


def test_auxk_loss_trains_dead_features_only():
    sae = _sae(dead_after_tokens=0, k_aux=12)
    x = torch.randn(50, 24, dtype=torch.float64) + 3
    sae.train()
    sae(x)  # every feature not fired in this batch is now dead (threshold 0)
    dead = sae.dead_features()
    assert 0 < int(dead.sum()) < 96
    out = sae(x)
    assert float(out.auxk.detach()) > 0
    (out.auxk).backward()
    grad_rows = sae.W_dec.grad.abs().sum(1) > 0
    assert grad_rows.any() and not grad_rows[~dead].any(), "AuxK must only move dead features' decoder rows"


@pytest.mark.parametrize("device", DEVICES)
def test_auxk_paths_agree(device, monkeypatch):
    """AuxK dense over the few dead features (the eager default) and from the fused encode's AuxK
    codes (what runs when many are dead, or while compiling) give the same loss and gradients."""
    sae = _sae(device, dead_after_tokens=0, k_aux=12)
    sae.train()
    x = torch.randn(50, 24, dtype=torch.float64, device=device) + 3
    sae(x)  # the features not fired on this batch are now dead
    assert 0 < int(sae.dead_features().sum()) * 50 <= fastsae.sae.AUXK_DENSE_MAX_ELEMENTS
    fused = copy.deepcopy(sae)
    results = []
    for model in (sae, fused):
        if model is fused:
            monkeypatch.setattr(fastsae.sae, "AUXK_DENSE_MAX_ELEMENTS", 0)
        out = model(x)
        assert float(out.auxk.detach()) > 0
        results.append((out.loss, *torch.autograd.grad(out.loss, list(model.parameters()))))
    for name, dense, from_codes in zip(("loss", *dict(sae.named_parameters())), *results):
        assert_close(dense, from_codes, torch.float64, name)


@pytest.mark.parametrize("path", ["dense_over_dead", "fused_codes"])
def test_whitened_auxk_loss_matches_reference(path, monkeypatch):
    """With centering="whiten" the codes, the residual and its AuxK reconstruction live in the whitened
    space and the FVU in the input space; checked term by term against the reference on both AuxK paths."""
    if path == "fused_codes":
        monkeypatch.setattr(fastsae.sae, "AUXK_DENSE_MAX_ELEMENTS", 0)
    sae = _sae(centering="whiten", dead_after_tokens=0, k_aux=12)
    sae.train()
    x = torch.randn(50, 24, dtype=torch.float64) @ torch.randn(24, 24, dtype=torch.float64) + 3
    sae(x)  # the features not fired on this batch are now dead
    dead = sae.dead_features()
    out = sae(x)
    white = (x - sae.whiten_center) @ sae.whiten_matrix
    params = (sae.W_enc, sae.b_enc, sae.b_dec)
    vals, idx, aux_vals, aux_idx = reference.encode_topk(white, *params, 6, 12, dead)
    recon_white = reference.decode_sparse(vals, idx, sae.W_dec, sae.b_dec)
    recon = recon_white @ sae.unwhiten_matrix + sae.whiten_center
    aux_recon = reference.decode_sparse(aux_vals, aux_idx, sae.W_dec, None)
    auxk = reference.auxk_loss(aux_recon, white - recon_white, dead.sum(), 12)
    assert_close(out.recon, recon, torch.float64, "recon")
    assert_close(out.fvu, reference.fvu(recon, x), torch.float64, "fvu")
    assert_close(out.auxk, auxk, torch.float64, "auxk")
    assert float(auxk.detach()) > 0


def test_death_statistics_count_fires_without_sync():
    sae = _sae()
    sae.train()
    x = torch.randn(40, 24, dtype=torch.float64) + 3
    out = sae(x)
    expected = reference.fire_counts(out.idx, 96, out.vals)
    assert sae.feature_fire_count.tolist() == expected.tolist()
    assert sae.tokens_since_fired.tolist() == torch.where(expected > 0, 0, 40).tolist()
    assert int(sae.n_tokens_seen) == 40
    sae.eval()
    sae(x)
    assert int(sae.n_tokens_seen) == 40, "evaluation must not change training statistics"


@pytest.mark.parametrize("device", DEVICES)
def test_dead_count_comes_from_the_step_before(device, monkeypatch, fresh_dynamo):
    """A training step with AuxK takes the dead features' count from the step before (DEAD_COUNT_AHEAD),
    with no synchronising count after the first step, and trains exactly as a twin that counts them
    at every step. A write to the statistics, a new dead threshold or a forward that cannot
    synchronise (traced by torch.compile) makes the next step count them itself; an evaluation keeps
    the count."""
    ahead = _sae(device, k_aux=12, dead_after_tokens=40)  # dead: not fired on the last batch
    counting = copy.deepcopy(ahead)
    optimizers = {id(sae): torch.optim.SGD(sae.parameters(), lr=1e-2) for sae in (ahead, counting)}
    from_last_step = []
    read = fastsae.SparseAutoencoder._dead_count_from_last_step

    def spy(sae):
        from_last_step.append(read(sae))
        return from_last_step[-1]

    monkeypatch.setattr(fastsae.SparseAutoencoder, "_dead_count_from_last_step", spy)
    true_counts = []
    for _ in range(6):
        x = torch.randn(50, 24, dtype=torch.float64, device=device) + 3
        true_counts.append(int(ahead.dead_features().sum()))
        outs = []
        for sae, use_count in ((ahead, True), (counting, False)):
            monkeypatch.setattr(fastsae.sae, "DEAD_COUNT_AHEAD", use_count)
            out = sae(x)
            out.loss.backward()
            optimizers[id(sae)].step()
            optimizers[id(sae)].zero_grad()
            outs.append(out)
        for name in ("loss", "auxk", "fvu"):
            assert_close(getattr(outs[0], name), getattr(outs[1], name), torch.float64, name)
    assert len(set(true_counts[1:])) > 1 and min(true_counts[1:]) > 0, true_counts  # the list changed
    assert_close(ahead.W_enc, counting.W_enc, torch.float64, "W_enc after training")
    assert torch.equal(ahead.tokens_since_fired, counting.tokens_since_fired)
    # the counting twin never had a count to read; the other read one at every step after the first
    assert from_last_step[::2] == [None] + true_counts[1:], (from_last_step, true_counts)

    def list_length() -> int:
        return ahead._few_dead_features(ahead.dead_features(), 50).shape[0]

    monkeypatch.setattr(fastsae.sae, "DEAD_COUNT_AHEAD", True)
    x = torch.randn(50, 24, dtype=torch.float64, device=device) + 3
    ahead.eval()
    ahead(x)
    ahead.train()
    assert list_length() == int(ahead.dead_features().sum())
    assert from_last_step[-1] is not None, "an evaluation dropped the count"
    ahead(x)
    with torch.no_grad():
        ahead.tokens_since_fired.fill_(1000)  # every feature dead: the count queued before is stale
    assert list_length() == 96 and from_last_step[-1] is None
    ahead(x)
    ahead.cfg.dead_after_tokens = 10**6  # none dead
    assert list_length() == 0 and from_last_step[-1] is None
    ahead.cfg.dead_after_tokens = 40
    ahead(x)
    ahead.compile(backend="eager")  # (the compiled part does not count them: the eager part does)
    assert ahead(x).loss.isfinite() and ahead._dead_count_ahead is not None


def test_readme_training_loop_reduces_loss(tmp_path, monkeypatch):
    """The README's drop-in example, executed as written (in a scratch folder: it saves a file)."""
    monkeypatch.chdir(tmp_path)
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    losses = namespace["losses"]
    assert losses[-1] < 0.5 * losses[0], f"FVU did not fall: {losses[0]:.3f} -> {losses[-1]:.3f}"


def test_decoder_rows_stay_unit_norm_in_training():
    sae = _sae(dtype="float32")
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for _ in range(5):
        out = sae(torch.randn(64, 24) + 3)
        out.loss.backward()
        sae.remove_decoder_parallel_grad()
        opt.step()
        opt.zero_grad()
        sae.normalize_decoder()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(96), atol=1e-5)


def test_save_load_round_trip(tmp_path):
    sae = _sae(dtype="float32")
    sae.train()
    sae(torch.randn(64, 24) + 3)
    sae = sae.to(torch.bfloat16)
    path = tmp_path / "sae.safetensors"
    sae.save(path)
    loaded = fastsae.SparseAutoencoder.load(path)
    assert loaded.cfg.dtype == "bfloat16" and loaded.cfg.k == 6
    for name, tensor in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    x = torch.randn(16, 24).to(torch.bfloat16) + 3
    sae.eval(), loaded.eval()
    assert torch.equal(sae(x).recon, loaded(x).recon)
    assert [p.name for p in tmp_path.iterdir()] == ["sae.safetensors"], "no temporary file may be left"


def test_loading_draws_no_random_directions(tmp_path, monkeypatch):
    """Every tensor of a checkpoint is loaded, so loading skips the random initialisation (seconds and a
    second copy's memory for a large SAE): a fastsae file and a SAELens directory."""
    sae = _sae(dtype="float32")
    sae.save(tmp_path / "sae.safetensors")
    sae.save(tmp_path / "saelens", format="saelens")

    def no_draw(self, seed=None):
        raise AssertionError("a loader drew random directions")

    monkeypatch.setattr(fastsae.SparseAutoencoder, "_init_directions", no_draw)
    for path in (tmp_path / "sae.safetensors", tmp_path / "saelens"):
        loaded = fastsae.SparseAutoencoder.load(path)
        assert torch.equal(loaded.W_dec, sae.W_dec) and torch.equal(loaded.W_enc, sae.W_enc), path


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "sae.safetensors"
    _sae().save(path)
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(fastsae.sae, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        _sae().save(path)
    assert path.read_bytes() == before, "a failed save must leave the earlier file intact"
    assert [p.name for p in tmp_path.iterdir()] == ["sae.safetensors"]


def test_load_rejects_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no SAE checkpoint"):
        fastsae.SparseAutoencoder.load(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        fastsae.SparseAutoencoder.load(garbage)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="not a fastsae checkpoint"):
        fastsae.SparseAutoencoder.load(foreign)
    sae = _sae()
    path = tmp_path / "sae.safetensors"
    sae.save(path)
    tensors = {n: t.contiguous() for n, t in sae.state_dict().items()}
    tensors["W_enc"] = torch.zeros(24, 95, dtype=torch.float64)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(ValueError, match="W_enc has shape"):
        fastsae.SparseAutoencoder.load(path)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"k": 97}, r"k must be in \[1, n_features=96\]"),
        ({"k": 0}, r"k must be in \[1"),
        ({"activation": "gelu"}, "activation must be one of"),
        ({"centering": "median"}, "centering must be one of"),
        ({"dtype": "int8"}, "dtype must be one of"),
        ({"k_aux": 97}, "k_aux must be in"),
        ({"activation": "relu", "k_aux": 8}, "only defined for activation='topk'"),
        ({"matryoshka_widths": (0, 8)}, r"must increase strictly within \[1, n_features=96\), got \[0, 8\]"),
        ({"matryoshka_widths": (8, 96)}, r"must increase strictly within \[1, n_features=96\)"),
        ({"matryoshka_widths": (32, 16)}, r"must increase strictly within"),
        ({"matryoshka_widths": (16, 16)}, r"must increase strictly within"),
        ({"activation": "relu", "matryoshka_widths": (16,)}, "for TopK and BatchTopK SAEs, not 'relu'"),
        ({"normalize_activations": "constant_norm_rescale"}, "normalize_activations must be one of"),
        ({"normalize_activations": "layer_norm", "centering": "whiten"}, "whitening standardises already"),
    ],
)
def test_config_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        fastsae.SAEConfig(**{"d_in": 24, "n_features": 96, **overrides})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ["topk", "relu", "batchtopk"])
def test_layer_norm_sae_reads_standardised_tokens(activation, device):
    """normalize_activations="layer_norm": the SAE is the plain one on the standardised tokens
    (`reference.layer_norm_input`): the same centering fitted to a sample, codes, losses and gradients,
    and the reconstruction mapped back (times each token's deviation, plus its mean)."""
    generator = torch.Generator().manual_seed(5)
    sample = (torch.randn(300, 24, generator=generator, dtype=torch.float64) * 4 + 3).to(device)
    x = (torch.randn(37, 24, generator=generator, dtype=torch.float64) * 4 + 3).to(device)
    cfg = {"d_in": 24, "n_features": 96, "k": 6, "dtype": "float64", "activation": activation}
    torch.manual_seed(0)
    normalized = fastsae.SparseAutoencoder(fastsae.SAEConfig(**cfg, normalize_activations="layer_norm")).to(device)
    normalized.initialize(sample)
    torch.manual_seed(0)
    plain = fastsae.SparseAutoencoder(fastsae.SAEConfig(**cfg)).to(device)
    plain.initialize(reference.layer_norm_input(sample)[0])
    for name, tensor in plain.state_dict().items():
        assert_close(normalized.state_dict()[name], tensor, torch.float64, f"{name} after initialize")
    x_n, mean, std = reference.layer_norm_input(x)
    out, want = normalized(x), plain(x_n)
    assert_close(out.loss, want.loss, torch.float64, "loss")
    assert_close(out.recon, want.recon * std + mean, torch.float64, "recon")
    out.loss.backward()
    want.loss.backward()
    for name, p in normalized.named_parameters():
        assert_close(p.grad, dict(plain.named_parameters())[name].grad, torch.float64, f"{name} gradient")
    for sae in (normalized, plain):
        sae.eval()
    codes, want_codes = normalized.encode(x), plain.encode(x_n)
    codes = codes if isinstance(codes, torch.Tensor) else reference.scatter_codes(codes.vals, codes.idx, 96)
    want_codes = (
        want_codes
        if isinstance(want_codes, torch.Tensor)
        else reference.scatter_codes(want_codes.vals, want_codes.idx, 96)
    )
    assert_close(codes, want_codes, torch.float64, "codes")


@pytest.mark.parametrize("widths", [(16.5,), (True,), "16", 16])
def test_config_rejects_matryoshka_widths_that_are_not_whole_numbers(widths):
    with pytest.raises(TypeError, match="matryoshka_widths must be"):
        fastsae.SAEConfig(d_in=24, n_features=96, matryoshka_widths=widths)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("codes", ["topk", "batchtopk sparse", "batchtopk dense"])
def test_matryoshka_loss_adds_each_prefixs_fvu(codes, device, monkeypatch, tmp_path):
    """matryoshka_widths (16, 60) of 96 features: the training loss is the plain SAE's plus the FVUs of
    the reconstructions from the first 16 and the first 60 features' codes (`reference.matryoshka_fvus`),
    and so are its gradients, with AuxK on and dead features (TopK) and for BatchTopK's sparse and
    dense codes; an evaluation's loss is the plain one's. It saves and loads with its widths."""
    from fastsae.ops import batchtopk

    monkeypatch.setattr(batchtopk, "SPARSE_CODES", codes != "batchtopk dense")
    activation = codes.split()[0]
    matryoshka = _sae(device, activation=activation, matryoshka_widths=[16, 60], dead_after_tokens=10)
    plain = _sae(device, activation=activation, dead_after_tokens=10)
    plain.load_state_dict(matryoshka.state_dict())
    with torch.no_grad():
        for sae in (matryoshka, plain):
            sae.tokens_since_fired[40:70] = 100  # AuxK over 30 dead features
    x = torch.randn(37, 24, dtype=torch.float64, device=device) + 3
    out, want = matryoshka(x), plain(x)
    acts = want.acts if want.acts is not None else reference.scatter_codes(want.vals, want.idx, 96)
    inner = reference.matryoshka_fvus(acts, plain.W_dec, plain.b_dec, x, (16, 60))
    assert float(inner.detach()) > float(want.fvu.detach()) > 0
    assert activation == "batchtopk" or float(want.auxk.detach()) > 0, "AuxK ran"
    assert_close(out.loss, want.loss + inner, torch.float64, "loss")
    out.loss.backward()
    (want.loss + inner).backward()
    for name, p in matryoshka.named_parameters():
        assert_close(p.grad, dict(plain.named_parameters())[name].grad, torch.float64, f"{name} gradient")
    matryoshka.eval()
    plain.eval()
    assert_close(matryoshka(x).loss, plain(x).loss, torch.float64, "evaluation loss")
    matryoshka.save(tmp_path / "sae.safetensors")
    assert fastsae.SparseAutoencoder.load(tmp_path / "sae.safetensors").cfg.matryoshka_widths == (16, 60)


@pytest.mark.parametrize("activation", ["topk", "relu", "batchtopk"])
def test_leading_dimensions(activation):
    """Activations shaped [batch, seq, d] (as transformer hooks give them) train and encode like the
    flattened [batch * seq, d] tokens, and every output keeps the leading shape."""
    sae = _sae(activation=activation)
    x = torch.randn(3, 5, 24, dtype=torch.float64) + 3
    flat = copy.deepcopy(sae)
    out, out_flat = sae(x), flat(x.reshape(15, 24))
    assert out.recon.shape == (3, 5, 24)
    assert torch.equal(out.recon.reshape(15, 24), out_flat.recon) and torch.equal(out.loss, out_flat.loss)
    codes = out.vals if activation in ("topk", "batchtopk") else out.acts  # BatchTopK trains on sparse codes
    assert codes.shape[:2] == (3, 5)
    assert torch.equal(sae.tokens_since_fired, flat.tokens_since_fired)  # 15 tokens seen either way
    sae.eval()
    encoded = sae.encode(x)
    first = encoded.vals if activation == "topk" else encoded
    assert first.shape[:2] == (3, 5)
    assert torch.allclose(sae.decode(encoded), sae(x).recon)
    single = sae.encode(x[0, 0])  # one token, [d]
    assert torch.allclose(single.vals if activation == "topk" else single, first[0, 0])


def test_first_training_batch_fits_the_centering_when_not_initialized():
    """Training an SAE that was neither initialised nor loaded fits b_dec to the first batch (once,
    with a warning); a loaded SAE keeps its b_dec; `never_fired` reports features silent so far."""
    cfg = fastsae.SAEConfig(d_in=24, n_features=96, k=6, dtype="float64")
    x = torch.randn(200, 24, dtype=torch.float64) + 3
    sae = fastsae.SparseAutoencoder(cfg)
    with torch.no_grad():
        sae.b_enc[:3] = -1e6  # three features that cannot fire
    with pytest.warns(UserWarning, match="initialize\\(\\) was not called"):
        sae(x)
    assert torch.allclose(sae.b_dec, fastsae.centering.geometric_median(x))
    b_dec = sae.b_dec.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sae(x + 1)  # no second fit, no second warning
    assert torch.equal(sae.b_dec, b_dec)
    assert sae.never_fired().nonzero().flatten().tolist() == [0, 1, 2]

    loaded = fastsae.SparseAutoencoder(cfg)
    loaded.load_state_dict(sae.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded(x)
    assert torch.equal(loaded.b_dec, b_dec)


def test_relu_sae_learns_sparse_codes_with_its_l1_penalty():
    """The ReLU SAE's loss includes l1_coef times its L1 penalty, which makes its codes sparser than
    training without it (the same data and initialisation)."""
    torch.manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(64, 16), dim=1)
    data = [(torch.rand(256, 64) * (torch.rand(256, 64) < 0.05)) @ features + 5 for _ in range(60)]
    active = {}
    for l1_coef in (0.0, 5.0):
        torch.manual_seed(1)
        sae = fastsae.SparseAutoencoder(fastsae.SAEConfig(d_in=16, n_features=128, activation="relu", l1_coef=l1_coef))
        sae.initialize(torch.cat(data[:4]))
        optimizer = torch.optim.Adam(sae.parameters(), lr=3e-3)
        for x in data:
            out = sae(x)
            penalty = reference.l1_penalty(out.acts, sae.W_dec, x)
            assert torch.allclose(out.sparsity, l1_coef * penalty) and torch.allclose(out.loss, out.fvu + out.sparsity)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            sae.normalize_decoder()
        active[l1_coef] = float((out.acts > 0).sum(1).float().mean())
    assert active[5.0] < 0.7 * active[0.0], active


def test_jumprelu_sae_learns_its_thresholds():
    """Trained from zero thresholds (ReLU), a JumpReLU SAE raises them through the straight-through
    estimates of its L0 penalty and ends with fewer active codes; its loss is FVU + l0_coef * L0."""
    torch.manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(64, 16), dim=1)
    data = [(torch.rand(256, 64) * (torch.rand(256, 64) < 0.05)) @ features + 5 for _ in range(80)]
    cfg = fastsae.SAEConfig(d_in=16, n_features=128, activation="jumprelu", l0_coef=1e-2)
    sae = fastsae.SparseAutoencoder(cfg).initialize(torch.cat(data[:4]))
    optimizer = torch.optim.Adam(sae.parameters(), lr=3e-3)
    active = []
    for x in data:
        out = sae(x)
        active.append(float((out.acts > 0).sum(1).float().mean()))
        assert torch.allclose(out.sparsity, 1e-2 * torch.tensor(active[-1], dtype=out.sparsity.dtype))
        assert torch.allclose(out.loss, out.fvu + out.sparsity)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        sae.normalize_decoder()
    assert float(sae.threshold.detach().mean()) > 0
    assert active[-1] < 0.7 * active[0], (active[0], active[-1])


def test_forward_rejects_bad_input():
    sae = _sae(dtype="float32")
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., d_in=24\]"):
        sae(torch.randn(8, 23))
    with pytest.raises(ValueError, match="x contains NaN"):
        sae(torch.full((8, 24), float("nan")))
    fresh = fastsae.SparseAutoencoder(sae.cfg)  # (its first batch would fit the centering)
    for model in (sae, fresh):
        with pytest.raises(ValueError, match="x must be floating point.*torch.int64"):
            model(torch.ones(8, 24, dtype=torch.int64))
    with pytest.raises(ValueError, match="at least 2 tokens"):
        sae(torch.randn(1, 24))
    with pytest.raises(ValueError, match="sample contains NaN"):
        sae.initialize(torch.full((8, 24), float("nan")))
    with pytest.raises(ValueError, match="sample has 23 dimensions"):
        sae.initialize(torch.randn(8, 23))
    sae.eval()
    assert torch.isnan(sae(torch.randn(1, 24)).fvu), "one token in evaluation: FVU is documented as NaN"


@pytest.mark.slow
def test_compiled_training_step_matches_eager(fresh_dynamo):
    """torch.compile(fullgraph=True) through every custom op of a TopK + AuxK step, on CPU."""
    eager, compiled_sae = _sae(dtype="float32", dead_after_tokens=0), _sae(dtype="float32", dead_after_tokens=0)
    compiled_sae.load_state_dict(eager.state_dict())
    step = torch.compile(lambda sae, x: sae(x).loss, fullgraph=True)
    for _ in range(2):
        x = torch.randn(64, 24) + 3
        losses = [eager(x).loss, step(compiled_sae, x)]
        for loss in losses:
            loss.backward()
        assert torch.allclose(losses[0], losses[1], rtol=1e-4)
        assert torch.allclose(eager.W_enc.grad, compiled_sae.W_enc.grad, rtol=1e-3, atol=1e-6)
        assert torch.equal(eager.tokens_since_fired, compiled_sae.tokens_since_fired)


def _twins(device: str) -> tuple[fastsae.SparseAutoencoder, fastsae.SparseAutoencoder]:
    """Two fp32 TopK + AuxK SAEs with the same weights: one to run eagerly, one to compile."""
    eager = _sae(device, dtype="float32", k_aux=8, dead_after_tokens=1000)
    compiled = _sae(device, dtype="float32", k_aux=8, dead_after_tokens=1000)
    compiled.load_state_dict(eager.state_dict())
    return eager, compiled


def _kill_features(saes, n_dead: int, device: str) -> None:
    """Marks the same n_dead random features dead (and the rest alive) in each of `saes`."""
    dead = torch.randperm(96, device=device)[:n_dead]
    for sae in saes:
        with torch.no_grad():
            sae.tokens_since_fired.zero_()
            sae.tokens_since_fired[dead] = 2000


def _assert_twins_agree(outs, eager, compiled, n_dead: int, compiled_backward_run: bool = False) -> None:
    """The twins' step (outs: eager's output, then the compiled one's, backward not yet run unless
    `compiled_backward_run`) agrees: losses, AuxK's loss (positive exactly when features are dead),
    gradients (then cleared), statistics."""
    for out in outs[:1] if compiled_backward_run else outs:
        out.loss.backward()
    assert (outs[1].auxk > 0) == (n_dead > 0), f"{n_dead} dead: AuxK's loss {float(outs[1].auxk)}"
    for name in ("loss", "auxk", "fvu"):
        assert torch.allclose(getattr(outs[0], name), getattr(outs[1], name), rtol=1e-4), f"{n_dead} dead: {name}"
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        expected, actual = getattr(eager, name).grad, getattr(compiled, name).grad
        assert torch.allclose(expected, actual, rtol=1e-3, atol=1e-5), f"{n_dead} dead: {name}.grad"
        getattr(eager, name).grad, getattr(compiled, name).grad = None, None
    assert torch.equal(eager.tokens_since_fired, compiled.tokens_since_fired)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_whole_compiled_step_chooses_auxk_by_dead_count(device, monkeypatch, fresh_dynamo):
    """torch.compile(sae, fullgraph=True) with COMPILED_AUXK_RUNGS: one compiled graph takes AuxK's path
    from the dead features' count on the device: dense lists of 0, 64 and 80 features (the dense path
    capped at 80 columns for 64 tokens), then the fused stream. Steps with 0, 5, 64, 70 and 85 dead
    features (each rung, its edge, and past the last) take the shortest list that holds them (the
    profiler names the ops and their operands' shapes) and train like the eager twin; with
    `auxk_capacity` set to 64, 70 dead features take the fused stream (not 64 of them). The forward runs
    once a step: the backward branches on the count again and recomputes only the dense AuxK's codes
    (torch.cond's own backward would run the branch's forward, the encode included, a second time)."""
    monkeypatch.setattr(fastsae.sae, "COMPILED_AUXK_RUNGS", True)
    monkeypatch.setattr(fastsae.sae, "AUXK_DENSE_MAX_ELEMENTS", 64 * 80)
    assert fastsae.sae.auxk_rungs(64, 96) == [0, 64, 80]
    eager, compiled = _twins(device)
    counter = CompileCounterWithBackend("inductor")
    step = torch.compile(compiled, fullgraph=True, backend=counter)
    steps = ((None, 0, [0]), (None, 5, [64]), (None, 64, [64]), (None, 70, [80]), (None, 85, "fused"))
    # A list of `auxk_capacity` entries set by hand: checked on the device too, the fused stream past it.
    steps += ((64, 5, [64]), (64, 70, "fused"))
    for number, (capacity, n_dead, path) in enumerate(steps):
        if number == 0 or capacity != compiled.auxk_capacity:  # a step each, compiled (every branch traced)
            compiled.auxk_capacity = capacity  # before the profile below
            x = torch.randn(64, 24, device=device) + 3
            for forward, sae in ((eager, eager), (step, compiled)):
                forward(x).loss.backward()
                sae.zero_grad()
        _kill_features((eager, compiled), n_dead, device)
        x = torch.randn(64, 24, device=device) + 3
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            outs = [step(x)]
            outs[0].loss.backward()
        ops = [(event.name, event.input_shapes) for event in prof.events() if event.name.startswith("fastsae::")]
        lists = [shapes[6][0] for name, shapes in ops if name == "fastsae::topk_autoencoder"]
        recomputed = [
            shapes[10][0] for name, shapes in ops if name == "fastsae::topk_autoencoder_backward_recompute_auxk"
        ]
        fused = [name for name, shapes in ops if name == "fastsae::encode_topk" and shapes[6] == [96]]
        # the forward once (the dense path's list again in the backward, for AuxK's codes alone)
        assert lists == recomputed == ([] if path == "fused" else path), f"{n_dead} dead: lists {lists} {recomputed}"
        assert len(fused) == (path == "fused"), f"{n_dead} dead: {ops}"
        outs.insert(0, eager(x))
        assert torch.equal(outs[0].idx, outs[1].idx), f"{n_dead} dead: codes"
        _assert_twins_agree(outs, eager, compiled, n_dead, compiled_backward_run=True)
    assert counter.frame_count == 2, f"compiled {counter.frame_count} times (once, and once for the capacity)"


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("padded", [False, True], ids=["dynamic_list", "padded_list"])
def test_module_compile_keeps_auxk_over_the_dead_list(device, padded, monkeypatch, fresh_dynamo):
    """sae.compile(fullgraph=True): the forward past the dead-feature list compiled, the list eager.
    Steps with 0 to 70 dead features train like the eager twin (losses, AuxK's loss, gradients,
    statistics) and the compiled graphs take the list (AuxK over it, as eagerly). As long as the dead
    features (COMPILED_LIST_PADDED off), the list's length is static for the first graph and dynamic
    from the second length on: 2 compiles, and a third for a length of 1, which Dynamo specialises.
    Padded to `auxk_list_length`: 64 for up to 51 dead features, 96 (all of them) for 70, which 37 keep,
    and 64 again from 19 on (a quarter of the list or fewer, sae.AUXK_SHRINK): compiled for the first
    length and, its length dynamic from then on, for the second."""
    monkeypatch.setattr(fastsae.sae, "COMPILED_LIST_PADDED", padded)
    eager, compiled = _twins(device)
    counter = CompileCounterWithBackend("inductor")
    compiled.compile(fullgraph=True, backend=counter)
    lengths = (0, 5, 13, 30, 21, 45, 27, 51, 70, 37, 19, 1)
    for n_dead in lengths:
        _kill_features((eager, compiled), n_dead, device)
        x = torch.randn(64, 24, device=device) + 3
        _assert_twins_agree([sae(x) for sae in (eager, compiled)], eager, compiled, n_dead)
    frames = counter.frame_count
    if padded:
        assert frames == 2 and compiled._compiled_list_length == 64, f"compiled {frames} times"
    else:
        assert frames == 3 and compiled._compiled_list_length is None, f"compiled {frames} times"
    # every compiled graph takes the list as an input
    inputs = [[node.name for node in graph.graph.nodes if node.op == "placeholder"] for graph in counter.graphs]
    assert all(any("few_dead" in name for name in names) for names in inputs), inputs
    # A copy runs uncompiled (the compiled forward is bound to the original, which it would train instead).
    twin = copy.deepcopy(compiled)
    twin(torch.randn(64, 24, device=device) + 3).loss.backward()
    assert twin.W_enc.grad is not None and compiled.W_enc.grad is None
    assert counter.frame_count == frames, "the copy ran the original's compiled forward"


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_cuda_training_matches_reference_path(deterministic):
    """200 Adam steps of a TopK + AuxK SAE in fp32: on CUDA every op runs fastsae's kernels, on CPU
    the reference. Same initial state and data; the loss curves and final weights agree."""
    torch.backends.cuda.matmul.allow_tf32 = False
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        cpu = _sae(dtype="float32", d_in=64, n_features=1024, k=16, k_aux=32, dead_after_tokens=2048)
        cuda = fastsae.SparseAutoencoder(cpu.cfg).cuda()
        cuda.load_state_dict(cpu.state_dict())
        curves = {}
        for name, sae in (("cpu", cpu), ("cuda", cuda)):
            device = next(sae.parameters()).device
            optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3)
            data = torch.Generator().manual_seed(0)
            curves[name] = []
            for _ in range(200):
                x = (torch.randn(256, 64, generator=data) * torch.linspace(0.1, 3, 64) + 3).to(device)
                out = sae(x)
                out.loss.backward()
                sae.remove_decoder_parallel_grad()
                optimizer.step()
                optimizer.zero_grad()
                sae.normalize_decoder()
                curves[name].append(float(out.loss.detach()))
        losses = {name: torch.tensor(curve) for name, curve in curves.items()}
        assert float(losses["cpu"][-1]) < 0.7 * float(losses["cpu"][0]), "the reference run did not train"
        assert ((losses["cuda"] - losses["cpu"]).abs() / losses["cpu"]).max() < 2e-2
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            assert_close(getattr(cuda, name), getattr(cpu, name).double(), torch.bfloat16, name)
    finally:
        torch.use_deterministic_algorithms(previous)


def test_batchtopk_trains_the_same_on_sparse_codes(monkeypatch):
    """FASTSAE_BATCHTOPK_SPARSE: a BatchTopK SAE trained on the sparse codes (each row's candidates,
    the batch's B x k largest among them; `functional.encode_batchtopk_sparse`) follows its twin on the
    dense codes step by step: the same codes, losses, gradients, death statistics and inference
    threshold. Rows that keep more than their candidates (a batch whose codes crowd into few rows) take
    the dense route inside the sparse one."""
    from fastsae.ops import batchtopk

    dense, sparse = _sae(activation="batchtopk"), _sae(activation="batchtopk")
    sparse.load_state_dict(dense.state_dict())
    optimizers = [torch.optim.Adam(sae.parameters(), lr=1e-3) for sae in (dense, sparse)]
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(40, 24, dtype=torch.float64, generator=generator) + 3 for _ in range(4)]
    batches[2][:2] *= 30  # two rows hold most of the batch's largest codes: more than 4k each
    for x in batches:
        outs = []
        for sae, optimizer, sparse_codes in zip((dense, sparse), optimizers, (False, True)):
            monkeypatch.setattr(batchtopk, "SPARSE_CODES", sparse_codes)
            optimizer.zero_grad()
            out = sae(x)
            out.loss.backward()
            optimizer.step()
            outs.append(out)
        want, got = outs
        assert got.acts is None and want.vals is None
        codes = reference.scatter_codes(got.vals, got.idx, want.acts.shape[1])
        assert_close(codes, want.acts, torch.float64, "codes")
        assert_close(got.loss, want.loss, torch.float64, "loss")
        for name, p in sparse.named_parameters():
            assert_close(p.grad, dict(dense.named_parameters())[name].grad, torch.float64, f"{name} gradient")
    for name in ("tokens_since_fired", "feature_fire_count", "batchtopk_threshold"):
        assert torch.equal(getattr(sparse, name), getattr(dense, name)), name


def test_batchtopk_eval_codes_do_not_depend_on_the_batch(tmp_path):
    """Training steps keep a running average of the smallest code BatchTopK kept; in eval mode the
    codes are JumpReLU at it, so a token alone and in a batch get the same codes. Before any training
    step, eval falls back to the batch rule. The threshold survives save/load; an older checkpoint
    without it loads unset."""
    sae = _sae(activation="batchtopk")
    x = torch.randn(40, 24, dtype=torch.float64) + 3
    sae.eval()
    assert torch.equal(sae(x).acts, reference.batch_topk(reference.encode_relu(x, *_encoder(sae)), 6))
    sae.train()
    out = sae(x)  # sparse codes while training
    first = float(out.vals.detach()[out.vals > 0].min())
    assert float(sae.batchtopk_threshold) == pytest.approx(first)
    y = torch.randn(40, 24, dtype=torch.float64) + 3
    out = sae(y)
    decay = fastsae.sae.BATCHTOPK_THRESHOLD_DECAY
    expected = decay * first + (1 - decay) * float(out.vals.detach()[out.vals > 0].min())
    assert float(sae.batchtopk_threshold) == pytest.approx(expected)
    sae.eval()
    together = sae(x).acts
    alone = torch.cat([sae(x[i : i + 1]).acts for i in range(x.shape[0])])
    assert torch.equal(together > 0, alone > 0), "a token's codes changed with its batch"
    assert_close(alone, together, torch.float64, "codes alone")
    threshold = sae.batchtopk_threshold.double().expand(96)
    assert_close(together, reference.encode_relu(x, *_encoder(sae), threshold), torch.float64, "eval codes")
    assert 0 < int((together > 0).sum()) < together.numel()
    path = tmp_path / "batchtopk.safetensors"
    sae.save(path)
    assert float(fastsae.SparseAutoencoder.load(path).batchtopk_threshold) == float(sae.batchtopk_threshold)
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    del metadata["fastsae_checksum"]  # as an older fastsae wrote it: no threshold, no checksum
    tensors = load_file(path)
    del tensors["batchtopk_threshold"]
    save_file(tensors, path, metadata=metadata)
    assert float(fastsae.SparseAutoencoder.load(path).batchtopk_threshold) == -1.0


def _encoder(sae):
    return sae.W_enc, sae.b_enc, sae.b_dec


def _saved(tmp_path, name="sae.safetensors"):
    path = tmp_path / name
    _sae().save(path)
    return path


@pytest.mark.parametrize(
    "damage, message",
    [
        pytest.param(lambda b: b[: len(b) // 2], "not a readable safetensors file", id="truncated"),
        pytest.param(lambda b: b[:-9] + bytes([b[-9] ^ 0x10]) + b[-8:], "corrupted", id="bit-flip-in-data"),
        pytest.param(lambda b: (2**40).to_bytes(8, "little") + b[8:], "not a readable", id="oversized-header"),
        pytest.param(lambda b: b"", "not a readable safetensors file", id="empty"),
    ],
)
def test_load_rejects_damaged_files(tmp_path, damage, message):
    """A damaged checkpoint raises a ValueError that says so; nothing half-loaded comes back."""
    path = _saved(tmp_path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=message):
        fastsae.SparseAutoencoder.load(path)


def test_load_checks_dtypes(tmp_path):
    """A tensor of the right shape but another dtype than the config's is refused, naming both."""
    path = _saved(tmp_path)
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    saved = tensors["b_enc"].dtype
    other = torch.float32 if saved == torch.float64 else torch.float64
    tensors["b_enc"] = tensors["b_enc"].to(other)
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(ValueError, match=f"b_enc is {other}, config says {saved}"):
        fastsae.SparseAutoencoder.load(path)


def test_saved_file_has_the_usual_permissions(tmp_path):
    previous = os.umask(0o027)
    try:
        path = _saved(tmp_path)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


KILLED_SAVE = """
import sys, time
import fastsae, fastsae.sae
real_save_file = fastsae.sae.save_file
def half_written(tensors, filename, metadata):
    real_save_file(tensors, filename, metadata=metadata)
    data = open(filename, "rb").read()
    open(filename, "wb").write(data[: len(data) // 2])  # killed in the middle of writing
    print("writing", flush=True)
    time.sleep(60)
fastsae.sae.save_file = half_written
sae = fastsae.SparseAutoencoder(fastsae.SAEConfig(d_in=24, n_features=96, k=6))
sae.save(sys.argv[1])
"""


def test_a_save_killed_midway_loses_nothing_and_leaves_nothing(tmp_path):
    """SIGKILL during save (a real subprocess): the earlier checkpoint stays intact and loadable, and
    the next save removes the dead save's temporary file."""
    path = _saved(tmp_path)
    before = path.read_bytes()
    child = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
        leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        assert len(leftovers) == 1, "the killed save should be caught with its temporary file written"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert path.read_bytes() == before
    fastsae.SparseAutoencoder.load(path)
    _sae().save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["sae.safetensors"], "the dead save's temporary file remains"


def test_a_non_finite_batch_mid_training_changes_nothing():
    """With check_finite (the default), one inf in the middle of training raises before any parameter,
    gradient, optimizer state or death statistic changes."""
    sae = _sae(dtype="float32", k_aux=12)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3)
    sae.train()
    for _ in range(3):
        sae(torch.randn(32, 24) + 3).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    state = copy.deepcopy(sae.state_dict())
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    bad = torch.randn(32, 24) + 3
    bad[17, 5] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        sae(bad)
    assert all(torch.equal(tensor, sae.state_dict()[name]) for name, tensor in state.items())
    assert all(p.grad is None or not p.grad.any() for p in sae.parameters())
    after = optimizer.state_dict()["state"]
    for index, moments in optimizer_state["state"].items():
        assert all(torch.equal(value, after[index][key]) for key, value in moments.items()), index
