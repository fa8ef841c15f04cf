"""`python -m fastsae reproduce`: outlier-induced feature death, and its cure, on synthetic data.

Synthetic activations = sparse non-negative combinations of a known dictionary of unit "true features"
+ Gaussian noise + a mean offset concentrated in a few dimensions, scaled so that the outlier severity
gamma = ||mu|| / ||sigma|| takes each value of a sweep. For each gamma:
1. at initialisation (random unit encoder directions, zero biases), the measured fraction of dead
   features (dead-by-ReLU, and dead overall under TopK) against the paper's closed forms;
2. after a short training run, % dead, feature recovery (MMCS: mean over true features of the best
   cosine similarity with a decoder row) and FVU for an uncentred baseline (b_dec = 0), the baseline
   with AuxK, fastsae's default (b_dec = geometric median, AuxK on) and the whitened SAE (PCA whitening
   after the geometric median, AuxK on).
The variants are paired: within a seed they start from the same random directions and see the same
batches, so a difference between them is the variant's, not the draw's (at gamma >= 15 an uncentred
TopK SAE is bimodal in its initialisation). Every number is a mean over `seeds` seeds, +- their std.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean, stdev

import torch
from tqdm import tqdm

from .diagnostics import RunningMoments, measure_death, predicted_death
from .optim import step_with_decoder_constraint
from .sae import SAEConfig, SparseAutoencoder


@dataclass
class Settings:
    gammas: tuple[float, ...] = (0.5, 2.0, 5.0, 15.0, 30.0, 50.0)
    d: int = 64
    n_true: int = 256  # true features in the data
    n_features: int = 512  # SAE features
    k: int = 8
    active_per_token: float = 4.0  # expected number of true features per token
    noise: float = 0.05
    outlier_dims: int = 2
    n_eval: int = 8192
    steps: int = 300
    batch_size: int = 512
    lr: float = 3e-3
    seed: int = 0  # the first seed
    seeds: int = 2  # seeds per gamma (seed, seed + 1, ...): a mean and a spread, under a minute on 2 CPU cores
    device: str = "cpu"
    workers: int | None = None  # processes for the (gamma, seed) runs: one per core on a CPU, 1 on a GPU


class SyntheticActivations:
    """Draws tokens x = codes @ dictionary + noise + offset, with ||offset|| = gamma * ||sigma||."""

    def __init__(self, settings: Settings, gamma: float, generator: torch.Generator):
        self.s = settings
        self.generator = generator
        self.dictionary = torch.nn.functional.normalize(
            torch.randn(settings.n_true, settings.d, generator=generator), dim=1
        )
        # The per-dimension std of codes @ dictionary + noise, exactly: each code is independent, active
        # with probability p and then uniform on [0.5, 1.5] (mean 1, second moment 13 / 12).
        p = settings.active_per_token / settings.n_true
        code_variance = p * 13 / 12 - p**2
        sigma = (code_variance * self.dictionary.pow(2).sum(0) + settings.noise**2).sqrt()
        self.offset = torch.zeros(settings.d)
        self.offset[: settings.outlier_dims] = gamma * float(sigma.norm()) / settings.outlier_dims**0.5

    def _centred(self, n: int) -> torch.Tensor:
        s = self.s
        active = self._active(n * s.n_true, s.active_per_token / s.n_true)
        codes = torch.zeros(n * s.n_true)
        codes[active] = 0.5 + torch.rand(active.numel(), generator=self.generator)  # magnitudes of the active
        noise = s.noise * torch.randn(n, s.d, generator=self.generator)
        return codes.view(n, s.n_true) @ self.dictionary + noise

    def _active(self, total: int, p: float) -> torch.Tensor:
        """Positions in [0, total) each active independently with probability p, from geometric gaps
        between them: about p * total draws instead of total."""
        positions, last = [], -1
        while last < total:
            gaps = torch.empty(int(1.1 * p * total) + 64).geometric_(p, generator=self.generator).long()
            chunk = last + gaps.cumsum(0)
            positions.append(chunk)
            last = int(chunk[-1])
        positions = torch.cat(positions)
        return positions[positions < total]

    def sample(self, n: int) -> torch.Tensor:
        return (self._centred(n) + self.offset).to(self.s.device)


def mean_max_cosine(sae: SparseAutoencoder, dictionary: torch.Tensor) -> float:
    """MMCS: for each true feature, the best cosine similarity with any decoder row; averaged."""
    decoder = torch.nn.functional.normalize(sae.W_dec.detach().float().cpu(), dim=1)
    return float((dictionary @ decoder.T).max(1).values.mean())


def _train(data: SyntheticActivations, cfg: SAEConfig, s: Settings) -> SparseAutoencoder:
    sae = SparseAutoencoder(cfg).to(s.device)
    sae.initialize(data.sample(4 * s.batch_size))
    optimizer = torch.optim.Adam(sae.parameters(), lr=s.lr)
    for _ in range(s.steps):
        out = sae(data.sample(s.batch_size))
        out.loss.backward()
        step_with_decoder_constraint(sae, optimizer)
        optimizer.zero_grad()
    return sae.eval()


VARIANTS = {  # name -> (centering, AuxK on)
    "baseline": ("none", False),
    "+AuxK": ("none", True),
    "centred": ("geometric_median", True),
    "whitened": ("whiten", True),
}


def run(s: Settings) -> list[dict]:
    """One row per gamma: init death (measured, predicted) and, per variant, % dead, MMCS, FVU; each
    value is a list with one entry per seed. On a CPU the (gamma, seed) runs go to one single-threaded
    process per core: their small matrices gain little from intra-op threads, so this is ~2x faster on
    2 cores; each run seeds itself, so the numbers do not depend on where it ran."""
    if s.seeds < 1 or (s.workers is not None and s.workers < 1):
        raise ValueError(f"reproduce needs seeds >= 1 and workers >= 1 (or None), got {s.seeds} and {s.workers}")
    if not all(gamma >= 0 for gamma in s.gammas):  # (a NaN too) the rows are labelled by the gamma measured
        raise ValueError(f"reproduce needs gammas >= 0 (||mu|| / ||sigma||), got {s.gammas}")
    jobs = [(gamma, seed) for gamma in s.gammas for seed in range(s.seed, s.seed + s.seeds)]
    workers = s.workers or (min(len(jobs), os.cpu_count() or 1) if s.device == "cpu" else 1)
    progress = tqdm(total=len(jobs), desc="training", unit="run", leave=False)
    if workers > 1:
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            futures = [pool.submit(_one_seed, s, gamma, seed) for gamma, seed in jobs]
            for _ in as_completed(futures):
                progress.update()
            results = [future.result() for future in futures]
    else:
        results = []
        for gamma, seed in jobs:
            results.append(_one_seed(s, gamma, seed))
            progress.update()
    progress.close()
    rows = []
    for gamma in s.gammas:
        row: dict = {"gamma": gamma}
        for (job_gamma, _), result in zip(jobs, results):
            if job_gamma == gamma:
                for key, value in result.items():
                    row.setdefault(key, []).append(value)
        rows.append(row)
    return rows


def _one_seed(s: Settings, gamma: float, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    data = SyntheticActivations(s, gamma, generator)
    eval_set = data.sample(s.n_eval)
    moments = RunningMoments()
    moments.update(eval_set)
    base = dict(d_in=s.d, n_features=s.n_features, k=s.k, check_finite=False)
    torch.manual_seed(seed)
    at_init = SparseAutoencoder(SAEConfig(**base, centering="none", k_aux=0)).to(s.device)
    init = measure_death(at_init, eval_set)
    predicted_relu, predicted_topk = predicted_death(moments.gamma, s.n_eval, s.k, s.n_features)
    result = {
        "gamma_measured": moments.gamma,
        "init_dead_relu": init.dead_relu,
        "init_dead_relu_predicted": predicted_relu,
        "init_dead": init.dead,
        "init_dead_predicted": predicted_topk,
    }
    stream = generator.get_state()  # every variant's batches are drawn from here
    for name, (centering, auxk) in VARIANTS.items():
        cfg = SAEConfig(
            **base,
            centering=centering,
            k_aux=s.d // 2 if auxk else 0,
            dead_after_tokens=20 * s.batch_size,
        )
        generator.set_state(stream)
        torch.manual_seed(seed)  # the same initial directions for every variant
        sae = _train(data, cfg, s)
        with torch.no_grad():
            fvu = float(sae(eval_set).fvu)
        result[f"{name}_dead"] = measure_death(sae, eval_set).dead
        result[f"{name}_mmcs"] = mean_max_cosine(sae, data.dictionary)
        result[f"{name}_fvu"] = fvu
    return result


def _spread(values: list[float]) -> float:
    """Standard deviation over seeds (0 for one seed)."""
    return stdev(values) if len(values) > 1 else 0.0


def _cell(values: list[float], percent: bool) -> str:
    scale, unit, digits = (100, "%", 1) if percent else (1, "", 3)
    text = f"{scale * fmean(values):.{digits}f}"
    if len(values) > 1:
        text += f" ± {scale * _spread(values):.{digits}f}"
    return text + unit


def _per_variant(row: dict, metric: str, percent: bool = False) -> str:
    return " / ".join(_cell(row[f"{name}_{metric}"], percent) for name in VARIANTS)


_NAMES = " / ".join(VARIANTS)


def markdown_table(rows: list[dict]) -> str:
    header = (
        "| gamma | init dead-by-ReLU measured / predicted | init dead (TopK) measured / predicted "
        f"| dead after training: {_NAMES} | MMCS: {_NAMES} | FVU: {_NAMES} |"
    )
    lines = [header, "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {fmean(r['gamma_measured']):.1f} "
            f"| {_cell(r['init_dead_relu'], True)} / {_cell(r['init_dead_relu_predicted'], True)} "
            f"| {_cell(r['init_dead'], True)} / {_cell(r['init_dead_predicted'], True)} "
            f"| {_per_variant(r, 'dead', percent=True)} | {_per_variant(r, 'mmcs')} | {_per_variant(r, 'fvu')} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], s: Settings, path: Path) -> None:
    """Death vs gamma: closed-form curves, measured points at init, and after training per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = torch.logspace(-1, 2, 200).tolist()
    curves = [predicted_death(g, s.n_eval, s.k, s.n_features) for g in grid]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(grid, [100 * c[0] for c in curves], "C0-", label="predicted dead-by-ReLU (init)")
    ax.plot(grid, [100 * c[1] for c in curves], "C1-", label="predicted dead, TopK (init)")
    gammas = [fmean(r["gamma_measured"]) for r in rows]
    series = [
        ("init_dead_relu", "C0o", "measured dead-by-ReLU (init)"),
        ("init_dead", "C1o", "measured dead, TopK (init)"),
        *((f"{name}_dead", f"C{i + 2}s--", f"after training: {name}") for i, name in enumerate(VARIANTS)),
    ]
    for key, style, label in series:  # means over seeds, their std as error bars
        means = [100 * fmean(r[key]) for r in rows]
        spreads = [100 * _spread(r[key]) for r in rows]
        ax.errorbar(gammas, means, yerr=spreads, fmt=style, capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("outlier severity gamma")
    ax.set_ylabel("% features dead")
    ax.set_title(f"Feature death vs outliers (d={s.d}, F={s.n_features}, k={s.k}, N={s.n_eval}, {s.seeds} seeds)")
    ax.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(s: Settings, out_dir: Path) -> str:
    rows = run(s)
    table = markdown_table(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(s).items())
    (out_dir / "reproduce.md").write_text(f"# fastsae reproduce\n\nSettings: {settings}\n\n{table}\n")
    plot(rows, s, out_dir / "death_vs_gamma.png")
    return table
