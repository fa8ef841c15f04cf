"""Whether compute-sanitizer's initcheck sees what cuBLAS writes, for reading initcheck's reports:

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool initcheck python bench/initcheck_cublas.py

It computes a [5, 96] bf16 torch.addmm (cuBLAS) and reads it back with torch's own cast kernel. Where
initcheck does not track cuBLAS's stores (the H200 with CUDA 13: its GEMM kernels store through TMA),
it reports every one of the 480 reads as uninitialized although addmm wrote every element: a kernel
that reads a cuBLAS result, like the filter route's threshold kernel, draws the same reports.
"""

import torch

x = torch.randn(5, 24, device="cuda").bfloat16()
w = torch.randn(24, 96, device="cuda").bfloat16()
bias = torch.zeros(96, device="cuda").bfloat16()
product = torch.addmm(bias, x, w)
expected = torch.addmm(bias.float(), x.float(), w.float())
error = float((product.float() - expected).abs().max())  # the read initcheck reports
print(f"addmm [5, 96] bf16 read back by torch; max difference from fp32 {error:.3g}")
