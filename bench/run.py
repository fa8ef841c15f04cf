"""Runs the benchmarks on a CUDA GPU and appends their rows to a CSV, then renders the report.

python -m bench.run [--only stats,encode,train] [--shapes gpt2,af3] [--providers fastsae,torch] [--csv PATH]
                    [--no-render]
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
FAMILIES = ["stats", "encode", "decode", "train"]


def _subset(parser: argparse.ArgumentParser, value: str, choices: list[str], what: str) -> list[str]:
    """The comma-separated names in `value`; a name outside `choices` is a usage error."""
    names = value.split(",")
    unknown = set(names) - set(choices)
    if unknown:
        parser.error(f"unknown {what} {sorted(unknown)}; choose from {choices}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(FAMILIES), help=f"comma-separated subset of {FAMILIES}")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated subset of {list(SHAPES)}")
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
    if not torch.cuda.is_available():
        print("fastsae bench times CUDA kernels and needs a CUDA GPU; none is visible here.")
        return 2
    families = _subset(parser, args.only, FAMILIES, "benchmark families")
    shapes = _subset(parser, args.shapes, list(SHAPES), "shapes")
    for name in list(SHAPES):  # every family loops over this one dict
        if name not in shapes:
            del SHAPES[name]
    if args.providers is not None:
        harness.PROVIDERS = set(args.providers.split(","))
    csv_path = args.csv or RESULTS / f"{harness.gpu_slug(torch.cuda.get_device_name())}.csv"
    recorder = Recorder(csv_path)
    failed = []
    for family in families:  # a failing family (a correctness check, say) does not cost the others their rows
        try:
            importlib.import_module(f"bench.bench_{family}").run(recorder)
        except Exception:
            traceback.print_exc()
            failed.append(family)
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
