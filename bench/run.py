"""Runs the benchmarks on a CUDA GPU and appends their rows to a CSV, then renders the report.

python -m bench.run [--only stats,encode,train] [--shapes gpt2,d768_F24576_B8192_k512] [--providers fastsae,torch]
                    [--csv PATH] [--no-render]
(or: python -m fastsae bench)
"""

from __future__ import annotations

import argparse
import importlib
import traceback
from pathlib import Path

import torch

from . import harness
from .harness import SHAPES, Recorder
from .report import render

RESULTS = Path(__file__).resolve().parent / "results"
FAMILIES = ["stats", "encode", "decode", "train", "gemm"]


def _subset(parser: argparse.ArgumentParser, value: str, choices: list[str], what: str) -> list[str]:
    """The comma-separated names in `value`; a name outside `choices` is a usage error."""
    names = value.split(",")
    unknown = set(names) - set(choices)
    if unknown:
        parser.error(f"unknown {what} {sorted(unknown)}; choose from {choices}")
    return names


def _family(name: str):
    """The module of benchmark family `name` (bench/bench_<name>.py): its run(recorder) and EXTRA_SHAPES."""
    return importlib.import_module(f"bench.bench_{name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(FAMILIES), help=f"comma-separated subset of {FAMILIES}")
    parser.add_argument(
        "--shapes",
        default=None,
        help=f"comma-separated shapes to run: of {list(SHAPES)} or a selected family's EXTRA_SHAPES, named "
        "d<d>_F<F>_B<B>_k<k> (the encode sweep's, train's k = 128 case; default: all)",
    )
    parser.add_argument(
        "--providers",
        default=None,
        help="comma-separated providers to run in the encode, decode and train families (default: all; the cuBLAS "
        "GEMM, their floor, always runs)",
    )
    parser.add_argument("--csv", type=Path, default=None, help="CSV to append to (default bench/results/<gpu>.csv)")
    parser.add_argument(
        "--no-render", action="store_true", help="only append the rows (no README.md and plots next to the CSV)"
    )
    args = parser.parse_args(argv)
    families = _subset(parser, args.only, FAMILIES, "benchmark families")
    if args.shapes is not None:
        offered = [*SHAPES, *(name for family in families for name in _family(family).EXTRA_SHAPES)]
        harness.SHAPE_NAMES = set(_subset(parser, args.shapes, offered, f"shapes of the families {families}"))
    if args.providers is not None:
        harness.PROVIDERS = set(args.providers.split(","))
    if not torch.cuda.is_available():
        print("fastsae bench times CUDA kernels and needs a CUDA GPU; none is visible here.")
        return 2
    csv_path = args.csv or RESULTS / f"{harness.gpu_slug(torch.cuda.get_device_name())}.csv"
    recorder = Recorder(csv_path)
    failed = []
    for family in families:  # a failing family or shape (a correctness check, say) costs no other its rows
        harness.FAILED_SHAPES.clear()
        try:
            _family(family).run(recorder)
        except Exception:
            traceback.print_exc()
            failed.append(family)
        if harness.FAILED_SHAPES:
            failed.append(f"{family} at {', '.join(harness.FAILED_SHAPES)}")
    if csv_path.exists() and not args.no_render:
        render(csv_path, csv_path.parent)
    if failed:
        print(f"benchmark families that failed: {failed}")
    unknown = sorted((harness.PROVIDERS or set()) - harness.OFFERED)
    if unknown:
        print(f"--providers {unknown}: no benchmark family offers them; offered: {sorted(harness.OFFERED)}")
    return 1 if failed or unknown else 0


if __name__ == "__main__":
    raise SystemExit(main())
