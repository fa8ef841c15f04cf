"""The GPU script's helpers run and check themselves: the compute-sanitizer driver over every Triton
kernel (at its smallest shape here; the GPU script runs all of them under the sanitizers), the
encode and training-step profiles, the kernels for Nsight Compute and the summary of its source page,
and the A/B of a switch (at small shapes)."""

import csv
from types import SimpleNamespace

import pytest
from torch.autograd import DeviceType

from bench import ab_step, harness, ncu_encode, ncu_sass, profile_encode, profile_train, sanitize_kernels
from bench import run as bench_run
from bench.harness import Recorder
from fastsae.ops import auxk, cutlass_gemm, encode, launch


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
    assert "back to back" in printed and "host's time per call" in printed and "the public op" in printed
    assert "the host's time of 20 eager calls" in printed and "tottime" in printed
    assert {"row_filter": "row kernel (the rest)", "filter": "filter GEMM, no survivor"}[route] in printed


@pytest.mark.gpu
def test_profile_batchtopk_runs(capsys):
    """The sparse BatchTopK encode's breakdown: each part timed against the GEMM."""
    profile_encode.profile_batchtopk("d384_F4096_B1024_k32")
    printed = capsys.readouterr().out
    for part in ("TopK encode of 128 candidates a row", "select among the candidates", "eager dense BatchTopK"):
        assert part in printed


@pytest.mark.gpu
def test_ncu_encode_runs_its_kernels_once_checked(capsys):
    """The kernels for Nsight Compute run (outside ncu the profiler range is empty) and check the codes."""
    if not cutlass_gemm.available():
        pytest.skip("fastsae's CUTLASS extension is not built (the `cutlass` extra)")
    assert ncu_encode.main(["--shape", "d384_F4096_B1024_k32"]) == 0
    assert "warp select, cuBLAS" in capsys.readouterr().out
    assert ncu_encode.main(["--shape", "d384_F4096_B1024_k32", "--filter-gemm"]) == 0  # buffers checked
    assert "filter GEMMs fastsae_pingpong_128x128, fastsae_cooperative_128x128, fastsae_triton, cuBLAS" in (
        capsys.readouterr().out
    )


def test_ncu_sass_groups_each_kernels_lines_into_blocks(tmp_path):
    """Nsight Compute's source page (two kernels, as ncu writes it): each kernel's total and per unit, and
    its runs of lines executed equally often by equally many threads, most instructions first."""
    header = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed",
              "Avg. Threads Executed"]  # fmt: skip
    lines = {
        "select": [["0x10", "LDG R1", "6", "8", "32"], ["0x20", "@P0 IADD R1", "2", "8", "32"],
                   ["0x30", "ATOMS.ADD R2", "12", "40", "1"], ["0x40", "BRA 0x30", "0", "40", "1"],
                   ["0x50", "EXIT", "0", "8", "32"]],
        "gemm": [["0x10", "HGMMA", "1", "1,000", "32"]],
    }  # fmt: skip
    path = tmp_path / "source.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        for name, rows in lines.items():
            writer.writerows([["Kernel Name", name], header, *rows])
    found = ncu_sass.kernels(path)
    assert list(found) == ["select", "gemm"] and len(found["select"]) == 5
    grouped = ncu_sass.blocks(found["select"])
    assert [(b.address, b.instructions, b.threads, b.opcodes) for b in grouped] == [
        ("0x10", 16.0, 32.0, ["LDG", "IADD"]), ("0x30", 80.0, 1.0, ["ATOMS.ADD", "BRA"]), ("0x50", 8.0, 32.0, ["EXIT"])
    ]  # fmt: skip
    printed = ncu_sass.report(path, per=8, top=2)
    assert "104 warp instructions executed, 13.0 per unit" in printed and "1,000 warp instructions" in printed
    assert printed.index("ATOMS.ADD BRA") < printed.index("LDG IADD") and "EXIT" not in printed  # top 2 of 3


