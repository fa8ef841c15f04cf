// Compile-check shim: CPU-only torch wheels ship c10/cuda headers but not this file, which a CUDA build
// of torch generates with CMake. Its content there is this one define. Used only by .ci/run's nvcc check.
#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS
