"""The one accumulator of a pass over rows: an online softmax, its weighted sum and the top K.

A pass streams the rows in blocks; for each block it has the logits of every query
against every row of the block and folds them into a :class:`Partial` (in the style of
FAISS's ``ResultHeap``: ``empty``, then ``absorb`` block after block). With ``m`` the
running maximum of the logits ``l_i``:

    s   = sum_i exp(l_i - m)
    acc = sum_i exp(l_i - m) q_i          (q_i: the values the pass averages, one row each)
    top = the K largest l_i and their row positions

Partials over disjoint rows merge exactly (flash-decoding's log-sum-exp merge): rescale
each to the common maximum, add, and keep the K largest of the union. Every pass uses it:
the torch backend and the exact float64 pass block by block (``absorb``), the GPU host
code over the splits of a kernel launch (``absorb_splits``), the distributed merge over
ranks (``scaled_to`` + ``select_topk``). ``D = acc / s`` and ``lse = m + log s``.

Pass statistics (``STATS``, asked for with ``Partial.empty(..., stats=True)``): two more
sums that ``absorb`` updates in the same sweep, from which ``optden.engine.stats`` gets
the posterior's effective sample size, entropy and mean logit:

    s2  = sum_i exp(2 (l_i - m))           (sum of squared weights: s2 / s^2)
    e1  = sum_i exp(l_i - m) (l_i - m)     (<= 0; entropy = log s - e1 / s)

e1 is kept relative to the running max, so that neither it nor the entropy cancels
(``log s >= 0`` and ``-e1 / s >= 0``); a new max m' rescales it exactly as
``e1' = alpha (e1 + (m - m') s)``. ``left_out`` is the relative mass of rows a pass left
out of s (the cpu pass's rows far below the max; None: every row is in s).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Partial", "STATS", "merge_topk", "select_topk"]

#: The pass statistics a Partial can accumulate besides s and acc (see the module docstring).
STATS = ("s2", "e1")


def select_topk(val: torch.Tensor, idx: torch.Tensor, k: int):
    """The k largest of candidate values val (N, C) with their positions idx (N, C), descending."""
    top, sel = val.topk(k, dim=1)
    return top, idx.gather(1, sel)


def merge_topk(top_val, top_idx, val, idx, k: int):
    """Keep the k largest of two (N, *) candidate sets, descending."""
    return select_topk(torch.cat([top_val, val], dim=1), torch.cat([top_idx, idx], dim=1), k)


@dataclass
class Partial:
    """Result of a pass over rows so far (on the query device; float64 for every certified pass).

    Logits are ``l_i = -coef * ||v - q_i||^2`` with ``v`` the centered raw query and
    ``q_i`` the centered raw row.

    m:        (N,) running max of the logits (-inf before any row).
    s:        (N,) sum_i exp(l_i - m).
    acc:      (N, d) sum_i exp(l_i - m) q_i (centered raw space). A backend may leave a
              query's row NaN when its delta is >= 0.25 (never DENSE for tol < 1, so
              ``certify`` never reads it): the triton backend's GEMM pass does.
    top_val:  (N, K) the K largest logits, descending (-inf padded).
    top_idx:  (N, K) their positions in the row source (int64; ``source.global_index``
              maps them to dataset rows).
    delta:    (N,) bound on |coarse logit - exact logit| over every row (set by the backend).
    s2, e1:   (N,) the pass statistics (``STATS``), or None when the pass was not asked for them.
    left_out: (N,) relative weight of rows left out of s, s2, e1 (folded into delta too), or None (no row).
    """

    m: torch.Tensor
    s: torch.Tensor
    acc: torch.Tensor
    top_val: torch.Tensor
    top_idx: torch.Tensor
    delta: torch.Tensor
    s2: torch.Tensor | None = None
    e1: torch.Tensor | None = None
    left_out: torch.Tensor | None = None

    @classmethod
    def empty(cls, n: int, d: int, k: int, device, dtype: torch.dtype = torch.float64,
              stats: bool = False) -> "Partial":
        """The partial of no rows: m = -inf, s = acc = 0, an empty top K (k = 0 keeps none);
        stats: also accumulate the pass statistics s2 and e1."""
        zero = (lambda: torch.zeros(n, dtype=dtype, device=device)) if stats else (lambda: None)
        return cls(
            m=torch.full((n,), -torch.inf, dtype=dtype, device=device),
            s=torch.zeros(n, dtype=dtype, device=device),
            acc=torch.zeros(n, d, dtype=dtype, device=device),
            top_val=torch.full((n, k), -torch.inf, dtype=dtype, device=device),
            top_idx=torch.zeros(n, k, dtype=torch.int64, device=device),
            delta=torch.zeros(n, dtype=dtype, device=device),
            s2=zero(),
            e1=zero(),
        )

    @property
    def has_stats(self) -> bool:
        return self.s2 is not None and self.e1 is not None

    @property
    def k(self) -> int:
        return self.top_val.shape[1]

    def absorb(self, logits: torch.Tensor, rows: torch.Tensor, offset: int = 0) -> None:
        """Fold one block in: logits (N, B) of its B rows, rows (B, d) the values they
        weight (same dtype as the partial), offset the position of its first row."""
        new_m = torch.maximum(self.m, logits.max(dim=1).values)
        alpha = torch.exp(self.m - new_m)  # 0 on the first block (m = -inf)
        p = torch.exp(logits - new_m[:, None])
        if self.s2 is not None:
            # e1 is relative to the max: moving it from m to new_m adds (m - new_m) s (0 before any row)
            shift = torch.where(self.s > 0, self.m - new_m, torch.zeros_like(new_m))
            self.e1 = alpha * (self.e1 + shift * self.s) + (p * (logits - new_m[:, None])).sum(1)
            self.s2 = self.s2 * (alpha * alpha) + (p * p).sum(1)
        self.s = self.s * alpha + p.sum(1)
        self.acc = torch.addmm(self.acc * alpha[:, None], p, rows)
        self.m = new_m
        self.absorb_top(logits, offset)

    def absorb_grouped(self, logits: torch.Tensor, rows: torch.Tensor, index: torch.Tensor) -> None:
        """Fold in a block whose rows differ by group of queries (the position-specific
        rows of the local denoisers, ``optden.local``): the N = G n queries are G groups of
        n (query ``g * n + j``); logits (G, n, B); rows (G, B, d) the values group g weighs;
        index (G, B) int64 the positions the top K records. A logit may be -inf (a row the
        query does not compete with); a query's first block needs one finite logit."""
        G, n, B = logits.shape
        flat = logits.reshape(G * n, B)
        new_m = torch.maximum(self.m, flat.max(dim=1).values)
        safe_m = torch.where(torch.isfinite(new_m), new_m, torch.zeros_like(new_m))  # no exp(-inf - -inf)
        alpha = torch.exp(self.m - safe_m)
        p = torch.exp(flat - safe_m[:, None])
        self.s = self.s * alpha + p.sum(1)
        acc = (self.acc * alpha[:, None]).reshape(G, n, -1)
        self.acc = torch.baddbmm(acc, p.reshape(G, n, B), rows).reshape(G * n, -1)
        self.m = new_m
        if self.k:
            bv, bi = flat.topk(min(self.k, B), dim=1)
            full = index.to(torch.int64)[:, None, :].expand(G, n, B).reshape(G * n, B)
            self.top_val, self.top_idx = merge_topk(self.top_val, self.top_idx, bv.to(self.top_val.dtype),
                                                    full.gather(1, bi), self.k)

    def absorb_top(self, logits: torch.Tensor, offset: int = 0) -> None:
        """Merge the K largest of a block's logits (N, B) into the top K (positions + offset)."""
        k = self.k
        if k == 0:
            return
        bv, bi = logits.topk(min(k, logits.shape[1]), dim=1)
        self.top_val, self.top_idx = merge_topk(self.top_val, self.top_idx, bv.to(self.top_val.dtype),
                                                bi.to(torch.int64) + offset, k)

    def absorb_splits(self, m: torch.Tensor, s: torch.Tensor, acc: torch.Tensor, group_bytes: int = 1 << 26) -> None:
        """Fold in the states of S splits over other rows: m, s (S, N) and acc (S, N, d),
        any float dtype (converted to the partial's). The weighted sums are merged in groups
        of splits whose converted temporaries stay under ``group_bytes``. Split states carry
        no pass statistics: a partial that accumulates them cannot take them."""
        if self.has_stats:
            raise ValueError("absorb_splits: split states carry no pass statistics (s2, e1); "
                             "run the statistics on a backend that declares them (Backend.statistics)")
        ms = m.to(self.m.dtype)
        new_m = torch.maximum(self.m, ms.max(0).values)
        w = torch.exp(ms - new_m[None, :])  # (S, N)
        alpha = torch.exp(self.m - new_m)
        self.s = self.s * alpha + (w * s.to(self.s.dtype)).sum(0)
        self.acc.mul_(alpha[:, None])
        n, d = self.acc.shape
        group = max(1, group_bytes // max(1, n * d * self.acc.element_size()))
        for j in range(0, acc.shape[0], group):
            self.acc.add_(torch.einsum("sn,snd->nd", w[j:j + group], acc[j:j + group].to(self.acc.dtype)))
        self.m = new_m

    def scaled_to(self, m: torch.Tensor):
        """``(s, acc)`` rescaled to a common maximum m (N,) >= self.m: summed over partials
        of disjoint rows, they give the merged s and acc (0 where this partial has no rows)."""
        scale = torch.exp(self.m - m)
        return self.s * scale, self.acc * scale[:, None]

    def mean(self) -> torch.Tensor:
        """(N, d) the softmax-weighted mean of the rows, ``acc / s``."""
        return self.acc / self.s[:, None]

    def lse(self) -> torch.Tensor:
        """(N,) log-sum-exp of the logits, ``m + log s``."""
        return self.m + torch.log(self.s)
