"""The full TopK training step (forward, backward, Adam, decoder constraint; AuxK on with 5% of the
features dead): fastsae's module (with torch.optim.Adam, as `fastsae_saeadam` with
fastsae.optim.SAEAdam, as `fastsae_graph` replayed as one CUDA graph, as `fastsae_saeadam_graph`
both, as `fastsae_compile` with its forward through torch.compile(sae, fullgraph=True) and as
`fastsae_module_compile` through sae.compile(), which leaves the dead-feature list eager, and as
`fastsae_saeadam_graph_matryoshka` the captured SAEAdam step of a Matryoshka SAE) against the eager dense
step SAE code usually runs, its torch.compile, and sparsify's SparseCoder when installed, with the
cuBLAS encoder GEMM as the floor.

bf16 parameters at the benchmark shapes (harness.SHAPES). Every provider steps with the same optimizer,
torch.optim.Adam with fused=True (`adam`; in rows up to commit ce049f2 the eager providers stepped with
torch's default multi-tensor Adam), except the SAEAdam rows. Before timing, every provider's FVU on the
same batch and weights is checked against the fp32 reference.

Op `train_step_batchtopk`: the BatchTopK SAE's step (no AuxK) at the three shapes, on the sparse codes
(`fastsae`, the default) and on the dense ones (`fastsae_dense_codes`, FASTSAE_BATCHTOPK_SPARSE=0),
replayed by CapturedStep on the sparse codes (`fastsae_graph`; `fastsae_threshold_graph` with the
threshold-first route, FASTSAE_BATCHTOPK_THRESHOLD_FIRST=1), against the eager dense BatchTopK step
(`torch`).

The dead features are silenced (encoder bias SILENT_BIAS: they never reach a token's top k, so they stay
dead) and fastsae's statistics say so from the start (tokens since fired beyond `dead_after_tokens`,
which the live features do not reach while timed). Every provider gets the same dead set and the same
weights, and nothing writes the statistics between steps, which would make the captured step count the
dead features with a synchronisation, as it must after a write from outside.
"""

from __future__ import annotations

from functools import partial

import torch

import fastsae
from fastsae import reference
from fastsae.ops import batchtopk as batchtopk_ops
from fastsae.testing import assert_close

from .harness import (
    SHAPES,
    Recorder,
    each_shape,
    measure,
    optional_sparsify,
    sae_train_step,
    selected,
    selected_shapes,
    sweep_name,
)

DEAD_FRACTION = 0.05
# A dead feature's encoder bias. The live features' pre-activations are N(0, 1) here (unit-norm encoder
# columns, centred Gaussian tokens), their top 32 above about 3; at -8 a dead feature's never reaches a
# top k nor 0 (no AuxK code fires, so no gradient moves it), and its values still spread over a row as
# a trained SAE's dead features do. (Until 1d0e7c9 it was -1e4, which rounds every dead pre-activation
# to one bf16 value: AuxK's top-k then selected among a row of ties, which no training run shows.)
SILENT_BIAS = -8.0
DEAD_AFTER_TOKENS = 2**40  # beyond what the live features go without firing while timed
# Steps each provider takes before it is timed: past a CapturedStep's eager calls and its capture, which
# otherwise fall in do_bench's estimate of the step's time, from which it sizes its timed loop (at
# a3c6605 both fastsae_graph rows came out with p20 = median = p80: one timed replay, it seems).
STEADY_CALLS = 5


def adam(params, capturable: bool = False) -> torch.optim.Adam:
    """Every provider's optimizer: torch's fused Adam (one kernel over the parameters, no temporaries)."""
    return torch.optim.Adam(params, lr=1e-4, fused=True, capturable=capturable)


def expected_topk_fvu(x: torch.Tensor, weights: dict, k: int) -> torch.Tensor:
    """The fp32 reference's FVU of a TopK SAE with `weights` on x: what every provider's first step
    must report."""
    pre = reference.pre_activation(x, *(weights[name] for name in ("W_enc", "b_enc", "b_dec")))
    vals, idx = reference.topk_activation(pre, k)
    del pre
    return reference.fvu(reference.decode_sparse(vals, idx, weights["W_dec"].float(), weights["b_dec"].float()), x)


