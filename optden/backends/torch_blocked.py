"""The ``torch`` backend: blocked streaming over rows with an online softmax.

Runs on any torch device. Each block of rows is converted to float64 and centered;
logits come from the expansion ``-coef (||v||^2 - 2 v.q + ||q||^2)`` with a float64
GEMM, whose rounding error is bounded rigorously (``optden.precision.gemm_delta``).
Memory is one block: about ``block_rows * (d + 2 N) * 8`` bytes, never N x M.
"""
from __future__ import annotations

import torch

from ..dispatch import Backend, Partial
from ..precision import gemm_delta


def merge_topk(top_val, top_idx, val, idx, k):
    """Keep the k largest of two (N, *) candidate sets, descending."""
    cat_v = torch.cat([top_val, val], dim=1)
    cat_i = torch.cat([top_idx, idx], dim=1)
    tv, sel = cat_v.topk(k, dim=1)
    return tv, cat_i.gather(1, sel)


class TorchBackend(Backend):
    name = "torch"
    priority = 0
    description = "blocked float64 streaming with an online softmax; any torch device"

    def partial(self, v: torch.Tensor, coef: torch.Tensor, source, k: int) -> Partial:
        """See ``Backend.partial``. v: (N, d) float64, coef: (N,) float64."""
        n, d = v.shape
        dev = v.device
        m = torch.full((n,), -torch.inf, dtype=torch.float64, device=dev)
        s = torch.zeros(n, dtype=torch.float64, device=dev)
        acc = torch.zeros(n, d, dtype=torch.float64, device=dev)
        top_val = torch.full((n, k), -torch.inf, dtype=torch.float64, device=dev)
        top_idx = torch.zeros(n, k, dtype=torch.int64, device=dev)
        vsq = (v * v).sum(1)
        for off, raw, csq in source.blocks():
            q = raw.to(torch.float64) - source.center  # exact for uint8 with an integer center
            # logits (N, B) = -coef * (||v||^2 - 2 v.q + ||q||^2)
            logit = torch.addmm(vsq[:, None] + csq[None, :], v, q.T, alpha=-2.0).mul_(-coef[:, None])
            new_m = torch.maximum(m, logit.max(dim=1).values)
            alpha = torch.exp(m - new_m)
            p = torch.exp(logit - new_m[:, None])
            s = s * alpha + p.sum(1)
            acc = torch.addmm(acc * alpha[:, None], p, q)
            m = new_m
            kb = min(k, logit.shape[1])
            bv, bi = logit.topk(kb, dim=1)
            top_val, top_idx = merge_topk(top_val, top_idx, bv, bi + off, k)
        delta = gemm_delta(torch.finfo(torch.float64).eps / 2, d, vsq.sqrt(), source.max_cnorm, coef, top_val[:, 0])
        return Partial(m=m, s=s, acc=acc, top_val=top_val, top_idx=top_idx, delta=delta)
