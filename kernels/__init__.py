"""Triton kernels of optden, imported as ``optden.kernels``.

Importing this package does not import Triton (nor touch CUDA); each kernel module does,
on first use:

* ``optden.kernels.dense``: the fused dense pass (Triton; imports triton).
* ``optden.kernels.bounds``: its rigorous fp32 error bound (pure torch).
* ``optden.kernels.host``: host side of the GPU passes, shared with the CUDA backend:
  chunking, log-sum-exp merge of splits, exact top-k (pure torch).
"""
