"""Where fastsae's TopK training step spends its time: torch.profiler's kernel and host-op tables for the
step that bench_train times, at each benchmark shape (harness.SHAPES, or a sweep name such as
d768_F24576_B8192_k128), with AuxK on (5% of features dead) and off, run eagerly, replayed as one
CUDA graph (fastsae.graphs.CapturedStep), and with the forward through torch.compile(sae, fullgraph=True)
or sae.compile() (bench_train's `fastsae_compile` and `fastsae_module_compile`: the backward and the
optimizer eager). Each header gives the wall time per step, the kernel time, the host overhead (wall
minus kernel time, as a share of the wall), the kernels run per step and the host's launch calls per
step (kernel and graph launches: one per kernel eagerly, one graph when captured).

python -m bench.profile_train [--shapes gpt2,llama8b] [--rows 25] [--modes eager,graph,compile,module_compile]
                              [--by-shape] [--auxk on,off] [--optimizer adam|saeadam]

`--optimizer saeadam` profiles the step with fastsae.optim.SAEAdam (the decoder constraint inside its
step) instead of torch.optim.Adam and the constraint's two calls.

`--by-shape` adds, for the eager steps, the host ops grouped by their input shapes and sorted by the
device time of the kernels they launched: which call (a cast of [B, d], a fill of [F, d]) a kernel
of the first table comes from. (A replayed graph runs no host ops, so it has no such table.)
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from fastsae.ops import launch

from .bench_train import DEAD_FRACTION, _fastsae_step, _initial_weights
from .harness import SHAPES, shape_dims

STEPS = 5  # profiled steps


MODES = {
    "eager": "eager",
    "graph": "captured graph",
    "compile": "forward through torch.compile",
    "module_compile": "forward through sae.compile",
}


def profile_step(
    shape: str, auxk: bool, rows: int, mode: str = "eager", by_shape: bool = False, fused_optimizer: bool = False
) -> dict:
    """Prints the step's tables (`by_shape`: and the host ops by input shape, eager steps only) in `mode`
    (a key of MODES); returns its {"wall_ms", "kernel_ms", "host_share", "kernels", "launches"} per step."""
    if mode not in MODES:
        raise ValueError(f"profile_step: mode {mode!r} is not one of {list(MODES)}")
    graph = mode == "graph"
    d, n_features, n_rows, k = shape_dims(shape)
    dead = torch.rand(n_features, device="cuda") < (DEAD_FRACTION if auxk else 0.0)
    x, weights = _initial_weights(d, n_features, n_rows, dead)
    compiled = {"compile": "torch.compile", "module_compile": "sae.compile"}.get(mode)
    step = _fastsae_step(d, n_features, k, weights, dead, fused_optimizer, graph, compiled)
    for _ in range(5):  # compile, autotune, warm the allocator; the captured step captures on the fourth
        step(x)
    by_shape = by_shape and mode == "eager"
    prof, wall_ms = timed_profile(lambda: step(x), STEPS, cuda=True, record_shapes=by_shape)
    summary = step_summary(prof, wall_ms, STEPS)
    print(
        f"\n== {shape} (d, F, B, k) = {(d, n_features, n_rows, k)}, AuxK {'on' if auxk else 'off'}, "
        f"{MODES[mode]}{', SAEAdam' if fused_optimizer else ''}: {describe(summary)} "
        f"({STEPS} steps below)"
    )
    print_tables(prof, rows)
    for route in ("blocked", "atomic"):  # the per-feature sums' tiles the tuner picked (none under FASTSAE_AUTOTUNE=0)
        print(f"feature sums, {route} route: tiles {launch.tuned_choices('feature_sums', route, d, n_features)}")
    if by_shape:
        events = prof.key_averages(group_by_input_shape=True)
        print(events.table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=40,
                           max_shapes_column_width=60))  # fmt: skip
    return summary


def timed_profile(run, steps: int, cuda: bool, record_shapes: bool = False) -> tuple[profile, float]:
    """`steps` calls of `run` timed on the wall clock, then as many under torch.profiler (CUDA activity
    too when `cuda`; the ops' input shapes with `record_shapes`): (the profile, wall ms per step)."""
    synchronize = torch.cuda.synchronize if cuda else (lambda: None)
    synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        run()
    synchronize()
    wall_ms = (time.perf_counter() - start) / steps * 1e3
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=record_shapes) as prof:
        for _ in range(steps):
            run()
        synchronize()
    return prof, wall_ms


def step_summary(prof: profile, wall_ms: float, steps: int) -> dict:
    """{"wall_ms", "kernel_ms", "host_share", "kernels", "launches"} per step, from a profile of `steps`
    steps that took `wall_ms` each. Kernel time summed over the step against its wall time: a large gap
    means the GPU waits on the host (Python dispatch, syncs), not on kernels. Device-side events only (a
    host op's self device time repeats the kernels it launched); launches are the host's kernel and
    graph launch calls."""
    kernels = kernels_per_step(prof, steps)
    kernel_ms = sum(micros for _, micros, _ in kernels) / 1e3
    n_kernels = sum(launches for _, _, launches in kernels)
    events = prof.key_averages()
    launches = sum(
        event.count for event in events
        if event.device_type == DeviceType.CPU and ("LaunchKernel" in event.key or "GraphLaunch" in event.key)
    ) / steps  # fmt: skip
    # Kernels on side streams can overlap, so kernel time may exceed the wall: no negative overhead.
    host_share = max(0.0, wall_ms - kernel_ms) / wall_ms
    return {"wall_ms": wall_ms, "kernel_ms": kernel_ms, "host_share": host_share, "kernels": n_kernels,
            "launches": launches}  # fmt: skip


def describe(summary: dict) -> str:
    return (
        f"{summary['wall_ms']:.2f} ms wall per step, {summary['kernel_ms']:.2f} ms of kernels, host overhead "
        f"{100 * summary['host_share']:.0f}%, {summary['kernels']:.0f} kernels from {summary['launches']:.0f} "
        "host launches per step"
    )


def kernels_per_step(prof: profile, steps: int) -> list[tuple[str, float, float]]:
    """(kernel, microseconds per step, launches per step), the longest first: the first table's device
    time divided by the profiled steps, to set a step's breakdown beside another's."""
    kernels = [event for event in prof.key_averages() if event.device_type != DeviceType.CPU]
    rows = [(event.key, event.self_device_time_total / steps, event.count / steps) for event in kernels]
    return sorted(rows, key=lambda row: -row[1])


def print_tables(prof: profile, rows: int) -> None:
    """The kernels per step, the kernels by device time, then the host ops by their own host time (where
    the host's time goes)."""
    print("kernels per step: us, launches")
    for name, micros, launches in kernels_per_step(prof, STEPS)[:rows]:
        print(f"  {micros:9.1f} {launches:5.1f}  {name[:100]}")
    events = prof.key_averages()
    print(events.table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=70))
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=70))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--modes", default="eager,graph", help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--by-shape", action="store_true", help="the eager steps' host ops by input shape too")
    parser.add_argument("--auxk", default="on,off", help="comma-separated subset of on,off")
    parser.add_argument("--optimizer", choices=["adam", "saeadam"], default="adam")
    args = parser.parse_args(argv)
    for shape in args.shapes.split(","):
        for auxk in args.auxk.split(","):
            for mode in args.modes.split(","):
                profile_step(shape, auxk == "on", args.rows, mode=mode, by_shape=args.by_shape,
                             fused_optimizer=args.optimizer == "saeadam")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
