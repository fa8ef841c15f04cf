"""Where the TopK encode's time goes: each launch of the route the tuner picks, timed alone, against the
cuBLAS GEMM x @ W_enc of the same shape (the floor), and torch.profiler's kernel table of the whole
encode, and the encode back to back eagerly and as a CUDA graph replay (GPU time alone: the gap to
do_bench and to eager is the host's launches), the host's time per call alone, and cProfile's table of
where that host time goes. For the threshold-first filter route
(fastsae/ops/filter.py) the parts are: centring, the threshold pass (a cuBLAS GEMM over a subset of the
features and the group-maxima kernel), the filter GEMM with its survivor epilogue, the same GEMM with no
survivor (every threshold +inf: the GEMM and its compares alone, so the difference is what the
survivors' appends cost) and the exact select. Where the CUDA warp select over CUTLASS's group maxima is
offered (the CUTLASS extension built, FASTSAE_CUTLASS_SELECT not 0), also that select alone over one
chunk (the route's line for it is a difference of two timings), with each way of raising its bound where
its buffer fills (`cutlass_gemm.SELECT_RAISE_BY_COUNT`).

python -m bench.profile_encode [--shapes gpt2,af3,d768_F24576_B8192_k128] [--rows 12] [--batchtopk]

With --batchtopk, the sparse BatchTopK encode (`functional.encode_batchtopk_sparse`) instead: the whole
call, its TopK encode of each row's 4k candidates, the batch's select among them (one host
synchronisation), and eager PyTorch's dense BatchTopK, against the GEMM.

bf16 weights and activations as bench_encode draws them; the codes are checked against the fp32
reference on the first rows before anything is timed.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from functools import partial

import torch
import triton.testing
from torch.profiler import ProfilerActivity, profile

from fastsae import functional as F
from fastsae import reference
from fastsae.ops import batchtopk, cutlass_gemm, encode, filter, launch
from fastsae.testing import assert_topk_matches

from . import harness
from .bench_encode import CHECK_ROWS, _torch_batchtopk, _weights
from .harness import SHAPES, shape_dims


def _ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=50)


def _drain(make_chunks) -> None:
    """Makes every chunk of the pre-activation chunk generator that `make_chunks()` returns, holding one
    at a time as the routes do."""
    for chunk in make_chunks():
        del chunk


def _graph_replay_seconds(fn) -> float:
    """Seconds per replay of a CUDA graph of `fn`, back to back: the GPU's time alone, with none of the
    host's launches (fn warms up on a side stream first, as torch.cuda.graphs asks)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return launch.seconds_per_call(graph.replay)


def _behind_gpu_sleep(fn, calls: int, measure):
    """`measure(loop)`, where `loop` makes `calls` calls of `fn` queued behind a long GPU sleep, so that no
    launch waits for the GPU (a call that synchronised would show the sleep)."""
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(2 * 10**8)  # about 0.1 s of GPU cycles
    result = measure(lambda: [fn() for _ in range(calls)])
    torch.cuda.synchronize()
    return result


def _host_seconds(fn, calls: int = 20) -> float:
    """Host seconds per call of `fn` alone."""

    def seconds(loop) -> float:
        start = time.perf_counter()
        loop()
        return (time.perf_counter() - start) / calls

    return _behind_gpu_sleep(fn, calls, seconds)


def _host_profile(fn, rows: int, calls: int = 20) -> str:
    """cProfile's table of the host's time in `calls` calls of `fn` alone, the `rows` functions with the
    most time of their own: where an eager call's launch time goes (Triton's argument binding per
    launch, torch.library's dispatch, allocations)."""
    profiler = cProfile.Profile()
    _behind_gpu_sleep(fn, calls, profiler.runcall)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(rows)
    return text.getvalue()