@pytest.mark.gpu
def test_profile_train_reports_launches_and_host_time(capsys):
    eager, graph, *compiled = (
        profile_train.profile_step("d128_F2048_B1024_k16", True, 5, mode)
        for mode in ("eager", "graph", "compile", "module_compile")
    )
    for step in (eager, graph, *compiled):
        assert step["kernels"] > 10 and step["kernel_ms"] > 0 and 0 <= step["host_share"] < 1
    # Captured, the step is one graph launch plus the few small kernels run outside it (the dead-feature
    # count, the bench's own bookkeeping); eagerly, one launch per kernel.
    assert graph["launches"] <= eager["launches"] / 4
    with_saeadam = profile_train.profile_step("d128_F2048_B1024_k16", True, 5, "graph", fused_optimizer=True)
    assert with_saeadam["launches"] <= eager["launches"] / 4
    printed = capsys.readouterr().out
    assert "host launches per step" in printed and "captured graph, SAEAdam" in printed
    assert "forward through torch.compile:" in printed and "forward through sae.compile:" in printed
    with pytest.raises(ValueError, match="mode 'captured'"):
        profile_train.profile_step("d128_F2048_B1024_k16", True, 5, "captured")


def test_profile_train_divides_kernel_time_by_the_steps():
    """The per-step breakdown: device events only, their time and launches divided by the steps, the
    longest first."""
    events = [
        SimpleNamespace(key="gemm", device_type=DeviceType.CUDA, self_device_time_total=900.0, count=6),
        SimpleNamespace(key="aten::mm", device_type=DeviceType.CPU, self_device_time_total=900.0, count=6),
        SimpleNamespace(key="sort", device_type=DeviceType.CUDA, self_device_time_total=1200.0, count=3),
    ]
    prof = SimpleNamespace(key_averages=lambda: events)
    assert profile_train.kernels_per_step(prof, 3) == [("sort", 400.0, 1.0), ("gemm", 300.0, 2.0)]


def test_ab_step_parses_switches():
    assert ab_step.parse_switch("fastsae.ops.auxk.ROW_TOPK=True,False") == (auxk, "ROW_TOPK", [True, False])
    for spec, message in [
        ("fastsae.ops.auxk.ROW_TOPK", "expected module.NAME"),
        ("fastsae.ops.auxk.NO_SUCH_SWITCH=1", "has no switch"),
        ("fastsae.ops.auxk.ROW_TOPK=on", "Python literals"),
    ]:
        with pytest.raises(ValueError, match=message):
            ab_step.parse_switch(spec)


def test_ab_step_holds_switches_with_one_value():
    """`--with` takes one value per switch: more is an error before anything runs."""
    with pytest.raises(SystemExit):
        ab_step.main(
            [
                "fastsae.ops.auxk.ROW_TOPK=True",
                "--csv",
                "x.csv",
                "--with",
                "fastsae.ops.auxk.CODES_WITHOUT_SELECTION=True,False",
            ]
        )


def test_ab_step_takes_the_train_benchmarks_steps():
    """`--steps` names steps of bench_train.FASTSAE_STEPS; another name is an error before anything runs."""
    with pytest.raises(SystemExit):
        ab_step.main(["fastsae.ops.auxk.ROW_TOPK=True", "--csv", "x.csv", "--steps", "fastsae,fastsae_eager"])


