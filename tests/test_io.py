"""SAELens and sparsify checkpoints, both ways (fastsae/io.py).

Three kinds of evidence:
- directories that the real libraries wrote (SAELens 6.54.12, sparsify 1.3.3), with their own codes and
  reconstructions of a fixed input (tests/fixtures/interop, made by make_interop_fixtures.py there);
- fixtures written here file by file in each library's layout, with the libraries' forward passes
  written out in plain PyTorch, for the cases and refusals the real directories do not cover;
- `test_the_real_libraries_load_what_fastsae_saves`, which needs the libraries themselves (sae-lens,
  eai-sparsify: large installs, not in CI) and is skipped without them; the README says how to run it.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastsae
from fastsae import io

D, N_FEATURES, K = 12, 40, 5
INTEROP = Path(__file__).resolve().parent / "fixtures" / "interop"


def _weights(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(D, N_FEATURES, generator=generator, dtype=torch.float64),
        "b_enc": 0.1 * torch.randn(N_FEATURES, generator=generator, dtype=torch.float64),
        "W_dec": torch.randn(N_FEATURES, D, generator=generator, dtype=torch.float64),
        "b_dec": torch.randn(D, generator=generator, dtype=torch.float64),
    }


def _x(seed=1):
    return torch.randn(16, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 1


def _saelens_forward(cfg, w, x):
    """SAELens' encode and decode (StandardSAE, TopKSAE, JumpReLUSAE) -> (dense codes, reconstruction),
    with its run-time "layer_norm" (each token less its mean, over its Bessel-corrected standard deviation
    + 1e-5; the reconstruction times that deviation plus the mean) where the config asks for it."""
    layer_norm = cfg.get("normalize_activations") == "layer_norm"
    if layer_norm:
        mean = x.mean(dim=-1, keepdim=True)
        std = (x - mean).std(dim=-1, keepdim=True)
        x = (x - mean) / (std + 1e-5)
    pre = (x - w["b_dec"] * cfg.get("apply_b_dec_to_input", True)) @ w["W_enc"] + w["b_enc"]
    if cfg["architecture"] == "topk":
        top = pre.topk(cfg["k"], dim=-1)
        acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    elif cfg["architecture"] == "jumprelu":
        acts = pre.relu() * (pre > w["threshold"])
    else:
        acts = pre.relu()
    recon = acts @ w["W_dec"] + w["b_dec"]
    return acts, recon * std + mean if layer_norm else recon


def _sparsify_forward(cfg, w, x):
    """sparsify's SparseCoder: the k largest of relu(encoder(x - b_dec)), decoded with W_dec."""
    top = ((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"]).relu().topk(cfg["k"], dim=-1)
    acts = torch.zeros(x.shape[0], w["W_dec"].shape[0], dtype=x.dtype).scatter(-1, top.indices, top.values)
    return acts, acts @ w["W_dec"] + w["b_dec"]


def _dense_codes(sae, x):
    out = sae(x)
    if out.acts is not None:
        return out.acts, out.recon
    dense = torch.zeros(x.shape[0], sae.cfg.n_features, dtype=out.vals.dtype)
    return dense.scatter(-1, out.idx.long(), out.vals), out.recon


def _assert_outputs(sae, expected):
    """The loaded SAE's (dense codes, reconstruction) of _x() in eval mode equal `expected`."""
    for got, want in zip(_dense_codes(sae.eval(), _x()), expected):
        torch.testing.assert_close(got, want)


def _sparsify_tensors(w):
    """`_weights` under sparsify's names and layout (the encoder as nn.Linear's [features, d] weight)."""
    return {"encoder.weight": w["W_enc"].T.contiguous(), "encoder.bias": w["b_enc"], "W_dec": w["W_dec"],
            "b_dec": w["b_dec"]}  # fmt: skip


def _write(directory, weights_name, tensors, cfg):
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / weights_name))
    (directory / "cfg.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("normalization", ["none", "layer_norm"])
@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu"])
def test_saelens_checkpoint_gives_saelens_outputs(tmp_path, architecture, apply_b_dec, normalization):
    """Each architecture, with and without b_dec applied to the input, and with SAELens' run-time
    layer_norm (OpenAI's GPT-2 TopK SAEs use it): the codes and reconstructions of SAELens' forward; saved
    back to SAELens, the same config's normalisation."""
    w = _weights()
    if architecture == "jumprelu":
        w["threshold"] = torch.rand(N_FEATURES, dtype=torch.float64) - 0.2  # a few negative: ReLU'd first
    cfg = {"architecture": architecture, "d_in": D, "d_sae": N_FEATURES, "dtype": "float64", "device": "cpu",
           "apply_b_dec_to_input": apply_b_dec, "normalize_activations": normalization, "k": K, "meta": {}}  # fmt: skip
    _write(tmp_path / "sae", "sae_weights.safetensors", w, cfg)
    assert io.detect_format(tmp_path / "sae") == "saelens"
    sae = fastsae.SparseAutoencoder.load(tmp_path / "sae")
    assert sae.cfg.normalize_activations == normalization
    _assert_outputs(sae, _saelens_forward(cfg, w, _x()))
    sae.save(tmp_path / "again", format="saelens")
    assert json.loads((tmp_path / "again" / "cfg.json").read_text())["normalize_activations"] == normalization


def test_sparsify_checkpoint_gives_sparsify_outputs(tmp_path):
    tensors = _sparsify_tensors(_weights())
    cfg = {"expansion_factor": 3, "normalize_decoder": True, "num_latents": N_FEATURES, "k": K,
           "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D}  # fmt: skip
    _write(tmp_path / "layers.3", "sae.safetensors", tensors, cfg)
    _write(tmp_path / "layers.5", "sae.safetensors", tensors, cfg)
    assert io.detect_format(tmp_path / "layers.3") == "sparsify"
    _assert_outputs(fastsae.SparseAutoencoder.load(tmp_path / "layers.3"), _sparsify_forward(cfg, tensors, _x()))
    assert sorted(io.load_hookpoints(tmp_path)) == ["layers.3", "layers.5"]


def _assert_library_outputs(sae, directory):
    """The SAE's (dense codes, reconstruction) of the recorded input equal what the library computed
    (fp32: to its rounding)."""
    expected = load_file(str(directory / "expected.safetensors"))
    codes, recon = _dense_codes(sae.eval(), expected["x"])
    torch.testing.assert_close(codes.detach(), expected["codes"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(recon.detach(), expected["recon"], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "case",
    ["saelens_standard", "saelens_standard_no_b_dec_input", "saelens_topk", "saelens_jumprelu", "saelens_batchtopk",
     "sparsify_topk"],
)  # fmt: skip
def test_checkpoints_the_real_libraries_wrote(case):
    """A directory SAELens or sparsify saved itself (SAELens saves a trained BatchTopK SAE as JumpReLU at
    its threshold) loads with that library's own codes and reconstruction of the same input."""
    assert io.detect_format(INTEROP / case) == case.split("_")[0]
    _assert_library_outputs(fastsae.SparseAutoencoder.load(INTEROP / case), INTEROP / case)


def test_a_real_sparsify_run_loads_per_hookpoint():
    saes = io.load_hookpoints(INTEROP / "sparsify_run")
    assert sorted(saes) == ["layers.0", "layers.1.mlp"]
    for hookpoint, sae in saes.items():
        _assert_library_outputs(sae, INTEROP / "sparsify_run" / hookpoint)


def test_the_real_libraries_load_what_fastsae_saves(tmp_path, monkeypatch):
    """Each format fastsae writes, loaded by the library itself, gives fastsae's codes and
    reconstruction (SAELens: encode then decode, which maps a layer_norm SAE's reconstruction back with
    the statistics its encode kept; sparsify: its forward). Needs sae-lens and eai-sparsify installed."""
    monkeypatch.setenv("SPARSIFY_DISABLE_TRITON", "1")  # sparsify's Triton decoder runs on GPUs only
    sae_lens = pytest.importorskip("sae_lens")
    sparsify = pytest.importorskip("sparsify")
    x = _x()
    for format, activation, normalization in [
        ("saelens", "topk", "none"), ("saelens", "relu", "none"), ("saelens", "jumprelu", "none"),
        ("saelens", "batchtopk", "none"), ("saelens", "topk", "layer_norm"), ("sparsify", "topk", "none"),
    ]:  # fmt: skip
        sae = _trained(activation, normalize_activations=normalization)
        directory = tmp_path / f"{format}_{activation}_{normalization}"
        sae.save(directory, format=format)
        if format == "saelens":
            library = sae_lens.SAE.load_from_disk(directory)
            codes = library.encode(x)
            got = codes, library.decode(codes)
        else:
            out = sparsify.SparseCoder.load_from_disk(directory)(x)
            codes = torch.zeros(x.shape[0], N_FEATURES, dtype=x.dtype).scatter(1, out.latent_indices, out.latent_acts)
            got = codes, out.sae_out
        for value, want, what in zip(got, _dense_codes(sae, x), ("codes", "reconstruction")):
            where = f"{format} {activation} {normalization} {what}"
            torch.testing.assert_close(value.detach(), want.detach(), msg=where)


def _trained(activation, **overrides):
    settings = {"d_in": D, "n_features": N_FEATURES, "k": K, "activation": activation, "dtype": "float64"}
    cfg = fastsae.SAEConfig(**{**settings, **overrides})
    sae = fastsae.SparseAutoencoder(cfg).initialize(_x(2))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
        if activation == "jumprelu":
            sae.threshold.uniform_(0, 0.5, generator=torch.Generator().manual_seed(4))
    if activation == "batchtopk":
        sae(_x(5))  # one training forward sets the inference threshold
    return sae.eval()


@pytest.mark.parametrize(
    "format, activation",
    [("saelens", "topk"), ("saelens", "relu"), ("saelens", "jumprelu"), ("saelens", "batchtopk"), ("sparsify", "topk")],
)
def test_round_trip_keeps_weights_and_outputs(tmp_path, format, activation):
    sae = _trained(activation)
    sae.save(tmp_path / "out", format=format)
    loaded = fastsae.SparseAutoencoder.load(tmp_path / "out")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(loaded, name), getattr(sae, name)), name
    _assert_outputs(loaded, _dense_codes(sae, _x()))


def test_saved_checkpoints_are_in_the_libraries_layout(tmp_path):
    sae = _trained("topk")
    sae.save(tmp_path / "saelens", format="saelens")
    cfg = json.loads((tmp_path / "saelens" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == K and cfg["d_sae"] == N_FEATURES and cfg["d_in"] == D
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    weights = load_file(str(tmp_path / "saelens" / "sae_weights.safetensors"))
    shapes = {name: tuple(t.shape) for name, t in weights.items()}
    assert shapes == {"W_enc": (D, N_FEATURES), "b_enc": (N_FEATURES,), "W_dec": (N_FEATURES, D), "b_dec": (D,)}
    sae.save(tmp_path / "sparsify", format="sparsify")
    tensors = load_file(str(tmp_path / "sparsify" / "sae.safetensors"))
    assert tuple(tensors["encoder.weight"].shape) == (N_FEATURES, D)
    assert json.loads((tmp_path / "sparsify" / "cfg.json").read_text())["num_latents"] == N_FEATURES


def _saelens_dir(tmp_path, **cfg_changes):
    cfg = {"architecture": "topk", "d_in": D, "d_sae": N_FEATURES, "dtype": "float64", "k": K, **cfg_changes}
    _write(tmp_path / "bad", "sae_weights.safetensors", _weights(), cfg)
    return tmp_path / "bad"


def test_what_fastsae_cannot_represent_is_refused(tmp_path):
    cases = [
        (lambda: io.load_saelens(_saelens_dir(tmp_path, architecture="gated")), "architecture 'gated'"),
        (
            lambda: io.load_saelens(_saelens_dir(tmp_path, normalize_activations="expected_average_only_in")),
            "normalize_activations='expected_average_only_in'",
        ),
        (lambda: io.load_saelens(_saelens_dir(tmp_path, rescale_acts_by_decoder_norm=True)), "rescale_acts_by"),
        (lambda: _trained("relu").save(tmp_path / "x", format="sparsify"), "sparsify SAEs are TopK"),
        (
            lambda: _trained("topk", normalize_activations="layer_norm").save(tmp_path / "z", format="sparsify"),
            "save this layer_norm SAE as saelens",
        ),
        (lambda: _trained("topk", centering="whiten").save(tmp_path / "y", format="saelens"), "whitened"),
        (
            lambda: fastsae.SparseAutoencoder(
                fastsae.SAEConfig(d_in=D, n_features=N_FEATURES, k=K, activation="batchtopk")
            ).save(tmp_path / "z", "saelens"),
            "not been trained",
        ),  # fmt: skip
        (lambda: _trained("topk").save(tmp_path / "w", format="onnx"), "format must be one of"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    transcoder = tmp_path / "transcoder"
    _write(transcoder, "sae.safetensors", {"b_dec": torch.zeros(D)}, {"k": K, "transcode": True})
    with pytest.raises(ValueError, match="transcoder"):
        fastsae.SparseAutoencoder.load(transcoder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a SAELens SAE"):
        fastsae.SparseAutoencoder.load(tmp_path / "empty")
    broken = _saelens_dir(tmp_path)
    (broken / "cfg.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a readable JSON config"):
        fastsae.SparseAutoencoder.load(broken)


def test_a_config_of_another_sae_is_refused(tmp_path):
    """cfg.json's sizes must be the weights': sparsify's num_latents, or where it is 0 (sparsify's
    default) expansion_factor x d_in, and SAELens' d_in and d_sae."""
    for change in ({"d_sae": N_FEATURES + 8}, {"d_in": D + 1}):
        with pytest.raises(ValueError, match="not the same SAE"):
            io.load_saelens(_saelens_dir(tmp_path, **change))
    tensors = _sparsify_tensors(_weights())
    # N_FEATURES = 40 features of D = 12: an expansion factor of 3 states 36
    for cfg, loads in (({"num_latents": N_FEATURES}, True), ({"num_latents": 0, "expansion_factor": 3}, False),
                       ({"num_latents": 2 * N_FEATURES}, False), ({"d_in": D + 4}, False)):  # fmt: skip
        _write(tmp_path / "sparsify", "sae.safetensors", tensors, {"k": K, "d_in": D, **cfg})
        if loads:
            assert io.load_sparsify(tmp_path / "sparsify").cfg.n_features == N_FEATURES
        else:
            with pytest.raises(ValueError, match="not the same SAE"):
                io.load_sparsify(tmp_path / "sparsify")
    w = _weights()
    w["W_enc"], w["b_enc"], w["W_dec"] = w["W_enc"][:, :36], w["b_enc"][:36], w["W_dec"][:36]
    default_latents = {"k": K, "d_in": D, "num_latents": 0, "expansion_factor": 3}
    _write(tmp_path / "sparsify", "sae.safetensors", _sparsify_tensors(w), default_latents)
    assert io.load_sparsify(tmp_path / "sparsify").cfg.n_features == 36


@pytest.mark.parametrize("format, weights", [("saelens", "sae_weights.safetensors"), ("sparsify", "sae.safetensors")])
def test_a_save_cut_between_its_files_is_refused(tmp_path, format, weights):
    """A save of a k = 2K SAE over a directory holding a k = K one, cut after its weights file: the new
    weights beside the old cfg.json are refused, not loaded as a k = K SAE."""
    _trained("topk").save(tmp_path / "old", format=format)
    _trained("topk", k=2 * K).save(tmp_path / "new", format=format)
    (tmp_path / "old" / weights).write_bytes((tmp_path / "new" / weights).read_bytes())
    with pytest.raises(ValueError, match="saved with another cfg.json"):
        fastsae.SparseAutoencoder.load(tmp_path / "old")
    assert fastsae.SparseAutoencoder.load(tmp_path / "new").cfg.k == 2 * K


def test_load_hub_downloads_one_sae(hub_repository):
    """The SAE at a path of a Hub repository (a sparsify directory per hook point, a SAELens one at the
    root, a fastsae file), downloading its files alone; a path with no SAE is a clear error."""
    saes = {name: fastsae.SparseAutoencoder(fastsae.SAEConfig(d_in=D, n_features=N_FEATURES, k=K)) for name in "abc"}
    saes["a"].save(hub_repository.path / "layers.3", format="sparsify")
    saes["b"].save(hub_repository.path / "layers.4", format="sparsify")
    saes["c"].save(hub_repository.path, format="saelens")
    saes["a"].save(hub_repository.path / "checkpoints" / "a.safetensors")
    for path, name, expected_files in [
        ("layers.3", "a", {"layers.3/cfg.json", "layers.3/sae.safetensors"}),
        ("", "c", {"cfg.json", "sae_weights.safetensors"}),
        ("/checkpoints/a.safetensors", "a", {"checkpoints/a.safetensors"}),
    ]:
        hub_repository.downloaded.clear()
        loaded = io.load_hub("org/saes", path, revision="v1")
        assert torch.equal(loaded.W_dec, saes[name].W_dec) and set(hub_repository.downloaded) == expected_files
    with pytest.raises(FileNotFoundError, match="holds no SAE checkpoint at 'layers.9'"):
        io.load_hub("org/saes", "layers.9")
