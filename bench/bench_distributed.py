"""Multi-GPU training: data parallel and feature sharding against one GPU, in one torchrun job.

    torchrun --nproc-per-node 2 -m bench.bench_distributed [--cases dp,shard] [--csv PATH]

Every process takes one GPU (NCCL). Rank 0 first times the single-GPU step alone (the baseline, in the
same run), then every rank times the multi-GPU step; rank 0 appends the rows to the CSV
(bench/results/<gpu>.csv by default). The step is the README's TopK training step (bf16, AuxK with a
few dead features, torch Adam, decoder constraint); times are medians over STEPS steps after WARMUP,
each step timed with CUDA events between barriers (every rank runs the same steps: the collectives
must pair up).

- Data parallel (op `train_step_dp`, shapes gpt2 and llama8b of harness.SHAPES): each GPU steps on
  its own B tokens, so N GPUs train N x B tokens per step; tokens/s against one GPU is
  N x (1-GPU ms) / (N-GPU ms). Provider `fastsae` wraps the SAE in DistributedDataParallel with its
  defaults, `fastsae_nobroadcast` without the buffer broadcast and with gradients as bucket views.
- Data parallel captured (op `train_step_dp_graph`, CUDA only): each rank's step replayed as one CUDA
  graph by fastsae.graphs.CapturedStep (no DDP: the gradients' all-reduces inside the graph), against
  one GPU's captured step (`fastsae_1gpu` of that op), torch's fused capturable Adam for both.
- Feature sharding (op `train_step_sharded`, Llama-8B width: d = 4096, B = 8192, k = 64, F = 262144,
  1048576 and 2097152): each GPU holds F / N features; the same B tokens per step, so the speed-up is
  (1-GPU ms) / (N-GPU ms). The optimizer is fastsae.optim.SAEAdam with fp32 moments (as large SAEs are
  trained; 2^21 features then need about 206 GB, more than one H200 holds). The one-GPU baseline is
  skipped where the SAE with its Adam state does not fit one GPU, and recorded as missing where it
  runs out of memory. The provider `comm_<N>gpu` is the time of one step's collectives alone (the candidate
  gathers and the reconstruction all-reduces of the forward, AuxK's included, and the backward's
  b_dec all-reduce), at the step's sizes.

Before timing, each case checks its result: the data-parallel FVU against one process on every
replica's tokens, the sharded codes of a few tokens against the top k of their fp32 pre-activations
over every shard. Peak memory (peak_mem_mb) is the largest per-GPU peak of the step. `--device cpu` runs the same on
CPU processes with gloo at a tiny shape (a smoke run for the tests). `--profile` prints, from rank 0,
torch.profiler's tables of a few data-parallel and feature-sharded steps after timing them, headed by
the step's wall time, kernel time, host overhead and launches (bench.profile_train's summary): where
a multi-GPU step spends what one GPU's step does not.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

import fastsae
from fastsae import parallel, reference
from fastsae.testing import assert_close

from .harness import SHAPES, Recorder, sae_train_step, sweep_name
from .profile_train import describe, print_tables, step_summary, timed_profile

WARMUP, STEPS = 3, 10
PROFILE_STEPS, PROFILE_ROWS = 5, 20  # --profile
DP_SHAPES = ["gpt2", "llama8b"]
# DistributedDataParallel's options per provider. The SAE all-reduces its own death statistics and fits
# its centering over every rank, so its buffers agree without DDP broadcasting them from rank 0 before
# every forward; and the gradients can live in DDP's buckets instead of being copied there.
DDP_VARIANTS = {"fastsae": {}, "fastsae_nobroadcast": {"broadcast_buffers": False, "gradient_as_bucket_view": True}}
SHARDED = [(4096, n_features, 8192, 64) for n_features in (2**18, 2**20, 2**21)]
TINY = (16, 256, 64, 4)  # --device cpu
DEAD_FRACTION = 0.05
# The captured steps' dead features are dead from the start and stay dead, and the live ones never go
# that long without firing: no rewrite of the statistics per step, which would make CapturedStep count
# the dead features again (a synchronisation) before every replay.
GRAPH_DEAD_AFTER_TOKENS = 2**40
ONE_GPU_FITS_PARAMETERS = 2**32  # d * F above this (17 GB of bf16 weights, x4 with grads and Adam): no 1-GPU run


def _sae(d: int, n_features: int, k: int, device: str, feature_group=None, dead_after_tokens: int = 1):
    dtype = "bfloat16" if device != "cpu" else "float32"
    cfg = fastsae.SAEConfig(d_in=d, n_features=n_features, k=k, dtype=dtype, check_finite=False,
                            dead_after_tokens=dead_after_tokens)  # fmt: skip
    with torch.device(device):  # built where it trains: no host copy of a large SAE
        return fastsae.SparseAutoencoder(cfg, feature_group=feature_group)


def _step(sae: fastsae.SparseAutoencoder, x: torch.Tensor, model=None, fp32_moments: bool = False):
    """A training step closure (through `model`, a DistributedDataParallel wrapper, when given) with
    DEAD_FRACTION of this module's features kept dead, so that AuxK runs. torch.optim.Adam, or
    SAEAdam with fp32 moments (`fp32_moments`)."""
    if fp32_moments:
        optimizer = fastsae.optim.SAEAdam(sae, lr=1e-4, state_dtype=torch.float32)
    else:
        optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4)
    n_local = sae.W_dec.shape[0]
    dead = torch.arange(n_local, device=x.device) < int(DEAD_FRACTION * n_local)

    def step():
        with torch.no_grad():
            sae.tokens_since_fired.copy_(dead.long() * 2)  # > dead_after_tokens: these stay dead
        return sae_train_step(sae, optimizer, x, model)

    return step


def _captured_step(sae: fastsae.SparseAutoencoder, x: torch.Tensor):
    """The step replayed as one CUDA graph by fastsae.graphs.CapturedStep (torch's fused, capturable
    Adam; a data-parallel SAE's gradients averaged inside the graph), with DEAD_FRACTION of this
    module's features dead throughout. One eager warm-up step, then the capture."""
    n_local = sae.W_dec.shape[0]
    dead = torch.arange(n_local, device=x.device) < int(DEAD_FRACTION * n_local)
    with torch.no_grad():
        sae.tokens_since_fired.copy_(dead.long() * 2 * sae.cfg.dead_after_tokens)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True, capturable=True)
    captured = fastsae.graphs.CapturedStep(sae, optimizer, warmup=1)
    return lambda: captured(x)


