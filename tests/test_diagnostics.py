"""Outlier severity, effective rank, closed forms, measured death, centering, and the CLI."""

import dataclasses

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from scipy.stats import norm

import fastsae
from fastsae import centering, diagnostics, reference
from fastsae.__main__ import main as cli
from fastsae.reproduce import VARIANTS, Settings, SyntheticActivations, markdown_table, run


def _outlier_data(n=3000, d=40, gamma=5.0):
    sigma = torch.rand(d, dtype=torch.float64) + 0.5
    x = torch.randn(n, d, dtype=torch.float64) * sigma
    x[:, :3] += gamma * float(sigma.norm()) / 3**0.5
    return x


def _numpy_gamma(x: np.ndarray, layernorm: bool) -> float:
    if layernorm:
        centred = x - x.mean(1, keepdims=True)
        x = centred / np.sqrt(centred.var(1, keepdims=True) + 1e-5) * np.sqrt(x.shape[1])
    return float(np.linalg.norm(x.mean(0)) / np.linalg.norm(x.std(0)))


def _numpy_effective_rank(x: np.ndarray) -> float:
    centred = x - x.mean(1, keepdims=True)
    x = centred / np.sqrt(centred.var(1, keepdims=True) + 1e-5) * np.sqrt(x.shape[1])
    eigenvalues = np.clip(np.linalg.eigvalsh(np.cov(x, rowvar=False, bias=True)), 0, None)
    p = eigenvalues / eigenvalues.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


@pytest.mark.parametrize("gamma", [0.3, 5.0, 50.0])
def test_gamma_and_effective_rank_match_numpy(gamma):
    x = _outlier_data(gamma=gamma)
    assert fastsae.outlier_severity(x) == pytest.approx(_numpy_gamma(x.numpy(), True), rel=1e-9)
    assert fastsae.outlier_severity(x, layernorm=False) == pytest.approx(_numpy_gamma(x.numpy(), False), rel=1e-9)
    assert fastsae.outlier_severity(x, layernorm=False) == pytest.approx(gamma, rel=0.05)
    assert fastsae.effective_rank(x) == pytest.approx(_numpy_effective_rank(x.numpy()), rel=1e-7)


def test_streaming_equals_one_shot(monkeypatch):
    x = _outlier_data(n=1000).float()
    chunks = [x[i : i + 97] for i in range(0, 1000, 97)]
    assert fastsae.outlier_severity(iter(chunks)) == pytest.approx(fastsae.outlier_severity(x), rel=1e-10)
    assert fastsae.effective_rank(iter(chunks)) == pytest.approx(fastsae.effective_rank(x), rel=1e-8)
    one_shot = fastsae.diagnose(x, k=8, n_features=256)
    monkeypatch.setattr(centering, "CHUNK_ROWS", 64)  # tensors are processed in chunks too
    chunked = fastsae.diagnose(x, k=8, n_features=256)
    assert chunked.gamma == pytest.approx(one_shot.gamma, rel=1e-10)
    assert chunked.effective_rank == pytest.approx(one_shot.effective_rank, rel=1e-6)  # float32 covariance


def test_closed_forms_at_known_values():
    # N = 2 makes C = Phi^-1(1/2) = 0: half of all directions point against mu, whatever gamma is, and
    # TopK keeps only the k / F most aligned.
    assert fastsae.predicted_death(3.0, 2, 8, 64) == pytest.approx((0.5, 1 - 8 / 64))
    # k = F/2 makes t_k = 0: dead-by-TopK equals dead-by-ReLU.
    relu, topk = fastsae.predicted_death(2.0, 1000, 32, 64)
    assert relu == pytest.approx(topk) and relu == pytest.approx(0.0618, abs=1e-3)  # Phi(-3.090 / 2)
    # gamma -> infinity: half die by ReLU; all but the k / F most aligned die under TopK.
    relu, topk = fastsae.predicted_death(1e9, 10_000, 32, 1024)
    assert relu == pytest.approx(0.5) and topk == pytest.approx(1 - 32 / 1024)
    assert fastsae.predicted_death(0.0, 100, 1, 10) == (0.0, 0.0)
    with pytest.raises(ValueError):
        fastsae.predicted_death(1.0, 100, 11, 10)


