"""Outlier diagnostics and feature-death accounting (Simon, Adams & Zou, ICML 2026, arXiv 2605.31518).

- Outlier severity gamma = ||mu|| / ||sigma||, mu and sigma the per-dimension mean and std (ddof 0)
  over tokens, after per-token LayerNorm times sqrt(d) (the paper's convention) or raw.
- Effective rank: exp of the entropy of the normalised eigenvalues of the centred covariance.
- Closed forms at initialisation (random unit encoder directions, zero biases), over N eval tokens:
  dead-by-ReLU = Phi(-C / gamma), dead-by-TopK (ReLU-dead included) = Phi(t_k - C / gamma), with
  C = Phi^-1(1 - 1/N) and t_k = Phi^-1(1 - k / n_features).
- Measured death: a feature is dead if it never fires on the evaluation set; dead-by-ReLU if its
  pre-activation is never > 0, dead-by-TopK if positive at least once but never selected.

Every statistic streams over chunks in float64 (Chan's parallel merge), so 1M tokens x 4096 dims
never sit in memory at once; pass a tensor (processed CHUNK_ROWS rows at a time, on its device) or
any iterable of [n_i, d] tensors.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy.stats import norm
from torch import Tensor

from .centering import check_sample, row_chunks
from .sae import SAEConfig, SparseAutoencoder

LAYERNORM_EPS = 1e-5
LOW_EFFECTIVE_RANK = 8.0  # below this, centring alone leaves most directions degenerate (Evo1: ~2.8)
CENTRE_IF_DEAD_RELU = 0.01
CENTRE_IF_DEAD_TOPK = 0.10
# diagnose estimates the covariance (n * d^2 work) from an evenly spaced subsample of this many tokens:
# at d = 1536 all of 62k tokens cost 8 s of float64 GEMM on a 2-core CPU for the same effective rank.
EIGEN_TOKENS = 16384
# diagnose measures death at initialisation by encoding this many (evenly spaced) tokens with random-init
# SAEs of the user's shape, by default only on a GPU: a CPU's dense reference encode of enough tokens for
# a meaningful count (each feature selected ~20 times by chance) takes minutes at d = 1536, F = 16 d.
MEASURE_TOKENS_GPU = 65536
MEASURED_CENTERINGS = {"none": "uncentred", "geometric_median": "centred", "whiten": "whitened"}


def layernorm_scaled(x: Tensor) -> Tensor:
    """Per-token LayerNorm times sqrt(d): (x - mean_d) / sqrt(var_d + 1e-5) * sqrt(d), in float64 (torch's
    fused layer_norm: one pass instead of five)."""
    d = x.shape[1]
    return F.layer_norm(x.to(torch.float64), (d,), eps=LAYERNORM_EPS) * d**0.5


def _chunks(acts: Tensor | Iterable[Tensor]) -> Iterator[Tensor]:
    if isinstance(acts, Tensor):
        check_sample(acts)
        yield from row_chunks(acts, dtype=acts.dtype)
        return
    seen = False
    for i, chunk in enumerate(acts):
        check_sample(chunk, f"acts chunk {i}")
        seen = True
        yield chunk
    if not seen:
        raise ValueError("acts is empty (no chunks)")


class RunningMoments:
    """Token count, per-dimension mean and centred second moments (diagonal, or the full d x d matrix
    when `full`), merged chunk by chunk with Chan et al.'s parallel update, in float64. `gram_dtype`:
    the dtype of the full matrix's GEMM over each float64-centred chunk (float32 halves its cost)."""

    def __init__(self, full: bool = False, gram_dtype: torch.dtype = torch.float64):
        self.full = full
        self.gram_dtype = gram_dtype
        self.n = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def update(self, x: Tensor) -> None:
        n_b = x.shape[0]
        if self.full:
            x = x.to(torch.float64)
            mean_b = x.mean(0)
            centred = (x - mean_b).to(self.gram_dtype)
            m2_b = (centred.T @ centred).to(torch.float64)
        else:
            # One fused Welford pass; on the CPU it accumulates in double for any float input, so no
            # float64 copy of the chunk is made.
            x = x if x.dtype == torch.float64 else x.float()
            variance_b, mean_b = (t.to(torch.float64) for t in torch.var_mean(x, dim=0, correction=0))
            m2_b = variance_b * n_b
        if self.mean is None:
            self.n, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        if x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"acts chunks disagree on d: {self.mean.shape[0]} then {x.shape[1]}")
        n = self.n + n_b
        delta = mean_b - self.mean.to(x.device)
        correction = torch.outer(delta, delta) if self.full else delta.pow(2)
        self.m2 = self.m2.to(x.device) + m2_b + correction * (self.n * n_b / n)
        self.mean = self.mean.to(x.device) + delta * (n_b / n)
        self.n = n

    @property
    def variance(self) -> Tensor:
        """Per-dimension variance (ddof 0)."""
        return (self.m2.diagonal() if self.full else self.m2) / self.n

    @property
    def constant(self) -> bool:
        """Every token the same vector (up to float64 rounding of the mean)."""
        spread = float(self.variance.sqrt().norm())
        return spread <= 1e-12 * float(self.mean.norm())

    @property
    def gamma(self) -> float:
        """||mu|| / ||sigma||; inf for constant activations (the paper's convention), all-zero ones too."""
        if self.constant:
            return math.inf
        return float(self.mean.norm() / self.variance.sqrt().norm())


