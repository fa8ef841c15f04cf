"""Renders bench/results/README.md (one markdown table per op) and one plot per op from the CSVs.

    python -m bench.report [RESULTS_DIR]

For each (op, shape, provider) the newest row counts. Ratios are to the op's baseline provider (the
cuBLAS GEMM floor where it was measured, else the torch provider the op is compared against) as
measured in the same run as the row (the same commit and date) where that run measured it, else its
newest row: a switch's A/B rows from an earlier run keep their own run's GEMM.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from .harness import SHAPES, gpu_slug, shape_dims

BASELINES = ["cublas_gemm", "bincount", "embedding_bag", "torch", "fastsae_1gpu"]
# Ops reported in TFLOP/s of their encoder GEMM, 2 * B * d * F.
GEMM_OPS = (
    "encode_topk", "encode_relu", "encode_batchtopk", "encode_topk_positive_counts", "encode_topk_sort_select",
    "gemm_group_max", "gemm_filter",
)  # fmt: skip
# What each op times, and where its bench says more (printed under the op's heading).
OP_NOTES = {
    "fire_counts": "Per-feature fire counts of sparse codes (`bench/bench_stats.py`).",
    "fire_counts_skewed": "The same with most codes on a few features (`bench/bench_stats.py`).",
    "fire_counts_dense": "Per-feature counts of positive entries of dense codes (`bench/bench_stats.py`).",
    "encode_topk": "The TopK encode against the cuBLAS GEMM x @ W_enc and eager torch (`bench/bench_encode.py`).",
    "encode_relu": "The ReLU encode, writing the whole [B, F] codes (`bench/bench_encode.py`).",
    "encode_batchtopk": "The BatchTopK encode, dense and sparse codes (`bench/bench_encode.py`); "
    "`fastsae_sparse_floor` (each row's codes above a floor, from the previous batch's threshold) was timed "
    "once and removed (slower than `fastsae_sparse`); `fastsae_threshold` is the threshold-first route "
    "(`fastsae/ops/batch_filter.py`), given another batch's threshold as its estimate.",
    "encode_topk_positive_counts": "The TopK encode with the per-feature positive counts (`bench/bench_encode.py`).",
    "encode_topk_sort_select": "The TopK encode with the experimental sort-select row-filter configurations, "
    "timed once and removed (no faster than `encode_topk`'s route).",
    "decode_sparse": "The sparse decode of [B, k] codes (`bench/bench_decode.py`).",
    "gemm_group_max": "The encoder GEMM writing the pre-activation and, in its epilogue, each row's maxima over "
    "groups of 64 to 256 features (a variant's tile width; experimental CUTLASS kernels, `bench/bench_gemm.py`), "
    "against cuBLAS's addmm.",
    "gemm_filter": "The threshold-first filter GEMM, writing only each row's entries above its threshold (experimental "
    "CUTLASS kernels, and `fastsae_triton`, the filter route's Triton GEMM; `bench/bench_gemm.py`), against "
    "cuBLAS's addmm.",
    "train_step": "A whole TopK training step with AuxK (`bench/bench_train.py`); `fastsae_compile` runs the "
    "module's forward through `torch.compile(sae, fullgraph=True)` and `fastsae_module_compile` through "
    "`sae.compile()` (the dead-feature list eager), the backward and Adam eager.",
    "train_step_batchtopk": "A BatchTopK training step, sparse and dense codes (`bench/bench_train.py`); "
    "`fastsae_graph` replays it with `fastsae.graphs.CapturedStep` (two graphs split at the sparse codes' "
    "exactness check), `fastsae_threshold_graph` the same with the threshold-first route, whose GPT-2 and "
    "Llama-8B rows at 0a6f244 are mostly eager steps standing in for batches the route handed back (53 and 11 "
    "of the timed calls): its rows outgrow their buffers as training on the one repeated batch piles entries up "
    "just below the threshold (docs/kernels.md, BatchTopK encode). The sparse codes above the previous "
    "step's floor took 96.2 ms a step at GPT-2 against 6.9 ms (bd324ad) and were removed; that row is left out "
    "of the CSV so that the plot stays legible.",
    "train_step_ab": "A training step under each value of one switch (`bench/ab_step.py`): the captured SAEAdam "
    "step, or the one a provider names first.",
    "train_step_dp": "Data parallel under DistributedDataParallel against one GPU (`bench/bench_distributed.py`).",
    "train_step_dp_graph": "Data parallel with every rank's step captured against one GPU's captured step "
    "(`bench/bench_distributed.py`).",
    "train_step_sharded": "Feature sharding against one GPU, fp32 Adam moments (`bench/bench_distributed.py`).",
}


def _read_rows(csv_paths: list[Path]) -> list[dict]:
    rows: list[dict] = []
    for path in csv_paths:
        with open(path, newline="") as f:
            rows += csv.DictReader(f)
    return rows


def _run_key(row: dict) -> tuple:
    """What tells one run's rows of an op and shape from another's: the GPU, the commit and the date."""
    return row["gpu"], row["op"], row["shape"], row["git_sha"], row["date"]


def _table(op: str, rows: list[dict], runs: dict) -> list[str]:
    """The op's table from its newest `rows`; `runs` maps each `_run_key` to that run's rows by provider
    (the baselines of ratios)."""
    providers = sorted({r["provider"] for r in rows})
    baseline = next((b for b in BASELINES if b in providers), None)
    by_shape: dict = {}
    for r in rows:
        by_shape.setdefault(r["shape"], {})[r["provider"]] = r
    header = "| shape | " + " | ".join(f"{p} ms (p20-p80)" for p in providers) + " |"
    if baseline:
        header += "".join(f" {p} / {baseline} |" for p in providers if p != baseline)
    if op in GEMM_OPS:
        header += " fastsae TFLOP/s |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for shape, cells in by_shape.items():
        line = (
            f"| {shape} | "
            + " | ".join(
                f"{float(cells[p]['median_ms']):.4f} ({float(cells[p]['p20_ms']):.4f}-{float(cells[p]['p80_ms']):.4f})"
                if p in cells
                else ""
                for p in providers
            )
            + " |"
        )
        if baseline:
            for p in providers:
                if p == baseline:
                    continue
                base = runs[_run_key(cells[p])].get(baseline, cells.get(baseline)) if p in cells else None
                ratio = float(cells[p]["median_ms"]) / float(base["median_ms"]) if base else None
                line += f" {ratio:.2f}x |" if ratio is not None else " |"
        if op in GEMM_OPS:
            d, n_features, n_rows, _ = shape_dims(shape)
            ms = float(cells["fastsae"]["median_ms"]) if "fastsae" in cells else None
            line += f" {2 * n_rows * d * n_features / ms / 1e9:.0f} |" if ms else " |"
        lines.append(line)
    peak = [
        f"{shape}/{p} {float(r['peak_mem_mb']):.0f} MB" for shape, cells in by_shape.items() for p, r in cells.items()
    ]
    lines.append("")
    lines.append("Peak extra memory: " + ", ".join(peak) + ".")
    return lines


def _plot(op: str, rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping plots")
        return
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    providers = sorted({r["provider"] for r in rows})
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(shapes) * max(1, len(providers)) / 3, 3.5))
    width = 0.8 / len(providers)
    for i, provider in enumerate(providers):
        medians = [
            next((float(r["median_ms"]) for r in rows if r["shape"] == s and r["provider"] == provider), 0.0)
            for s in shapes
        ]
        ax.bar([x + i * width for x in range(len(shapes))], medians, width, label=provider)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(shapes))], shapes)
    ax.set_ylabel("median ms")
    ax.set_title(op)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_ratio_against_k(rows: list[dict], path: Path) -> bool:
    """encode_topk time / cuBLAS GEMM time against k, for the shapes that differ from GPT-2's only in
    k (d = 768, F = 24576, B = 8192), saved to `path`; False when fewer than two such k were measured."""
    import matplotlib.pyplot as plt

    gpt2_width = (768, 24576, 8192)
    by_k: dict = {}
    for r in rows:
        d, n_features, n_rows, k = shape_dims(r["shape"])
        if (d, n_features, n_rows) == gpt2_width:
            by_k.setdefault(k, {})[r["provider"]] = float(r["median_ms"])
    points = {k: p for k, p in sorted(by_k.items()) if "cublas_gemm" in p}
    if len(points) < 2:
        return False
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for provider in ("fastsae", "torch"):
        ks = [k for k, p in points.items() if provider in p]
        ax.plot(ks, [points[k][provider] / points[k]["cublas_gemm"] for k in ks], marker="o", label=provider)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("time / cuBLAS GEMM time")
    ax.set_title("encode_topk, d=768 F=24576 B=8192")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _runs(rows: list[dict]) -> str:
    """Which commit (and date) each row comes from, when the newest rows of an op span several runs."""
    runs: dict = {}
    for r in rows:
        runs.setdefault((r["git_sha"], r["date"]), []).append(f"{r['shape']}/{r['provider']}")
    if len(runs) == 1:
        (sha, date), _ = runs.popitem()
        return f"commit {sha}, {date}"
    return "; ".join(f"commit {sha} ({date}): {', '.join(cells)}" for (sha, date), cells in runs.items())


def render(csv_path: Path, out_dir: Path) -> None:
    """Rewrites out_dir/README.md and out_dir/<op>.png from every CSV in csv_path's folder (one
    <op>-<gpu>.png per GPU where an op was measured on several)."""
    latest: dict = {}
    runs: dict = {}
    for row in _read_rows(sorted(csv_path.parent.glob("*.csv"))):  # in order: the newest row wins
        latest[(row["gpu"], row["op"], row["shape"], row["provider"])] = row
        runs.setdefault(_run_key(row), {})[row["provider"]] = row
    lines = [
        "# Benchmark results",
        "",
        "Rendered by `python -m bench.report` from the CSVs here; medians of",
        "`triton.testing.do_bench`, correctness checked before timing. Newest row per (op, shape, provider).",
        "Shapes (d, F, B, k): " + ", ".join(f"{name} = {dims}" for name, dims in SHAPES.items()) + ";",
        "the others are named d<d>_F<F>_B<B>_k<k>. A table's rows may come from different runs (each row's",
        "commit is listed under its heading); each ratio is to the baseline of its row's own run where that",
        "run measured one.",
        "",
    ]
    groups: dict = {}
    for (gpu, op, _, _), row in latest.items():
        groups.setdefault((gpu, op), []).append(row)
    gpus_per_op: dict = {}
    for gpu, op in groups:
        gpus_per_op.setdefault(op, []).append(gpu)
    ops_per_gpu = {gpu: sum(g == gpu for g, _ in groups) for gpu, _ in groups}
    # the GPU that measured the most ops first (the others measured a few cases again)
    for (gpu, op), rows in sorted(groups.items(), key=lambda group: -ops_per_gpu[group[0][0]]):
        env = rows[-1]
        # An op measured on one GPU keeps its plain plot names; on several, each GPU's plots are its own.
        suffix = "" if len(gpus_per_op[op]) == 1 else f"-{gpu_slug(gpu)}"
        lines += [
            f"## {op} — {gpu}",
            "",
            *([OP_NOTES[op], ""] if op in OP_NOTES else []),
            f"torch {env['torch']}, triton {env['triton']}; {_runs(rows)}",
            "",
        ]
        lines += _table(op, rows, runs) + [""]
        _plot(op, rows, out_dir / f"{op}{suffix}.png")
        lines += [f"![{op}]({op}{suffix}.png)", ""]
        if op == "encode_topk" and _plot_ratio_against_k(rows, out_dir / f"encode_topk_vs_k{suffix}.png"):
            lines += [f"![encode_topk against k](encode_topk_vs_k{suffix}.png)", ""]
    (out_dir / "README.md").write_text("\n".join(lines))


if __name__ == "__main__":
    results = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results"
    render(next(iter(results.glob("*.csv")), results / "none.csv"), results)
