"""`SparseAutoencoder`: a drop-in nn.Module for training and running SAEs, and its config.

Parameters follow SAELens: W_enc [d, F], b_enc [F], W_dec [F, d], b_dec [d]. The module only calls
`fastsae.functional`, whose custom ops run fused kernels on CUDA and the reference on CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import math
import numbers
import os
import socket
import tempfile
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from . import centering, parallel, reference
from . import functional as F
from .ops import batchtopk as batchtopk_ops
from .ops.launch import cdiv, join_stream, may_synchronize, next_power_of_2, on_stream

ACTIVATIONS = ("topk", "relu", "jumprelu", "batchtopk")
CENTERING_MODES = ("geometric_median", "mean", "none", "whiten")
NORMALIZATIONS = ("none", "layer_norm")  # SAEConfig.normalize_activations
LAYER_NORM_EPS = 1e-5  # SAELens' run-time layer_norm's
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
FORMAT_VERSION = "1"
# The straight-through window, in units of the activations' per-dimension RMS. The paper's 0.001 (on
# activations normalised to unit scale) left thresholds near 0 for 1500 steps on the README's data;
# 0.01 and 0.1 trained them to the same L0.
JUMPRELU_BANDWIDTH = 1e-2
# The BatchTopK inference threshold's running-average factor per training step (Bussmann et al. 2024;
# dictionary_learning's default).
BATCHTOPK_THRESHOLD_DECAY = 0.999
# AuxK runs densely over the dead features (F.topk_autoencoder, and F.auxk_reconstruction on a feature
# shard) while its [B, n_dead] matrices have
# at most this many elements (1 GiB each in bf16; the step holds about four at once), else as the fused
# encode's second top-k stream. Dense was the faster wherever both were timed on the H200: the fused
# stream gathers B * k_aux decoder rows of d, forward and backward, where dense runs thin GEMMs; at
# d = 4096, k_aux = 2048, a feature-sharded step (8192 tokens, 2^17 features and 6553 dead per GPU)
# took 104 ms dense against 576 ms fused.
AUXK_DENSE_MAX_ELEMENTS = 2**29
# An eager (or `compile`d) training step with AuxK takes its dead-feature count from the step before
# (queued to pinned host memory after that step's statistics update, `_count_dead_ahead`) instead of
# synchronising with the device to count them: the host then waits only for that update, long done,
# and queues the step while the GPU still runs the last one's backward and optimizer step. Off: one
# `nonzero` a step, which drains the GPU's queue (it waited 11 ms a step at Llama-8B's shape on the
# H200, the GPU idle while the host then queued the forward).
DEAD_COUNT_AHEAD = True
# `compile`'s dead-feature list padded with -1 to `auxk_list_length` as a captured step's (True), or as
# long as the dead features (False). Unpadded, its length becomes a dynamic dimension once a second length
# is seen (torch.compile's automatic dynamic shapes), so the compiled part is compiled about three times
# (for the first length, for any, and for a length of 1, which Dynamo specialises), and AuxK's products
# run over the dead features alone, where the padding makes them a quarter or more longer (8192 columns
# for 6554 dead features at Llama-8B's shape, 1600 for 1229 at GPT-2's). Padded by default: a dynamic
# length had been compiled for again at most lengths on CUDA (guards on it in the kernels' launches,
# Triton's integer specialisation) and failed at GPT-2's shape while Dynamo traced AuxK's kernels, which
# now run inside opaque ops (`F._topk_autoencoder_op`); the unpadded list is tested on CPU only so far.
COMPILED_LIST_PADDED = True
# The shortest dead-feature list of a captured or compiled step (`auxk_list_length`): fewer captures
# (CapturedStep) and compiles (`SparseAutoencoder.compile`) while features die one by one.
MIN_AUXK_CAPACITY = 64
# A new list holds the dead features counted and AUXK_HEADROOM as many again, rounded up to a multiple of
# MIN_AUXK_CAPACITY: AuxK's products run over the whole list, which the next power of two made up to
# twice the count (2048 columns for 1229 dead features at the GPT-2 benchmark shape), while the headroom
# keeps new captures (an eager step and a capture each) and compiles few while features die. Where a
# power of two holds the count and MIN_AUXK_CAPACITY more and is shorter, the list takes it: the row top-k
# (ops/auxk.py) pads each row to a power of two, and one past it doubles its work (at AlphaFold3's
# benchmark shape, about 820 dead features: 1088 columns padded to 2048, against 1024).
AUXK_HEADROOM = 0.25
# A list is made anew, shorter, once the dead features are at most 1 / AUXK_SHRINK of it (where a new one
# is shorter): otherwise a list sized while many features were dead (early in training, before AuxK
# revives them) stayed that long for the rest of the run, and AuxK's dense products (six [B, d] x [d, n]
# GEMMs-worth, forward and backward) ran over it. A new list costs a captured step one eager step and a
# capture; the gap between the growth (past the list) and this keeps a count that wanders from making
# list after list.
AUXK_SHRINK = 4
# A training step's fire counts and death-statistics update on the CUDA side stream that AuxK uses
# (`functional.AUXK_SIDE_STREAM`), beside the losses, joined before the forward returns. Measured on the
# H200 (captured SAEAdam step, bf16, off -> on, 278bf24): 1.684 -> 1.659 ms at AlphaFold3's shape,
# 1.953 -> 1.929 at GPT-2's.
DEATH_STATS_ON_SIDE_STREAM = True
# `torch.compile(sae)` (the whole forward traced) picks its AuxK path from the dead features' count on the
# device: torch.cond over `auxk_rungs`' list lengths (or the one of `auxk_capacity`, where that is set:
# checked, where it was trusted), each the dense AuxK over a list of that length (`F.topk_autoencoder`, as
# an eager step's few dead features), and the fused encode's second top-k stream past the last. Inductor
# reads a torch.cond's predicate on the host: one synchronisation a step (and a few scalar reads after
# it), where the fused stream gathers B * k_aux decoder rows of d, forward and backward (1.70x the eager
# step at Llama-8B's shape on an H100, e4f0941).
# On an H100 at Llama-8B's shape the whole-compiled step took 32.79 ms with the rungs against the eager
# module's 22.85 (1dd0bbb; 38.44 without them, e4f0941): better, still slower than eager, because
# torch.cond's own backward ran the branch's forward again, the encode included (each step encoded twice;
# counted on a CPU, torch 2.13). Now one autograd node branches in its forward and its backward
# (`F.topk_autoencoder_by_dead_count`), not yet timed on a GPU. Off (the fused stream, no synchronisation)
# until an A/B in one run says which is faster: FASTSAE_COMPILED_AUXK_RUNGS=1.
COMPILED_AUXK_RUNGS = os.environ.get("FASTSAE_COMPILED_AUXK_RUNGS", "0") == "1"
# The tensors indexed by feature, and their feature dimension: what `shard_features` splits and `save` gathers.
FEATURE_DIMS = {"W_enc": 1, "b_enc": 0, "W_dec": 0, "feature_fire_count": 0, "tokens_since_fired": 0}
INIT_BLOCK_ROWS = 4096  # decoder rows per seeded block of the random initialisation (`_init_directions`)


@dataclass
class SAEConfig:
    """What defines an SAE. `k_aux=None` picks d_in // 2 (Gao et al. 2024) for TopK and 0 otherwise;
    0 turns AuxK off. A feature is dead after `dead_after_tokens` tokens without firing.
    `check_finite` raises on NaN/inf input at the cost of one device synchronisation per forward
    (skipped under torch.compile); turn it off for maximum throughput. `l1_coef` weighs the ReLU SAE's
    L1 penalty (`reference.l1_penalty`), on the scale of SAELens' l1_coefficient (on the README's
    synthetic data, 1500 steps: 0 / 1 / 2 / 5 gave 119 / 63 / 38 / 7 active codes per token at FVU
    0.00 / 0.20 / 0.39 / 0.91; 2 recovered the true features best). `l0_coef` weighs the JumpReLU SAE's
    L0 penalty (active codes per token), whose thresholds learn through straight-through estimates
    (Rajamanoharan et al. 2024): a code is worth keeping when it explains more than l0_coef of the
    variance (same data: 0.001 / 0.01 gave 91 / 22 active codes at FVU 0.00 / 0.21). TopK and BatchTopK
    need neither. `matryoshka_widths` makes a TopK or BatchTopK SAE a Matryoshka SAE (Bussmann et al.
    2025, Nabeshima 2024): in training, the reconstruction from each prefix of the features alone (the
    first w of them, for w in the widths: strictly increasing, each below n_features) is scored too, its
    FVU added to the loss (SAELens' inner reconstruction losses, on fastsae's FVU scale), so that the
    first features learn what is general and later ones what is specific, rather than absorbing one
    another. Only the training loss changes: the SAE encodes, decodes, saves and loads as the plain one.
    `normalize_activations="layer_norm"` (SAELens', as OpenAI's GPT-2 TopK SAEs use it) standardises each
    token first (`reference.layer_norm_input`: its mean over the d dimensions subtracted, divided by
    their standard deviation + 1e-5); the codes, the centering and the losses are those of the
    standardised tokens, and `forward`'s reconstruction is mapped back (times the standard deviation,
    plus the mean), where `decode` leaves codes in the standardised space."""

    d_in: int
    n_features: int
    activation: Literal["topk", "relu", "jumprelu", "batchtopk"] = "topk"
    k: int = 32
    k_aux: int | None = None
    auxk_coef: float = 1 / 32
    l1_coef: float = 2.0
    l0_coef: float = 1e-2
    dead_after_tokens: int = 10_000_000
    centering: Literal["geometric_median", "mean", "none", "whiten"] = "geometric_median"
    dtype: str = "float32"
    check_finite: bool = True
    matryoshka_widths: tuple[int, ...] = ()
    normalize_activations: Literal["none", "layer_norm"] = "none"

    def __post_init__(self) -> None:
        # Whole numbers as Python ints (numpy's, and floats such as 1e7 that are whole, too), so that a
        # fraction or a bool fails here rather than inside the first forward.
        for name in ("d_in", "n_features", "k", "k_aux", "dead_after_tokens"):
            value = getattr(self, name)
            if value is None and name == "k_aux":
                continue
            whole = isinstance(value, numbers.Integral) or (
                isinstance(value, numbers.Real) and float(value).is_integer()
            )
            if isinstance(value, bool) or not whole:
                raise TypeError(f"{name} must be a whole number (int), got {value!r}")
            setattr(self, name, int(value))
        for name in ("auxk_coef", "l1_coef", "l0_coef"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{name} must be a real number, got {value!r}")
        if not isinstance(self.check_finite, bool):
            raise TypeError(f"check_finite must be True or False, got {self.check_finite!r}")
        if self.d_in < 1 or self.n_features < 1:
            raise ValueError(f"d_in and n_features must be >= 1, got {self.d_in} and {self.n_features}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.centering not in CENTERING_MODES:
            raise ValueError(f"centering must be one of {CENTERING_MODES}, got {self.centering!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.activation in ("topk", "batchtopk") and not 1 <= self.k <= self.n_features:
            raise ValueError(f"k must be in [1, n_features={self.n_features}], got {self.k}")
        if self.k_aux is None:
            self.k_aux = min(self.d_in // 2, self.n_features) if self.activation == "topk" else 0
        if self.k_aux and self.activation != "topk":
            raise ValueError(f"AuxK (k_aux={self.k_aux}) is only defined for activation='topk'")
        if not 0 <= self.k_aux <= self.n_features:
            raise ValueError(f"k_aux must be in [0, n_features={self.n_features}], got {self.k_aux}")
        if self.dead_after_tokens < 0:
            raise ValueError(f"dead_after_tokens must be >= 0, got {self.dead_after_tokens}")
        if self.l1_coef < 0 or self.l0_coef < 0:
            raise ValueError(f"l1_coef and l0_coef must be >= 0, got {self.l1_coef} and {self.l0_coef}")
        self._check_matryoshka_widths()
        if self.normalize_activations not in NORMALIZATIONS:
            raise ValueError(
                f"normalize_activations must be one of {NORMALIZATIONS}, got {self.normalize_activations!r}"
            )
        if self.normalize_activations != "none" and self.centering == "whiten":
            raise ValueError(
                "normalize_activations='layer_norm' with centering='whiten': whitening standardises already"
            )

    def _check_matryoshka_widths(self) -> None:
        widths = self.matryoshka_widths
        if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence):
            raise TypeError(f"matryoshka_widths must be a sequence of whole numbers, got {widths!r}")
        if not all(isinstance(w, numbers.Integral) and not isinstance(w, bool) for w in widths):
            raise TypeError(f"matryoshka_widths must be whole numbers, got {list(widths)}")
        self.matryoshka_widths = widths = tuple(int(w) for w in widths)  # (a JSON config gives a list)
        if widths and self.activation not in ("topk", "batchtopk"):
            raise ValueError(f"matryoshka_widths are for TopK and BatchTopK SAEs, not {self.activation!r}")
        if any(not 1 <= w < self.n_features for w in widths) or any(a >= b for a, b in zip(widths, widths[1:])):
            raise ValueError(
                f"matryoshka_widths must increase strictly within [1, n_features={self.n_features}), got {list(widths)}"
            )


def _squared_deviations(n: Tensor, total: Tensor, squares: Tensor) -> Tensor:
    """Sum over n tokens of ||x - mean(x)||^2 from their count, sum and sum of squares."""
    return squares - total.pow(2).sum() / n


def auxk_list_length(n_dead: int, current: int | None, n_tokens: int, n_features: int) -> int | None:
    """The length of the dead-feature list (padded with -1) that a captured or compiled training step's
    AuxK reads, given n_dead dead features: `current` while `auxk_list_keeps`, else a new one
    (AUXK_HEADROOM), capped where n_tokens x length reaches AUXK_DENSE_MAX_ELEMENTS; None (the fused
    AuxK stream) where the dead features are more than that, as in an eager step."""
    if current is not None and auxk_list_keeps(n_dead, current, n_tokens, n_features):
        return current
    return _new_auxk_list_length(n_dead, n_tokens, n_features)


def auxk_list_keeps(n_dead: int, current: int, n_tokens: int, n_features: int) -> bool:
    """Whether a list of `current` entries stays for n_dead dead features: it holds them, and they are
    more than 1 / AUXK_SHRINK of it or a new list would be no shorter. Where it keeps a list for a bound
    on the count, it keeps it for the count too (a captured step decides from its bound without counting;
    one that counts because the bound says the list shrinks makes the shorter list, and does not count
    again at every step)."""
    if n_dead > current:
        return False
    if n_dead > current // AUXK_SHRINK:
        return True
    new = _new_auxk_list_length(n_dead, n_tokens, n_features)
    return new is None or new >= current


def _new_auxk_list_length(n_dead: int, n_tokens: int, n_features: int) -> int | None:
    """`auxk_list_length` of a new list: n_dead and AUXK_HEADROOM as many again, rounded up to a
    multiple of MIN_AUXK_CAPACITY, or a shorter power of two that leaves MIN_AUXK_CAPACITY to spare."""
    longest = min(n_features, AUXK_DENSE_MAX_ELEMENTS // n_tokens)
    wanted = n_dead + math.ceil(AUXK_HEADROOM * n_dead)
    rounded = max(MIN_AUXK_CAPACITY, cdiv(wanted, MIN_AUXK_CAPACITY) * MIN_AUXK_CAPACITY)
    length = min(longest, rounded, next_power_of_2(n_dead + MIN_AUXK_CAPACITY))
    return length if n_dead <= length else None


def auxk_rungs(n_tokens: int, n_features: int) -> list[int]:
    """The dead-feature list lengths among which a whole-compiled step's AuxK chooses (COMPILED_AUXK_RUNGS):
    0 (no feature dead), then MIN_AUXK_CAPACITY doubling up to the longest dense list (n_tokens x length
    at most AUXK_DENSE_MAX_ELEMENTS, at most n_features), so a list is at most twice the dead features."""
    longest = min(n_features, AUXK_DENSE_MAX_ELEMENTS // n_tokens)
    rungs, length = [0], MIN_AUXK_CAPACITY
    while length < longest:
        rungs.append(length)
        length *= 2
    return rungs + [longest] if longest > 0 else rungs


def _feature_shard(cfg: SAEConfig, group) -> tuple[object, int, int]:
    """(group, start, stop) of this rank's features in a feature-sharded SAE over `group` (the default
    group when None), after checking that the SAE can be sharded so."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "feature sharding needs torch.distributed initialised (torch.distributed.init_process_group)"
        )
    if cfg.activation != "topk":
        raise ValueError(f"feature sharding supports TopK SAEs; this one is {cfg.activation!r}")
    group = group if group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    if cfg.n_features // world < max(cfg.k, cfg.k_aux):
        raise ValueError(
            f"{world} shards of {cfg.n_features} features hold {cfg.n_features // world}, fewer than k={cfg.k} or "
            f"k_aux={cfg.k_aux}: use fewer shards"
        )
    return group, *parallel.shard_bounds(cfg.n_features, group)


