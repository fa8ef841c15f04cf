"""bench.report renders the newest row per (op, shape, provider) and takes each ratio against the
baseline of its row's own run (commit and date) where that run measured one, else the newest baseline."""

import csv

from bench import report
from bench.harness import COLUMNS


def _row(provider, median_ms, sha, date, shape="gpt2", op="train_step_ab"):
    env = {"gpu": "NVIDIA H200", "torch": "2.11.0", "triton": "3.6.0", "git_sha": sha, "date": date}
    timing = {"median_ms": median_ms, "p20_ms": median_ms, "p80_ms": median_ms, "peak_mem_mb": 1.0}
    return {"op": op, "shape": shape, "provider": provider, **timing, **env}


def _table_line(readme: str, shape: str) -> list[str]:
    line = next(line for line in readme.splitlines() if line.startswith(f"| {shape} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_ratios_use_their_own_runs_baseline(tmp_path):
    rows = [
        _row("A=1", 2.0, "aaaaaaa", "2026-12-01"),  # an earlier A/B whose run measured the GEMM at 0.5
        _row("cublas_gemm", 0.5, "aaaaaaa", "2026-12-01"),
        _row("B=1", 1.6, "bbbbbbb", "2026-12-02"),  # a later one, GEMM 0.4: the newest GEMM row
        _row("cublas_gemm", 0.4, "bbbbbbb", "2026-12-02"),
        _row("C=1", 3.0, "ccccccc", "2026-12-03"),  # a run without a GEMM row: the newest one counts
    ]
    path = tmp_path / "h200.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    report.render(path, tmp_path)
    readme = (tmp_path / "README.md").read_text()
    # Columns: shape, the four providers' ms (sorted: A=1, B=1, C=1, cublas_gemm), then the three ratios.
    cells = _table_line(readme, "gpt2")
    assert cells[4].startswith("0.4000"), cells  # the newest GEMM row is the one shown
    assert cells[5:8] == ["4.00x", "4.00x", "7.50x"], cells


def test_an_op_measured_on_several_gpus_gets_a_plot_per_gpu(tmp_path):
    """Each GPU's rows of an op are a section and a plot of their own (one GPU's plot no longer
    overwrites the other's); an op measured on one GPU keeps its plain plot name; the GPU that measured
    the most ops comes first."""
    h100 = [{**_row("fastsae", 2.0, "bbbbbbb", "2026-12-05"), "gpu": "NVIDIA H100 80GB HBM3"}]
    h200 = [
        _row("fastsae", 1.0, "aaaaaaa", "2026-12-04"),
        _row("fastsae", 3.0, "aaaaaaa", "2026-12-04", op="fire_counts"),
    ]
    for name, rows in (("h100-80gb-hbm3.csv", h100), ("h200.csv", h200)):
        with open(tmp_path / name, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    report.render(tmp_path / "h200.csv", tmp_path)
    readme = (tmp_path / "README.md").read_text()
    headings = [line for line in readme.splitlines() if line.startswith("## ")]
    assert headings == [
        "## train_step_ab — NVIDIA H200",
        "## fire_counts — NVIDIA H200",
        "## train_step_ab — NVIDIA H100 80GB HBM3",
    ], headings
    plots = ["train_step_ab-h200.png", "fire_counts.png", "train_step_ab-h100-80gb-hbm3.png"]
    assert all(f"]({plot})" in readme for plot in plots), readme
    assert sorted(path.name for path in tmp_path.glob("*.png")) == sorted(plots)
