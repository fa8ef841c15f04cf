"""Triton kernels and their launchers, one file per op family (encode, decode; BatchTopK's selection is
plain torch). `fastsae.functional` registers the launchers as the CUDA implementations of its custom
ops; tests also run them on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1)."""