def _mark_initialized(module: SparseAutoencoder, incompatible_keys) -> None:
    """load_state_dict post-hook: loaded weights come with their centering."""
    module._initialized = True


class SAEOutput(NamedTuple):
    """For input x [..., d] (e.g. [batch, seq, d] from a transformer hook): recon [..., d]; vals/idx
    [..., k] for TopK and for a training BatchTopK SAE (its sparse codes: each row's candidates, value 0
    where not kept; else None); acts [..., F] for dense codes (else None); loss = fvu + auxk_coef *
    auxk + the sparsity term (the scalar to backpropagate, over all tokens); mse, fvu, auxk (TopK's
    AuxK loss) and sparsity (the ReLU SAE's L1 penalty or, while training, the JumpReLU SAE's L0), each
    0 when it does not apply."""

    recon: Tensor
    vals: Tensor | None
    idx: Tensor | None
    acts: Tensor | None
    loss: Tensor
    mse: Tensor
    fvu: Tensor
    auxk: Tensor
    sparsity: Tensor


class SparseAutoencoder(nn.Module):
    """A sparse autoencoder z = act((x - b_dec) @ W_enc + b_enc), x_hat = z @ W_dec + b_dec.

    Buffers track death statistics during training without host synchronisation:
    `feature_fire_count` (fires per feature since the last reset), `tokens_since_fired`, `n_tokens_seen`.
    """

    def __init__(self, cfg: SAEConfig, feature_group=None, *, draw_directions: bool = True):
        """A new SAE with random directions. With `feature_group`, this rank's feature shard of it
        (`shard_features`), built and drawn without the whole: for SAEs one device cannot hold.
        `draw_directions=False` leaves W_enc and W_dec unset, for a loader that overwrites every
        parameter (drawing a 2^20 x 4096 decoder takes seconds and a second copy's memory)."""
        super().__init__()
        self.cfg = cfg
        self._group = None  # the data-parallel process group (`data_parallel`), or None
        # Length of the dead-feature list a compiled or captured training step's AuxK reads (set by
        # `fastsae.graphs.CapturedStep`, which keeps it at least the dead count: a shorter list holds only
        # the first dead features, and AuxK sees no others); None: such a step takes the fused AuxK stream.
        self.auxk_capacity: int | None = None
        self._compiled_forward = None  # `compile`'s compiled part of the forward
        self._compiled_list_length: int | None = None  # the padded list's length (COMPILED_LIST_PADDED)
        # (event, host copy, statistics version, dead threshold) of the dead count after the last step
        # (`_count_dead_ahead`), read by the next one; None where there is none to trust
        self._dead_count_ahead: tuple | None = None
        self._dead_count_host: Tensor | None = None  # its pinned host memory (CUDA), reused every step
        self._feature_group, self._feature_start, stop = None, 0, cfg.n_features  # `shard_features`
        if feature_group is not None:
            self._feature_group, self._feature_start, stop = _feature_shard(cfg, feature_group)
        d, n_features = cfg.d_in, stop - self._feature_start  # this module's features
        dtype = DTYPES[cfg.dtype]
        self.W_enc = nn.Parameter(torch.empty(d, n_features, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(n_features, dtype=dtype))
        self.W_dec = nn.Parameter(torch.empty(n_features, d, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d, dtype=dtype))
        if cfg.centering == "whiten":
            # A fixed input transform fitted by initialize(): the SAE works on (x - center) @ whiten and
            # its reconstruction is mapped back with @ unwhiten + center, so losses stay in input space.
            whiten_dtype = torch.promote_types(dtype, torch.float32)  # never whiten below fp32
            self.register_buffer("whiten_center", torch.zeros(d, dtype=whiten_dtype))
            self.register_buffer("whiten_matrix", torch.eye(d, dtype=whiten_dtype))
            self.register_buffer("unwhiten_matrix", torch.eye(d, dtype=whiten_dtype))
        if cfg.activation == "jumprelu":
            # Learned through straight-through estimates in training (`_encode_jumprelu_for_training`),
            # or loaded from a trained SAE (e.g. Gemma Scope).
            self.threshold = nn.Parameter(torch.zeros(n_features, dtype=dtype))
        if cfg.activation == "batchtopk":
            # The inference threshold (Bussmann et al. 2024): a running average of the smallest code
            # BatchTopK kept in each training batch. In eval mode the codes are JumpReLU at it, so a
            # token's codes do not depend on the rest of its batch. -1 until a training step sets it.
            self.register_buffer("batchtopk_threshold", torch.full((), -1.0, dtype=torch.float32))
            # The last training batch's threshold, the estimate the next one filters by when
            # batchtopk.THRESHOLD_FIRST (`F.encode_batchtopk_sparse`): closer to it than the running
            # average, which lags while the threshold moves. -1 until a training step sets it; not saved.
            self.register_buffer("last_batch_threshold", torch.full((), -1.0, dtype=torch.float32), persistent=False)
        self.register_buffer("feature_fire_count", torch.zeros(n_features, dtype=torch.int64))
        self.register_buffer("tokens_since_fired", torch.zeros(n_features, dtype=torch.int64))
        self.register_buffer("n_tokens_seen", torch.zeros((), dtype=torch.int64))
        if draw_directions:
            self._init_directions()
        # Whether the centering was fitted (`initialize`) or weights were loaded; a training forward
        # without either fits it to its first batch (`_initialize_lazily`).
        self._initialized = cfg.centering == "none"
        self.register_load_state_dict_post_hook(_mark_initialized)

    # -- initialisation ------------------------------------------------------------------------------

    @torch.no_grad()
    def _init_directions(self, seed: int | None = None) -> None:
        """Random unit-norm decoder rows, encoder = decoder transpose, zero biases. The rows are drawn in
        blocks of INIT_BLOCK_ROWS, block b from a CPU generator seeded with seed + b (`seed` from torch's
        RNG when None), so a feature shard draws its own rows, equal to the same rows of the whole, on
        any device. The blocks are drawn in parallel threads: on one thread a 2^21-feature SAE at
        d = 4096 took minutes."""
        if seed is None:
            seed = int(torch.randint(2**62, ()))
        start, stop = self._feature_start, self._feature_start + self.W_dec.shape[0]

        def draw(block: int) -> None:
            first = block * INIT_BLOCK_ROWS
            size = min(INIT_BLOCK_ROWS, self.cfg.n_features - first)
            drawn = torch.randn(size, self.cfg.d_in, generator=torch.Generator().manual_seed(seed + block))
            rows = F.normalize_decoder_rows(drawn[max(start - first, 0) : stop - first])
            offset = max(first - start, 0)
            with torch.no_grad():  # grad mode is per thread
                self.W_dec[offset : offset + rows.shape[0]] = rows.to(self.W_dec.device)

        blocks = range(start // INIT_BLOCK_ROWS, -(-stop // INIT_BLOCK_ROWS))
        with ThreadPoolExecutor(min(len(blocks), os.cpu_count() or 1)) as pool:
            list(pool.map(draw, blocks))  # list(): a block's exception is raised here
        self.W_enc.copy_(self.W_dec.T)
        self.b_enc.zero_()
        self.b_dec.zero_()

    def data_parallel(self, group=None) -> SparseAutoencoder:
        """Makes this module one replica of data-parallel training over `group` (torch.distributed's
        default group when None), e.g. wrapped in DistributedDataParallel. From then on `initialize`
        fits the centering to every replica's sample and takes rank 0's random directions, and training
        forwards all-reduce the death statistics (every replica sees the same dead features) and
        normalise the FVU, MSE and AuxK losses over every replica's tokens (the sums behind all of these
        in one all-reduce), so that N replicas of B tokens train as one process on all N x B tokens
        (DDP averages the gradients). The ReLU L1 and JumpReLU L0 penalties (and JumpReLU's estimator
        window) are normalised the same way, and BatchTopK keeps the N x B x k largest codes of all the
        replicas' tokens (`_batchtopk_replicated`)."""
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "data_parallel needs torch.distributed initialised (torch.distributed.init_process_group)"
            )
        self._group = group if group is not None else dist.group.WORLD
        return self

    @torch.no_grad()
    def shard_features(self, group=None) -> SparseAutoencoder:
        """Makes this module one shard of a feature-sharded (tensor-parallel) TopK SAE over `group`
        (torch.distributed's default group when None): it keeps its contiguous share of the features
        (`parallel.shard_bounds`) of W_enc, b_enc, W_dec and the death statistics, and a forward
        exchanges each token's [k] candidate codes and the [d] reconstruction with the other shards
        (`fastsae.parallel`), so the codes, losses and gradients are those of the whole SAE. b_dec (and
        the whitening) stay whole on every rank, with the full gradient. Call it on the whole SAE
        (constructed, loaded or initialised: each rank keeps its slice; `SparseAutoencoder(cfg,
        feature_group=group)` builds a new one's shard without the whole); combine with `data_parallel`
        over a second group for a 2-D mesh (wrap in DistributedDataParallel over that group). `save`
        gathers the shards into one file that loads whole, to be sharded again over any world size.
        TopK SAEs; every shard must hold at least k and k_aux features."""
        if self._feature_group is not None:
            raise RuntimeError("this SAE is already feature-sharded")
        group, start, stop = _feature_shard(self.cfg, group)
        for name, dim in FEATURE_DIMS.items():
            tensor = getattr(self, name)
            tensor.data = tensor.data.narrow(dim, start, stop - start).clone()
        self._feature_group, self._feature_start = group, start
        return self

    @torch.no_grad()
    def initialize(self, sample: Tensor) -> SparseAutoencoder:
        """Fresh random directions (unit-norm W_dec rows, W_enc = W_dec^T, b_enc = 0), b_dec from a
        sample of activations [N, d] by the config's centering mode, and reset death statistics. In
        data-parallel training, the sample is every replica's and the directions are rank 0's."""
        centering.check_sample(sample, "sample")
        if sample.shape[1] != self.cfg.d_in:
            raise ValueError(f"sample has {sample.shape[1]} dimensions, expected d_in={self.cfg.d_in}")
        sample = self._normalized(sample)[0]
        seed = torch.randint(2**62, (1,), dtype=torch.int64)
        for group in (self._feature_group, self._group):  # rank 0's seed (of a 2-D mesh's first row, then column)
            if group is not None:
                seed = seed.to(self.W_dec.device)
                dist.broadcast(seed, src=dist.get_global_rank(group, 0), group=group)
        self._init_directions(int(seed))
        if self._group is not None:
            sample = parallel.gather_rows(sample, self._group)
        self._fit_centering(sample)
        if self._feature_group is not None:  # the shards of one replica share one centering
            source = dist.get_global_rank(self._feature_group, 0)
            for name in ("b_dec", "whiten_center", "whiten_matrix", "unwhiten_matrix"):
                if hasattr(self, name):
                    dist.broadcast(getattr(self, name).data, src=source, group=self._feature_group)
        self.reset_death_stats()
        return self

    @torch.no_grad()
    def _fit_centering(self, sample: Tensor) -> None:
        """b_dec (or the whitening transform) from a sample [N, d] by the config's centering mode."""
        if self.cfg.centering == "whiten":
            center = centering.geometric_median(sample)
            whiten, unwhiten = centering.fit_whitening(sample, center)
            self.whiten_center.copy_(center)
            self.whiten_matrix.copy_(whiten)
            self.unwhiten_matrix.copy_(unwhiten)
        elif self.cfg.centering == "geometric_median":
            self.b_dec.copy_(centering.geometric_median(sample))
        elif self.cfg.centering == "mean":
            self.b_dec.copy_(centering.mean(sample))
        self._initialized = True

    def _initialize_lazily(self, x: Tensor) -> None:
        """The first training batch of an SAE that was neither initialised nor loaded fits the centering
        (b_dec = 0 would leave the outlier dimensions that kill features at initialisation), once, with a
        warning: a larger sample passed to `initialize` estimates it better."""
        if torch.compiler.is_compiling():
            raise RuntimeError(
                "SparseAutoencoder: call sae.initialize(sample) before compiling the training step; the "
                "centering cannot be fitted to the first batch inside torch.compile"
            )
        warnings.warn(
            f"SparseAutoencoder.initialize() was not called: fitting the {self.cfg.centering!r} centering to the "
            f"first training batch ({x.shape[0]} tokens). Call sae.initialize(sample) before training to choose the "
            "sample.",
            stacklevel=3,
        )
        self._fit_centering(x.detach())

    @torch.no_grad()
    def reset_death_stats(self) -> None:
        self.feature_fire_count.zero_()
        self.tokens_since_fired.zero_()
        self.n_tokens_seen.zero_()

    # -- forward -------------------------------------------------------------------------------------

    @property
    def uses_sparse_codes(self) -> bool:
        return self.cfg.activation == "topk"

    def dead_features(self) -> Tensor:
        """bool [F]: features that have not fired for more than cfg.dead_after_tokens tokens."""
        return F.dead_mask(self.tokens_since_fired, self.cfg.dead_after_tokens)

    def never_fired(self) -> Tensor:
        """bool [F]: features that have not fired once in training since the statistics were last reset
        (dead from the start, whatever `dead_after_tokens` says)."""
        return self.feature_fire_count == 0

    def encode(self, x: Tensor) -> F.TopKCodes | Tensor:
        """x [..., d] -> TopK: TopKCodes(vals, idx, ...) [..., k] each (no AuxK candidates); otherwise
        dense codes [..., F]."""
        self._check_input(x)
        lead = x.shape[:-1]
        x = self._normalized(x.reshape(-1, self.cfg.d_in))[0]
        if self._feature_group is not None:
            codes = self._encode_shard(self._to_sae_space(x), None)[1]
        else:
            codes = self._encode(x)
        if isinstance(codes, F.TopKCodes):
            return F.TopKCodes(*(t.reshape(*lead, t.shape[-1]) for t in codes))
        return codes.reshape(*lead, codes.shape[-1])

    def fire_and_positive_counts(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per feature, int64 [F] each: how many tokens of x it fired on, and on how many its
        pre-activation is > 0 (the evidence for classifying dead features). TopK takes both from one
        fused pass, ReLU from its one encode; the other activations encode, then count a ReLU encode."""
        self._check_input(x)
        if self._feature_group is not None:
            raise NotImplementedError("fire_and_positive_counts of a feature-sharded SAE: load the saved SAE whole")
        cfg = self.cfg
        x = self._normalized(x.reshape(-1, cfg.d_in))[0]
        if cfg.activation == "topk":
            sae_x = self._to_sae_space(x)
            vals, idx, positive = F.encode_topk_positive_counts(sae_x, self.W_enc, self.b_enc, self.b_dec, cfg.k)
            return F.fire_counts(idx, cfg.n_features, vals), positive
        fired = self._fire_counts(self._encode(x))  # a training BatchTopK SAE's codes are sparse
        if cfg.activation == "relu":  # a ReLU code fires exactly where its pre-activation is > 0
            return fired, fired.clone()
        sae_x = self._to_sae_space(x)
        return fired, F.fire_counts_dense(F.encode_relu(sae_x, self.W_enc, self.b_enc, self.b_dec))

    def _normalized(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """x [N, d] as the SAE reads it (cfg.normalize_activations), and the (mean, standard deviation)
        [N, 1] that map a reconstruction back, or None without a normalisation."""
        if self.cfg.normalize_activations == "none":
            return x, None
        dtype = torch.promote_types(x.dtype, torch.float32)
        normalized, mean, std = reference.layer_norm_input(x.to(dtype), LAYER_NORM_EPS)
        return normalized.to(x.dtype), (mean, std)

    @staticmethod
    def _denormalized(recon: Tensor, stats: tuple[Tensor, Tensor] | None) -> Tensor:
        """A reconstruction [..., d] of normalised tokens mapped back with their `_normalized` stats."""
        if stats is None:
            return recon
        mean, std = (t.reshape(*recon.shape[:-1], 1) for t in stats)
        return (recon.to(mean.dtype) * std + mean).to(recon.dtype)

    def _to_sae_space(self, x: Tensor) -> Tensor:
        if self.cfg.centering != "whiten":
            return x
        dtype = torch.promote_types(self.whiten_matrix.dtype, torch.float32)
        return (x.to(dtype) - self.whiten_center.to(dtype)) @ self.whiten_matrix.to(dtype)

    def _from_sae_space(self, y: Tensor) -> Tensor:
        if self.cfg.centering != "whiten":
            return y
        dtype = torch.promote_types(self.unwhiten_matrix.dtype, torch.float32)
        return (y.to(dtype) @ self.unwhiten_matrix.to(dtype) + self.whiten_center.to(dtype)).to(y.dtype)

    def _few_dead_features(self, dead: Tensor | None, n_rows: int) -> Tensor | None:
        """The dead features' indices when n_rows x their number is at most AUXK_DENSE_MAX_ELEMENTS,
        for `F.auxk_reconstruction` (dense over those features: it takes the AuxK step from the fused
        encode's second top-k stream and B * k_aux * d gathers and atomics to thin GEMMs); else None,
        and the fused encode selects the AuxK codes. Learning n costs one host sync, unless the last
        step queued the count (`_count_dead_ahead`; not on a feature shard), so while compiling
        or capturing a CUDA graph this answers a list of `auxk_capacity` entries instead
        (`torch.nonzero_static`, padded with -1: static shapes; whoever sets it keeps it at least the
        number of dead features), or None when that is unset. A feature shard's dead features are its
        own; the shard with the most decides for every shard."""
        if dead is None:
            return None
        if not may_synchronize(dead):
            if self.auxk_capacity is None or self._feature_group is not None:
                return None
            return torch.nonzero_static(dead, size=self.auxk_capacity, fill_value=-1).squeeze(1)
        counted = self._dead_count_from_last_step() if self._feature_group is None else None
        if counted is None:
            features = dead.nonzero().squeeze(1)  # one synchronisation
        else:  # the same list, of a length known on the host without one
            # (-1, which AuxK skips, pads the list should the count be stale: statistics written
            # through `.data` do not move the version counter that vouches for it)
            features = torch.nonzero_static(dead, size=counted, fill_value=-1).squeeze(1)
        most = features.shape[0]
        if self._feature_group is not None:  # every shard takes the same path (their collectives pair up)
            most = torch.full((), most, device=dead.device)
            dist.all_reduce(most, op=dist.ReduceOp.MAX, group=self._feature_group)
            most = int(most)
        return features if most * n_rows <= AUXK_DENSE_MAX_ELEMENTS else None

    def _encode(self, x: Tensor, aux_dead: Tensor | None = None) -> F.TopKCodes | Tensor:
        """With `aux_dead` (the dead-feature mask), a TopK encode also selects the AuxK codes."""
        cfg = self.cfg
        x = self._to_sae_space(x)
        if cfg.activation == "topk":
            k_aux = cfg.k_aux if aux_dead is not None else 0
            return F.encode_topk(x, self.W_enc, self.b_enc, self.b_dec, cfg.k, k_aux=k_aux, dead_mask=aux_dead)
        if cfg.activation == "batchtopk":
            # One host read in eval mode: before any training step there is no threshold to use.
            if not self.training and float(self.batchtopk_threshold) >= 0:
                threshold = self.batchtopk_threshold.to(self.W_enc.dtype).expand(cfg.n_features)
                return F.encode_relu(x, self.W_enc, self.b_enc, self.b_dec, threshold)
            sparse = self.training and batchtopk_ops.SPARSE_CODES and batchtopk_ops.sparse_codes_possible(x)
            if self._group is not None and self.training:
                return self._batchtopk_replicated_sparse(x) if sparse else self._batchtopk_replicated(x)
            if sparse:
                estimate = self.last_batch_threshold if batchtopk_ops.THRESHOLD_FIRST else None
                return F.encode_batchtopk_sparse(x, self.W_enc, self.b_enc, self.b_dec, cfg.k, threshold=estimate)
            return F.encode_batchtopk(x, self.W_enc, self.b_enc, self.b_dec, cfg.k)
        threshold = self.threshold if cfg.activation == "jumprelu" else None
        return F.encode_relu(x, self.W_enc, self.b_enc, self.b_dec, threshold)

    def _encode_shard(self, x: Tensor, aux_dead: Tensor | None) -> tuple[F.TopKCodes, F.TopKCodes]:
        """TopK over the feature shards, x in SAE space: (this shard's codes: shard-local features, value
        0 where another shard's candidate won, differentiable; the global codes: features of the whole
        SAE, detached). With `aux_dead` (this shard's dead features) the AuxK codes the same way."""
        group, start = self._feature_group, self._feature_start
        cfg = self.cfg
        x, b_dec = parallel.shared_input(x, group), parallel.shared_input(self.b_dec, group)
        k_aux = cfg.k_aux if aux_dead is not None else 0
        local = F.encode_topk(x, self.W_enc, self.b_enc, b_dec, cfg.k, k_aux=k_aux, dead_mask=aux_dead)
        kept, vals, idx = parallel.merge_topk(local.vals, local.idx, start, cfg.k, group)
        aux_vals, aux_idx, local_aux_vals = local.aux_vals, local.aux_idx.to(torch.int64), local.aux_vals
        if k_aux:
            aux_kept, aux_vals, aux_idx = parallel.merge_topk(local.aux_vals, local.aux_idx, start, k_aux, group)
            local_aux_vals = torch.where(aux_kept, local.aux_vals, 0)
        shard_codes = F.TopKCodes(torch.where(kept, local.vals, 0), local.idx, local_aux_vals, local.aux_idx)
        return shard_codes, F.TopKCodes(vals, idx, aux_vals, aux_idx)

    def _decode_shard(self, vals: Tensor, idx: Tensor, bias: bool = True, fired_only: bool = False) -> Tensor:
        """The reconstruction (in SAE space) from this shard's codes [B, k] (shard-local features),
        summed over the shards, plus b_dec when `bias`; `fired_only` as `decode`'s."""
        recon = F.decode_sparse(vals, idx, self.W_dec, fired_only=fired_only)
        recon = parallel.sum_over_shards(recon, self._feature_group)
        return recon + self.b_dec if bias else recon

    def _auxk_shard(self, x: Tensor, features: Tensor, k_aux: int) -> Tensor:
        """The AuxK reconstruction (SAE space, no b_dec) over the feature shards, dense over this shard's
        dead `features` (F.auxk_reconstruction): each shard's top k_aux candidates are merged, and each
        decodes those of its own that are among the top k_aux over every shard; summed over the shards."""
        group = self._feature_group

        def keep(values: Tensor) -> Tensor:  # [B, min(k_aux, n)]; padded with zeros (codes that do not fire)
            padded = torch.cat([values, values.new_zeros(values.shape[0], k_aux - values.shape[1])], dim=1)
            return torch.where(parallel.kept_in_top(padded, group)[:, : values.shape[1]], values, 0)

        x, b_dec = parallel.shared_input(x, group), parallel.shared_input(self.b_dec, group)
        partial = F.auxk_reconstruction(x, self.W_enc, self.b_enc, b_dec, self.W_dec, features, k_aux, keep=keep)
        return parallel.sum_over_shards(partial, group)

    def _batchtopk_replicated(self, x: Tensor) -> Tensor:
        """BatchTopK over every data-parallel replica's tokens, x in SAE space: the ReLU codes [B, F] at or
        above the k * (all replicas' tokens)-th largest of all of them (ties at it all kept)."""
        acts = F.encode_relu(x, self.W_enc, self.b_enc, self.b_dec)
        threshold = self._replicated_batch_threshold(acts.detach(), x.shape[0])
        return torch.where((acts >= threshold) & (acts > 0), acts, 0)

    def _batchtopk_replicated_sparse(self, x: Tensor) -> F.TopKCodes | Tensor:
        """`_batchtopk_replicated` as sparse codes (FASTSAE_BATCHTOPK_SPARSE): each row's candidates from
        the TopK encode (`batchtopk.candidate_width`), the threshold over every replica's candidates,
        and the candidates at or above it kept. Where a row on any replica may hold more codes at or
        above it than its candidates (its smallest candidate is above the threshold, or at a positive
        one: ties are all kept), every replica takes the dense codes instead (one more all-reduce)."""
        cfg = self.cfg
        width = batchtopk_ops.candidate_width(cfg.k, cfg.n_features)
        codes = F.encode_topk(x, self.W_enc, self.b_enc, self.b_dec, width)
        vals = codes.vals.detach()
        threshold = self._replicated_batch_threshold(vals, x.shape[0])
        if width < cfg.n_features:  # every replica has the same width: the all-reduce pairs up (whole rows: none)
            smallest = vals.amin(dim=1)
            crowded = ((smallest > threshold) | ((smallest == threshold) & (threshold > 0))).any().double()
            dist.all_reduce(crowded, op=dist.ReduceOp.MAX, group=self._group)
            if bool(crowded):
                return self._batchtopk_replicated(x)
        keep = (vals >= threshold) & (vals > 0)
        return F.TopKCodes(torch.where(keep, codes.vals, 0), codes.idx, codes.aux_vals, codes.aux_idx)

    def _replicated_batch_threshold(self, codes: Tensor, n_rows: int) -> Tensor:
        """The k * (all replicas' tokens)-th largest of every replica's `codes` (at least 0): each replica
        contributes its largest that many (no more can pass), all-gathered."""
        # fp64, not the codes' dtype: bf16 rounds a token count such as 257 to 256.
        (tokens,) = self._replica_sums(codes.new_full((), float(n_rows), dtype=torch.float64))
        budget = self.cfg.k * int(tokens)
        local = codes.flatten()
        candidates = local.topk(min(budget, local.numel())).values  # in the codes' dtype: the threshold is one
        padded = torch.full((budget,), float("-inf"), dtype=codes.dtype, device=codes.device)
        padded[: candidates.numel()] = candidates
        gathered = [torch.empty_like(padded) for _ in range(dist.get_world_size(self._group))]
        dist.all_gather(gathered, padded, group=self._group)
        return torch.cat(gathered).topk(budget).values[-1].clamp_min(0)

    def _encode_jumprelu_for_training(self, x: Tensor, replicated: bool) -> tuple[Tensor, Tensor, Tensor]:
        """JumpReLU codes whose thresholds get straight-through gradients, l0_coef x the L0 penalty and
        its loss term (equal in one process; over every replica's tokens when `replicated`). The
        estimates' window is JUMPRELU_BANDWIDTH times the batch's per-dimension RMS around its mean
        (the paper's 0.001 on activations normalised to unit per-dimension scale), on the device."""
        sae_x = self._to_sae_space(x)
        pre = F.encode_relu(sae_x, self.W_enc, self.b_enc, self.b_dec, None)  # dense, differentiable
        n, squared_deviations, _ = self._spread(sae_x, replicated)
        bandwidth = JUMPRELU_BANDWIDTH * (squared_deviations / (n * sae_x.shape[1])).sqrt().clamp_min(1e-12)
        codes = F.jumprelu(pre, self.threshold, bandwidth.to(pre.dtype))
        l0 = self.cfg.l0_coef * F.l0_penalty(pre, self.threshold, bandwidth.to(pre.dtype))
        if not replicated:
            return codes, l0, l0
        local_sum = l0 * x.shape[0]  # this replica's sum over its tokens
        (total,) = self._replica_sums(local_sum)
        return codes, *self._mean_over_replicas(local_sum, total, n)

    def _relu_l1(self, acts: Tensor, x: Tensor, replicated: bool) -> tuple[Tensor, Tensor]:
        """l1_coef x the ReLU SAE's L1 penalty (`reference.l1_penalty`) and its loss term (equal in one
        process; over every replica's tokens when `replicated`)."""
        sae_x = self._to_sae_space(x)
        if not replicated:
            l1 = self.cfg.l1_coef * F.l1_penalty(acts, self.W_dec, sae_x)
            return l1, l1
        local_sum = F.l1_sum(acts, self.W_dec, torch.promote_types(acts.dtype, torch.float32))
        n, squared_deviations, (total,) = self._spread(sae_x, replicated, local_sum)
        scale = (self.cfg.l1_coef / (sae_x.shape[1] * squared_deviations / n).sqrt()).to(local_sum.dtype)
        return self._mean_over_replicas(local_sum * scale, total * scale, n)

    def _fvu_sums(self, prediction: Tensor, target: Tensor) -> list[Tensor]:
        """This replica's sums behind an FVU over every data-parallel replica's tokens: the token count,
        the target's sum and sum of squares (fp64: its spread comes from raw sums) and the squared error
        (differentiable), for `_replica_sums` and then `_fvu_from_totals`."""
        error = (prediction.to(torch.promote_types(prediction.dtype, torch.float32)) - target).pow(2).sum()
        return [*self._moments(target), error]

    def _fvu_from_totals(self, error: Tensor, totals: list[Tensor], width: int) -> tuple[Tensor, Tensor, Tensor]:
        """(FVU, loss term, MSE) over every replica's tokens from `_fvu_sums`' totals: the squared error
        over the target's spread, both summed over the replicas; `error` is this replica's."""
        n, total, squares, total_error = totals
        squared_deviations = _squared_deviations(n, total, squares)
        world = dist.get_world_size(self._group)
        fvu = (total_error / squared_deviations).to(error.dtype)
        mse = (total_error / (n * width)).to(error.dtype)
        return fvu, world * error / squared_deviations.to(error.dtype), mse  # the term: see _mean_over_replicas

    def _spread(self, x: Tensor, replicated: bool, *local_sums: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """(n, sum over tokens of ||x - mean(x)||^2, totals of `local_sums`) of x [n, d]: over every
        replica's tokens in one all-reduce when `replicated` (fp64 moments: the deviations come from
        raw sums), else this process's."""
        sums = [*self._moments(x), *local_sums]
        n, total, squares, *totals = self._replica_sums(*sums) if replicated else sums
        return n, _squared_deviations(n, total, squares), totals

    @staticmethod
    def _moments(x: Tensor) -> list[Tensor]:
        """[token count, sum over tokens, sum of squares] of x [n, d] in fp64 (a spread computed from raw
        sums needs it)."""
        x64 = x.detach().double()
        # new_full, not new_tensor: a host-to-device copy waits for the device; a fill does not.
        return [x64.new_full((), float(x.shape[0])), x64.sum(0), x64.pow(2).sum()]

    def _mean_over_replicas(self, local_sum: Tensor, total: Tensor, n: Tensor) -> tuple[Tensor, Tensor]:
        """(total / n, world * local_sum / n) for a quantity summed over every replica's n tokens: the
        value, and a loss term whose gradient, once DDP averages it over the replicas, is the value's."""
        world = dist.get_world_size(self._group)
        return (total / n).to(local_sum.dtype), world * local_sum / n.to(local_sum.dtype)

    def _replica_sums(self, *local: Tensor) -> list[Tensor]:
        """The sums of `local` tensors over every data-parallel replica, in fp64 and one all-reduce
        (detached)."""
        flat = torch.cat([t.detach().double().reshape(-1) for t in local])
        dist.all_reduce(flat, group=self._group)
        return [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in local]), local)]

    def decode(self, codes: F.TopKCodes | Tensor, *, fired_only: bool = False) -> Tensor:
        """Reconstruction [..., d] from what `encode` returned ([..., k] sparse or [..., F] dense codes).
        `fired_only` (sparse codes): `F.decode_sparse`'s, the gradient w.r.t. the codes' values taken where
        they are > 0 only (as the encoder's ReLU keeps it); the training forward passes it."""
        if isinstance(codes, F.TopKCodes):
            lead, k = codes.vals.shape[:-1], codes.vals.shape[-1]
            vals, idx = codes.vals.reshape(-1, k), codes.idx.reshape(-1, k)
            if self._feature_group is not None:  # features of the whole SAE: this shard decodes its own
                mine = (idx >= self._feature_start) & (idx < self._feature_start + self.W_dec.shape[0])
                shard_idx = torch.where(mine, idx - self._feature_start, 0).to(torch.int32)
                # (another shard's codes are 0 here: fired_only gives them no gradient, nor does the where)
                recon = self._decode_shard(torch.where(mine, vals, 0), shard_idx, fired_only=fired_only)
            else:
                recon = F.decode_sparse(vals, idx, self.W_dec, self.b_dec, fired_only=fired_only)
        else:
            lead = codes.shape[:-1]
            recon = F.decode_dense(codes.reshape(-1, codes.shape[-1]), self.W_dec, self.b_dec)
        return self._from_sae_space(recon).reshape(*lead, self.cfg.d_in)

    def compile(self, *args, **kwargs) -> None:
        """torch.compile this SAE's forward (the arguments are torch.compile's), all but its first part:
        the input's checks and, in a training step with AuxK, the dead-feature list, which stay eager.
        So AuxK runs densely over the few dead features as in an eager step (counted as an eager step
        counts them; the list's length a dynamic dimension, COMPILED_LIST_PADDED), where
        `torch.compile(sae)`, which cannot count them, takes the fused encode's second top-k stream:
        much slower where k_aux and d are large (`AUXK_DENSE_MAX_ELEMENTS`). While a CUDA graph is
        captured (`fastsae.graphs.CapturedStep`) the forward runs uncompiled."""
        self._compiled_forward = torch.compile(self._forward_from_dead_list, *args, **kwargs)

    def __getstate__(self) -> dict:
        """A copy or a pickle runs uncompiled, as nn.Module.compile's do: the compiled forward is bound to
        this module, and would train it instead of the copy. Its first step counts the dead features
        itself (a CUDA event does not pickle)."""
        state = super().__getstate__()
        return {**state, "_compiled_forward": None, "_dead_count_ahead": None, "_dead_count_host": None}

    def forward(self, x: Tensor) -> SAEOutput:
        """Encode, decode and the loss terms; in training mode also updates the death statistics. A
        training step with AuxK learns the number of dead features from the step before it (queued
        asynchronously, `_count_dead_ahead`), or where there is none, such as the first step or after
        the statistics were written, synchronises once with the device to count them (not while
        compiling or capturing: see `_few_dead_features`)."""
        self._check_input(x)
        lead = x.shape[:-1]
        x, stats = self._normalized(x.reshape(-1, self.cfg.d_in))
        if self.training and not self._initialized:
            self._initialize_lazily(x)
        k_aux, sharded, replicated = self._step_kind()
        # While a CUDA graph is captured the dead-feature list (a compare and nonzero_static's five launches)
        # is queued on AuxK's side stream, where AuxK reads it, instead of ahead of the encode.
        list_stream = None
        if k_aux and not (sharded or replicated or may_synchronize(x)):
            list_stream = F._auxk_side_stream(x)
        # Traced whole by torch.compile, which cannot count the dead features: AuxK's path is chosen on the
        # device (`_auxk_by_dead_count`), not from a list made here.
        auxk_on_device = bool(k_aux) and COMPILED_AUXK_RUNGS and not sharded and torch.compiler.is_compiling()
        with contextlib.nullcontext() if list_stream is None else on_stream(list_stream):
            dead = self.dead_features() if k_aux else None
            few_dead = None if auxk_on_device else self._few_dead_features(dead, x.shape[0])
        if list_stream is not None and few_dead is None:  # the fused encode reads the mask on this stream
            join_stream(list_stream, dead)
        if self._compiled_forward is not None and may_synchronize(x):  # `compile`: the rest compiled
            if few_dead is not None and not sharded and COMPILED_LIST_PADDED:
                n_dead = few_dead.shape[0]
                length = auxk_list_length(n_dead, self._compiled_list_length, x.shape[0], self.cfg.n_features)
                self._compiled_list_length = length
                few_dead = torch.cat([few_dead, few_dead.new_full((length - n_dead,), -1)])
            out = self._compiled_forward(x, lead, dead, few_dead, list_stream)  # (None: not capturing)
        else:
            out = self._forward_from_dead_list(x, lead, dead, few_dead, list_stream, auxk_on_device)
        self._count_dead_ahead(x, k_aux, sharded)
        return out if stats is None else out._replace(recon=self._denormalized(out.recon, stats))

    def _count_dead_ahead(self, x: Tensor, k_aux: int, sharded: bool) -> None:
        """After a training step's statistics update: queue the count of the features now dead (what the
        next step's `_few_dead_features` would count) to host memory (DEAD_COUNT_AHEAD). A forward that
        cannot synchronise (traced whole by torch.compile, captured in a CUDA graph) leaves none: its
        replays write the statistics without a trace the host could check. An evaluation writes none:
        the count queued before it still holds."""
        if not self.training:
            return
        self._dead_count_ahead = None
        if not (DEAD_COUNT_AHEAD and k_aux and not sharded and may_synchronize(x)):
            return
        count, event = self.dead_features().sum(), None
        if count.is_cuda:
            if self._dead_count_host is None:
                self._dead_count_host = torch.empty((), dtype=count.dtype, pin_memory=True)
            count = self._dead_count_host.copy_(count, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        self._dead_count_ahead = (event, count, self.tokens_since_fired._version, self.cfg.dead_after_tokens)

    def _dead_count_from_last_step(self) -> int | None:
        """The dead count `_count_dead_ahead` queued after the last step, if nothing has written the
        statistics (or changed the dead threshold) since; it is read once."""
        ahead, self._dead_count_ahead = self._dead_count_ahead, None
        if ahead is None:
            return None
        event, count, version, threshold = ahead
        if version != self.tokens_since_fired._version or threshold != self.cfg.dead_after_tokens:
            return None
        if event is not None:
            event.synchronize()  # the last step's statistics update: the GPU is past it in steady state
        return int(count)

    def _step_kind(self) -> tuple[int, bool, bool]:
        """(k_aux of this forward: AuxK is TopK's and training's, whether the features are sharded,
        whether the batch is replicated across data-parallel ranks)."""
        k_aux = self.cfg.k_aux if self.training and self.cfg.activation == "topk" else 0
        return k_aux, self._feature_group is not None, self._group is not None and self.training

    def _forward_from_dead_list(
        self, x: Tensor, lead: torch.Size, dead: Tensor | None, few_dead: Tensor | None, list_stream,
        auxk_on_device: bool = False,
    ) -> SAEOutput:  # fmt: skip
        """The forward past the dead-feature mask and list (`forward`), on x [B, d_in] (`lead`: its
        leading dimensions as given), with the list built on `list_stream` (or None); with `auxk_on_device`
        (and no list), AuxK's path chosen on the device (`_auxk_by_dead_count`)."""
        k_aux, sharded, replicated = self._step_kind()
        # AuxK compares the residual and its reconstruction in the SAE's own (possibly whitened) space.
        sae_x = self._to_sae_space(x) if k_aux else None  # (without whitening, x itself)
        sparsity = torch.zeros((), dtype=torch.promote_types(self.W_enc.dtype, torch.float32), device=x.device)
        sparsity_term = None  # the ReLU SAE's L1 or the JumpReLU SAE's L0 term of the loss, where it has one
        joint = None  # F.TopKAutoencoderOutput where encode, decode and AuxK ran as one
        if self.cfg.activation == "jumprelu" and self.training:
            codes, sparsity, sparsity_term = self._encode_jumprelu_for_training(x, replicated)
        elif sharded:  # this shard's codes for the decode, the gradients and its statistics; global ones shown
            codes, shown = self._encode_shard(self._to_sae_space(x), dead if few_dead is None else None)
        elif few_dead is not None or auxk_on_device:  # encode, decode and AuxK (dense over the few dead features)
            if few_dead is None:
                joint = self._auxk_by_dead_count(sae_x, dead, k_aux)
            else:  # as one autograd node
                params = (self.W_enc, self.b_enc, self.b_dec, self.W_dec)
                joint = F.topk_autoencoder(sae_x, *params, self.cfg.k, dead_features=few_dead, k_aux=k_aux)
            if list_stream is not None and few_dead is not None:  # (the node has joined it: this marks the
                join_stream(list_stream, dead, few_dead)  # list's memory as used here; `forward` joined the mask)
            no_aux_codes = (joint.vals[:, :0], joint.idx[:, :0])  # AuxK's codes stay inside the node
            codes = F.TopKCodes(joint.vals, joint.idx, *no_aux_codes)
        else:
            codes = self._encode(x, dead)  # with the fused encode's AuxK codes when `dead` is given
        # The codes are ReLU outputs: the decode's backward skips the zero ones' decoder rows (BatchTopK's
        # unkept candidates, another shard's codes), whose gradient the encoder's ReLU masks anyway.
        if sharded:
            recon = self._from_sae_space(self._decode_shard(codes.vals, codes.idx, fired_only=self.training))
        else:
            recon = self.decode(codes, fired_only=self.training) if joint is None else self._from_sae_space(joint.recon)
        inner_recons = self._matryoshka_recons(codes, sharded) if self.training else []
        aux_recon = None
        if isinstance(codes, F.TopKCodes):
            vals, idx, acts = codes.vals, codes.idx, None
            if k_aux:
                if sharded and few_dead is not None:
                    aux_recon = self._auxk_shard(sae_x, few_dead, k_aux)
                elif sharded:
                    aux_recon = self._decode_shard(codes.aux_vals, codes.aux_idx, bias=False)
                elif joint is not None:
                    aux_recon = joint.aux_recon
                else:
                    aux_recon = F.decode_sparse(codes.aux_vals, codes.aux_idx, self.W_dec)
                n_dead = dead.sum()
                if sharded:  # every shard's dead features
                    dist.all_reduce(n_dead, group=self._feature_group)
        else:
            vals, idx, acts = None, None, codes
        counts, n_tokens, stats_stream = None, None, None
        if self.training:
            stats_stream = F._auxk_side_stream(x) if DEATH_STATS_ON_SIDE_STREAM and not replicated else None
            with contextlib.nullcontext() if stats_stream is None else on_stream(stats_stream):
                counts, n_tokens = self._fire_counts(codes), x.shape[0]
                if stats_stream is not None:
                    self._update_death_stats(counts, n_tokens)
        aux_in_input_space = aux_recon is not None and self.cfg.centering != "whiten"
        if replicated:  # the FVUs (AuxK's, the Matryoshka prefixes') and fire counts over every replica: one all-reduce
            residual = None if aux_recon is None else (sae_x - self._to_sae_space(recon)).detach()
            fvu_sums = self._fvu_sums(recon, x)
            aux_sums = [] if aux_recon is None else self._fvu_sums(aux_recon, residual)
            inner_errors = [self._fvu_sums(inner, x)[-1] for inner in inner_recons]
            *totals, counts, n_tokens = self._replica_sums(
                *fvu_sums, *aux_sums, *inner_errors, counts, counts.new_full((), n_tokens)
            )
            counts, n_tokens = counts.long(), n_tokens.long()
            fvu, loss, mse = self._fvu_from_totals(fvu_sums[-1], totals[:4], x.shape[1])
            auxk = torch.zeros((), dtype=fvu.dtype, device=x.device)
            if aux_recon is not None:  # reference.auxk_loss with the FVU over every replica's tokens
                scale = F.auxk_scale(n_dead, k_aux)
                aux_fvu, aux_term, _ = self._fvu_from_totals(aux_sums[-1], totals[4:8], residual.shape[1])
                auxk, loss = aux_fvu * scale, loss + self.cfg.auxk_coef * aux_term * scale
            for error, total_error in zip(inner_errors, totals[len(fvu_sums) + len(aux_sums) :]):
                loss = loss + self._fvu_from_totals(error, [*totals[:3], total_error], x.shape[1])[1]
        else:  # the MSE, the FVU, AuxK's loss and the loss mixing them in one node (three launches on CUDA)
            loss, mse, fvu, auxk = F.training_losses(
                recon, x, aux_recon if aux_in_input_space else None, n_dead if aux_in_input_space else None,
                max(k_aux, 1), self.cfg.auxk_coef,
            )  # fmt: skip
            if aux_recon is not None and not aux_in_input_space:
                residual = (sae_x - self._to_sae_space(recon)).detach()
                auxk = F.auxk_loss(aux_recon, residual, n_dead, k_aux)
                loss = loss + self.cfg.auxk_coef * auxk
            for inner in inner_recons:  # a Matryoshka SAE's prefixes (`_matryoshka_recons`)
                loss = loss + F.fvu(inner, x)
        if self.cfg.activation == "relu" and self.cfg.l1_coef:
            sparsity, sparsity_term = self._relu_l1(acts, x, replicated)
        if self.training:
            if stats_stream is None:
                self._update_death_stats(counts, n_tokens)
            else:
                join_stream(stats_stream, counts)
            if self.cfg.activation == "batchtopk":
                self._update_batchtopk_threshold(codes.vals if isinstance(codes, F.TopKCodes) else codes)
        if sparsity_term is not None:
            loss = loss + sparsity_term
        if sharded:
            vals, idx = shown.vals, shown.idx
        vals, idx, acts = (None if t is None else t.reshape(*lead, t.shape[-1]) for t in (vals, idx, acts))
        return SAEOutput(recon.reshape(*lead, self.cfg.d_in), vals, idx, acts, loss, mse, fvu, auxk, sparsity)

    def _matryoshka_recons(self, codes: F.TopKCodes | Tensor, sharded: bool) -> list[Tensor]:
        """A Matryoshka SAE's reconstructions [B, d] from its codes on each prefix of the features (the
        first w of them, w in cfg.matryoshka_widths; the others' codes set to 0), whose FVUs its training
        loss adds: one more decode, and its backward, per width, of the codes in the prefix (the sparse
        decode and its backward skip the zero codes' decoder rows). A shard's codes name its own features."""
        recons = []
        for width in self.cfg.matryoshka_widths:
            if isinstance(codes, F.TopKCodes):
                first = self._feature_start if sharded else 0  # (the shard's codes: indices into its features)
                vals = torch.where(codes.idx < width - first, codes.vals, 0)
                if sharded:
                    recon = self._decode_shard(vals, codes.idx, fired_only=True)
                else:
                    recon = F.decode_sparse(vals, codes.idx, self.W_dec, self.b_dec, fired_only=True)
            else:  # dense codes [B, F] (a BatchTopK SAE with FASTSAE_BATCHTOPK_SPARSE=0): the first columns
                recon = F.decode_dense(codes[:, :width], self.W_dec[:width], self.b_dec)
            recons.append(self._from_sae_space(recon))
        return recons

    def _auxk_by_dead_count(self, x: Tensor, dead: Tensor, k_aux: int) -> F.TopKAutoencoderOutput:
        """Encode, decode and AuxK of x [B, d] (SAE space) with AuxK's path chosen on the device from the
        count of `dead` (COMPILED_AUXK_RUNGS, `F.topk_autoencoder_by_dead_count`): the dense AuxK over the
        shortest of `auxk_rungs`' lists (or the one list of `auxk_capacity` entries, where that is set) that
        holds the dead features, or the fused encode's AuxK stream where none does."""
        rungs = [self.auxk_capacity] if self.auxk_capacity is not None else auxk_rungs(x.shape[0], self.cfg.n_features)
        params = (self.W_enc, self.b_enc, self.b_dec, self.W_dec)
        return F.topk_autoencoder_by_dead_count(x, *params, self.cfg.k, dead, k_aux, rungs, fired_only=self.training)

    @torch.no_grad()
    def _fire_counts(self, codes: F.TopKCodes | Tensor) -> Tensor:
        """int64 [F]: how many of this batch's tokens each feature (of this shard) fired on."""
        if isinstance(codes, F.TopKCodes):
            return F.fire_counts(codes.idx, self.W_dec.shape[0], codes.vals)
        return F.fire_counts_dense(codes)

    @torch.no_grad()
    def _update_death_stats(self, counts: Tensor, n_tokens: int | Tensor) -> None:
        """Fold a batch's fire counts into the statistics. A data-parallel replica passes every replica's
        counts and its token count as a device tensor (reading it on the host would stall the host
        before it queues the backward)."""
        if isinstance(n_tokens, Tensor):
            self.tokens_since_fired.copy_(reference.update_since_fired(self.tokens_since_fired, counts, n_tokens))
        else:
            F.update_since_fired_(self.tokens_since_fired, counts, n_tokens)
        self.feature_fire_count += counts
        self.n_tokens_seen += n_tokens

    @torch.no_grad()
    def _update_batchtopk_threshold(self, acts: Tensor) -> None:
        """Fold this batch's smallest kept code into the running inference threshold (on the device:
        no synchronisation); a batch that kept nothing leaves it unchanged."""
        smallest = torch.where(acts > 0, acts, float("inf")).amin().float()
        if self._group is not None:  # the smallest code any replica kept: the batch's
            dist.all_reduce(smallest, op=dist.ReduceOp.MIN, group=self._group)
        running = self.batchtopk_threshold
        averaged = BATCHTOPK_THRESHOLD_DECAY * running + (1 - BATCHTOPK_THRESHOLD_DECAY) * smallest
        updated = torch.where(running < 0, smallest, averaged)
        kept_none = torch.isinf(smallest)
        running.copy_(torch.where(kept_none, running, updated))
        if batchtopk_ops.THRESHOLD_FIRST:  # the next batch's estimate
            self.last_batch_threshold.copy_(torch.where(kept_none, self.last_batch_threshold, smallest))

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != self.cfg.d_in:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"x must be [..., d_in={self.cfg.d_in}] (e.g. [batch, d_in] or [batch, seq, d_in]), got {shape}"
            )
        if not x.is_floating_point():
            raise ValueError(f"x must be floating point (activations), got {x.dtype}")
        if x.device != self.W_enc.device:
            raise ValueError(f"x is on {x.device} but the SAE is on {self.W_enc.device}")
        if self.training and x.numel() < 2 * self.cfg.d_in:
            raise ValueError(
                f"training needs at least 2 tokens per batch (the FVU loss), got {x.numel() // self.cfg.d_in}"
            )
        # Not while compiling or capturing (CapturedStep checks x itself before each replay).
        if self.cfg.check_finite and may_synchronize(x) and not bool(torch.isfinite(x).all()):
            raise ValueError("x contains NaN or infinite values (set SAEConfig.check_finite=False to skip this check)")

    # -- the decoder constraint ----------------------------------------------------------------------

    @torch.no_grad()
    def remove_decoder_parallel_grad(self) -> None:
        """Call between backward() and optimizer.step(): drops the part of W_dec.grad that would only
        change the decoder row norms."""
        if self.W_dec.grad is not None:
            F.remove_parallel_grad_(self.W_dec, self.W_dec.grad)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Call after optimizer.step(): rescales every decoder row to unit norm."""
        F.normalize_decoder_rows_(self.W_dec)

    # -- persistence ---------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike, format: str = "fastsae") -> None:
        """Writes weights, buffers and the config (JSON in the safetensors header) to one .safetensors
        file, atomically: a crash mid-write leaves any earlier file at `path` intact, and the temporary
        file a killed save leaves behind is removed by the next save. The file gets the usual
        permissions (0666 less the umask) and a checksum that `load` verifies. In data-parallel or
        feature-sharded training every rank calls it and global rank 0 writes the whole SAE. format=
        "saelens" or "sparsify" writes that library's checkpoint directory instead (`fastsae.io`)."""
        if format == "fastsae" and Path(path).is_dir():  # (every rank checks: none is left waiting for rank 0)
            raise IsADirectoryError(
                f"{path} is a directory: save writes one .safetensors file there, e.g. {Path(path) / 'sae.safetensors'}"
            )
        if format != "fastsae" and self._feature_group is not None:
            raise ValueError(
                f"a feature-sharded SAE saves in the fastsae format only: save it, load it whole "
                f"(SparseAutoencoder.load) and save that as {format!r}"
            )
        # In multi-process training every rank of the job calls save and global rank 0 writes (a
        # feature-sharded SAE gathered whole); the others return once the file is complete.
        distributed = self._feature_group is not None or self._group is not None
        state = self.state_dict()
        if self._feature_group is not None:
            state.update({name: parallel.gather_rows(state[name], self._feature_group, dim) for name, dim in
                          FEATURE_DIMS.items()})  # fmt: skip
        if distributed and dist.get_rank() != 0:
            dist.barrier()
            return
        if format != "fastsae":
            from . import io

            io.save(self, path, format)
        else:
            _write_checkpoint(Path(path), state, saved_config(self))
        if distributed:
            dist.barrier()

    def save_shards(self, directory: str | os.PathLike) -> None:
        """A feature-sharded SAE as one file per shard and a manifest (`fastsae.shards`), for SAEs too
        large to gather on one rank: every rank calls it and no rank holds more than its shard. The
        manifest is written last, so a directory with one is complete, and a save cut short leaves the
        previous one whole."""
        from . import shards

        shards.save(self, directory)

    @classmethod
    def load_shards(
        cls, directory: str | os.PathLike, feature_group=None, device: str | torch.device = "cpu"
    ) -> SparseAutoencoder:
        """This rank's shard over `feature_group` (the whole SAE when None) of a `save_shards`
        directory, whatever number of shards saved it; each rank reads only the files that hold its
        features. Corrupted or missing shard files raise ValueError; nothing is returned half-loaded."""
        from . import shards

        return shards.load(directory, feature_group, device)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> SparseAutoencoder:
        """Reads a file written by `save`. Raises FileNotFoundError if it is missing and ValueError if
        it is not a fastsae checkpoint, is corrupted (truncated, a flipped bit: checked against the
        checksum save wrote), or its tensors do not match its config in name, shape or dtype. Nothing
        is returned half-loaded. A directory is read as a SAELens or sparsify checkpoint (`fastsae.io`)."""
        path = Path(path)
        if path.is_dir():
            from . import io

            return io.load(path, device)
        if not path.is_file():
            raise FileNotFoundError(f"no SAE checkpoint at {path}")
        metadata, tensors = read_safetensors(path)
        if "fastsae_config" not in metadata:
            raise ValueError(f"{path} is a safetensors file but not a fastsae checkpoint (no fastsae_config)")
        try:
            cfg = SAEConfig(**json.loads(metadata["fastsae_config"]))
        except (TypeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} has an invalid fastsae config: {error}") from error
        with torch.device(device):  # built where it loads, with nothing drawn: every tensor is overwritten
            sae = cls(cfg, draw_directions=False)
        expected = sae.state_dict()
        missing, unexpected = expected.keys() - tensors.keys(), tensors.keys() - expected.keys()
        if missing == {"batchtopk_threshold"}:  # saved before the threshold existed: still unset
            tensors["batchtopk_threshold"] = expected["batchtopk_threshold"]
            missing = set()
        if missing or unexpected:
            raise ValueError(
                f"{path} does not match its config: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
            )
        for name, tensor in tensors.items():
            if tensor.shape != expected[name].shape:
                raise ValueError(
                    f"{path}: {name} has shape {tuple(tensor.shape)}, config says {tuple(expected[name].shape)}"
                )
            if tensor.dtype != expected[name].dtype:
                raise ValueError(f"{path}: {name} is {tensor.dtype}, config says {expected[name].dtype}")
        if "fastsae_checksum" in metadata and _checksum(tensors) != metadata["fastsae_checksum"]:
            raise ValueError(f"{path} is corrupted: its tensors do not match the checksum written when it was saved")
        sae.load_state_dict(tensors)
        return sae


def saved_config(sae: SparseAutoencoder) -> SAEConfig:
    """The config a checkpoint records: `sae.cfg` with the parameters' dtype, which may have changed
    since construction (sae.to(torch.bfloat16))."""
    dtype_name = next(name for name, dtype in DTYPES.items() if dtype == sae.W_enc.dtype)
    return dataclasses.replace(sae.cfg, dtype=dtype_name)


def _write_checkpoint(path: Path, state: dict[str, Tensor], cfg: SAEConfig) -> None:
    """`SparseAutoencoder.save`'s file: the tensors, the config, the format and a checksum."""
    tensors = {name: t.detach().cpu().contiguous() for name, t in state.items()}
    metadata = {
        "fastsae_config": json.dumps(dataclasses.asdict(cfg)),
        "fastsae_format": FORMAT_VERSION,
        "fastsae_checksum": _checksum(tensors),
    }
    write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, Tensor]]:
    """(metadata, every tensor on the CPU) of a safetensors file; a ValueError naming the file if it
    cannot be read as one."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return f.metadata() or {}, {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from error


def _checksum(tensors: dict[str, Tensor]) -> str:
    """blake2b over every tensor's name, dtype, shape and bytes, in name order. safetensors has no
    checksum of its own: a flipped bit in the data would load as a wrong weight."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def write_atomically(path: Path, write: Callable[[str], None]) -> None:
    """Creates or replaces the file `path` with what `write(temporary_path)` writes, atomically: the
    temporary file beside it is synced, given the usual permissions (0666 less the umask; mkstemp's
    0600 would hide it from a shared cluster's group) and renamed over `path`, and the rename is made
    durable. A crash leaves any earlier file intact; the temporary file a killed write leaves behind
    is removed by the next write to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, glob.escape(path.name))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temporary_prefix(path), suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    sync_directory(path.parent)


def sync_directory(directory: Path) -> None:
    """Makes the renames and removals in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary_prefix(path: Path) -> str:
    """`.<name>.<host>.<pid>.`: whose temporary file it is, so that a later save can tell one a killed
    save left behind from one a live save is writing."""
    return f".{path.name}.{socket.gethostname()}.{os.getpid()}."


def remove_stale_temporaries(directory: Path, target: str) -> None:
    """Deletes the temporary files that saves to the files in `directory` named by the glob `target`
    left, where the process that wrote one ran on this host and no longer runs (`_temporary_prefix`)."""
    host = socket.gethostname()
    for tmp in directory.glob(f".{target}.*.tmp"):
        head, pid, _, _ = tmp.name.rsplit(".", 3)  # .<target>.<host>, pid, random, "tmp"
        if not head.endswith(f".{host}") or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except PermissionError:  # alive, another user's
            pass
