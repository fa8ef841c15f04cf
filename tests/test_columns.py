"""Column sums (fastsae/ops/columns.py): the plain and AuxK's masked sums against fp64 torch sums, the
masked sums' in-place zeroing against torch.where, the masked product's GEMM with its sums, their
repeatability, and the shapes they take."""

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_masked_product_sums(device, dtype):
    """where(codes > 0, a @ b_rows^T, 0) and its column sums against fp64 torch, codes zero, negative or
    NaN masked; row and column counts off the tiles (a partial last row block and column block), strided
    operands (b_rows a transposed view, as W_dec's rows are not), the same bits on a second call; no
    dead feature listed gives empty outputs; mismatched shapes an error."""
    for B, n, d in [(1, 1, 1), (37, 300, 24), (700, 129, 70)]:
        a = torch.randn(B, d, device=device).to(dtype)
        b_rows = torch.randn(d, n, device=device).to(dtype).t()
        codes = torch.randn(B, n, device=device).relu_().to(dtype)
        codes[0, 0] = float("nan")
        product, sums = columns.masked_product_sums(a, b_rows, codes)
        expected = torch.where(codes > 0, a.double() @ b_rows.double().t(), 0)
        assert product.dtype == dtype and sums.dtype == torch.float32
        assert_close(product, expected, dtype, f"masked product {B}x{n}")
        assert_close(sums, product.double().sum(0), torch.float32, f"its column sums {B}x{n}")
        again = columns.masked_product_sums(a, b_rows, codes)
        assert torch.equal(product, again[0]) and torch.equal(sums, again[1]), "not repeatable"
    product, sums = columns.masked_product_sums(a, b_rows[:0], codes[:, :0])
    assert product.shape == (B, 0) and sums.shape == (0,)
    with pytest.raises(ValueError, match="must share d"):
        columns.masked_product_sums(a, b_rows[:, :-1], codes)
    with pytest.raises(ValueError, match=r"codes must be \[B, n\]"):
        columns.masked_product_sums(a, b_rows, codes.t())


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