def profile_encode(shape: str, rows: int) -> None:
    d, n_features, n_rows, k = shape_dims(shape)
    x = torch.randn(n_rows, d, device="cuda").bfloat16()
    W_enc, b_enc, b_dec = _weights(d, n_features)
    vals, idx, _, _ = encode.encode_topk(x, W_enc, b_enc, b_dec, k, 0, None)  # tunes the route
    assert_topk_matches(
        vals[:CHECK_ROWS], idx[:CHECK_ROWS], reference.pre_activation(x[:CHECK_ROWS], W_enc, b_enc, b_dec), k, 2e-2
    )
    tuned = launch.tuned_choices("encode_topk", d, n_features, launch.bucket(n_rows), k)
    route = tuned[0] if tuned else encode.topk_routes(k, 0, n_features)[0]  # FASTSAE_AUTOTUNE=0: the first
    gemm = _ms(lambda: x @ W_enc)
    whole = _ms(lambda: encode.encode_topk(x, W_enc, b_enc, b_dec, k, 0, None))
    # The public op (argument checks, torch.library's dispatch and autograd wrapper) as bench_encode times
    # it: on the H100 bench_encode read 0.876 ms at GPT-2's shape where this process's `whole` read 0.605.
    public = _ms(lambda: F.encode_topk(x, W_enc, b_enc, b_dec, k))
    flops = 2 * n_rows * d * n_features
    print(f"\n== {shape} (d, F, B, k) = {(d, n_features, n_rows, k)}: cuBLAS GEMM {gemm:.3f} ms, encode {whole:.3f} ms "
          f"({whole / gemm:.2f}x; the public op {public:.3f} ms, {public / gemm:.2f}x), "
          f"route {route[0]} {route[1]}")  # fmt: skip
    # do_bench clears the L2 before each call, so the GPU waits for the host's launches; back to back, the
    # host runs ahead, and a graph replay has no launches at all: the gap is the host's share.
    routed = lambda: encode.encode_topk(x, W_enc, b_enc, b_dec, k, 0, None, route=route)  # noqa: E731
    eager, replay = launch.seconds_per_call(routed) * 1e3, _graph_replay_seconds(routed) * 1e3
    floor = launch.seconds_per_call(lambda: x @ W_enc) * 1e3
    print(f"  back to back: eager {eager:.3f} ms, CUDA graph replay {replay:.3f} ms (GPU time alone), GEMM "
          f"{floor:.3f} ms: {eager / floor:.2f}x / {replay / floor:.2f}x the GEMM; the host's time per call "
          f"{_host_seconds(routed) * 1e3:.3f} ms (GEMM {_host_seconds(lambda: x @ W_enc) * 1e3:.3f})")  # fmt: skip
    if route[0] == "filter":
        cfg = route[1]
        xc = filter.center(x, b_dec, W_enc.dtype)
        tau = filter.thresholds(xc, W_enc, b_enc, k, cfg["CAP"])
        count = torch.zeros(n_rows, dtype=torch.int32, device="cuda")
        key_buf = torch.empty(n_rows, cfg["CAP"], dtype=torch.int64, device="cuda")
        no_survivor = torch.full_like(tau, float("inf"))

        def gemm_with(thresholds):
            count.zero_()
            filter.filter_gemm(xc, W_enc, b_enc, thresholds, count, key_buf, None, None, cfg)

        gemm_with(tau)
        survivors = count.clone()
        vals, idx = torch.empty_like(vals), torch.empty_like(idx)
        flags = torch.empty(n_rows, dtype=torch.int8, device="cuda")
        parts = {
            "centre": _ms(lambda: filter.center(x, b_dec, W_enc.dtype)),
            "thresholds": _ms(lambda: filter.thresholds(xc, W_enc, b_enc, k, cfg["CAP"])),
            "filter GEMM": _ms(lambda: gemm_with(tau)),
            "filter GEMM, no survivor": _ms(lambda: gemm_with(no_survivor)),
            "select": _ms(lambda: filter._select(key_buf, survivors, tau, vals, idx, flags, False, False)),
        }
        for name, ms in parts.items():
            print(f"  {name:>26} {ms:8.3f} ms  {ms / gemm:5.2f}x the GEMM")
        tflops = flops / parts["filter GEMM, no survivor"] / 1e9
        print(f"  filter GEMM with no survivor: {tflops:.0f} TFLOP/s (cuBLAS {flops / gemm / 1e9:.0f}); survivors per "
              f"row {survivors.float().mean():.0f} mean, {int(survivors.max())} max (CAP {cfg['CAP']}); "
              f"{int(flags.sum())} rows flagged")  # fmt: skip
    if route[0] == "row_filter":  # the pre-activation chunks (cuBLAS's or CUTLASS's), the row kernel the rest
        cfg = route[1]
        chunk_rows = filter.row_filter_chunk_rows(n_rows, n_features, cfg["CAP"])  # the route's own chunks
        if cfg.get("GEMM") == "cutlass":
            gemm_name = f"centre + CUTLASS {cutlass_gemm.VARIANTS[cfg['VARIANT']].name}"
            chunks = partial(filter.group_max_chunks, x, W_enc, b_enc, b_dec, chunk_rows, None, cfg["VARIANT"])
        else:
            gemm_name = "centre + cuBLAS pre-activation"
            chunks = partial(filter.pre_activation_chunks, x, W_enc, b_enc, b_dec, chunk_rows, None)
        pre_ms = _ms(partial(_drain, chunks))
        route_ms = _ms(routed)
        for name, ms in ((gemm_name, pre_ms), ("row kernel (the rest)", route_ms - pre_ms)):
            print(f"  {name:>30} {ms:8.3f} ms  {ms / gemm:5.2f}x the GEMM")
        # The other selects over the same chunks: the Triton row program's (with its select, or a launch of
        # one warp a row after it) and, over CUTLASS's maxima, the CUDA kernel of one warp a row ("warp").
        if cfg.get("GEMM") == "cutlass":
            selects = [c for c in filter.group_max_configs(k, 0, n_features) if c["VARIANT"] == cfg["VARIANT"]]
        else:
            selects = [{**cfg, "SELECT": select} for select in (True, False)]
        for select in selects:
            ms = _ms(partial(encode.encode_topk, x, W_enc, b_enc, b_dec, k, 0, None, route=("row_filter", select)))
            label = f"select {select['SELECT']}" + ("" if select["SELECT"] == "warp" else f" CAP {select['CAP']}")
            print(f"  {label:>30} {ms - pre_ms:8.3f} ms  {(ms - pre_ms) / gemm:5.2f}x the GEMM")
        # The warp select alone where it is offered, over the tuned CUTLASS tile or else the first routed
        # one (the tuner may have taken the row filter over cuBLAS's chunks).
        warps = [c for c in filter.group_max_configs(k, 0, n_features) if c["SELECT"] == "warp"]
        warp = next((c for c in warps if c["VARIANT"] == cfg.get("VARIANT")), warps[0] if warps else None)
        if warp is not None:
            _warp_select_alone(x, W_enc, b_enc, b_dec, k, warp["VARIANT"], gemm)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            encode.encode_topk(x, W_enc, b_enc, b_dec, k, 0, None)
        torch.cuda.synchronize()
    print("  (10 encodes below)")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=60))
    print("  the host's time of 20 eager calls of the public encode (cProfile, by own time; profiling slows it):")
    print(_host_profile(partial(F.encode_topk, x, W_enc, b_enc, b_dec, k), rows))


