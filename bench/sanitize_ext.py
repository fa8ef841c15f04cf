"""A short run of every CUDA op of fastsae's extensions, for compute-sanitizer (memcheck, racecheck):
the death-statistics ops (uniform and skewed indices, chunked F beyond one block's shared memory, every
dtype) and, where the CUTLASS extension is built, the GEMM with group maxima and the warp select over
them (both group widths, a partial block of rows, and a row of ties that takes the select's bisection)."""

import torch

from fastsae import functional as F
from fastsae.ops import cutlass_gemm

for n_features in (1, 1000, 24576, 70001):
    idx = torch.randint(0, n_features, (2048, 32), device="cuda", dtype=torch.int32)
    idx[:, 0] = n_features // 2
    vals = torch.rand(2048, 32, device="cuda", dtype=torch.bfloat16)
    fired = torch.bincount(idx[vals > 0], minlength=n_features)  # bf16 rand holds exact zeros: not fires
    assert torch.equal(F.fire_counts(idx, n_features, vals), fired)
    assert torch.equal(F.fire_counts(idx.long(), n_features), torch.bincount(idx.flatten(), minlength=n_features))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        acts = (torch.randn(257, n_features, device="cuda") - 1).relu().to(dtype)
        assert torch.equal(F.fire_counts_dense(acts), (acts > 0).sum(0))
    since = torch.zeros(n_features, device="cuda", dtype=torch.int64)
    F.update_since_fired_(since, F.fire_counts(idx, n_features), 2048)
    F.dead_mask(since, 10)
if cutlass_gemm.available():
    for variant, kernel in enumerate(cutlass_gemm.VARIANTS):
        if not kernel.routed or kernel.group not in cutlass_gemm.SELECT_GROUPS:
            continue
        rows, d, n_features, k = 37, 64, 4096, 8
        xc = torch.randn(rows, d, device="cuda").bfloat16()
        W_enc = torch.randn(d, n_features, device="cuda").bfloat16()
        b_enc = torch.zeros(n_features, device="cuda").bfloat16()
        W_enc[:, :1024] = 0  # row 0's first 1024 features tie at 1 (xc[0] = 0): more than the select's slots
        b_enc[:1024] = 1
        xc[0] = 0
        pre, maxima = cutlass_gemm.gemm_bias_group_max(xc, W_enc, b_enc, variant)
        for raise_by_count in (False, True):  # both ways of raising the bound over a full buffer
            vals = torch.full((rows, k), float("nan"), device="cuda", dtype=torch.bfloat16)
            idx = torch.full((rows, k), -1, device="cuda", dtype=torch.int32)
            flags = torch.full((rows,), 7, device="cuda", dtype=torch.int8)
            cutlass_gemm.select_topk_group_max(pre, maxima, kernel.group, k, vals, idx, flags, raise_by_count)
            assert not flags.any() and torch.equal(vals, pre.topk(k).values.relu()), (kernel.name, raise_by_count)
            assert torch.equal(pre.gather(1, idx.long()).relu(), vals), (kernel.name, raise_by_count)
torch.cuda.synchronize()
print("sanitize_ext: all ops ran and matched")