def outlier_severity(acts: Tensor | Iterable[Tensor], layernorm: bool = True) -> float:
    """gamma = ||mu|| / ||sigma|| over tokens; with `layernorm` (default, the paper's convention) each
    token is first LayerNorm-ed and scaled by sqrt(d)."""
    moments = RunningMoments()
    for chunk in _chunks(acts):
        moments.update(layernorm_scaled(chunk) if layernorm else chunk)
    return moments.gamma


def _effective_rank_of(moments: RunningMoments) -> float:
    """Effective rank of the covariance that full `moments` hold; 0 when the tokens do not vary."""
    if moments.constant:  # eigenvalues of rounding noise would give any rank
        return 0.0
    eigenvalues = torch.linalg.eigvalsh(moments.m2 / moments.n).clamp_min(0)
    p = eigenvalues / eigenvalues.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def effective_rank(acts: Tensor | Iterable[Tensor], layernorm: bool = True) -> float:
    """exp(entropy) of the normalised eigenvalues of the centred covariance (streamed d x d, float64)."""
    moments = RunningMoments(full=True)
    for chunk in _chunks(acts):
        moments.update(layernorm_scaled(chunk) if layernorm else chunk)
    return _effective_rank_of(moments)


def predicted_death(gamma: float, n_eval: int, k: int, n_features: int) -> tuple[float, float]:
    """(dead_relu, dead_topk) fractions at initialisation from the paper's closed forms; dead_topk
    includes the ReLU-dead features. gamma = inf (constant activations) gives the limit: half of all
    directions point against the mean."""
    if math.isnan(gamma):
        raise ValueError("gamma is NaN: outlier_severity of activations with no finite spread?")
    if gamma < 0 or n_eval < 2 or not 1 <= k <= n_features:
        raise ValueError(
            f"need gamma >= 0, n_eval >= 2, 1 <= k <= n_features; got {gamma}, {n_eval}, {k}, {n_features}"
        )
    if gamma == 0:
        return 0.0, 0.0
    c = norm.ppf(1 - 1 / n_eval)
    t_k = norm.ppf(1 - k / n_features)
    return float(norm.cdf(-c / gamma)), float(norm.cdf(t_k - c / gamma))


@dataclass
class DeathReport:
    """Measured feature death over an evaluation set of n_tokens tokens."""

    dead_relu: float  # fraction of features whose pre-activation was never > 0
    dead_topk: float  # fraction positive at least once but never selected (0 for dense activations)
    dead: float  # fraction that never fired: dead_relu + dead_topk
    dead_relu_mask: Tensor
    dead_topk_mask: Tensor
    fire_counts: Tensor  # int64 [F]: tokens each feature fired on
    n_tokens: int