def _warp_select_alone(x, W_enc, b_enc, b_dec, k: int, variant: int, gemm: float) -> None:
    """The warp select over one chunk of CUTLASS's pre-activation and maxima, with each way of raising its
    bound over a full buffer (`cutlass_gemm.SELECT_RAISE_BY_COUNT`), checked against the reference on the
    first rows."""
    group = cutlass_gemm.VARIANTS[variant].group
    rows = filter.row_filter_chunk_rows(x.shape[0], W_enc.shape[1], 1)
    _, pre, maxima = next(filter.group_max_chunks(x[:rows], W_enc, b_enc, b_dec, rows, None, variant))
    rows = pre.shape[0]
    for raise_by_count in (False, True):
        vals = torch.full((rows, k), float("nan"), dtype=W_enc.dtype, device="cuda")  # nothing from the other
        idx = torch.full((rows, k), -1, dtype=torch.int32, device="cuda")
        flags = torch.full((rows,), 7, dtype=torch.int8, device="cuda")
        ms = _ms(partial(cutlass_gemm.select_topk_group_max, pre, maxima, group, k, vals, idx, flags, raise_by_count))
        label = f"select warp (raise by count {raise_by_count!s:>5})"
        assert not flags.any(), f"{label}: rows flagged"
        assert_topk_matches(vals[:CHECK_ROWS], idx[:CHECK_ROWS], pre[:CHECK_ROWS], k, 2e-2, label)
        print(f"  {label} alone over its chunk ({rows} rows) {ms:8.3f} ms  {ms / gemm:5.2f}x the GEMM")


