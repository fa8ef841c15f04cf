"""The encoder GEMM with each row's group maxima in its epilogue (`fastsae.ops.group_max_gemm`, CUTLASS,
experimental) against cuBLAS's addmm of the same operands (provider `cublas_gemm`), which writes the
same pre-activation without the maxima: what the TopK row filter runs today, before it reads the whole
pre-activation once more for those maxima. The GEMM is worth a route of the encode where its time is
below addmm's plus that read.

bf16 centred inputs and weights at the benchmark shapes (harness.SHAPES). The pre-activation is checked
against addmm's and the maxima against the kernel's own pre-activation (exactly) before timing. Skipped,
with a line saying so, where the CUTLASS extension was not built.
"""

from __future__ import annotations

from functools import partial

import torch

from fastsae import reference
from fastsae.ops import group_max_gemm
from fastsae.testing import assert_close

from .harness import SHAPES, Recorder, measure, selected, selected_shapes

EXTRA_SHAPES: dict = {}  # no shapes beyond harness.SHAPES


def _check(pre: torch.Tensor, maxima: torch.Tensor, expected_pre: torch.Tensor, name: str, group: int) -> None:
    assert_close(pre.float(), expected_pre.float(), 2e-2, f"{name} pre-activation")
    B = pre.shape[0]
    if not torch.equal(maxima[:, :B], reference.group_maxima(pre, group)[:, :B]):
        raise AssertionError(f"{name}: the maxima are not those of the kernel's pre-activation")


def run(recorder: Recorder) -> None:
    if not group_max_gemm.available():
        print("gemm_group_max skipped: fastsae's CUTLASS extension is not built (the `cutlass` extra)")
        return
    for shape, (d, n_features, n_rows, _) in selected_shapes(SHAPES).items():
        xc = torch.randn(n_rows, d, device="cuda").bfloat16()
        W_enc = (torch.randn(d, n_features, device="cuda") / d**0.5).bfloat16()
        b_enc = (0.1 * torch.randn(n_features, device="cuda")).bfloat16()
        expected_pre = torch.addmm(b_enc, xc, W_enc)
        variants = {f"fastsae_{v.name}": (number, v.group) for number, v in enumerate(group_max_gemm.VARIANTS)}
        gemm = group_max_gemm.gemm_bias_group_max
        providers = selected({name: partial(gemm, xc, W_enc, b_enc, number) for name, (number, _) in variants.items()})
        for name, fn in providers.items():
            _check(*fn(), expected_pre, f"gemm_group_max {shape} {name}", variants[name][1])
        del expected_pre
        for name, fn in providers.items():
            recorder.record("gemm_group_max", shape, name, measure(fn))
        recorder.record("gemm_group_max", shape, "cublas_gemm", measure(partial(torch.addmm, b_enc, xc, W_enc)))
