import os
import zlib

import pytest
import torch

from fastsae.ops import scatter

HAS_CUDA = torch.cuda.is_available()

# Compiled graphs embed the custom ops' schemas; an on-disk cache written by another checkout of
# fastsae (another branch) would replay a stale one. The tests compile from scratch.
torch._inductor.config.fx_graph_cache = False
torch._functorch.config.enable_autograd_cache = False

# Tests check each kernel's first (default) configuration instead of autotuning every new shape, which
# would compile every candidate; the benchmarks tune and check the tuned configuration before timing.
os.environ.setdefault("FASTSAE_AUTOTUNE", "0")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_interpret = pytest.mark.skip(reason="Triton interpreter tests run with TRITON_INTERPRET=1")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "interpret" in item.keywords and os.environ.get("TRITON_INTERPRET") != "1":
            item.add_marker(skip_interpret)


@pytest.fixture(autouse=True)
def _seed(request):
    """Every test draws fresh data, but reproducibly from its own name."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def fresh_dynamo():
    """A compiling test starts and ends with Dynamo's caches empty: what an earlier test compiled in the
    same process (a dimension Dynamo has since made dynamic) would change what this one compiles."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def poison_empty(monkeypatch):
    """Tensor.new_empty (how the kernel launchers allocate outputs and scratch) returns NaN-filled
    floats and -1-filled integers, so any element a kernel leaves unwritten fails the comparison."""
    original = torch.Tensor.new_empty

    def poisoned(self, *size, **kwargs):
        out = original(self, *size, **kwargs)
        return out.fill_(float("nan") if out.is_floating_point() else -1)

    monkeypatch.setattr(torch.Tensor, "new_empty", poisoned)


@pytest.fixture(params=["atomic", "blocked", "deterministic"])
def deterministic(request, monkeypatch):
    """Runs a test with each route of the per-feature sums (fastsae.ops.scatter): the atomic and
    blocked ones (FASTSAE_FEATURE_SUMS), and the blocked one that torch's deterministic algorithms
    select; yields whether the results must be bit-reproducible."""
    monkeypatch.setattr(scatter, "ROUTE", "atomic" if request.param == "deterministic" else request.param)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(request.param == "deterministic")
    yield request.param != "atomic"
    torch.use_deterministic_algorithms(previous)


@pytest.fixture
def hub_repository(tmp_path, monkeypatch):
    """A Hub repository as a local folder: huggingface_hub.snapshot_download is replaced by a copy of the
    files its allow_patterns match (fnmatch, as the Hub filters them) into a fresh snapshot folder.
    Gives the repository's folder (`path`) and the paths downloaded (`downloaded`)."""
    import fnmatch
    import shutil
    from types import SimpleNamespace

    import huggingface_hub

    repository = SimpleNamespace(path=tmp_path / "repository", downloaded=[])
    repository.path.mkdir()

    def snapshot_download(repo_id, revision=None, allow_patterns=None):
        assert repo_id == "org/saes" and revision in (None, "v1")
        snapshot = tmp_path / f"snapshot{len(list(tmp_path.glob('snapshot*')))}"
        snapshot.mkdir()
        for file in repository.path.rglob("*"):
            relative = file.relative_to(repository.path).as_posix()
            if file.is_file() and any(fnmatch.fnmatch(relative, pattern) for pattern in allow_patterns):
                (snapshot / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(file, snapshot / relative)
                repository.downloaded.append(relative)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return repository