def measure_step(step, x) -> dict:
    """`measure` of a provider's step on x, after STEADY_CALLS steps, with the peak memory those steps
    allocate above what was allocated before them where it is larger: a CapturedStep allocates in its
    capture, and the replays `measure` sees allocate nothing new (the graph's pool holds what they use;
    at d2089ab its rows read 0 MB)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(STEADY_CALLS):
        step(x)
    torch.cuda.synchronize()
    warm_up_peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    timing = measure(partial(step, x))
    timing["peak_mem_mb"] = max(timing["peak_mem_mb"], warm_up_peak)
    return timing


def _fastsae_step(
    d, n_features, k, weights, dead, fused_optimizer: bool = False, graph: bool = False, compiled: str | None = None,
    matryoshka: bool = False,
):  # fmt: skip
    """The module's step with torch.optim.Adam and the decoder constraint's two calls, with
    fastsae.optim.SAEAdam (`fused_optimizer`: the constraint inside its step), replayed as one CUDA graph
    by fastsae.graphs.CapturedStep (`graph`, with torch's fused Adam made capturable), or both. `compiled`:
    the forward through torch.compile(sae, fullgraph=True) ("torch.compile") or sae.compile() ("sae.compile":
    the forward past the dead-feature list), as a user compiling the module runs it (the backward and the
    optimizer eager). `matryoshka`: a Matryoshka SAE (its prefixes: MATRYOSHKA_PARTS)."""
    widths = tuple(n_features // parts for parts in MATRYOSHKA_PARTS) if matryoshka else ()
    cfg = fastsae.SAEConfig(d_in=d, n_features=n_features, k=k, dtype="bfloat16", check_finite=False,
                            dead_after_tokens=DEAD_AFTER_TOKENS, matryoshka_widths=widths)  # fmt: skip
    sae = fastsae.SparseAutoencoder(cfg).cuda()
    sae.load_state_dict({**sae.state_dict(), **weights})
    with torch.no_grad():  # the silenced features are dead from the start, and stay dead
        sae.tokens_since_fired.copy_(dead.long() * 2 * DEAD_AFTER_TOKENS)
    if fused_optimizer:
        optimizer = fastsae.optim.SAEAdam(sae, lr=1e-4, capturable=graph)
    else:
        optimizer = adam(sae.parameters(), capturable=graph)
    captured = fastsae.graphs.CapturedStep(sae, optimizer) if graph else None
    model = torch.compile(sae, fullgraph=True) if compiled == "torch.compile" else None
    if compiled == "sae.compile":
        sae.compile()

    def step(x):
        return (captured(x) if graph else sae_train_step(sae, optimizer, x, model=model)).fvu

    return step


# fastsae's steps by provider name: `_fastsae_step`'s arguments (bench.ab_step times one under a switch).
FASTSAE_STEPS = {
    "fastsae": {},
    "fastsae_saeadam": {"fused_optimizer": True},
    "fastsae_graph": {"graph": True},
    "fastsae_saeadam_graph": {"fused_optimizer": True, "graph": True},
    "fastsae_compile": {"compiled": "torch.compile"},
    "fastsae_module_compile": {"compiled": "sae.compile"},
    "fastsae_saeadam_graph_matryoshka": {"fused_optimizer": True, "graph": True, "matryoshka": True},
}
# The Matryoshka provider's prefixes: the first F / 16, F / 8, F / 4 and F / 2 features (four more
# decodes a step than the plain SAE's)
MATRYOSHKA_PARTS = (16, 8, 4, 2)


def _batchtopk_step(d, n_features, k, weights, sparse_codes: bool, graph: bool = False, threshold_first: bool = False):
    """A BatchTopK SAE's step (torch.optim.Adam, the decoder constraint) on the dense codes or, with
    `sparse_codes`, on the sparse ones (the module-level switches FASTSAE_BATCHTOPK_SPARSE and
    FASTSAE_BATCHTOPK_THRESHOLD_FIRST set, set here around each step); with `graph`, replayed by
    fastsae.graphs.CapturedStep (its `captured` attribute), with torch's fused Adam made capturable."""
    cfg = fastsae.SAEConfig(d_in=d, n_features=n_features, k=k, activation="batchtopk", dtype="bfloat16",
                            check_finite=False)  # fmt: skip
    sae = fastsae.SparseAutoencoder(cfg).cuda()
    sae.load_state_dict({**sae.state_dict(), **weights})
    optimizer = adam(sae.parameters(), capturable=graph)
    captured = fastsae.graphs.CapturedStep(sae, optimizer) if graph else None

    def step(x):
        switches = batchtopk_ops.SPARSE_CODES, batchtopk_ops.THRESHOLD_FIRST
        batchtopk_ops.SPARSE_CODES, batchtopk_ops.THRESHOLD_FIRST = sparse_codes, threshold_first
        try:
            return (captured(x) if graph else sae_train_step(sae, optimizer, x)).fvu
        finally:
            batchtopk_ops.SPARSE_CODES, batchtopk_ops.THRESHOLD_FIRST = switches

    step.captured = captured
    return step


def _dense_batchtopk_loss(params, x, k):
    """Eager BatchTopK as SAE code usually writes it: dense codes, topk over the whole batch."""
    W_enc, b_enc, W_dec, b_dec = params
    codes = reference.batch_topk(((x - b_dec) @ W_enc + b_enc).relu(), k)
    fvu = reference.fvu(codes @ W_dec + b_dec, x)
    return fvu, fvu


def _dense_loss(params, x, k, k_aux, dead):
    """What SAE code usually runs: the dense pre-activation, topk, a dense [B, F] code matrix."""
    W_enc, b_enc, W_dec, b_dec = params
    pre = ((x - b_dec) @ W_enc + b_enc).relu()
    vals, idx = pre.topk(k, dim=-1)
    recon = torch.zeros_like(pre).scatter(1, idx, vals) @ W_dec + b_dec
    fvu = reference.fvu(recon, x)
    aux_vals, aux_idx = pre.masked_fill(~dead, 0).topk(k_aux, dim=-1)
    aux_recon = torch.zeros_like(pre).scatter(1, aux_idx, aux_vals) @ W_dec
    scale = (dead.sum() / k_aux).clamp(max=1.0)
    return fvu, fvu + reference.fvu(aux_recon, (x - recon).detach()) * scale / 32


def _dense_step(loss_fn, weights, compile_loss: bool):
    """The eager step around loss_fn(params, x) -> (FVU, loss), or its torch.compile."""
    params = [weights[name].clone().requires_grad_() for name in ("W_enc", "b_enc", "W_dec", "b_dec")]
    optimizer = adam(params)
    loss_fn = torch.compile(loss_fn) if compile_loss else loss_fn

    def step(x):
        fvu, loss = loss_fn(params, x)
        loss.backward()
        W_dec = params[2]
        W_dec.grad.copy_(reference.remove_parallel_grad(W_dec, W_dec.grad))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            W_dec.copy_(reference.normalize_decoder_rows(W_dec))
        return fvu

    return step


def _sparsify_step(sparsify, d, n_features, k, weights, dead):
    coder = sparsify.SparseCoder(d, sparsify.SparseCoderConfig(num_latents=n_features, k=k), device="cuda")
    coder = coder.to(torch.bfloat16)
    with torch.no_grad():
        coder.encoder.weight.copy_(weights["W_enc"].T)
        coder.encoder.bias.copy_(weights["b_enc"])
        coder.W_dec.copy_(weights["W_dec"])
        coder.b_dec.copy_(weights["b_dec"])
    optimizer = adam(coder.parameters())

    def step(x):
        out = coder(x, dead_mask=dead)
        (out.fvu + out.auxk_loss / 32).backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        coder.set_decoder_norm_to_unit_norm()
        return out.fvu

    return step


def _initial_weights(d: int, n_features: int, n_rows: int, dead: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """A bf16 batch and an initialised SAE's bf16 weights (W_enc = W_dec^T, unit-norm rows), the `dead`
    features silenced."""
    x = (torch.randn(n_rows, d, device="cuda") + 0.5).bfloat16()
    W_dec = reference.normalize_decoder_rows(torch.randn(n_features, d, device="cuda"))
    weights = {
        "W_enc": W_dec.T.contiguous().bfloat16(),
        "b_enc": (dead * SILENT_BIAS).bfloat16(),
        "W_dec": W_dec.bfloat16(),
        "b_dec": (0.5 * torch.ones(d, device="cuda")).bfloat16(),
    }
    return x, weights


# Beyond the three shapes: the GPT-2 shape at k = 128, where the TopK encode's share of the step is largest.
EXTRA_SHAPES = {sweep_name(768, 24576, 8192, 128): (768, 24576, 8192, 128)}


def _bench_shape(recorder: Recorder, shape: str, d: int, n_features: int, n_rows: int, k: int, sparsify) -> None:
    """The training steps' rows at one shape (`run`)."""
    k_aux = d // 2
    dead = torch.rand(n_features, device="cuda") < DEAD_FRACTION
    x, weights = _initial_weights(d, n_features, n_rows, dead)
    expected_fvu = expected_topk_fvu(x, weights, k)
    providers = {name: _fastsae_step(d, n_features, k, weights, dead, **how) for name, how in FASTSAE_STEPS.items()}
    providers |= {
        "torch": _dense_step(partial(_dense_loss, k=k, k_aux=k_aux, dead=dead), weights, compile_loss=False),
        "compile": _dense_step(partial(_dense_loss, k=k, k_aux=k_aux, dead=dead), weights, compile_loss=True),
    }
    if sparsify is not None:
        providers["sparsify"] = _sparsify_step(sparsify, d, n_features, k, weights, dead)
    providers = selected(providers)
    for name, step in providers.items():  # the first step sees the shared initial weights
        assert_close(step(x).detach().float(), expected_fvu, 2e-2, f"train_step {shape} {name} FVU")
    for name, step in providers.items():
        recorder.record("train_step", shape, name, measure_step(step, x))
    recorder.record("train_step", shape, "cublas_gemm", measure(partial(torch.mm, x, weights["W_enc"])))
    del providers
    if shape in SHAPES:
        _bench_batchtopk(recorder, shape, d, n_features, k, x, weights)


def run(recorder: Recorder) -> None:
    sparsify = optional_sparsify()
    for shape, (d, n_features, n_rows, k) in selected_shapes({**SHAPES, **EXTRA_SHAPES}).items():
        with each_shape(shape):
            _bench_shape(recorder, shape, d, n_features, n_rows, k, sparsify)


def _bench_batchtopk(recorder: Recorder, shape: str, d: int, n_features: int, k: int, x, weights) -> None:
    acts = reference.pre_activation(x, *(weights[name] for name in ("W_enc", "b_enc", "b_dec"))).relu()
    codes = reference.batch_topk(acts, k)
    del acts
    expected_fvu = reference.fvu(codes @ weights["W_dec"].float() + weights["b_dec"].float(), x)
    del codes
    providers = {
        "fastsae": _batchtopk_step(d, n_features, k, weights, sparse_codes=True),
        "fastsae_dense_codes": _batchtopk_step(d, n_features, k, weights, sparse_codes=False),
        "fastsae_graph": _batchtopk_step(d, n_features, k, weights, sparse_codes=True, graph=True),
        "fastsae_threshold_graph": _batchtopk_step(
            d, n_features, k, weights, sparse_codes=True, graph=True, threshold_first=True
        ),
        "torch": _dense_step(partial(_dense_batchtopk_loss, k=k), weights, compile_loss=False),
    }
    providers = selected(providers)
    for name, step in providers.items():  # the first step sees the shared initial weights
        assert_close(step(x).detach().float(), expected_fvu, 2e-2, f"train_step_batchtopk {shape} {name} FVU")
    for name, step in providers.items():
        timing = measure_step(step, x)
        captured = getattr(step, "captured", None)
        # A captured step's row stands for replays: where some calls were the eager steps that stand in
        # for codes that are not exact (the threshold-first route's estimate too far off, 97 of the calls
        # at GPT-2's shape on an H100, e4f0941), it is left out, and the other providers still run.
        if captured is not None and captured.eager_fallbacks:
            print(f"train_step_batchtopk {shape} {name}: not recorded, {captured.eager_fallbacks} calls ran eagerly")
            continue
        recorder.record("train_step_batchtopk", shape, name, timing)