@pytest.mark.slow
@pytest.mark.parametrize("gamma", [1.0, 10.0, 50.0])
def test_measured_death_at_init_tracks_closed_forms(gamma):
    """Isotropic Gaussian activations with a mean offset, random unit encoder directions, zero biases:
    the measured fractions land within 2 percentage points of the closed forms.

    The TopK form Phi(t_k - C / gamma) is the large-gamma limit: a token's k-th largest pre-activation
    is about t_k * sqrt(1 + gamma^2) noise standard deviations, not t_k. At gamma = 1 that puts the
    measured TopK death near Phi(t_k * sqrt(2) - C) (~22% here) against the closed form's ~6.5%, so the
    TopK form is checked from gamma = 10 on, where the two agree."""
    d, n_tokens, n_features, k = 256, 8192, 4096, 64
    x = torch.randn(n_tokens, d) + gamma * d**0.5 * torch.nn.functional.normalize(torch.randn(d), dim=0)
    sae = fastsae.SparseAutoencoder(fastsae.SAEConfig(d_in=d, n_features=n_features, k=k, centering="none"))
    measured = fastsae.measure_death(sae, x)
    relu, topk = fastsae.predicted_death(fastsae.outlier_severity(x, layernorm=False), n_tokens, k, n_features)
    assert measured.dead_relu == pytest.approx(relu, abs=0.02)
    if gamma >= 10:
        assert measured.dead == pytest.approx(topk, abs=0.02)
    assert measured.dead == pytest.approx(measured.dead_relu + measured.dead_topk)
    assert int(measured.dead_relu_mask.sum()) == round(measured.dead_relu * n_features)


def test_measure_death_classifies_each_pathway():
    sae = fastsae.SparseAutoencoder(fastsae.SAEConfig(d_in=8, n_features=4, k=1, centering="none"))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(8)[:, :4])
        sae.b_enc.copy_(torch.tensor([5.0, 0.0, -100.0, 0.0]))
    x = torch.randn(200, 8).abs() + 0.1  # feature 0 always wins, 2 is never positive
    report = fastsae.measure_death(sae, x)
    assert report.dead_relu_mask.tolist() == [False, False, True, False]
    assert report.dead_topk_mask.tolist() == [False, True, False, True]
    assert report.fire_counts.tolist() == [200, 0, 0, 0]
    assert (report.dead_relu, report.dead_topk, report.dead) == (0.25, 0.5, 0.75)


@pytest.mark.parametrize("activation", ["topk", "relu", "batchtopk"])
def test_fire_and_positive_counts_match_the_dense_encode(activation):
    """The module's counts for death classification (one fused pass for TopK) against counting the
    reference's dense pre-activations and the module's own codes."""
    cfg = fastsae.SAEConfig(d_in=12, n_features=40, k=3, activation=activation, centering="mean")
    sae = fastsae.SparseAutoencoder(cfg)
    x = torch.randn(64, 12) + 2
    sae.initialize(x)
    with torch.no_grad():
        fired, positive = sae.fire_and_positive_counts(x)
        pre = reference.pre_activation(x, sae.W_enc, sae.b_enc, sae.b_dec)
        codes = sae.encode(x)
    dense = codes if isinstance(codes, torch.Tensor) else torch.zeros(64, 40).scatter(1, codes.idx.long(), codes.vals)
    assert positive.tolist() == (pre > 0).sum(dim=0).tolist()
    assert fired.tolist() == (dense > 0).sum(dim=0).tolist()
    if activation == "relu":
        assert fired.tolist() == positive.tolist()
    else:  # TopK and BatchTopK fire a subset of the positive pre-activations
        assert 0 < int(fired.sum()) < int(positive.sum())


