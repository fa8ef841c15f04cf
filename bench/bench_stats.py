"""Fire counts: fastsae's CUDA histogram against torch.bincount, and the dense count against (acts >
0).sum(0), at the benchmark shapes (harness.SHAPES) (B * k indices into F features).
"""

from __future__ import annotations

from functools import partial

import torch

from fastsae import functional as F

from .harness import SHAPES, Recorder, each_shape, measure, selected_shapes


def _skewed(n_rows: int, k: int, n_features: int) -> torch.Tensor:
    """One feature in every row plus a steep power law: the histogram's worst case for contention."""
    idx = (torch.rand(n_rows, k, device="cuda").pow(4) * n_features).to(torch.int32)
    idx[:, 0] = n_features // 2
    return idx


def _positive_per_column(acts: torch.Tensor) -> torch.Tensor:
    """The torch baseline for fire_counts_dense."""
    return (acts > 0).sum(0)


EXTRA_SHAPES: dict = {}  # no shapes beyond harness.SHAPES


def _bench_shape(recorder: Recorder, shape_name: str, n_features: int, n_rows: int, k: int) -> None:
    """The fire counts' rows at one shape (`run`)."""
    distributions = {
        "fire_counts": torch.randint(0, n_features, (n_rows, k), device="cuda", dtype=torch.int32),
        "fire_counts_skewed": _skewed(n_rows, k, n_features),
    }
    for op, idx in distributions.items():
        vals = torch.rand(n_rows, k, device="cuda", dtype=torch.bfloat16)
        expected = torch.bincount(idx.flatten(), minlength=n_features)
        assert torch.equal(F.fire_counts(idx, n_features), expected), f"{op} {shape_name}: wrong counts"
        fired = torch.bincount(idx[vals > 0], minlength=n_features)  # bf16 rand holds exact zeros
        assert torch.equal(F.fire_counts(idx, n_features, vals), fired), f"{op} {shape_name}: wrong with vals"
        recorder.record(op, shape_name, "fastsae", measure(partial(F.fire_counts, idx, n_features)))
        recorder.record(op, shape_name, "fastsae_vals", measure(partial(F.fire_counts, idx, n_features, vals)))
        recorder.record(
            op, shape_name, "bincount", measure(partial(torch.bincount, idx.flatten(), minlength=n_features))
        )
    acts = (torch.randn(n_rows, n_features, device="cuda", dtype=torch.bfloat16) - 1.5).relu()
    assert torch.equal(F.fire_counts_dense(acts), (acts > 0).sum(0)), f"fire_counts_dense {shape_name}: wrong"
    recorder.record("fire_counts_dense", shape_name, "fastsae", measure(partial(F.fire_counts_dense, acts)))
    recorder.record("fire_counts_dense", shape_name, "torch", measure(partial(_positive_per_column, acts)))
    del acts


def run(recorder: Recorder) -> None:
    for shape_name, (_, n_features, n_rows, k) in selected_shapes(SHAPES).items():
        with each_shape(shape_name):
            _bench_shape(recorder, shape_name, n_features, n_rows, k)
