"""The ``torch`` backend: blocked streaming over rows with an online softmax.

Runs on any torch device. Each block of rows is converted to float64 and centered;
logits come from the expansion ``-coef (||v||^2 - 2 v.q + ||q||^2)`` with a float64
GEMM, whose rounding error is bounded rigorously (``optden.engine.bounds.gemm_delta``).
Memory is one block: about ``block_rows * (d + 2 N) * 8`` bytes, never N x M.
"""
from __future__ import annotations

import torch

from ..bounds import EPS64, gemm_delta
from ..dispatch import Backend
from ..partial import STATS, Partial


class TorchBackend(Backend):
    name = "torch"
    priority = 0
    description = "blocked float64 streaming with an online softmax; any torch device"
    devices = None  # any torch device
    statistics = STATS

    def partial(self, v: torch.Tensor, coef: torch.Tensor, source, k: int, stats: bool = False) -> Partial:
        """See ``Backend.partial``. v: (N, d) float64, coef: (N,) float64; stats: accumulate ``STATS``."""
        n, d = v.shape
        part = Partial.empty(n, d, k, v.device, stats=stats)
        vsq = (v * v).sum(1)
        for off, raw, csq in source.blocks():
            q = raw.to(torch.float64) - source.center  # exact for uint8 with an integer center
            # logits (N, B) = -coef * (||v||^2 - 2 v.q + ||q||^2)
            logit = torch.addmm(vsq[:, None] + csq[None, :], v, q.T, alpha=-2.0).mul_(-coef[:, None])
            part.absorb(logit, q, off)
        part.delta = gemm_delta(EPS64, d, vsq.sqrt(), source.max_cnorm, coef, part.top_val[:, 0])
        return part
