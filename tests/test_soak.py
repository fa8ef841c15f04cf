"""bench/soak.py (the GPU script's determinism and 20,000-step soak run): a smoke run on the CPU, and
its verdict on records that show each failure it must catch."""

import json

from bench import soak


def test_soak_smoke_run_on_cpu(tmp_path):
    soak.main(["--device", "cpu", "--shape", "tiny", "--steps", "30", "--every", "10",
               "--determinism-steps", "6", "--out", str(tmp_path)])  # fmt: skip
    summary = json.loads((tmp_path / "soak.json").read_text())
    assert summary["determinism"]["identical"] and summary["determinism"]["tensors"] > 10
    assert [w["step"] for w in summary["windows"]] == [10, 20, 30]
    # Step times on a shared CPU may jitter past the slowdown bound; nothing else may fail.
    assert all(failure.startswith("steps slowed") for failure in summary["failures"]), summary["failures"]


def _windows(allocated=(100.0, 100.0, 100.0), ms=(9.0, 5.0, 5.0), compiled=(7, 7, 7)):
    return [{"step": 1000 * (i + 1), "allocated_mb": a, "ms_per_step": t, "kernels_compiled": c}
            for i, (a, t, c) in enumerate(zip(allocated, ms, compiled))]  # fmt: skip


def test_soak_verdict_catches_each_failure():
    same = {"identical": True, "differing_tensors": 0}
    assert soak.verdict(same, _windows()) == []  # the first window's compile time and warm-up are allowed
    assert "differ in 3 tensors" in soak.verdict({"identical": False, "differing_tensors": 3}, _windows())[0]
    assert "memory grew" in soak.verdict(same, _windows(allocated=(100.0, 100.0, 108.0)))[0]
    assert "1 kernels compiled after step 2000" in soak.verdict(same, _windows(compiled=(7, 7, 8)))[0]
    assert "steps slowed" in soak.verdict(same, _windows(ms=(9.0, 5.0, 6.5)))[0]
