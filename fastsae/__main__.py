"""Command line: python -m fastsae {train,evaluate,features,reproduce,diagnose,bench}."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from . import evaluate, features, train
from .activations import load_activations
from .cli import at_least, non_negative_float
from .reproduce import Settings

ROOT = Path(__file__).resolve().parent.parent


def cmd_diagnose(args: argparse.Namespace) -> int:
    from .diagnostics import diagnose

    acts = load_activations(args.path)
    print(diagnose(acts, k=args.k, n_features=args.n_features, measure_tokens=args.measure_tokens))
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from .reproduce import main

    settings = Settings(
        gammas=tuple(args.gammas),
        steps=args.steps,
        n_eval=args.n_eval,
        seed=args.seed,
        seeds=args.seeds,
        device=args.device,
    )
    print(main(settings, args.out))
    print(f"\nwrote {args.out / 'reproduce.md'} and {args.out / 'death_vs_gamma.png'}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if not (ROOT / "bench" / "run.py").is_file():
        print("fastsae bench runs the benchmarks of a source checkout (bench/run.py), not found here.")
        return 2
    sys.path.insert(0, str(ROOT))
    from bench.run import main

    return main(args.bench_args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastsae", description=__doc__)
    defaults = {"formatter_class": argparse.ArgumentDefaultsHelpFormatter}
    commands = parser.add_subparsers(dest="command", required=True)
    train.add_parser(commands)
    evaluate.add_parser(commands)
    features.add_parser(commands)

    reproduce = commands.add_parser("reproduce", help="feature death vs outlier severity on synthetic data", **defaults)
    reproduce.add_argument("--out", type=Path, default=Path("fastsae_reproduce"), help="output folder")
    reproduce.add_argument("--gammas", type=non_negative_float, nargs="+", default=list(Settings.gammas),
                           help="outlier severities to sweep (||mu|| / ||sigma||)")  # fmt: skip
    reproduce.add_argument("--steps", type=at_least(0), default=Settings.steps, help="training steps per SAE")
    reproduce.add_argument("--n-eval", type=at_least(2), default=Settings.n_eval, help="evaluation tokens")
    reproduce.add_argument("--seed", type=int, default=Settings.seed, help="the first seed")
    reproduce.add_argument("--seeds", type=at_least(1), default=Settings.seeds,
                           help="seeds per gamma (paired variants each)")  # fmt: skip
    reproduce.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    reproduce.set_defaults(run=cmd_reproduce)

    what = "outlier severity and predicted feature death of a file"
    diagnose = commands.add_parser("diagnose", help=what, **defaults)
    diagnose.add_argument("path", type=Path, help="[N, d] or [..., d] activations: .npy, .pt or .safetensors")
    diagnose.add_argument("--k", type=at_least(1), default=32,
                          help="active features per token of the TopK SAE to assess")  # fmt: skip
    diagnose.add_argument("--n-features", type=at_least(1), default=None,
                          help="features of the SAE to assess; None: 16 x d")  # fmt: skip
    diagnose.add_argument(
        "--measure-tokens", type=at_least(0), default=None,
        help="tokens random-init SAEs encode to measure death at init; None: 65536 with a GPU, else 0 (skip)",
    )  # fmt: skip
    diagnose.set_defaults(run=cmd_diagnose)

    bench = commands.add_parser("bench", help="GPU benchmarks (arguments go to bench/run.py, e.g. --only encode)")
    bench.set_defaults(run=cmd_bench)

    # bench passes every argument after it to bench/run.py (argparse would refuse its options here).
    args, bench_args = parser.parse_known_args(argv)
    if bench_args and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(bench_args)}")
    args.bench_args = bench_args
    try:
        device = getattr(args, "device", None)  # the commands that take --device
        if device is not None and torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {device}: no CUDA device is visible to this torch ({torch.__version__})")
        return args.run(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
