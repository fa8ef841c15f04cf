"""Builds fastsae and, when torch is importable at build time, its C++/CUDA extension `fastsae._C`.

Install torch first and build without isolation (`pip install --no-build-isolation -e .`): then the
extension is compiled ahead of time, as a CppExtension on a CPU-only torch and as a CUDAExtension
(sm_90 machine code plus PTX for newer GPUs) when torch has CUDA and nvcc is found. Without torch,
or with FASTSAE_NO_EXT=1, the package installs without it and `fastsae._ext` builds it on first use
with ninja, or falls back to the pure-PyTorch implementation with a warning.
"""

import glob
import os

from setuptools import setup


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
    else:
        ext = cpp_extension.CppExtension(
            "fastsae._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx_flags}
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
