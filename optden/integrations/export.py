"""Saved torch modules as optden denoisers: ``torch.export`` archives and TorchScript.

A module whose forward is ``D(x, sigma)`` (x (B, *image_shape) in the data's model
space, sigma (B,)) saved with ``torch.export.save`` (``.pt2``) or ``torch.jit.save``.
An exported program traced with a static batch size B (no ``dynamic_shapes``) accepts
exactly B rows: ``load_module`` then calls it in chunks of B, the last one padded with
copies of its last row (their outputs dropped), so samplers and the score deviation can
use any batch size.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..calling import call_in_chunks
from ..errors import InputError

__all__ = ["StaticBatch", "static_batch", "load_module"]


class StaticBatch(torch.nn.Module):
    """``module(x, sigma, *rest)`` in padded chunks of exactly ``batch`` rows."""

    def __init__(self, module, batch: int):
        super().__init__()
        self.module = module
        self.batch = int(batch)

    def forward(self, x, sigma, *rest):
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
        return call_in_chunks(self.module, x, self.batch, sigma, *rest, pad=True)


def static_batch(program) -> int | None:
    """The batch size an exported program was traced with when it is static, else None."""
    names = list(program.graph_signature.user_inputs)
    nodes = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    val = nodes[names[0]].meta.get("val") if names and names[0] in nodes else None
    shape = getattr(val, "shape", None)
    return int(shape[0]) if shape is not None and len(shape) > 0 and isinstance(shape[0], int) else None


def load_module(path, device="cpu"):
    """A saved ``D(x, sigma)`` module on ``device``: ``.pt2`` -> ``torch.export.load`` (a
    static batch wrapped in ``StaticBatch``), another file -> ``torch.jit.load``."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"model: {path} is not a file")
    if p.suffix == ".pt2":
        try:
            program = torch.export.load(str(p))
        except Exception as exc:  # torch.export raises many types for a bad archive
            raise InputError(f"model: {path!s} is not a torch.export archive ({type(exc).__name__}: {exc})") from None
        module = program.module().to(device)
        batch = static_batch(program)
        return module if batch is None else StaticBatch(module, batch)
    try:
        module = torch.jit.load(str(p), map_location=device)
    except (RuntimeError, ValueError) as exc:
        raise InputError(f"model: {path!s} is not a TorchScript file that torch.jit.load can read ({exc})") from None
    module.eval()
    return module
