"""The GPU script's helpers run and check themselves: the compute-sanitizer driver over every Triton
kernel (at its smallest shape here; the GPU script runs all of them under the sanitizers) and the
encode and training-step profiles (at small shapes)."""

import pytest

from bench import profile_encode, profile_train, sanitize_kernels
from fastsae.ops import encode, launch


@pytest.mark.gpu
def test_sanitize_kernels_runs_and_matches():
    sanitize_kernels.run_shape("small", *sanitize_kernels.SHAPES["small"])


@pytest.mark.gpu
@pytest.mark.parametrize("route", ["row_filter", "filter"])
def test_profile_encode_runs(capsys, monkeypatch, route):
    """The profile's breakdown of the route the tuner picks (here forced: each route's own parts)."""
    picked = next(r for r in encode.topk_routes(32, 0, 4096) if r[0] == route)
    monkeypatch.setattr(launch, "tuned_choices", lambda *key: [picked])
    profile_encode.profile_encode("d384_F4096_B1024_k32", rows=5)
    printed = capsys.readouterr().out
    assert "back to back" in printed and "host's time per call" in printed
    assert {"row_filter": "row kernel (the rest)", "filter": "filter GEMM, no survivor"}[route] in printed


@pytest.mark.gpu
def test_profile_train_reports_launches_and_host_time(capsys):
    eager, graph = (profile_train.profile_step("d128_F2048_B1024_k16", True, 5, graph) for graph in (False, True))
    for step in (eager, graph):
        assert step["kernels"] > 10 and step["kernel_ms"] > 0 and 0 <= step["host_share"] < 1
    # Captured, the step is one graph launch plus the few small kernels run outside it (the dead-feature
    # count, the bench's own bookkeeping); eagerly, one launch per kernel.
    assert graph["launches"] <= eager["launches"] / 4
    with_saeadam = profile_train.profile_step("d128_F2048_B1024_k16", True, 5, graph=True, fused_optimizer=True)
    assert with_saeadam["launches"] <= eager["launches"] / 4
    printed = capsys.readouterr().out
    assert "host launches per step" in printed and "captured graph, SAEAdam" in printed
