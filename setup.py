"""Builds fastsae and, when torch is importable at build time, its C++/CUDA extension `fastsae._C`.

Install torch first and build without isolation (`pip install --no-build-isolation -e .`): then the
extension is compiled ahead of time, as a CppExtension on a CPU-only torch and as a CUDAExtension
(sm_90 machine code plus PTX for newer GPUs) when torch has CUDA and nvcc is found. Without torch,
or with FASTSAE_NO_EXT=1, the package installs without it and `fastsae._ext` builds it on first use
with ninja, or falls back to the pure-PyTorch implementation with a warning.

Where CUTLASS's headers are found as well (the `cutlass` extra, PyPI nvidia-cutlass, or a checkout named
by FASTSAE_CUTLASS_DIR), a CUDA build also compiles `fastsae._cutlass` (csrc/cutlass, sm_90a: Hopper only),
the GEMMs behind `fastsae.ops.cutlass_gemm` (nine kernels) and their TopK select, each GEMM and each of the
select's group widths a translation unit of its own: a few minutes more to build, in parallel where ninja has
the cores.
"""

import glob
import importlib.util
import os

from setuptools import setup


def cutlass_source_dir():
    """A CUTLASS source tree (include/ and tools/util/include/): FASTSAE_CUTLASS_DIR, or the one that the
    nvidia-cutlass package ships in cutlass_library/source; None where there is neither."""
    if os.environ.get("FASTSAE_CUTLASS_DIR"):
        return os.environ["FASTSAE_CUTLASS_DIR"]
    spec = importlib.util.find_spec("cutlass_library")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    source = os.path.join(list(spec.submodule_search_locations)[0], "source")
    return source if os.path.isdir(os.path.join(source, "include", "cutlass")) else None


def optional_cutlass(build_ext):
    """`build_ext` under which a failure to build the experimental `fastsae._cutlass` is a warning: the
    package and its main extension install without it."""

    class BuildExtension(build_ext):
        def build_extension(self, ext):
            if ext.name != "fastsae._cutlass":
                return super().build_extension(ext)
            try:
                super().build_extension(ext)
            except Exception as error:  # any compiler or ninja failure
                print(f"warning: the experimental fastsae._cutlass was not built: {error}")

    return BuildExtension


def extension_modules():
    if os.environ.get("FASTSAE_NO_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return [], {}

    sources = ["csrc/fastsae.cpp"]
    include_dirs = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")]
    cxx_flags = ["-O3", "-std=c++17"]
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc_flags = [
            "-O3",
            "-std=c++17",
            "-gencode=arch=compute_90,code=sm_90",
            "-gencode=arch=compute_90,code=compute_90",
        ]
        ext = cpp_extension.CUDAExtension(
            "fastsae._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        )
        cutlass = cutlass_source_dir()
        if cutlass is not None:
            cutlass_ext = cpp_extension.CUDAExtension(
                "fastsae._cutlass",
                sorted(glob.glob("csrc/cutlass/*.cu")),
                include_dirs=[os.path.join(cutlass, "include"), os.path.join(cutlass, "tools", "util", "include")],
                extra_compile_args={
                    "cxx": cxx_flags,
                    # wgmma and TMA need sm_90a's architecture-specific features; CUTLASS needs the half and
                    # bfloat16 operators that torch's default flags switch off.
                    "nvcc": [
                        "-O3",
                        "-std=c++17",
                        "-gencode=arch=compute_90a,code=sm_90a",
                        "--expt-relaxed-constexpr",
                        "-DNDEBUG",
                        "-U__CUDA_NO_HALF_OPERATORS__",
                        "-U__CUDA_NO_HALF_CONVERSIONS__",
                        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                        "-U__CUDA_NO_HALF2_OPERATORS__",
                    ],
                },
            )
            return [ext, cutlass_ext], {"build_ext": optional_cutlass(cpp_extension.BuildExtension)}
    else:
        ext = cpp_extension.CppExtension(
            "fastsae._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx_flags}
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
