"""Triton kernels of optden, imported as ``optden.kernels``.

Importing this package does not import Triton; each kernel module does, on first use.
"""
