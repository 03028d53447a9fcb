"""Triton kernels of optden, imported as ``optden.kernels`` (device code only).

Importing this package does not import Triton (nor touch CUDA); each kernel module does,
on first use:

* ``optden.kernels.dense``: the fused dense pass (kernel -> launcher -> public function ->
  float64 reference, as in mamba's ops).

Their host side (chunking, merging splits, the top K) is
``optden.engine.backends.gpu_pass``; their rounding-error bound is
``optden.engine.bounds.fp32_pass_delta``.
"""
