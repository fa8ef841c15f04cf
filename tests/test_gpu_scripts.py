"""The GPU script's helpers run and check themselves: the compute-sanitizer driver over every Triton
kernel (at its smallest shape here; the GPU script runs all of them under the sanitizers) and the
encode profile (at a small shape)."""

import pytest

from bench import profile_encode, sanitize_kernels


@pytest.mark.gpu
def test_sanitize_kernels_runs_and_matches():
    sanitize_kernels.run_shape("small", *sanitize_kernels.SHAPES["small"])


@pytest.mark.gpu
def test_profile_encode_runs(capsys):
    profile_encode.profile_encode("d384_F4096_B1024_k32", rows=5)
    assert "filter GEMM, no survivor" in capsys.readouterr().out
