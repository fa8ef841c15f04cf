"""Column sums (fastsae/ops/columns.py) against fp64 torch sums, the masked variant's in-place zeroing
against torch.where, and the repeatability of both."""

import pytest
import torch

from fastsae.ops import columns

from .utils import KERNEL_DEVICES, assert_close

SHAPES = [(1, 1), (37, 300), (700, 129)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_column_sums(device, dtype):
    """Contiguous, transposed and column-sliced matrices, the same bits on a second call, zeros for no rows."""
    for B, n in SHAPES:
        values = torch.randn(B, n, device=device).to(dtype) + 3  # an offset: sums that grow with B
        for view in (values, values.t().contiguous().t(), torch.cat([values, values], 1)[:, 1 : n + 1]):
            got = columns.column_sums(view)
            assert got.dtype == torch.float32 and got.shape == (n,)
            assert_close(got, view.double().sum(0), torch.float32, f"column sums {B}x{n}")
            assert torch.equal(got, columns.column_sums(view)), "not repeatable"
    assert torch.equal(columns.column_sums(torch.ones(0, 5, device=device)), torch.zeros(5, device=device))


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_masked_column_sums(device):
    """Entries whose code is zero, negative or NaN become zeros in place (NaN values where the code is
    positive stay); the sums are those of the result."""
    for B, n in SHAPES:
        values = torch.randn(B, n, device=device).bfloat16()
        codes = torch.randn(B, n, device=device).relu_().bfloat16()
        codes[0, 0] = float("nan")
        expected = torch.where(codes > 0, values, 0)
        got = columns.masked_column_sums_(values, codes)
        assert torch.equal(values, expected), "the masked entries"
        assert_close(got, expected.double().sum(0), torch.float32, f"masked column sums {B}x{n}")
    with pytest.raises(ValueError, match="differ in shape"):
        columns.masked_column_sums_(torch.zeros(2, 3, device=device), torch.zeros(3, 2, device=device))