def _time(step, device: str, group=None) -> tuple[list[float], float]:
    """Milliseconds of each of STEPS steps after WARMUP (barriers between them when `group` is set, so
    that every rank's step spans the same collectives), and this process's peak memory in MB."""
    cuda = device != "cpu"
    for _ in range(WARMUP):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(STEPS):
        if group is not None:
            dist.barrier(group=group)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            step()
            times.append((time.perf_counter() - begin) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else 0.0
    return times, peak


def _row(times: list[float], peak_mb: float) -> dict:
    quantiles = statistics.quantiles(times, n=5)
    return {"median_ms": statistics.median(times), "p20_ms": quantiles[0], "p80_ms": quantiles[3],
            "peak_mem_mb": peak_mb}  # fmt: skip


def _largest(value: float, device: str) -> float:
    """The largest of every rank's `value`."""
    tensor = torch.tensor([value], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor)


def _single_gpu(recorder, op: str, shape: str, d, n_features, n_rows, k, device: str, fp32_moments=False,
                captured=False) -> None:  # fmt: skip
    """Rank 0 alone: the whole SAE's step (`captured`: `_captured_step`'s); the other ranks wait at the
    barrier after. A step that runs out of memory is reported and leaves no row."""
    if dist.get_rank() == 0:
        torch.manual_seed(0)
        try:
            x = torch.randn(n_rows, d, device=device)
            if captured:
                sae = _sae(d, n_features, k, device, dead_after_tokens=GRAPH_DEAD_AFTER_TOKENS).initialize(x)
                step = _captured_step(sae, x.to(sae.W_enc.dtype))
            else:
                sae = _sae(d, n_features, k, device).initialize(x)
                step = _step(sae, x.to(sae.W_enc.dtype), fp32_moments=fp32_moments)
            times, peak = _time(step, device)
            recorder.record(op, shape, "fastsae_1gpu", _row(times, peak))
        except torch.OutOfMemoryError as error:
            print(f"{op} {shape}: one GPU runs out of memory ({str(error).splitlines()[0]})", flush=True)
        x = sae = step = None  # the step's closure and its optimizer state go with them
        _release(device)
    dist.barrier()


def data_parallel(recorder, shape: str, d, n_features, n_rows, k, device: str, profile_steps: bool = False) -> None:
    _single_gpu(recorder, "train_step_dp", shape, d, n_features, n_rows, k, device)
    for provider, ddp_options in DDP_VARIANTS.items():
        torch.manual_seed(dist.get_rank())  # every rank its own tokens
        x = torch.randn(n_rows, d, device=device)
        sae = _sae(d, n_features, k, device).data_parallel()
        sae.initialize(x)
        _check_data_parallel(sae, x.to(sae.W_enc.dtype))
        model = torch.nn.parallel.DistributedDataParallel(sae, **ddp_options)
        step = _step(sae, x.to(sae.W_enc.dtype), model)
        times, peak = _time(step, device, dist.group.WORLD)
        _record(recorder, "train_step_dp", shape, times, _largest(peak, device), provider)
        if profile_steps:
            _profile(step, device, f"data parallel {shape} ({provider}), {dist.get_world_size()} processes")
        x = sae = model = step = None
        _release(device)


def data_parallel_captured(recorder, shape: str, d, n_features, n_rows, k, device: str) -> None:
    """Op train_step_dp_graph: one GPU's captured step (rank 0 alone), then every rank's."""
    op = "train_step_dp_graph"
    _single_gpu(recorder, op, shape, d, n_features, n_rows, k, device, captured=True)
    torch.manual_seed(dist.get_rank())  # every rank its own tokens
    x = torch.randn(n_rows, d, device=device)
    sae = _sae(d, n_features, k, device, dead_after_tokens=GRAPH_DEAD_AFTER_TOKENS).data_parallel()
    sae.initialize(x)
    _check_data_parallel(sae, x.to(sae.W_enc.dtype))
    times, peak = _time(_captured_step(sae, x.to(sae.W_enc.dtype)), device, dist.group.WORLD)
    _record(recorder, op, shape, times, _largest(peak, device))


def _profile(step, device: str, title: str) -> None:
    """Every rank runs PROFILE_STEPS steps under torch.profiler (the collectives must pair up); rank 0
    prints its summary and tables. The wall time per step is from as many steps just before."""
    dist.barrier()
    prof, wall_ms = timed_profile(step, PROFILE_STEPS, cuda=device != "cpu")
    if dist.get_rank() == 0:
        print(f"== {title}, rank 0: {describe(step_summary(prof, wall_ms, PROFILE_STEPS))}", flush=True)
        print_tables(prof, PROFILE_ROWS)


def feature_sharded(recorder, d, n_features, n_rows, k, device: str, profile_steps: bool = False) -> None:
    shape = sweep_name(d, n_features, n_rows, k)
    if d * n_features <= ONE_GPU_FITS_PARAMETERS:
        _single_gpu(recorder, "train_step_sharded", shape, d, n_features, n_rows, k, device, fp32_moments=True)
    torch.manual_seed(0)  # every rank the same tokens
    x = torch.randn(n_rows, d, device=device)
    sae = _sae(d, n_features, k, device, feature_group=dist.group.WORLD)
    sae.initialize(x)
    _check_sharded(sae, x.to(sae.W_enc.dtype))
    step = _step(sae, x.to(sae.W_enc.dtype), fp32_moments=True)
    times, peak = _time(step, device, dist.group.WORLD)
    peak = _largest(peak, device)
    dense_auxk = sae._few_dead_features(sae.dead_features(), n_rows) is not None  # the timed steps' path
    comm, _ = _time(lambda: _collectives(sae, n_rows, k, dense_auxk), device, dist.group.WORLD)
    _record(recorder, "train_step_sharded", shape, times, peak)
    _record(recorder, "train_step_sharded", shape, comm, 0.0, provider="comm")
    if profile_steps:
        _profile(step, device, f"feature sharding {shape}, {dist.get_world_size()} processes")


@torch.no_grad()
def _check_data_parallel(sae: fastsae.SparseAutoencoder, x: torch.Tensor) -> None:
    """Before timing: the replicas' FVU is one process's FVU on all their tokens (rank 0 runs the same
    weights, not data-parallel, on every rank's batch)."""
    fvu = float(sae(x).fvu)
    everything = parallel.gather_rows(x, dist.group.WORLD)
    if dist.get_rank() == 0:
        whole = fastsae.SparseAutoencoder(sae.cfg).to(x.device)
        whole.load_state_dict(sae.state_dict())
        want = float(whole(everything).fvu)
        assert abs(fvu - want) <= 2e-2 * want, f"data-parallel FVU {fvu:.5f} != one process's {want:.5f}"
    sae.reset_death_stats()


@torch.no_grad()
def _check_sharded(sae: fastsae.SparseAutoencoder, x: torch.Tensor, rows: int = 16) -> None:
    """Before timing: the sharded codes of a few tokens are the top k of their fp32 pre-activations
    over every shard (each rank computes its shard's, all gathered)."""
    codes = sae.encode(x[:rows])
    pre = reference.pre_activation(x[:rows], sae.W_enc, sae.b_enc, sae.b_dec)
    local = pre.topk(sae.cfg.k, dim=1).values
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    want = torch.cat(gathered, dim=1).topk(sae.cfg.k, dim=1).values.relu()
    got = codes.vals.float().sort(dim=1, descending=True).values
    assert_close(got, want, 2e-2, "feature-sharded codes")


def _record(recorder, op: str, shape: str, times: list[float], peak_mb: float, provider: str = "fastsae") -> None:
    if recorder is not None:  # rank 0
        recorder.record(op, shape, f"{provider}_{dist.get_world_size()}gpu", _row(times, peak_mb))


def _collectives(sae: fastsae.SparseAutoencoder, n_rows: int, k: int, dense_auxk: bool) -> None:
    """One sharded step's collectives at its sizes: the candidate gathers (k, and k_aux: values alone
    when AuxK runs dense over the few dead features) and the reconstruction all-reduces of the forward
    (the main one and AuxK's), and b_dec's gradient."""
    group, device, dtype, d = sae._feature_group, sae.W_dec.device, sae.W_dec.dtype, sae.cfg.d_in
    for width in (k, sae.cfg.k_aux):
        vals = torch.zeros(n_rows, width, device=device, dtype=dtype)
        if width == sae.cfg.k_aux and dense_auxk:
            parallel.kept_in_top(vals, group)
        else:
            parallel.merge_topk(vals, torch.zeros_like(vals, dtype=torch.int32), sae._feature_start, width, group)
        dist.all_reduce(torch.zeros(n_rows, d, device=device, dtype=dtype), group=group)
    dist.all_reduce(torch.zeros(d, device=device, dtype=dtype), group=group)


def _log(message: str, begin: float) -> None:
    if dist.get_rank() == 0:
        print(f"[{time.perf_counter() - begin:6.1f} s] {message}", flush=True)


def _release(device: str) -> None:
    """The finished case's SAE, optimizer state and DDP wrapper (reference cycles) leave the GPU before
    the next case allocates."""
    gc.collect()
    if device != "cpu":
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cases_help = "comma-separated subset of dp,dp_graph,shard, run in that order (dp_graph: CUDA only)"
    parser.add_argument("--cases", default="dp,dp_graph,shard", help=cases_help)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--csv", type=Path, default=None, help="CSV to append to (default bench/results/<gpu>.csv)")
    parser.add_argument("--profile", action="store_true", help="rank 0's profile of the multi-GPU steps")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    device = f"cuda:{torch.cuda.current_device()}" if cuda else "cpu"
    recorder = None
    if dist.get_rank() == 0:
        name = torch.cuda.get_device_name().lower().replace("nvidia ", "").replace(" ", "-") if cuda else "cpu"
        recorder = Recorder(args.csv or Path(__file__).resolve().parent / "results" / f"{name}.csv")
    begin = time.perf_counter()
    for case in args.cases.split(","):  # in the order given
        if case == "dp":
            for shape in DP_SHAPES if cuda else ["tiny"]:
                data_parallel(recorder, shape, *(SHAPES[shape] if cuda else TINY), device, args.profile)
                _release(device)
                _log(f"data parallel {shape} done", begin)
        elif case == "dp_graph" and cuda:
            for shape in DP_SHAPES:
                data_parallel_captured(recorder, shape, *SHAPES[shape], device)
                _release(device)
                _log(f"data parallel captured {shape} done", begin)
        elif case == "dp_graph":
            _log("data parallel captured: skipped (CUDA graphs)", begin)
        elif case == "shard":
            for d, n_features, n_rows, k in SHARDED if cuda else [TINY]:
                feature_sharded(recorder, d, n_features, n_rows, k, device, args.profile)
                _release(device)
                _log(f"feature sharding F={n_features} done", begin)
        else:
            raise SystemExit(f"unknown case {case!r}: choose from dp, dp_graph, shard")
    gc.collect()  # objects holding the group go before it (gloo's threads abort a process that leaves them)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
