"""A training step under each value of one of fastsae's switches, in one run, to set its default by
measurement:

    python -m bench.ab_step fastsae.ops.auxk.ENTRIES_PER_THREAD=8,16 [--shapes gpt2,af3] [--csv PATH] [--retune]
        [--with fastsae.ops.auxk.CODES_WITHOUT_SELECTION=False ...] [--steps fastsae,fastsae_module_compile]

A switch is a module attribute that fastsae reads when it runs an op (most are set from an environment
variable at import: FASTSAE_AUXK_ROW_TOPK, FASTSAE_FEATURE_SUMS, ...). For each shape and value, in
turns (`--rounds`: every value once per round, so drift during the run reaches each alike), it builds
`bench_train`'s `fastsae_saeadam_graph` step (SAEAdam, one CUDA graph, AuxK on with 5% of the features
dead), checks its FVU against the fp32 reference, and times it; then the cuBLAS encoder GEMM. Rows:
op `train_step_ab`, provider `NAME=value` (one per round), and `cublas_gemm`. `--steps` names other
steps of `bench_train.FASTSAE_STEPS` instead (e.g. the eager module's, `fastsae`, and sae.compile()'s,
`fastsae_module_compile`, to compare the two under each value), each timed in turn under each value;
their providers read `step NAME=value`.

fastsae's tuner times its candidates (routes, tiles) once per process, so by default every value runs
the picks made under the first, and the switch's effect is told apart from a different pick. With
`--retune` the tuner times them again under each value: for a switch that changes which candidate is
fastest (e.g. fastsae.ops.filter.ROW_FILTER_CHUNK, the row filter's chunk of pre-activations).
`--with module.NAME=value` (repeatable) holds other switches at a value for the whole run, to time a
switch where another would hide it (e.g. AuxK's row top-k selection, which the benchmark's rows skip
unless CODES_WITHOUT_SELECTION is off); the providers then read `NAME=value with OTHER=value`.
"""

from __future__ import annotations

import argparse
import ast
import importlib
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch

from fastsae.ops import launch
from fastsae.testing import assert_close

from . import bench_train
from .harness import SHAPES, Recorder, measure, shape_dims

DEFAULT_STEP = "fastsae_saeadam_graph"  # the captured SAEAdam step: its providers name the switch alone


def parse_switch(spec: str) -> tuple[object, str, list[object]]:
    """(module, attribute name, values) of 'package.module.NAME=v1,v2,...'; values are Python literals."""
    target, _, values = spec.partition("=")
    module_name, _, name = target.rpartition(".")
    if not values or not module_name:
        raise ValueError(f"expected module.NAME=value,value,..., got {spec!r}")
    module = importlib.import_module(module_name)
    if not hasattr(module, name):
        raise ValueError(f"{module_name} has no switch {name}")
    try:
        parsed = [ast.literal_eval(value) for value in values.split(",")]
    except (ValueError, SyntaxError) as error:
        raise ValueError(f"the values of {spec!r} must be Python literals ({error})") from None
    return module, name, parsed


def run(
    recorder: Recorder,
    switch: tuple[object, str, list[object]],
    shapes: list[str],
    rounds: int,
    retune: bool = False,
    held: Sequence[tuple[object, str, list[object]]] = (),
    steps: Sequence[str] = (DEFAULT_STEP,),
) -> None:
    """Rows for each shape: each of `steps` (`bench_train.FASTSAE_STEPS`' names) under each value of
    `switch` (`parse_switch`'s), then the GEMM; `retune`: the tuner's picks made again under each value;
    `held`: switches (`parse_switch`'s, one value each) set for the whole run. Every switch is restored
    after."""
    module, name, values = switch
    originals = [(module, name, getattr(module, name))] + [(m, n, getattr(m, n)) for m, n, _ in held]
    suffix = "".join(f" with {n}={v[0]}" for _, n, v in held)
    try:
        for held_module, held_name, (value,) in held:
            setattr(held_module, held_name, value)
        for shape in shapes:
            d, n_features, n_rows, k = shape_dims(shape)
            dead = torch.rand(n_features, device="cuda") < bench_train.DEAD_FRACTION
            x, weights = bench_train._initial_weights(d, n_features, n_rows, dead)
            expected_fvu = bench_train.expected_topk_fvu(x, weights, k)
            for _ in range(rounds):
                for value in values:
                    setattr(module, name, value)
                    if retune:
                        launch.forget_tuned()
                    for step_name in steps:
                        how = bench_train.FASTSAE_STEPS[step_name]
                        step = bench_train._fastsae_step(d, n_features, k, weights, dead, **how)
                        provider = f"{name}={value}{suffix}"
                        if step_name != DEFAULT_STEP:
                            provider = f"{step_name} {provider}"
                        assert_close(step(x).detach().float(), expected_fvu, 2e-2, f"train_step_ab {shape} {provider}")
                        recorder.record("train_step_ab", shape, provider, bench_train.measure_step(step, x))
                        # The tuner times its candidates once per process: the step's picks, to tell a switch's
                        # effect from a different pick.
                        print(f"  tuner's picks: {[(key[0], choice) for key, choice in launch.tuned_items()]}")
                        del step
                        torch.cuda.empty_cache()
            recorder.record("train_step_ab", shape, "cublas_gemm", measure(partial(torch.mm, x, weights["W_enc"])))
    finally:
        for restored_module, restored_name, original in originals:
            setattr(restored_module, restored_name, original)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("switch", help="module.NAME=value,value,... (Python literals)")
    parser.add_argument(
        "--shapes", default="gpt2,af3", help=f"comma-separated, from {list(SHAPES)} or d<d>_F<F>_B<B>_k<k>"
    )
    parser.add_argument("--rounds", type=int, default=1, help="times each value is measured, in turns")
    parser.add_argument("--csv", type=Path, required=True, help="CSV to append the rows to")
    parser.add_argument("--retune", action="store_true", help="the tuner's picks made again under each value")
    parser.add_argument(
        "--with", dest="held", action="append", default=[], help="module.NAME=value held for the whole run"
    )
    parser.add_argument(
        "--steps", default=DEFAULT_STEP, help=f"comma-separated, from {list(bench_train.FASTSAE_STEPS)}"
    )
    args = parser.parse_args(argv)
    steps = args.steps.split(",")
    if unknown := [step for step in steps if step not in bench_train.FASTSAE_STEPS]:
        parser.error(f"no step {unknown}: choose from {list(bench_train.FASTSAE_STEPS)}")
    try:
        switch = parse_switch(args.switch)
        held = [parse_switch(spec) for spec in args.held]
    except (ImportError, ValueError) as error:
        parser.error(str(error))
    if any(len(values) != 1 for _, _, values in held):
        parser.error("--with takes one value per switch")
    if not torch.cuda.is_available():
        print("bench.ab_step times the training step on a CUDA GPU; none is visible here.")
        return 2
    run(Recorder(args.csv), switch, args.shapes.split(","), args.rounds, args.retune, held, steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