def test_diagnose_recommends_by_severity_and_rank():
    assert fastsae.diagnose(_outlier_data(gamma=0.05), k=32, n_features=1024).recommendation == "no action"
    report = fastsae.diagnose(_outlier_data(gamma=20.0), k=32, n_features=1024)
    assert report.recommendation == "centre" and "gamma" in str(report)
    low_rank = torch.randn(2000, 2, dtype=torch.float64) @ torch.randn(2, 40, dtype=torch.float64)
    assert fastsae.diagnose(low_rank + 1e-3 * torch.randn(2000, 40, dtype=torch.float64)).recommendation == (
        "centre + whiten"
    )


def test_geometric_median_matches_brute_force():
    x = torch.randn(60, 3, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.5]) + 2
    x[:5] += 40  # outliers pull the mean but barely the median
    expected = minimize(lambda m: np.linalg.norm(x.numpy() - m, axis=1).sum(), x.mean(0).numpy(), tol=1e-12).x
    assert np.allclose(fastsae.geometric_median(x).numpy(), expected, atol=1e-5)
    # A point that coincides with the estimate does not break the iteration.
    repeated = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(fastsae.geometric_median(repeated), torch.zeros(2, dtype=torch.float64), atol=1e-6)


def test_whitening_round_trip_and_identity_covariance():
    x = _outlier_data(n=4000, d=12) @ torch.randn(12, 12, dtype=torch.float64)
    sae = fastsae.SparseAutoencoder(fastsae.SAEConfig(d_in=12, n_features=48, k=4, centering="whiten", dtype="float64"))
    sae.initialize(x)
    white = sae._to_sae_space(x)
    covariance = torch.cov(white.T, correction=0)
    assert torch.allclose(covariance, torch.eye(12, dtype=torch.float64), atol=0.05)
    assert torch.allclose(sae._from_sae_space(white), x, atol=1e-8 * float(x.abs().max()))
    out = sae(x[:64])
    assert out.recon.shape == (64, 12) and torch.isfinite(out.loss)


def test_diagnose_cli_reads_every_format(tmp_path, capsys):
    from safetensors.torch import save_file

    x = _outlier_data(n=500, d=16, gamma=10).float()
    np.save(tmp_path / "acts.npy", x.numpy())
    torch.save(x, tmp_path / "acts.pt")
    save_file({"acts": x}, str(tmp_path / "acts.safetensors"))
    torch.save(x.reshape(4, -1, x.shape[1]), tmp_path / "acts_seq.pt")  # [batch, seq, d], as hooks give them
    for name in ("acts.npy", "acts.pt", "acts.safetensors", "acts_seq.pt"):
        assert cli(["diagnose", str(tmp_path / name), "--k", "8", "--n-features", "256"]) == 0
        assert "| recommendation | centre |" in capsys.readouterr().out


def test_diagnose_cli_fails_clearly_on_bad_files(tmp_path, capsys):
    from safetensors.torch import save_file

    (tmp_path / "garbage.npy").write_bytes(b"not numpy")
    np.save(tmp_path / "vector.npy", np.ones(10))
    np.save(tmp_path / "ints.npy", np.ones((10, 3), dtype=np.int64))
    np.save(tmp_path / "nan.npy", np.full((10, 3), np.nan))
    save_file({"a": torch.ones(2, 2), "b": torch.ones(2, 2)}, str(tmp_path / "two.safetensors"))
    (tmp_path / "acts.csv").write_text("1,2\n")
    cases = {
        "missing.npy": "no such file",
        "garbage.npy": "cannot be read as .npy",
        "vector.npy": "expected an [N, d] (or [..., d]) tensor",
        "ints.npy": "expected floating-point",
        "nan.npy": "NaN",
        "two.safetensors": "holds 2 tensors",
        "acts.csv": "unknown format",
    }
    for name, message in cases.items():
        assert cli(["diagnose", str(tmp_path / name)]) == 2, name
        assert message in capsys.readouterr().err, name


