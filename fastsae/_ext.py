"""Loads the C++/CUDA extension that implements the death-statistics ops (`fastsae::fire_counts`, ...).

Three paths, tried in order, the first that works wins:
1. "prebuilt": `fastsae._C`, compiled by setup.py at install time;
2. "jit": compiled from csrc/ on first use with torch.utils.cpp_extension + ninja (cached under
   TORCH_EXTENSIONS_DIR), when the sources are there (an editable or source install);
3. "python": the same schemas registered from Python with fastsae.reference as the implementation,
   after one warning saying why the compiled paths failed.
`fastsae.ext_info()` says which path is active. FASTSAE_EXT=prebuilt|jit|python forces one path (no
fallback, no warning). Fake (meta) impls are registered here for all paths.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor

from . import reference

CSRC = Path(__file__).resolve().parent.parent / "csrc"

# The schemas, as csrc/fastsae.cpp defines them; used only by the Python fallback.
SCHEMAS = {
    "fire_counts": "fire_counts(Tensor idx, int n_features, Tensor? vals=None) -> Tensor",
    "fire_counts_dense": "fire_counts_dense(Tensor acts) -> Tensor",
    "update_since_fired": "update_since_fired(Tensor(a!) tokens_since_fired, Tensor counts, int n_tokens) -> ()",
    "dead_mask": "dead_mask(Tensor tokens_since_fired, int threshold) -> Tensor",
}

_info: dict = {}


def _load_prebuilt() -> None:
    spec = importlib.util.find_spec("fastsae._C")
    if spec is None or spec.origin is None:
        raise ImportError("fastsae._C was not built at install time")
    torch.ops.load_library(spec.origin)


def _load_jit() -> None:
    from torch.utils import cpp_extension

    sources = [CSRC / "fastsae.cpp"]
    if not sources[0].exists():
        raise FileNotFoundError(f"no C++ sources at {CSRC} (not a source checkout)")
    with_cuda = torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None
    if with_cuda:
        sources += sorted((CSRC / "cuda").glob("*.cu"))
    cpp_extension.load(
        name="fastsae_C_cuda" if with_cuda else "fastsae_C_cpu",
        sources=[str(s) for s in sources],
        extra_include_paths=[str(CSRC)],
        extra_cflags=["-O3", "-std=c++17"],
        extra_cuda_cflags=["-O3", "-std=c++17", "-gencode=arch=compute_90,code=sm_90"],
        is_python_module=False,
        verbose=False,
    )


def _update_since_fired_python(tokens_since_fired: Tensor, counts: Tensor, n_tokens: int) -> None:
    tokens_since_fired.copy_(reference.update_since_fired(tokens_since_fired, counts, n_tokens))


def _register_python() -> None:
    library = torch.library.Library("fastsae", "FRAGMENT")
    impls = {
        "fire_counts": reference.fire_counts,
        "fire_counts_dense": reference.fire_counts_dense,
        "update_since_fired": _update_since_fired_python,
        "dead_mask": reference.dead_mask,
    }
    for name, schema in SCHEMAS.items():
        library.define(schema)
        library.impl(name, impls[name], "CompositeExplicitAutograd")
    _info["library"] = library  # a Library unregisters its ops when garbage-collected


def _register_fakes() -> None:
    @torch.library.register_fake("fastsae::fire_counts")
    def _(idx: Tensor, n_features: int, vals: Tensor | None = None) -> Tensor:
        return idx.new_empty(n_features, dtype=torch.int64)

    @torch.library.register_fake("fastsae::fire_counts_dense")
    def _(acts: Tensor) -> Tensor:
        return acts.new_empty(acts.shape[1], dtype=torch.int64)

    @torch.library.register_fake("fastsae::update_since_fired")
    def _(tokens_since_fired: Tensor, counts: Tensor, n_tokens: int) -> None:
        return None

    @torch.library.register_fake("fastsae::dead_mask")
    def _(tokens_since_fired: Tensor, threshold: int) -> Tensor:
        return torch.empty_like(tokens_since_fired, dtype=torch.bool)


def load() -> None:
    """Makes the fastsae::fire_counts family available, once per process."""
    if _info:
        return
    loaders = {"prebuilt": _load_prebuilt, "jit": _load_jit, "python": _register_python}
    forced = os.environ.get("FASTSAE_EXT")
    if forced is not None and forced not in loaders:
        raise ValueError(f"FASTSAE_EXT must be one of {sorted(loaders)}, got {forced!r}")
    errors = []
    for name in [forced] if forced else ["prebuilt", "jit"]:
        try:
            loaders[name]()
        except Exception as error:  # any build or load failure moves on to the next path
            if forced:
                raise
            errors.append(f"{name}: {type(error).__name__}: {str(error).strip().splitlines()[-1]}")
            continue
        backend = name
        break
    else:
        warnings.warn(
            "fastsae: the C++/CUDA extension could not be loaded or built, so fire counts and death "
            "statistics use the slower pure-PyTorch implementation. Reasons: " + "; ".join(errors),
            RuntimeWarning,
            stacklevel=3,
        )
        _register_python()
        backend = "python"
    _register_fakes()
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("fastsae::fire_counts", "CUDA")
    _info.update(backend=backend, cuda=backend != "python" and has_cuda, errors=errors)


def ext_info() -> dict:
    """Which implementation of the C++ ops is active: {'backend': 'prebuilt' | 'jit' | 'python',
    'cuda': whether CUDA kernels are registered, 'errors': why earlier paths were skipped}."""
    load()
    return {key: value for key, value in _info.items() if key != "library"}
