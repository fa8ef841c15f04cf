"""The one benchmark harness: medians of triton.testing.do_bench, peak memory, CSV rows.

Every benchmark checks correctness against the reference before timing anything, and appends rows
with exactly the columns of COLUMNS to bench/results/<gpu>.csv (or the CSV path it is given).
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import os
import subprocess
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

import fastsae

COLUMNS = [
    "op",
    "shape",
    "provider",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "peak_mem_mb",
    "gpu",
    "torch",
    "triton",
    "git_sha",
    "date",
]

# The benchmark shapes, (d, F, B, k): SAEs at the widths of GPT-2 small (d = 768), Llama-3-8B (d = 4096)
# and AlphaFold3's pair representation (d = 384), with batch sizes and k as their SAEs are trained.
SHAPES = {
    "gpt2": (768, 24576, 8192, 32),
    "llama8b": (4096, 131072, 4096, 64),
    "af3": (384, 16384, 16384, 32),
}


# The providers to run (bench.run --providers): None runs every one. The cuBLAS GEMM, each family's floor,
# always runs. OFFERED collects every provider name the families offered, so that bench.run can name the
# selected ones that none offered (a typo would otherwise run nothing, silently).
PROVIDERS: set[str] | None = None
OFFERED: set[str] = set()


def selected(providers: dict) -> dict:
    """The entries of a family's {provider: fn} that PROVIDERS selects."""
    OFFERED.update(providers)
    return {name: fn for name, fn in providers.items() if PROVIDERS is None or name in PROVIDERS}


# The shapes to run (bench.run --shapes): None runs every one. A name is one of SHAPES or of a family's
# EXTRA_SHAPES, the shapes it runs beyond them (the encode sweep's, the train family's k = 128 case), so
# that a run can time one case alone.
SHAPE_NAMES: set[str] | None = None


def selected_shapes(shapes: dict) -> dict:
    """The entries of a family's {shape name: (d, F, B, k)} that SHAPE_NAMES selects."""
    return {name: dims for name, dims in shapes.items() if SHAPE_NAMES is None or name in SHAPE_NAMES}


FAILED_SHAPES: list[str] = []  # the shapes whose benchmark failed, for bench.run's summary


@contextlib.contextmanager
def each_shape(name: str) -> Iterator[None]:
    """Runs a family's benchmark of one shape: a failure (a correctness or memory check, say) is printed
    and listed in FAILED_SHAPES, and the family goes on to its next shape, whose rows are kept."""
    try:
        yield
    except Exception:
        traceback.print_exc()
        FAILED_SHAPES.append(name)
    finally:
        torch.cuda.empty_cache()


def sweep_name(d: int, n_features: int, n_rows: int, k: int) -> str:
    return f"d{d}_F{n_features}_B{n_rows}_k{k}"


def sae_train_step(sae, optimizer: torch.optim.Optimizer, x: torch.Tensor, model=None):
    """One training step of a `fastsae.SparseAutoencoder` as the README's loop runs it (forward, backward,
    decoder constraint, optimizer; with fastsae.optim.SAEAdam the constraint is inside its step); returns
    the forward's output. `model`: a wrapper of `sae` to run the forward through (DistributedDataParallel)."""
    out = (model if model is not None else sae)(x)
    out.loss.backward()
    fastsae.optim.step_with_decoder_constraint(sae, optimizer)
    optimizer.zero_grad(set_to_none=True)
    return out


def shape_dims(shape: str) -> tuple[int, int, int, int]:
    """(d, F, B, k) of a named shape or a sweep name."""
    if shape in SHAPES:
        return SHAPES[shape]
    parts = shape.split("_")
    if [part[:1] for part in parts] != list("dFBk") or not all(part[1:].isdigit() for part in parts):
        raise ValueError(f"{shape!r} is neither one of {list(SHAPES)} nor a name d<d>_F<F>_B<B>_k<k>")
    d, n_features, n_rows, k = (int(part[1:]) for part in parts)
    return d, n_features, n_rows, k


def optional_sparsify():
    """EleutherAI's sparsify package (PyPI eai-sparsify) when it imports, else None (and why)."""
    try:
        import sparsify
        import sparsify.utils
    except ImportError as error:
        print(f"sparsify provider skipped: {error}")
        return None
    return sparsify


def gpu_slug(gpu: str) -> str:
    """A GPU's name as results file names carry it: "NVIDIA H100 80GB HBM3" -> "h100-80gb-hbm3"."""
    return gpu.lower().replace("nvidia ", "").replace(" ", "-")


def environment() -> dict:
    """gpu, torch, triton, git_sha and date columns for this run."""
    import triton

    sha = os.environ.get("FASTSAE_GIT_SHA")
    if not sha:
        try:
            sha = subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            sha = "unknown"
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "git_sha": sha,
        "date": datetime.date.today().isoformat(),
    }


def measure(fn: Callable[[], object]) -> dict:
    """Median, 20th and 80th percentile milliseconds (do_bench) and the peak memory the call
    allocates above what was allocated before it, in MB."""
    import triton.testing

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    median, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=200)
    return {"median_ms": median, "p20_ms": p20, "p80_ms": p80, "peak_mem_mb": peak_mb}


class Recorder:
    """Appends one row per measurement to a CSV (writing the header on a new file) as soon as it is
    taken, so an interrupted run keeps what it measured."""

    def __init__(self, csv_path: Path):
        self.csv_path = csv_path
        self.env = environment()

    def record(self, op: str, shape: str, provider: str, timing: dict) -> None:
        row = {"op": op, "shape": shape, "provider": provider, **timing, **self.env}
        self.csv_path.parent.mkdir(parents=True, exist_ok=True)
        new_file = not self.csv_path.exists()
        with open(self.csv_path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            if new_file:
                writer.writeheader()
            writer.writerow({key: f"{value:.5f}" if isinstance(value, float) else value for key, value in row.items()})
        print(
            f"{op:>22} {shape:>24} {provider:>14} {timing['median_ms']:9.4f} ms  peak {timing['peak_mem_mb']:9.1f} MB",
            flush=True,
        )
