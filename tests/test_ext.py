"""The C++/CUDA death-statistics ops against torch.bincount and the reference, and the loading paths."""

import os
import subprocess
import sys

import pytest
import torch

import fastsae
from fastsae import functional as F
from fastsae import reference

from .utils import DEVICES


def _indices(kind, n_rows, k, n_features):
    if kind == "uniform":
        return torch.randint(0, n_features, (n_rows, k))
    if kind == "skewed":  # one feature in every row, the rest from a steep power law
        idx = (torch.rand(n_rows, k).pow(4) * n_features).long()
        idx[:, 0] = n_features // 2
        return idx
    raise ValueError(kind)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("kind", ["uniform", "skewed"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (37, 5, 3), (512, 32, 24576), (300, 64, 70001)], ids=str)
def test_fire_counts_matches_bincount(shape, kind, index_dtype, device):
    n_rows, k, n_features = shape
    idx = _indices(kind, n_rows, k, n_features).clamp_max(n_features - 1)
    vals = torch.rand(n_rows, k) - 0.2  # some selected features did not fire
    expected_all = torch.bincount(idx.flatten(), minlength=n_features)
    expected_fired = torch.bincount(idx[vals > 0], minlength=n_features)
    idx_d = idx.to(device=device, dtype=index_dtype)
    assert torch.equal(F.fire_counts(idx_d, n_features).cpu(), expected_all)
    for dtype in (torch.float32, torch.bfloat16):
        counts = F.fire_counts(idx_d, n_features, vals.to(device=device, dtype=dtype))
        assert counts.dtype == torch.int64 and counts.device.type == device
        assert torch.equal(counts.cpu(), expected_fired)


@pytest.mark.parametrize("device", DEVICES)
def test_fire_counts_empty_batch(device):
    idx = torch.empty(0, 8, dtype=torch.int32, device=device)
    assert F.fire_counts(idx, 10).tolist() == [0] * 10
    assert F.fire_counts_dense(torch.empty(0, 10, device=device)).tolist() == [0] * 10


def test_fire_counts_rejects_out_of_range_on_cpu():
    with pytest.raises(RuntimeError, match=r"idx holds 10 at flat position 3"):
        F.fire_counts(torch.tensor([[0, 1], [2, 10]]), 10)
    with pytest.raises(RuntimeError, match="idx holds -1"):
        F.fire_counts(torch.tensor([-1]), 10)
    with pytest.raises(ValueError, match="idx must be int32 or int64"):
        F.fire_counts(torch.tensor([1.0]), 10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (37, 13), (256, 24576), (129, 1001)], ids=str)
def test_fire_counts_dense_matches_reference(shape, dtype, device):
    acts = (torch.randn(shape) - 0.5).relu().to(device=device, dtype=dtype)
    acts[:, 0] = 1.0  # a feature that fires on every token
    counts = F.fire_counts_dense(acts)
    assert torch.equal(counts.cpu(), (acts.cpu().float() > 0).sum(0))
    # A non-contiguous view is handled too.
    assert torch.equal(F.fire_counts_dense(acts.T.contiguous().T).cpu(), counts.cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_update_since_fired_and_dead_mask(device):
    since = torch.randint(0, 1000, (513,), device=device)
    counts = torch.randint(0, 3, (513,), device=device)
    expected = reference.update_since_fired(since, counts, 77)
    F.update_since_fired_(since, counts, 77)
    assert torch.equal(since, expected)
    assert torch.equal(F.dead_mask(since, 500), reference.dead_mask(since, 500))


@pytest.mark.parametrize("device", DEVICES)
def test_ops_compile_fullgraph(device):
    def stats(idx, vals, acts, since):
        counts = F.fire_counts(idx, 100, vals) + F.fire_counts_dense(acts)
        F.update_since_fired_(since, counts, idx.shape[0])
        return F.dead_mask(since, 10), counts

    args = (
        torch.randint(0, 100, (20, 4), device=device, dtype=torch.int32),
        torch.rand(20, 4, device=device),
        torch.rand(20, 100, device=device) - 0.5,
        torch.randint(0, 20, (100,), device=device),
    )
    eager_since, compiled_since = args[3].clone(), args[3].clone()
    expected = stats(*args[:3], eager_since)
    actual = torch.compile(stats, fullgraph=True)(*args[:3], compiled_since)
    assert all(torch.equal(a, e) for a, e in zip(actual, expected))
    assert torch.equal(compiled_since, eager_since)


def test_ext_info_reports_the_active_path():
    info = fastsae.ext_info()
    assert info["backend"] in ("prebuilt", "jit", "python")
    assert info["cuda"] == (info["backend"] != "python" and torch.cuda.is_available())


def _run_with_backend(backend: str) -> str:
    code = (
        "import torch, fastsae; from fastsae import functional as F;"
        "print(fastsae.ext_info()['backend']);"
        "print(F.fire_counts(torch.tensor([[1, 2], [2, 3]]), 5).tolist())"
    )
    env = {**os.environ, "FASTSAE_EXT": backend}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout


def test_python_fallback_computes_the_same():
    assert _run_with_backend("python").split() == ["python", "[0,", "1,", "2,", "1,", "0]"]


@pytest.mark.slow
def test_jit_build_computes_the_same():
    """The ninja JIT path builds csrc/ from source (cached) and registers the same ops."""
    assert _run_with_backend("jit").split() == ["jit", "[0,", "1,", "2,", "1,", "0]"]
