"""Backends that compute the coarse pass (see ``optden.engine.dispatch``).

Each backend module registers its class here. A backend whose runtime is missing (no
extension, no Triton, no GPU) still registers: ``availability()`` says why it cannot run.
"""
from __future__ import annotations

import importlib

from .. import dispatch
from .torch_blocked import TorchBackend

dispatch.register("torch", TorchBackend)

# Compiled / GPU backends, each in its own module: cpu (optden._C), triton (optden.kernels),
# cuda (optden._C built with nvcc); gpu_pass.py is the host side the GPU ones share.
# A module that is not part of this build is skipped.
for _module in ("cpu", "triton", "cuda"):
    try:
        importlib.import_module(f"{__name__}.{_module}")
    except ModuleNotFoundError as _exc:
        if _exc.name != f"{__name__}.{_module}":
            raise
