"""Where fastsae's TopK training step spends its time: torch.profiler's kernel and host-op tables for the
step that bench_train times, at each benchmark shape (harness.SHAPES), with AuxK on (5% of features
dead) and off.

python -m bench.profile_train [--shapes gpt2,llama8b] [--rows 25]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from .bench_train import DEAD_FRACTION, _fastsae_step, _initial_weights
from .harness import SHAPES


def profile_step(shape: str, auxk: bool, rows: int) -> None:
    d, n_features, n_rows, k = SHAPES[shape]
    x, weights = _initial_weights(d, n_features, n_rows)
    dead = torch.rand(n_features, device="cuda") < (DEAD_FRACTION if auxk else 0.0)
    step = _fastsae_step(d, n_features, k, weights, dead)
    for _ in range(3):  # compile, autotune, warm the allocator
        step(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(5):
        step(x)
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) / 5 * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step(x)
        torch.cuda.synchronize()
    # Kernel time summed over the step against the step's wall time: a large gap means the GPU waits on
    # the host (Python dispatch, syncs), not on kernels. Device-side events only: a host op's self device
    # time repeats the kernels it launched. The second table shows where the host's time goes.
    events = prof.key_averages()
    gpu_ms = sum(event.self_device_time_total for event in events if event.device_type != DeviceType.CPU) / 5 / 1e3
    print(
        f"\n== {shape} (d, F, B, k) = {(d, n_features, n_rows, k)}, AuxK {'on' if auxk else 'off'}: "
        f"{wall_ms:.2f} ms wall per step, {gpu_ms:.2f} ms of kernels (5 steps below)"
    )
    print(events.table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=70))
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=70))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args(argv)
    for shape in args.shapes.split(","):
        for auxk in (True, False):
            profile_step(shape, auxk, args.rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
