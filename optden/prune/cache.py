"""Neighbour cache along a trajectory (docs/design.md, "Pruning").

A sampler calls ``den(x, sigma)`` step after step with the same batch. For each batch
row the cache keeps the query ``v0`` the last search ran for, the candidate rows it
certified and its shells ``(count, lower)`` (rows left out, at exact distance >= lower
from ``v0``). When row j's next query ``v`` moved by ``delta = ||v - v0||`` (exact,
float64), every left-out row is still at least ``lower - delta`` away (triangle
inequality), so re-scoring the cached candidates exactly at ``v`` and re-checking the
bound certifies the new evaluation without a search. Nothing is trusted that the new
bound does not prove: a row whose bound fails is searched again.

The cache is keyed by the index (its dataset fingerprint and kind). A batch of the same
size is matched row by row; a batch of another size (mean shift drops the points that
have converged) is matched to the cached queries nearest to each of its rows, and the
cache is reordered to follow it. Either way delta is measured exactly from the cached
query each row was matched to, so a poor match only fails the bound and is searched again.
"""
from __future__ import annotations

import torch

__all__ = ["NeighbourCache"]


class NeighbourCache:
    """Per-row certified candidate sets of one batch.

    v0: (N, d) float64 queries of the last search per row; idx: (N, K) int64 candidates
    (-1 padded); counts / lower: (N, S) float64 shells; valid: (N,) bool.
    """

    def __init__(self):
        self.key = None
        self.v0 = self.idx = self.counts = self.lower = self.valid = None
        self.hits = 0  # rows certified from the cache, without a search
        self.misses = 0  # rows whose cached bound failed (or that had none)

    def clear(self) -> None:
        self.key = None
        self.v0 = self.idx = self.counts = self.lower = self.valid = None

    def _ensure(self, key, v: torch.Tensor) -> None:
        if self.key == key and self.v0 is not None and self.v0.shape[1] == v.shape[1] and self.v0.shape[0] != v.shape[0]:
            self._rematch(v)
        if self.key != key or self.v0 is None or self.v0.shape != v.shape:
            self.key = key
            n = v.shape[0]
            self.v0 = torch.zeros_like(v)
            self.idx = torch.full((n, 1), -1, dtype=torch.int64, device=v.device)
            self.counts = torch.zeros(n, 1, dtype=torch.float64, device=v.device)
            self.lower = torch.zeros(n, 1, dtype=torch.float64, device=v.device)
            self.valid = torch.zeros(n, dtype=torch.bool, device=v.device)

    def _rematch(self, v: torch.Tensor, max_pairs: int = 1 << 22) -> None:
        """Reorder the cache to a batch of another size: row j takes the entry whose query is
        nearest to v[j] (ties: the first). Too large a batch pair count clears instead."""
        E = self.v0.shape[0]
        if E * v.shape[0] > max_pairs or not bool(self.valid.any()):
            self.clear()
            return
        ok = self.valid.nonzero().flatten()
        match = ok[torch.cdist(v, self.v0[ok]).argmin(dim=1)]  # a heuristic match; delta is exact later
        self.v0, self.idx, self.valid = self.v0[match], self.idx[match], self.valid[match]
        self.counts, self.lower = self.counts[match], self.lower[match]

    def lookup(self, key, v: torch.Tensor):
        """Rows with a cached set and their shifted shells for queries v (N, d).

        Returns ``(rows (R,) int64, idx (R, K), counts (R, S), lower (R, S))`` where lower
        is already reduced by how far each query moved; R may be 0.
        """
        self._ensure(key, v)
        rows = self.valid.nonzero().flatten()
        if rows.numel() == 0:
            return rows, None, None, None
        delta = torch.linalg.vector_norm(v[rows] - self.v0[rows], dim=1)
        delta = delta * (1.0 + 1e-12) + 1e-300
        lower = torch.clamp(self.lower[rows] - delta[:, None], min=0.0)
        return rows, self.idx[rows], self.counts[rows], lower

    def store(self, key, v: torch.Tensor, rows: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor,
              lower: torch.Tensor) -> None:
        """Remember the search made at v[rows] (candidates idx, shells counts / lower)."""
        self._ensure(key, v)
        if rows.numel() == 0:
            return
        k, s = idx.shape[1], counts.shape[1]
        if k != self.idx.shape[1]:
            width = max(k, self.idx.shape[1])
            self.idx = _pad(self.idx, width, -1)
            idx = _pad(idx, width, -1)
        if s != self.counts.shape[1]:
            width = max(s, self.counts.shape[1])
            self.counts, counts = _pad(self.counts, width, 0.0), _pad(counts, width, 0.0)
            self.lower, lower = _pad(self.lower, width, float("inf")), _pad(lower, width, float("inf"))
        self.v0[rows] = v[rows]
        self.idx[rows] = idx
        self.counts[rows] = counts
        self.lower[rows] = lower
        self.valid[rows] = True

    def invalidate(self, rows: torch.Tensor) -> None:
        if self.valid is not None and rows.numel():
            self.valid[rows] = False


def _pad(t: torch.Tensor, width: int, value) -> torch.Tensor:
    if t.shape[1] >= width:
        return t
    extra = torch.full((t.shape[0], width - t.shape[1]), value, dtype=t.dtype, device=t.device)
    return torch.cat([t, extra], dim=1)