@torch.no_grad()
def measure_death(sae, acts: Tensor | Iterable[Tensor], batch_size: int = 4096) -> DeathReport:
    """Runs `sae` over the evaluation set in batches (no [N, F] tensor kept) and classifies every
    feature: fired at least once, dead-by-TopK, or dead-by-ReLU."""
    n_features = sae.cfg.n_features
    device = sae.W_enc.device
    fired = torch.zeros(n_features, dtype=torch.int64, device=device)
    positive = torch.zeros(n_features, dtype=torch.int64, device=device)
    n_tokens = 0
    for chunk in _chunks(acts):
        for start in range(0, chunk.shape[0], batch_size):
            x = chunk[start : start + batch_size].to(device)
            fired_here, positive_here = sae.fire_and_positive_counts(x)
            fired += fired_here
            positive += positive_here
            n_tokens += x.shape[0]
    dead_relu = positive == 0
    dead_topk = (fired == 0) & ~dead_relu
    return DeathReport(
        dead_relu=float(dead_relu.float().mean()),
        dead_topk=float(dead_topk.float().mean()),
        dead=float((fired == 0).float().mean()),
        dead_relu_mask=dead_relu,
        dead_topk_mask=dead_topk,
        fire_counts=fired,
        n_tokens=n_tokens,
    )