def profile_batchtopk(shape: str) -> None:
    """The sparse BatchTopK encode's parts against the GEMM: the TopK encode of min(F, 4k) candidates
    a row (tuned), the select among them alone, and the whole call; do_bench (the L2 flushed, the host
    waited for) and back to back, since the select waits on the host once a call."""
    d, n_features, n_rows, k = shape_dims(shape)
    x = torch.randn(n_rows, d, device="cuda").bfloat16()
    W_enc, b_enc, b_dec = _weights(d, n_features)
    width = batchtopk.candidate_width(k, n_features)
    complete = width == n_features  # the candidates are whole rows
    candidates = encode.encode_topk(x, W_enc, b_enc, b_dec, width, 0, None)[0]  # tunes the route
    keep = batchtopk.select_among_candidates(candidates, k, complete)
    if keep is None:  # a row may keep more codes than its candidates: the call takes the dense route
        print(f"\n  {shape}: the candidates may not hold the batch's codes; encode_batchtopk_sparse runs densely")
    else:
        assert int(keep.sum()) == min(n_rows * k, candidates.numel()), "not the batch's B * k codes"
    parts = {
        "cuBLAS GEMM": lambda: x @ W_enc,
        f"TopK encode of {width} candidates a row": lambda: encode.encode_topk(x, W_enc, b_enc, b_dec, width, 0, None),
        "select among the candidates": lambda: batchtopk.select_among_candidates(candidates, k, complete),
        "encode_batchtopk_sparse": lambda: F.encode_batchtopk_sparse(x, W_enc, b_enc, b_dec, k),
        "eager dense BatchTopK": lambda: _torch_batchtopk(x, W_enc, b_enc, b_dec, k),
    }
    route = launch.tuned_choices("encode_topk", d, n_features, launch.bucket(n_rows), width)
    print(f"\n== BatchTopK {shape} (d, F, B, k) = {(d, n_features, n_rows, k)}: TopK route {route}")
    timings = {name: (_ms(fn), launch.seconds_per_call(fn) * 1e3) for name, fn in parts.items()}
    gemm, gemm_back_to_back = timings["cuBLAS GEMM"]
    for name, (ms, back_to_back) in timings.items():
        print(f"  {name:>40} {ms:8.3f} ms  {ms / gemm:5.2f}x the GEMM; back to back {back_to_back:8.3f} ms "
              f"{back_to_back / gemm_back_to_back:5.2f}x")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join([*SHAPES, "d768_F24576_B8192_k128"]))
    parser.add_argument("--rows", type=int, default=12)
    parser.add_argument("--batchtopk", action="store_true", help="the sparse BatchTopK encode's parts instead")
    args = parser.parse_args(argv)
    harness.FAILED_SHAPES.clear()
    for shape in args.shapes.split(","):
        with harness.each_shape(shape):  # a failed check at one shape leaves the others' profiles to be read
            if args.batchtopk:
                profile_batchtopk(shape)
            else:
                profile_encode(shape, args.rows)
    if harness.FAILED_SHAPES:
        print(f"profile_encode failed at {', '.join(harness.FAILED_SHAPES)} (tracebacks above)")
    return 1 if harness.FAILED_SHAPES else 0


if __name__ == "__main__":
    raise SystemExit(main())
