"""A short run of every CUDA death-statistics op, for compute-sanitizer (memcheck, racecheck):
uniform and skewed indices, chunked F (beyond one block's shared memory), every dtype."""

import torch

from fastsae import functional as F

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
torch.cuda.synchronize()
print("sanitize_ext: all ops ran and matched")
