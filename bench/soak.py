"""Long-run checks of the TopK training step (forward, backward, Adam, decoder constraint, AuxK):

    python -m bench.soak --out DIR                                  GPT-2 shape on the GPU, 20,000 steps
    python -m bench.soak --device cpu --shape tiny --steps 40       a smoke run

1. Determinism: with torch's deterministic algorithms on, two runs of --determinism-steps steps from
   the same seed and batches end with bitwise-equal parameters, optimizer state and death statistics.
2. Soak: --steps steps on a fixed pool of batches (so the data costs nothing). Every --every steps it
   records the allocated device memory, the mean step time of the window and how many Triton kernels
   have been compiled so far.

It prints both and writes them to DIR/soak.json. It exits non-zero when the runs differ, when
allocated memory grows after the first window, when a kernel compiles after the first window, or
when the last window's step time is more than 20% above the second's (a host-side slowdown; the first
window holds compilation and the allocator's warm-up).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS is deterministic only with it

import torch  # noqa: E402
import triton  # noqa: E402

import fastsae  # noqa: E402

from .harness import sae_train_step  # noqa: E402

# (d, F, B, k)
SHAPES = {"gpt2": (768, 24576, 8192, 32), "tiny": (16, 64, 32, 4)}
N_BATCHES = 8  # the pool the steps cycle through
SLOWDOWN = 1.2  # the last window may take at most this much longer per step than the first
MEMORY_SLACK_MB = 1.0  # allocator rounding: growth within this is not growth


def _setup(shape: str, device: str, seed: int):
    """A bf16 (CUDA) or fp32 (CPU) SAE with AuxK, its Adam and a pool of batches with an outlier
    dimension, all from `seed`. Features die after 4 batches without firing, so AuxK runs."""
    d, n_features, batch, k = SHAPES[shape]
    torch.manual_seed(seed)
    dtype = "bfloat16" if device == "cuda" else "float32"
    cfg = fastsae.SAEConfig(d_in=d, n_features=n_features, k=k, dtype=dtype, check_finite=False,
                            dead_after_tokens=4 * batch)  # fmt: skip
    batches = []
    for _ in range(N_BATCHES):
        x = torch.randn(batch, d)
        x[:, 0] += 20.0  # an outlier dimension, centred away by the geometric median
        batches.append(x.to(device, getattr(torch, dtype)))
    sae = fastsae.SparseAutoencoder(cfg).to(device).initialize(batches[0])
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3)
    return sae, optimizer, batches


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def determinism(shape: str, device: str, steps: int, seed: int = 0) -> dict:
    """Two deterministic runs of `steps` steps; whether every tensor of the end state is bitwise equal."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        states = []
        for _ in range(2):
            sae, optimizer, batches = _setup(shape, device, seed)
            for step in range(steps):
                sae_train_step(sae, optimizer, batches[step % N_BATCHES])
            optimizer_state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
            states.append([t.detach().clone() for t in (*sae.state_dict().values(), *optimizer_state)])
    finally:
        torch.use_deterministic_algorithms(previous)
    differing = sum(not torch.equal(a, b) for a, b in zip(*states))
    return {"steps": steps, "tensors": len(states[0]), "differing_tensors": differing, "identical": differing == 0}


def soak(shape: str, device: str, steps: int, every: int, seed: int = 0) -> list[dict]:
    """`steps` steps; one record per `every` steps: allocated MB, ms per step, kernels compiled."""
    compiled: list[str] = []
    triton.knobs.runtime.jit_post_compile_hook = lambda **info: compiled.append(info["repr"])
    try:
        sae, optimizer, batches = _setup(shape, device, seed)
        windows = []
        _synchronize(device)
        start = time.perf_counter()
        for step in range(1, steps + 1):
            sae_train_step(sae, optimizer, batches[step % N_BATCHES])
            if step % every == 0:
                _synchronize(device)
                now = time.perf_counter()
                allocated = torch.cuda.memory_allocated() / 2**20 if device == "cuda" else None
                windows.append({"step": step, "allocated_mb": allocated, "ms_per_step": (now - start) / every * 1e3,
                                "kernels_compiled": len(compiled)})  # fmt: skip
                print(_table_row(windows[-1]), flush=True)  # as it goes: a run cut short still shows its windows
                start = time.perf_counter()
    finally:
        triton.knobs.runtime.jit_post_compile_hook = None
    return windows


def _table_row(window: dict) -> str:
    allocated = "" if window["allocated_mb"] is None else f"{window['allocated_mb']:.1f}"
    return f"| {window['step']} | {allocated} | {window['ms_per_step']:.3f} | {window['kernels_compiled']} |"


def verdict(determinism_result: dict, windows: list[dict]) -> list[str]:
    """What failed, in words (empty when everything held). The first window includes compilation and
    the allocator's warm-up, so growth and slowdowns are measured from the second window on."""
    failures = []
    if not determinism_result["identical"]:
        failures.append(f"deterministic runs differ in {determinism_result['differing_tensors']} tensors")
    if len(windows) >= 3:
        base, last = windows[1], windows[-1]
        if base["allocated_mb"] is not None and last["allocated_mb"] > base["allocated_mb"] + MEMORY_SLACK_MB:
            failures.append(f"allocated memory grew from {base['allocated_mb']:.1f} to {last['allocated_mb']:.1f} MB")
        if last["kernels_compiled"] > base["kernels_compiled"]:
            failures.append(f"{last['kernels_compiled'] - base['kernels_compiled']} kernels compiled after step "
                            f"{base['step']}")  # fmt: skip
        if last["ms_per_step"] > SLOWDOWN * base["ms_per_step"]:
            failures.append(f"steps slowed from {base['ms_per_step']:.2f} to {last['ms_per_step']:.2f} ms")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="gpt2")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--every", type=int, default=1000)
    parser.add_argument("--determinism-steps", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench.soak --device cuda needs a CUDA GPU; none is visible here.")
        return 2
    if args.steps < args.every or args.every < 1 or args.determinism_steps < 1:
        parser.error("need --every >= 1, --steps >= --every and --determinism-steps >= 1")

    same = determinism(args.shape, args.device, args.determinism_steps)
    print(f"determinism: {same['steps']} steps twice, {same['differing_tensors']} of {same['tensors']} "
          f"tensors differ")  # fmt: skip
    print("| step | allocated MB | ms / step | kernels compiled |\n|---|---|---|---|")
    windows = soak(args.shape, args.device, args.steps, args.every)
    failures = verdict(same, windows)
    print("soak: " + ("; ".join(failures) if failures else "passed"))
    summary = {
        "shape": args.shape, "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__, "triton": triton.__version__, "determinism": same, "windows": windows,
        "failures": failures,
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(summary, indent=1) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
