"""The experimental CUTLASS encoder GEMMs (`fastsae.ops.cutlass_gemm`) against cuBLAS's addmm of the same
operands (provider `cublas_gemm`), which writes the pre-activation: what the TopK row filter runs today,
before it reads the whole pre-activation once more.
- `gemm_group_max`: the GEMM writing the same pre-activation and each row's group maxima. It is worth a
  route of the encode where its time is below addmm's plus that read.
- `gemm_filter`: the threshold-first filter GEMM, which writes only the entries above each row's
  threshold (from `filter.thresholds` at the shape's k and a 512-slot buffer) to the row's buffer;
  `fastsae_triton` is the filter route's Triton GEMM (`filter.filter_gemm`, its first tiling) on the same
  thresholds. The filter route's whole encode is this GEMM, the threshold pass and the select.
  Providers ending `_no_survivors` run on thresholds of +inf: the GEMM and its epilogue's compares
  without a single append.

bf16 centred inputs and weights at the benchmark shapes (harness.SHAPES). Before timing, the
pre-activation is checked against addmm's, the maxima against the kernel's own pre-activation (exactly),
and the filters' buffers against the fp32 pre-activation of their first rows. Skipped, with a line saying
so, where the CUTLASS extension was not built.
"""

from __future__ import annotations

from functools import partial

import torch

from fastsae import reference
from fastsae.ops import cutlass_gemm, filter
from fastsae.testing import assert_close

from .harness import SHAPES, Recorder, each_shape, measure, selected, selected_shapes

EXTRA_SHAPES: dict = {}  # no shapes beyond harness.SHAPES
FILTER_CAP = 512  # buffer slots a row for gemm_filter (the filter route's smallest capacity at k <= 32)
CHECKED_ROWS = 64  # rows of each filter's buffers checked against the fp32 pre-activation


def _check(pre: torch.Tensor, maxima: torch.Tensor, expected_pre: torch.Tensor, name: str, group: int) -> None:
    assert_close(pre.float(), expected_pre.float(), 2e-2, f"{name} pre-activation")
    B = pre.shape[0]
    expected = reference.group_maxima(pre, group)
    if not torch.equal(cutlass_gemm.maxima_by_group(maxima, expected.shape[0])[:, :B], expected[:, :B]):
        raise AssertionError(f"{name}: the maxima are not those of the kernel's pre-activation")


def _check_filter(count, key_buf, xc, W_enc, b_enc, tau, name: str) -> None:
    """The first CHECKED_ROWS rows: each stored key's value is its entry's fp32 pre-activation (up to
    summation order) above tau, the row keeps no feature twice, and its count is the entries above tau
    (up to those within rounding of it); rows that overflowed keep `cap` of them."""
    rows = slice(0, CHECKED_ROWS)
    pre = xc[rows].float() @ W_enc.float() + b_enc.float()
    slack = 1e-3 * pre.abs().amax(dim=1)  # summation-order rounding, far above fp32's
    for row in range(pre.shape[0]):
        kept = key_buf[row, : min(int(count[row]), key_buf.shape[1])]
        features, values = (kept & 0xFFFFFFFF).long(), reference.key_values(kept)
        if features.unique().numel() != features.numel():
            raise AssertionError(f"{name}: row {row} keeps a feature twice")
        if not torch.allclose(values, pre[row, features], rtol=0, atol=float(slack[row])):
            raise AssertionError(f"{name}: row {row}'s kept values are not its pre-activations")
        surely, maybe = (pre[row] > tau[row] + slack[row]).sum(), (pre[row] > tau[row] - slack[row]).sum()
        if not surely <= int(count[row]) <= maybe or (values <= tau[row]).any():
            raise AssertionError(f"{name}: row {row} counts {int(count[row])} above tau, expected {int(surely)}")


def _filters(xc, W_enc, b_enc, tau, suffix: str) -> dict:
    """gemm_filter's providers over thresholds `tau`, named with `suffix`; each zeroes the counts and
    fills the buffers."""
    count = torch.zeros(xc.shape[0], dtype=torch.int32, device=xc.device)
    key_buf = torch.empty(xc.shape[0], FILTER_CAP, dtype=torch.int64, device=xc.device)
    triton_cfg = dict(filter.filter_tiles(interpret=False)[0], AUX_CAP=1)

    def cutlass(variant):
        count.zero_()
        cutlass_gemm.gemm_bias_filter(xc, W_enc, b_enc, tau, count, key_buf, variant)
        return count, key_buf

    def triton():
        count.zero_()
        filter.filter_gemm(xc, W_enc, b_enc, tau, count, key_buf, None, None, triton_cfg)
        return count, key_buf

    providers = {f"fastsae_{name}{suffix}": partial(cutlass, n) for n, name in enumerate(cutlass_gemm.FILTER_VARIANTS)}
    return {**providers, f"fastsae_triton{suffix}": triton}


def _bench_shape(recorder: Recorder, shape: str, d: int, n_features: int, n_rows: int, k: int) -> None:
    """The CUTLASS GEMMs' rows at one shape (`run`)."""
    xc = torch.randn(n_rows, d, device="cuda").bfloat16()
    W_enc = (torch.randn(d, n_features, device="cuda") / d**0.5).bfloat16()
    b_enc = (0.1 * torch.randn(n_features, device="cuda")).bfloat16()
    expected_pre = torch.addmm(b_enc, xc, W_enc)
    variants = {f"fastsae_{v.name}": (number, v.group) for number, v in enumerate(cutlass_gemm.VARIANTS)}
    gemm = cutlass_gemm.gemm_bias_group_max
    providers = selected({name: partial(gemm, xc, W_enc, b_enc, number) for name, (number, _) in variants.items()})
    for name, fn in providers.items():
        _check(*fn(), expected_pre, f"gemm_group_max {shape} {name}", variants[name][1])
    del expected_pre
    for name, fn in providers.items():
        recorder.record("gemm_group_max", shape, name, measure(fn))
    recorder.record("gemm_group_max", shape, "cublas_gemm", measure(partial(torch.addmm, b_enc, xc, W_enc)))

    # The filter route's thresholds, and +inf (no survivors: the epilogue's compares alone, so that the
    # difference is what the appends cost).
    tau = filter.thresholds(xc, W_enc, b_enc, k, FILTER_CAP)
    for suffix, thresholds in (("", tau), ("_no_survivors", torch.full_like(tau, float("inf")))):
        for name, fn in selected(_filters(xc, W_enc, b_enc, thresholds, suffix)).items():
            _check_filter(*fn(), xc, W_enc, b_enc, thresholds, f"gemm_filter {shape} {name}")
            recorder.record("gemm_filter", shape, name, measure(fn))
    recorder.record("gemm_filter", shape, "cublas_gemm", measure(partial(torch.addmm, b_enc, xc, W_enc)))


def run(recorder: Recorder) -> None:
    if not cutlass_gemm.available():
        print("gemm_group_max skipped: fastsae's CUTLASS extension is not built (the `cutlass` extra)")
        return
    for shape, (d, n_features, n_rows, k) in selected_shapes(SHAPES).items():
        with each_shape(shape):
            _bench_shape(recorder, shape, d, n_features, n_rows, k)