def test_reproduce_small_run(tmp_path):
    """A small reproduce: at gamma 30 the uncentred SAE loses many features, the centred one none."""
    settings = Settings(gammas=(30.0,), steps=200, n_eval=2048)
    rows = run(settings)
    high = {key: value[0] for key, value in rows[0].items() if key != "gamma"}  # the one seed
    assert high["init_dead"] > 0.8 and high["init_dead_predicted"] > 0.8
    assert high["baseline_dead"] > 0.3 and high["centred_dead"] < 0.02
    assert high["centred_mmcs"] > high["baseline_mmcs"] + 0.2
    assert markdown_table(rows).count("\n") == 2
    assert cli(["reproduce", "--out", str(tmp_path), "--gammas", "30", "--steps", "20", "--n-eval", "1024"]) == 0
    assert (tmp_path / "reproduce.md").is_file() and (tmp_path / "death_vs_gamma.png").is_file()


def test_reproduce_pairs_its_variants(monkeypatch):
    """Within a seed every variant starts from the same directions and sees the same batches; seeds
    differ, and the table reports their mean +- std."""
    initial, drawn = [], []
    original_initialize, original_sample = fastsae.SparseAutoencoder.initialize, SyntheticActivations.sample

    def initialize(self, sample):
        original_initialize(self, sample)
        initial.append(self.W_dec.detach().clone())
        return self

    def sample(self, n):
        drawn.append(original_sample(self, n))
        return drawn[-1]

    monkeypatch.setattr(fastsae.SparseAutoencoder, "initialize", initialize)
    monkeypatch.setattr(SyntheticActivations, "sample", sample)
    rows = run(Settings(gammas=(5.0,), steps=2, n_eval=256, seeds=2, workers=1))  # one process: the patches see it
    variants, per_variant = len(VARIANTS), 3  # the initialisation sample and two batches each
    for seed in range(2):
        inits = initial[seed * variants : (seed + 1) * variants]
        assert all(torch.equal(inits[0], w) for w in inits[1:]), "variants start from different directions"
        first = seed * (1 + variants * per_variant) + 1  # past this seed's eval set
        streams = [drawn[first + i * per_variant : first + (i + 1) * per_variant] for i in range(variants)]
        assert all(torch.equal(a, b) for stream in streams[1:] for a, b in zip(streams[0], stream)), "batches differ"
    assert not torch.equal(initial[0], initial[variants]), "two seeds drew the same directions"
    assert len(rows[0]["baseline_dead"]) == 2 and " ± " in markdown_table(rows)
    with pytest.raises(ValueError, match="seeds >= 1"):
        run(Settings(gammas=(5.0,), seeds=0))
    with pytest.raises(ValueError, match="gammas >= 0"):  # its row would read gamma 1.0, as measured
        run(Settings(gammas=(5.0, -1.0)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the messages shown on machines without a GPU")
def test_cli_says_what_needs_a_gpu(capsys):
    """bench (with bench/run.py's own options) and reproduce --device cuda explain, without a traceback."""
    assert cli(["bench"]) == 2 and cli(["bench", "--only", "encode"]) == 2
    assert capsys.readouterr().out.count("needs a CUDA GPU") == 2
    assert cli(["reproduce", "--device", "cuda", "--steps", "1"]) == 2
    assert "--device cuda: no CUDA device is visible" in capsys.readouterr().err


def test_cli_refuses_unknown_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli(["diagnose", "acts.npy", "--bogus"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [(["diagnose", "acts.npy", "--n-features=-1"], "argument --n-features: must be >= 1, got -1"),
     (["diagnose", "acts.npy", "--measure-tokens=-4"], "argument --measure-tokens: must be >= 0"),
     (["reproduce", "--n-eval=1"], "argument --n-eval: must be >= 2"),
     (["reproduce", "--seeds=0"], "argument --seeds: must be >= 1"),
     (["reproduce", "--gammas", "5", "-1"], "argument --gammas: must be >= 0, got -1"),
     (["reproduce", "--gammas", "nan"], "argument --gammas: must be >= 0, got nan")],
)  # fmt: skip
def test_cli_refuses_counts_out_of_range(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli(args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_degenerate_inputs_get_the_papers_conventions_or_clear_errors():
    """NaN gamma is an error; constant activations (all-zero ones too) have gamma inf and nothing to
    learn; the closed forms at gamma inf are their limit; fractions are Python floats."""
    with pytest.raises(ValueError, match="NaN"):
        fastsae.predicted_death(float("nan"), 1000, 32, 1024)
    dead_relu, dead_topk = fastsae.predicted_death(float("inf"), 1000, 32, 1024)
    assert type(dead_relu) is float and dead_relu == 0.5
    assert dead_topk == pytest.approx(float(norm.cdf(norm.ppf(1 - 32 / 1024))))
    row = torch.randn(40, dtype=torch.float64)
    for acts in (row.expand(500, 40).clone(), torch.zeros(500, 40), torch.full((500, 40), 3.0)):
        assert fastsae.outlier_severity(acts) == float("inf")
        assert fastsae.outlier_severity(acts, layernorm=False) == float("inf")
        report = fastsae.diagnose(acts, k=8)
        assert report.recommendation == "nothing to learn" and "constant" in str(report)
        assert report.effective_rank == 0.0 and type(report.predicted_dead_topk) is float


def test_diagnose_subsamples_the_covariance_on_one_grid(monkeypatch):
    """Past EIGEN_TOKENS tokens the effective rank comes from an evenly spaced subsample, the same rows
    whether the tensor is processed in one chunk or many; gamma still uses every token. The SAE assumed
    by default has 16 x d features."""
    x = _outlier_data(n=1000, gamma=2.0)
    monkeypatch.setattr(diagnostics, "EIGEN_TOKENS", 100)
    one_shot = fastsae.diagnose(x, k=8)
    assert one_shot.n_features == 16 * x.shape[1] and "8 of 640" in str(one_shot)
    assert one_shot.gamma == pytest.approx(fastsae.outlier_severity(x), rel=1e-12)
    assert one_shot.effective_rank == pytest.approx(fastsae.effective_rank(x[::10]), rel=1e-6)
    assert one_shot.effective_rank == pytest.approx(fastsae.effective_rank(x), rel=0.2)
    monkeypatch.setattr(centering, "CHUNK_ROWS", 64)
    assert fastsae.diagnose(x, k=8).effective_rank == pytest.approx(one_shot.effective_rank, rel=1e-6)


def test_diagnose_measures_death_at_init_like_measure_death():
    """diagnose's measured death is measure_death's on the same random-init SAEs (uncentred, centred,
    whitened, from one seed), and its advice follows it; measure_tokens=0 falls back to the closed forms."""
    x = _outlier_data(n=1500, gamma=20.0)
    report = fastsae.diagnose(x, k=16, n_features=512, measure_tokens=1000)
    rows = torch.linspace(0, 1499, 1000).round().long()
    sample = x[rows].float()
    assert report.measured_tokens == 1000
    for mode in ("none", "geometric_median", "whiten"):
        cfg = fastsae.SAEConfig(d_in=40, n_features=512, k=16, k_aux=0, centering=mode)
        torch.manual_seed(0)
        sae = fastsae.SparseAutoencoder(cfg).initialize(sample).eval()
        expected = fastsae.measure_death(sae, sample)
        assert report.measured_dead[mode] == expected.dead
        assert report.measured_dead_relu[mode] == expected.dead_relu
    assert report.measured_dead["none"] > 0.8 and report.measured_dead["geometric_median"] < 0.02
    assert report.recommendation == "centre" and "1000 tokens" in str(report)
    unmeasured = fastsae.diagnose(x, k=16, n_features=512, measure_tokens=0)
    assert unmeasured.measured_tokens == 0 and not unmeasured.measured_dead
    assert unmeasured.recommendation == "centre" and "measured" not in str(unmeasured)
    with pytest.raises(ValueError, match="measure_tokens must be >= 0"):
        fastsae.diagnose(x, k=16, n_features=512, measure_tokens=-1)


def test_reproduce_in_processes_matches_one_process():
    """The (gamma, seed) runs seed themselves: spread over processes they give the same numbers."""
    settings = Settings(gammas=(2.0, 5.0), steps=3, n_eval=256, seeds=2)
    parallel = run(dataclasses.replace(settings, workers=2))
    serial = run(dataclasses.replace(settings, workers=1))
    for together, alone in zip(parallel, serial):
        assert together.keys() == alone.keys()
        for key in together:
            assert together[key] == pytest.approx(alone[key], rel=1e-4, abs=1e-6), key