@dataclass
class Diagnosis:
    """What `diagnose` found, and what to do about it."""

    n_tokens: int
    d: int
    k: int
    n_features: int
    gamma: float  # LayerNorm convention
    gamma_raw: float
    effective_rank: float
    predicted_dead_relu: float  # closed forms at the LayerNorm gamma, over n_tokens
    predicted_dead_topk: float
    predicted_dead_relu_raw: float  # ... at the raw gamma (what an SAE on raw activations sees)
    predicted_dead_topk_raw: float
    measured_tokens: int  # tokens the random-init SAEs encoded (0: not measured)
    measured_dead: dict[str, float]  # centering -> fraction dead at initialisation over measured_tokens
    measured_dead_relu: dict[str, float]  # centering -> fraction never positive
    recommendation: str  # "no action" | "centre" | "centre + whiten" | "nothing to learn"
    reason: str

    def __str__(self) -> str:
        rows = [
            ("tokens x dims", f"{self.n_tokens} x {self.d}"),
            ("SAE assumed (k of n_features)", f"{self.k} of {self.n_features}"),
            ("gamma (LayerNorm x sqrt(d))", f"{self.gamma:.3f}"),
            ("gamma (raw)", f"{self.gamma_raw:.3f}"),
            ("effective rank", f"{self.effective_rank:.1f}"),
            ("predicted dead-by-ReLU at init (LayerNorm / raw gamma)",
             f"{100 * self.predicted_dead_relu:.1f}% / {100 * self.predicted_dead_relu_raw:.1f}%"),
            ("predicted dead (TopK) at init (LayerNorm / raw gamma)",
             f"{100 * self.predicted_dead_topk:.1f}% / {100 * self.predicted_dead_topk_raw:.1f}%"),
        ]  # fmt: skip
        if self.measured_tokens:
            names = " / ".join(MEASURED_CENTERINGS[c] for c in self.measured_dead)
            rows += [
                (f"measured dead at init over {self.measured_tokens} tokens: {names}", _percents(self.measured_dead)),
                ("measured dead-by-ReLU at init", _percents(self.measured_dead_relu)),
            ]
        rows.append(("recommendation", self.recommendation))
        lines = ["| statistic | value |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)]
        return "\n".join(lines) + f"\n\n{self.reason}"


def _percents(fractions: dict[str, float]) -> str:
    return " / ".join(f"{100 * value:.1f}%" for value in fractions.values())


def measure_death_at_init(
    sample: Tensor, k: int, n_features: int, centerings=tuple(MEASURED_CENTERINGS), seed: int = 0
) -> dict[str, DeathReport]:
    """Death at initialisation of a TopK SAE (k of n_features) over `sample` [N, d], for each centering
    mode: every SAE starts from the same random directions (drawn from `seed`, the caller's RNG left
    untouched) and is initialised (b_dec, whitening) from the sample itself."""
    reports = {}
    for centering in centerings:
        cfg = SAEConfig(d_in=sample.shape[1], n_features=n_features, k=k, k_aux=0, centering=centering)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            sae = SparseAutoencoder(cfg).to(sample.device).initialize(sample)
        reports[centering] = measure_death(sae.eval(), sample)
    return reports


def diagnose(
    acts: Tensor | Iterable[Tensor], k: int = 32, n_features: int | None = None, measure_tokens: int | None = None
) -> Diagnosis:
    """One streaming pass: gamma in both conventions, effective rank, the closed-form death an
    uncentred TopK SAE (k of n_features, default 16 x d) would have at initialisation over these tokens;
    then death measured at initialisation with random-init SAEs of that shape, uncentred, centred and
    whitened, over `measure_tokens` evenly spaced tokens (default MEASURE_TOKENS_GPU when there is a GPU,
    else 0, which skips it), and a recommendation based on what was measured. For a
    tensor, the covariance behind the effective rank comes from an evenly spaced subsample of at most
    EIGEN_TOKENS tokens; gamma uses every token."""
    step = max(1, acts.shape[0] // EIGEN_TOKENS) if isinstance(acts, Tensor) else 1
    if measure_tokens is None:
        measure_tokens = MEASURE_TOKENS_GPU if torch.cuda.is_available() else 0
    if measure_tokens < 0:
        raise ValueError(f"measure_tokens must be >= 0 (0 skips the measurement), got {measure_tokens}")
    layernormed, raw, covariance = RunningMoments(), RunningMoments(), RunningMoments(True, torch.float32)
    seen, kept, n_kept = 0, [], 0  # kept: an iterable's first tokens, for the measurement
    for chunk in _chunks(acts):
        normed = layernorm_scaled(chunk)
        layernormed.update(normed)
        raw.update(chunk)
        sampled = normed[(-seen) % step :: step]  # the rows of this chunk on the global grid of the subsample
        if sampled.shape[0]:
            covariance.update(sampled)
        if not isinstance(acts, Tensor) and n_kept < measure_tokens:
            kept.append(chunk)
            n_kept += chunk.shape[0]
        seen += chunk.shape[0]
    d = raw.mean.shape[0]
    n_features = 16 * d if n_features is None else n_features
    if not 1 <= k <= n_features:
        raise ValueError(f"k must be in [1, n_features={n_features}], got {k}")
    gamma, gamma_raw = layernormed.gamma, raw.gamma
    rank = _effective_rank_of(covariance)
    n_eval = max(layernormed.n, 2)
    dead_relu, dead_topk = predicted_death(gamma, n_eval, k, n_features)
    dead_relu_raw, dead_topk_raw = predicted_death(gamma_raw, n_eval, k, n_features)

    measured = {}
    if measure_tokens > 0 and not raw.constant:
        sample = _measurement_sample(acts if isinstance(acts, Tensor) else torch.cat(kept), measure_tokens)
        measured = measure_death_at_init(sample, k, n_features)
    recommendation, reason = _advice(raw.constant, gamma, rank, dead_relu, dead_topk, measured, k, n_features)
    return Diagnosis(
        n_tokens=layernormed.n,
        d=d,
        k=k,
        n_features=n_features,
        gamma=gamma,
        gamma_raw=gamma_raw,
        effective_rank=rank,
        predicted_dead_relu=dead_relu,
        predicted_dead_topk=dead_topk,
        predicted_dead_relu_raw=dead_relu_raw,
        predicted_dead_topk_raw=dead_topk_raw,
        measured_tokens=next(iter(measured.values())).n_tokens if measured else 0,
        measured_dead={c: report.dead for c, report in measured.items()},
        measured_dead_relu={c: report.dead_relu for c, report in measured.items()},
        recommendation=recommendation,
        reason=reason,
    )


def _measurement_sample(acts: Tensor, measure_tokens: int) -> Tensor:
    """Up to `measure_tokens` evenly spaced tokens of `acts` in float32, on the GPU when there is one."""
    device = acts.device if acts.is_cuda or not torch.cuda.is_available() else torch.device("cuda")
    rows = torch.linspace(0, acts.shape[0] - 1, min(measure_tokens, acts.shape[0]), device=acts.device).round().long()
    return acts[rows].to(device=device, dtype=torch.float32)


def _advice(
    constant: bool,
    gamma: float,
    rank: float,
    dead_relu: float,
    dead_topk: float,
    measured: dict[str, DeathReport],
    k: int,
    n_features: int,
) -> tuple[str, str]:
    """(recommendation, reason): from the measured death when there is a measurement, else from the
    closed forms."""
    if constant:
        return "nothing to learn", (
            "The activations are constant: every token is the same vector, so there is no variation for an "
            "SAE to learn (gamma is infinite by the paper's convention). Check the hook point and the data."
        )
    if measured:
        n = measured["none"].n_tokens
        uncentred, centred, whitened = (measured[c].dead for c in MEASURED_CENTERINGS)
        predicted = predicted_death(gamma, max(n, 2), k, n_features)[1]  # over the same tokens
        # With few tokens, features also go unselected by chance: k of n_features per token, Poisson.
        chance = math.exp(-n * k / n_features)
        summary = (
            f"Random-init SAEs of this shape left {100 * uncentred:.1f}% of features dead uncentred, "
            f"{100 * centred:.1f}% centred and {100 * whitened:.1f}% whitened over {n} tokens "
            f"(the closed form predicts {100 * predicted:.1f}% uncentred at gamma = {gamma:.2f})."
        )
        if chance > 1e-3:
            summary += (
                f" Over so few tokens about {100 * chance:.1f}% stay unselected by chance alone "
                "(--measure-tokens for more)."
            )
        uncentred, centred, whitened = (max(0.0, dead - chance) for dead in (uncentred, centred, whitened))
        if uncentred > 2 * max(predicted, 0.01):
            summary += (
                " More die than gamma explains: the activations are anisotropic (a few directions carry most "
                "of the variance), so features die by TopK even at low gamma."
            )
        if rank < LOW_EFFECTIVE_RANK or (centred > CENTRE_IF_DEAD_TOPK and whitened < centred / 2):
            return "centre + whiten", (
                f"{summary} Effective rank {rank:.1f}: centring alone leaves features without signal. "
                "Use SAEConfig(centering='whiten')."
            )
        if uncentred > CENTRE_IF_DEAD_TOPK or measured["none"].dead_relu > CENTRE_IF_DEAD_RELU:
            return "centre", f"{summary} Centre the input: SAEConfig(centering='geometric_median'), fastsae's default."
        return "no action", f"{summary} The default geometric-median centring is harmless here."
    if rank < LOW_EFFECTIVE_RANK:
        return "centre + whiten", (
            f"The centred activations have effective rank {rank:.1f} (< {LOW_EFFECTIVE_RANK:g}): a few directions "
            "carry nearly all variance, so centring alone leaves most features without signal. "
            "Use SAEConfig(centering='whiten')."
        )
    if dead_relu > CENTRE_IF_DEAD_RELU or dead_topk > CENTRE_IF_DEAD_TOPK:
        return "centre", (
            f"gamma = {gamma:.2f}: the mean offset shifts every feature's pre-activation by w . mu, so an "
            f"uncentred SAE would start with {100 * dead_topk:.0f}% of features dead "
            f"({100 * dead_relu:.0f}% never positive). Centre the input: SAEConfig(centering='geometric_median'), "
            "fastsae's default."
        )
    return "no action", (
        f"gamma = {gamma:.2f} is small: outliers predict {100 * dead_topk:.1f}% dead features at "
        "initialisation. The default geometric-median centring is harmless here."
    )
