"""Column sums (fastsae/ops/columns.py): the plain and AuxK's masked sums against fp64 torch sums, the
masked sums' in-place zeroing against torch.where, their repeatability, and the shapes they take."""

import pytest
import torch

from fastsae.ops import columns

from .utils import KERNEL_DEVICES, assert_close

SHAPES = [(1, 1), (37, 300), (700, 129)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_column_sums(device, dtype):
    """scale * the sums over the rows (an outlier column included), the same bits on a second call, the
    input untouched; contiguous, transposed and column-sliced matrices. A NaN spoils its column only."""
    for B, n in SHAPES:
        values = torch.randn(B, n, device=device).to(dtype) + 3
        values[:, 0] += 1e3
        for layout in (_contiguous, _transposed, _column_slice):
            matrix = layout(values)
            for scale in (1.0, 1 / B):
                got = columns.column_sums(matrix, scale)
                assert got.dtype == torch.float32 and got.shape == (n,)
                assert_close(got, values.double().sum(0) * scale, torch.float32, f"column sums {B}x{n}")
                assert torch.equal(got, columns.column_sums(matrix, scale)), "not repeatable"
            assert torch.equal(matrix, values), "the input changed"
        values[-1, -1] = float("nan")
        spoiled = columns.column_sums(values).isnan()
        assert spoiled[-1] and not spoiled[:-1].any(), "a NaN reaches its own column's sum, no other"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_masked_column_sums(device, dtype):
    """Entries whose code is zero, negative or NaN become zeros in place (a NaN gradient among them);
    the sums are those of the result, the same bits on a second call; contiguous, transposed and
    column-sliced matrices."""
    for B, n in SHAPES:
        grads = torch.randn(B, n, device=device).to(dtype) + 3  # an offset: sums that grow with B
        grads[-1, -1] = float("nan")
        codes = torch.randn(B, n, device=device).relu_().to(dtype)
        codes[0, 0], codes[-1, -1] = float("nan"), 0
        expected = torch.where(codes > 0, grads, 0)
        for layout in (_contiguous, _transposed, _column_slice):
            values = layout(grads)
            got = columns.masked_column_sums_(values, layout(codes))
            assert torch.equal(values, expected), "the masked entries"
            assert got.dtype == torch.float32 and got.shape == (n,)
            assert_close(got, expected.double().sum(0), torch.float32, f"masked column sums {B}x{n}")
            assert torch.equal(got, columns.masked_column_sums_(layout(grads), layout(codes))), "not repeatable"


def _contiguous(t):
    return t.clone()


def _transposed(t):
    return t.t().contiguous().t()


def _column_slice(t):
    return torch.cat([t, t], 1)[:, t.shape[1] :]


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_column_sums_shapes(device):
    """No rows or no columns (an AuxK list of no dead feature) give zero sums; mismatched shapes and a
    matrix that is not 2-D an error."""
    empty = torch.ones(0, 5, device=device)
    assert torch.equal(columns.column_sums(empty), torch.zeros(5, device=device))
    assert torch.equal(columns.masked_column_sums_(empty, empty), torch.zeros(5, device=device))
    assert columns.masked_column_sums_(torch.ones(4, 0, device=device), torch.ones(4, 0, device=device)).shape == (0,)
    with pytest.raises(ValueError, match=r"\[rows, columns\] matrix"):
        columns.column_sums(torch.ones(4, device=device))
    with pytest.raises(ValueError, match="differ in shape"):
        columns.masked_column_sums_(torch.zeros(2, 3, device=device), torch.zeros(3, 2, device=device))
