"""The GPU script's helpers run and check themselves: the compute-sanitizer driver over every Triton
kernel (at its smallest shape here; the GPU script runs all of them under the sanitizers)."""

import pytest

from bench import sanitize_kernels


@pytest.mark.gpu
def test_sanitize_kernels_runs_and_matches():
    sanitize_kernels.run_shape("small", *sanitize_kernels.SHAPES["small"])