@pytest.mark.gpu
def test_ab_step_records_each_value(tmp_path):
    """A row per value, step and round, and the GEMM's (with the tuner's picks made again under each
    value), with a held switch named in the providers and a step other than the captured SAEAdam one
    named first; both switches are restored after."""
    csv_path, original, original_shortcut = tmp_path / "ab.csv", auxk.ROW_TOPK, auxk.CODES_WITHOUT_SELECTION
    switch = ab_step.parse_switch("fastsae.ops.auxk.ROW_TOPK=True,False")
    held = [ab_step.parse_switch(f"fastsae.ops.auxk.CODES_WITHOUT_SELECTION={not original_shortcut}")]
    steps = (ab_step.DEFAULT_STEP, "fastsae")
    ab_step.run(Recorder(csv_path), switch, ["d128_F8192_B1024_k16"], 1, retune=True, held=held, steps=steps)
    with open(csv_path, newline="") as f:
        providers = [row["provider"] for row in csv.DictReader(f)]
    held_name = f"CODES_WITHOUT_SELECTION={not original_shortcut}"
    assert providers == [
        f"ROW_TOPK=True with {held_name}", f"fastsae ROW_TOPK=True with {held_name}",
        f"ROW_TOPK=False with {held_name}", f"fastsae ROW_TOPK=False with {held_name}", "cublas_gemm",
    ]  # fmt: skip
    assert auxk.ROW_TOPK is original and auxk.CODES_WITHOUT_SELECTION is original_shortcut


def test_bench_providers_filter(monkeypatch):
    """bench.run --providers: a family runs only the named providers; unset, every one. Every name a family
    offers is noted, so that bench.run can name a selected provider none offered."""
    monkeypatch.setattr(harness, "OFFERED", set())
    providers = {"fastsae": 1, "torch": 2, "sparsify": 3}
    assert harness.selected(providers) == providers
    monkeypatch.setattr(harness, "PROVIDERS", {"torch", "compile"})
    assert harness.selected(providers) == {"torch": 2}
    assert harness.OFFERED == {"fastsae", "torch", "sparsify"}


def test_a_failed_shape_leaves_the_other_shapes_rows(monkeypatch, capsys):
    """harness.each_shape: a family's failure at one shape (a memory bound, say) is printed and listed for
    bench.run's summary, and the family goes on to its next shape."""
    monkeypatch.setattr(harness, "FAILED_SHAPES", [])
    ran = []
    for shape in ("gpt2", "llama8b", "af3"):
        with harness.each_shape(shape):
            if shape == "llama8b":
                raise AssertionError("fastsae encode_topk llama8b: 1073.5 MB")
            ran.append(shape)
    assert ran == ["gpt2", "af3"]
    assert harness.FAILED_SHAPES == ["llama8b"]
    assert "AssertionError: fastsae encode_topk llama8b: 1073.5 MB" in capsys.readouterr().err


def test_bench_shapes_filter(monkeypatch, capsys):
    """bench.run --shapes: a family runs only the named shapes, its own beyond harness.SHAPES (the encode
    sweep's) included, so one case can be timed alone; unset, every one. A name that is neither one of
    SHAPES nor of a selected family's EXTRA_SHAPES is a usage error before anything runs."""
    shapes = {"gpt2": harness.SHAPES["gpt2"], "d768_F24576_B8192_k512": (768, 24576, 8192, 512)}
    assert harness.selected_shapes(shapes) == shapes
    monkeypatch.setattr(harness, "SHAPE_NAMES", {"d768_F24576_B8192_k512", "af3"})
    assert harness.selected_shapes(shapes) == {"d768_F24576_B8192_k512": (768, 24576, 8192, 512)}
    assert harness.shape_dims("d768_F24576_B8192_k512") == (768, 24576, 8192, 512)
    for bad in ("gpt3", "d768_F24576_B8192", "d768_F24576_B8192_kx"):
        with pytest.raises(ValueError, match="nor a name d<d>_F<F>_B<B>_k<k>"):
            harness.shape_dims(bad)
    # the sweep's k = 512 case is the encode family's, not the train family's; k = 1000 nobody's
    for argv in (["--shapes", "gpt2,gpt3"], ["--only", "train", "--shapes", "d768_F24576_B8192_k512"],
                 ["--shapes", "d768_F24576_B8192_k1000"]):  # fmt: skip
        with pytest.raises(SystemExit):
            bench_run.main(argv)
        assert "unknown shapes" in capsys.readouterr().err
