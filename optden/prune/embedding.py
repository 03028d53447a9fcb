"""The certified lower-bound embedding index (docs/design.md, "Pruning"; issue 22).

Why. FAISS indexes over the rows themselves (``optden.prune.index``) cannot certify much:
in 192 and more dimensions an IVF list's radius is as large as the distances that
matter, and a flat search charges every row it left out the weight of the last one it
returned. Natural image rows are far from uniform, though: a few principal directions
hold most of their spread, and there a partition of the rows has tight bounds.

The embedding (``optden.engine.bounds``, section 8). P (d, k): the top k principal
directions of the centered rows (float64, from a sample of rows); r0 a constant. A
centered vector w maps to ``e(w) = [P^T w, ||w - P P^T w|| - r0]`` in k + 1 dimensions,
and ``||e(u) - e(y)|| <= sqrt(1 + eta) ||u - y||``: every distance between embeddings,
rounding included, gives a rigorous lower bound on the true distance.

The index. The rows' float32 embeddings are split into *leaves* of about ``leaf_size``
rows by a k-d tree (median splits on the widest of the first ``tree_dims`` coordinates
and the radial one); each leaf keeps its exact box over those coordinates, and its rows'
embeddings are stored one leaf after the other. ``optden._C.leaf_scan`` scans the leaves
a query names (float32 direct differences, leaf after leaf; FAISS's IVF range search,
with the leaves as its inverted lists, was measured at 50-300 ns per row here, most of it
per list visited, against a few ns for this scan), ``box_lower`` bounds every leaf, and
``shell_histogram`` bins the bounds.

A certified search for queries v (centered raw, float64) at ``coef = scale^2 / 2 sigma^2``:

1. embed the queries; the distance from each query to each leaf's box bounds the true
   distance of every row of the leaf from below;
2. the few leaves nearest by that bound are scanned and their nearest rows re-scored
   exactly: ``d_best`` >= the nearest row's distance;
3. leaves are left out, smallest log-mass ``log(size) - coef (lower^2 - d_best^2)`` first,
   while their summed mass stays below half the tolerance; the others are *probed*;
4. the scan of the probed leaves returns every row whose embedded distance could put it
   within rho, ``rho^2 = d_best^2 + log(rows probed / (tol_mass / 4)) / coef``;
5. returned rows whose own lower bound does not make them negligible are re-scored
   exactly (by the caller, ``optden.prune.pruner``); the rest, the probed rows not returned
   (each at least rho away) and the leaves left out are the *shells* of the certificate:
   histograms ``(count, lower)`` whose bound is a sum over shells, each charged its own
   lower bound (never every excluded row the weight of the nearest one left out).

``certified_nearest`` is the same search for exact nearest rows (memorization's NN1 / NN2):
every row not re-scored is provably at least as far as the k-th one found.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import _ext
from ..engine.bounds import (DISTANCE_MARGIN, EPS64, dot_rel_err, embedding_error, embedding_float64_error,
                             embedding_lower, embedding_lower_terms, faiss_distance_interval, gamma,
                             orthonormality_slack, scan_lower_terms)
from ..errors import DatasetError, DatasetNotFoundError, DtypeError, InputError
from ..fileio import sha256_file
from .index import save_dir

__all__ = ["EmbeddingIndex", "SearchResult", "default_k", "default_leaf_size", "histogram_shells", "far_bins",
           "SHARE_LEAVES", "SHARE_RANGE", "SHARE_RETURNED"]

INDEX_FORMAT = "optden.embedding-index"
#: 2: each leaf's rows split into leading and other coordinates; 3: the leading block
#: stored coordinate after coordinate (``_leaf_blocks``). Files of versions 1 (whole rows)
#: and 2 (the leading block row after row) convert on load.
INDEX_VERSION = 3
#: Leading coordinates a scan reads first (``optden._C.leaf_scan``'s kLead): a leaf stores
#: them for all its rows, then the other coordinates, so rows that stop early read no more.
LEAD = 8
#: Shares of the left-out mass (tol_mass) given to the leaves left out, to the probed rows
#: the range search did not return, and to the returned rows not re-scored; they sum to 1.
SHARE_LEAVES, SHARE_RANGE, SHARE_RETURNED = 0.5, 0.25, 0.25
#: Shell histograms: bin b holds lower bounds with t = coef (lower^2 - ref^2) in
#: [SHELL_WIDTH b, SHELL_WIDTH (b + 1)) for t in [0, SHELL_TOP) (t < 0 in bin 0, beyond in the
#: last); each bin is charged its smallest lower bound, so a bin over-counts its true mass
#: by at most e^SHELL_WIDTH, and what is left out is decided on the binned masses.
SHELL_WIDTH = 0.5
SHELL_TOP = 64.0
#: Queries per search chunk (a chunk holds a queries x leaves float64 bound matrix).
QUERY_CHUNK = 64
#: Queries whose nearest-row scans run together, leaf after leaf (``certified_nearest``),
#: and the rows one such scan may scan, at most (plus one query's): it holds every row it
#: returns, 20 bytes each (memorization near 1.2M rows: 30k scanned per query, 0.5% returned).
GROUPED_QUERIES = 4096
SCAN_ROWS_PER_CALL = 1 << 26


def _C():
    if _ext.C is None or not hasattr(_ext.C, "leaf_scan"):
        raise RuntimeError("the embedding index needs optden._C with leaf_scan / box_lower / shell_histogram "
                           f"({_ext.error or 'rebuild: pip install --no-build-isolation -e .'})")
    return _ext.C


def histogram_shells(low: np.ndarray, count: np.ndarray, ref2: np.ndarray, coef: np.ndarray):
    """Histogram of left-out groups (``optden._C.shell_histogram``): low (n, X) exact lower
    bounds on their rows' distance (inf: no bound), count (X,) or (n, X) rows per group;
    bins by ``t = coef (low^2 - ref2)`` (see SHELL_WIDTH; ref2, coef (n,)). Returns
    ``(bin (n, X) uint8 (255: in no bin), counts (n, B), lower (n, B))``, lower = the
    smallest lower bound in the bin (inf where empty): each bin is a valid shell for any
    later coef and, shifted, for a moved query."""
    bins = int(SHELL_TOP / SHELL_WIDTH) + 1
    f64 = np.float64
    return _C().shell_histogram(np.ascontiguousarray(low, dtype=f64), np.ascontiguousarray(count, dtype=f64),
                                np.ascontiguousarray(ref2, dtype=f64), np.ascontiguousarray(coef, dtype=f64),
                                SHELL_WIDTH, bins)


def far_bins(counts: np.ndarray, lower: np.ndarray, ref2: np.ndarray, coef: np.ndarray, budget: float) -> np.ndarray:
    """(n,) b*: the bins b >= b* of a histogram (``histogram_shells``) whose summed mass
    ``sum count_b exp(-coef (lower_b^2 - ref2))`` is <= budget (relative to
    exp(-coef ref2)); they can be left out, the bins below b* cannot."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        lw = np.where(counts > 0, np.log(np.maximum(counts, 1e-300)) - coef[:, None] * (lower**2 - ref2[:, None]),
                      -np.inf)
    tail = np.logaddexp.accumulate(lw[:, ::-1], axis=1)[:, ::-1]  # log of the mass of bins b..B-1
    fits = tail <= math.log(budget) - 1e-9
    return fits.shape[1] - np.cumprod(fits[:, ::-1], axis=1).sum(1)


@dataclass
class SearchResult:
    """Candidates of a certified search, per query (torch, CPU).

    searched: (n,) bool, the search ran (False: over a limit, or nothing found;
    the caller runs those queries dense). idx: (n, K) int64 rows to re-score (-1 padded).
    counts / lower: (n, S) float64 shells of the rows not in idx. scanned: (n,) rows the
    range search scanned (the cost, for ``optden.prune.policy``).
    """

    searched: torch.Tensor
    idx: torch.Tensor
    counts: torch.Tensor
    lower: torch.Tensor
    scanned: torch.Tensor


class EmbeddingIndex:
    """A certified lower-bound embedding of a Dataset's centered raw rows (see the module docstring).

    Build with :meth:`build`, persist with :meth:`save` (``index_embedding.npz`` and
    ``.json`` beside the dataset), reopen with :meth:`load`.

    basis (d, k), r0: the embedding; emb (M, k + 1) float32 the rows' embeddings leaf after
    leaf, each leaf split into leading and other coordinates (``_leaf_blocks``; read rows
    with ``stored_rows``), ids (M,) their row numbers, starts (L + 1,) the leaves' first
    positions; lo / hi (L, t) the leaves' boxes over the coordinates tree_cols (t,);
    err_rows: bound on any row's embedding error.
    """

    kind = "embedding"

    def __init__(self, dataset, basis, r0, emb, ids, starts, lo, hi, err_rows, fingerprint, tree_cols):
        self.dataset = dataset
        self.basis = np.ascontiguousarray(basis, dtype=np.float64)
        self.d, self.k = self.basis.shape
        self.dim = self.k + 1
        self.r0 = float(r0)
        self.emb = np.ascontiguousarray(emb, dtype=np.float32)
        self.ids = np.ascontiguousarray(ids, dtype=np.int64)
        self.starts = np.ascontiguousarray(starts, dtype=np.int64)
        self.sizes = np.diff(self.starts).astype(np.float64)
        self.lo = np.ascontiguousarray(lo, dtype=np.float64)
        self.hi = np.ascontiguousarray(hi, dtype=np.float64)
        self.err_rows = float(err_rows)
        self.fingerprint = fingerprint
        self.tree_cols = np.asarray(tree_cols, dtype=np.int64)
        self.M = dataset.M
        self.eta = orthonormality_slack(self.basis)
        self.c64 = embedding_float64_error(self.d, self.k)
        self.scans = 0  # leaf scans run (one per batched call)

    def __repr__(self) -> str:
        return (f"EmbeddingIndex(M={self.M}, d={self.d}, k={self.k}, leaves={self.nlist}, "
                f"tree_dims={len(self.tree_cols)})")

    @property
    def nlist(self) -> int:
        return int(self.starts.shape[0] - 1)

    # ------------------------------------------------------------------ embedding
    def stored_rows(self, pos: np.ndarray) -> np.ndarray:
        """The float32 embeddings (len(pos), k + 1) of the rows at leaf-order positions pos
        (row ``ids[pos]``), read from the split layout of ``_leaf_blocks``."""
        return _stored_rows(self.emb, self.starts, pos, INDEX_VERSION)

    def embed(self, w: np.ndarray, w_norm: np.ndarray | None = None):
        """Embeddings of centered vectors w (n, d) float64: ``(e64 (n, k + 1) float64,
        e32 (n, k + 1) float32, err (n,))``, err bounding ||e32 - e(w)|| (``bounds.embedding_error``)."""
        w = np.ascontiguousarray(w, dtype=np.float64)
        z = w @ self.basis
        b = w - z @ self.basis.T
        e64 = np.empty((w.shape[0], self.dim), dtype=np.float64)
        e64[:, : self.k] = z
        e64[:, self.k] = np.sqrt((b * b).sum(1)) - self.r0
        e32 = e64.astype(np.float32)
        if w_norm is None:
            w_norm = np.sqrt((w * w).sum(1)) * (1 + gamma(self.d + 2, EPS64))
        return e64, e32, embedding_error(e64, e32, w_norm, self.r0, self.c64)

    def leaf_lower(self, e32: np.ndarray, err: np.ndarray, nearest: int = 8):
        """Exact lower bound (n, leaves) on the true distance of every row of each leaf from
        the queries whose float32 embeddings are e32 (n, k + 1) (errors err (n,)), and the
        ``nearest`` leaves of smallest bound (n, nearest)."""
        shift, factor = embedding_lower_terms(err, self.err_rows, self.eta)
        return _C().box_lower(e32[:, self.tree_cols].astype(np.float64), self.lo, self.hi,
                              min(int(nearest), self.nlist), shift, factor)

    def scan_lower(self, D: np.ndarray, err: np.ndarray) -> np.ndarray:
        """Exact lower bound on the true distance of rows whose scanned squared distance
        (float32 direct differences between float32 embeddings, ``leaf_scan``) is D (n,) or
        (n, K), err (n,) the queries' embedding errors; inf where D is not finite."""
        D = np.asarray(D, dtype=np.float64)
        low, _ = faiss_distance_interval(D, None, np.zeros(D.shape[0]), d=self.dim, max_cnorm=0.0, u_in=0.0,
                                         direct=True)
        return embedding_lower(low, err if D.ndim == 1 else err[:, None], self.err_rows, self.eta)

    def scan_radius(self, rho: np.ndarray, err: np.ndarray) -> np.ndarray:
        """float32 squared radii R (n,) such that every row whose scanned distance is >= R has
        true distance >= rho (n,): the inverse of :meth:`scan_lower` (increasing in D),
        rounded up to float32 and checked forward."""
        need = (rho * math.sqrt(1 + self.eta) / (1 - DISTANCE_MARGIN) + err + self.err_rows) / (1 - DISTANCE_MARGIN)
        R = need**2 / (1 - 2 * dot_rel_err(self.dim + 2, 0.0)) * (1 + 1e-9)
        R32 = R.astype(np.float32)
        R32 = np.where(R32.astype(np.float64) < R, np.nextafter(R32, np.float32(np.inf)), R32)
        for _ in range(64):  # the forward bound, float32 rounding included
            bad = self.scan_lower(R32.astype(np.float64), err) < rho
            if not bad.any():
                break
            R32 = np.where(bad, np.nextafter(R32 * np.float32(1 + 2**-20), np.float32(np.inf)), R32)
        return np.where(self.scan_lower(R32.astype(np.float64), err) < rho, np.float32(np.inf), R32)

    # ------------------------------------------------------------------ scans
    def _scan(self, e32: np.ndarray, lists: np.ndarray, R: np.ndarray, hist=None):
        """Rows within scanned squared distance < R[j] of query j among its leaves lists[j]
        (-1 padded): ``(lims (n + 1,), D (nnz,), I (nnz,))``, query j's at lims[j]:lims[j + 1].
        hist: None, or ``(err (n,), ref2 (n,), coef (n,))``: then also each row's histogram
        bin and the queries' histograms ``(bin (nnz,), counts (n, B), lower (n, B))`` of the
        rows' lower bounds (``histogram_shells``'s bins, computed in ``leaf_scan``)."""
        self.scans += 1
        n = e32.shape[0]
        if hist is None:
            err, ref2, coef, bins = np.zeros(n), np.zeros(n), np.ones(n), 0
        else:
            (err, ref2, coef), bins = hist, int(SHELL_TOP / SHELL_WIDTH) + 1
        shift, factor = embedding_lower_terms(err, self.err_rows, self.eta)
        s2, margin = scan_lower_terms(self.dim)
        f64 = np.float64
        lims, D, I, b, c, lo = _C().leaf_scan(
            np.ascontiguousarray(e32, dtype=np.float32), np.ascontiguousarray(lists),
            np.ascontiguousarray(R, dtype=np.float32), self.emb, self.starts, self.ids,
            np.ascontiguousarray(shift, dtype=f64), s2, margin, factor, np.ascontiguousarray(ref2, dtype=f64),
            np.ascontiguousarray(coef, dtype=f64), SHELL_WIDTH, bins)
        return (lims, D, I) if hist is None else (lims, D, I, b, c, lo)

    # ------------------------------------------------------------------ probe plan
    def _first_rows(self, e32, near, k):
        """The k rows nearest in the embedding among the leaves near (n, P): (n, k) int64, -1 where none."""
        n = e32.shape[0]
        lims, D, I = self._scan(e32, near, np.full(n, np.inf, dtype=np.float32))
        # each query's scanned rows padded into one row of a (n, W) matrix: one vectorised
        # selection instead of a sort per query (2,000 queries: 0.19 s of numpy calls)
        Dm, Im = _padded(lims, D.astype(np.float64), np.inf), _padded(lims, I, -1)
        W = Dm.shape[1]
        kk = min(int(k), W)
        if kk < W:
            part = np.argpartition(Dm, kk - 1, axis=1)[:, :kk]
            Dm, Im = np.take_along_axis(Dm, part, 1), np.take_along_axis(Im, part, 1)
        order = np.argsort(Dm, axis=1, kind="stable")
        out = np.full((n, int(k)), -1, dtype=np.int64)
        out[:, :kk] = np.take_along_axis(Im, order, 1)
        return out

    def _probe_lists(self, keep: np.ndarray) -> np.ndarray:
        """(n, P) leaf numbers of the True entries of keep (n, leaves), -1 padded."""
        width = max(1, int(keep.sum(1).max()))
        lists = np.full((keep.shape[0], width), -1, dtype=np.int64)
        q, l = np.nonzero(keep)
        pos = np.arange(len(q)) - np.searchsorted(q, q)
        lists[q, pos] = l
        return lists

    # ------------------------------------------------------------------ certified search
    def certified_candidates(self, v: torch.Tensor, coef: torch.Tensor, tol_mass: float, rescore, *,
                             max_scan: float, max_rescore: int, min_rows: int = 1) -> SearchResult:
        """Candidates and shells for queries v (n, d) float64 at coef (n,) (see the module
        docstring). rescore(sel (m,) int64, idx (m, K)) -> exact logits (m, K) of those rows
        for queries v[sel]. max_scan: rows a query may scan (else it is not searched);
        max_rescore: candidates a query may need (else not searched either); min_rows: at
        least this many candidates per query (the nearest rows found first)."""
        parts = [self._search_chunk(v[a:a + QUERY_CHUNK], coef[a:a + QUERY_CHUNK], tol_mass,
                                    lambda s, i, a=a: rescore(s + a, i), max_scan, max_rescore, min_rows)
                 for a in range(0, v.shape[0], QUERY_CHUNK)]
        if len(parts) == 1:
            return parts[0]
        K = max(p.idx.shape[1] for p in parts)
        S = max(p.counts.shape[1] for p in parts)

        def pad(t, w, val):
            return torch.nn.functional.pad(t, (0, w - t.shape[1]), value=val)

        return SearchResult(searched=torch.cat([p.searched for p in parts]),
                            idx=torch.cat([pad(p.idx, K, -1) for p in parts]),
                            counts=torch.cat([pad(p.counts, S, 0.0) for p in parts]),
                            lower=torch.cat([pad(p.lower, S, math.inf) for p in parts]),
                            scanned=torch.cat([p.scanned for p in parts]))

    def _search_chunk(self, v, coef, tol_mass, rescore, max_scan, max_rescore, min_rows) -> SearchResult:
        n = v.shape[0]
        vn = v.detach().cpu().numpy()
        cf = coef.detach().cpu().numpy().astype(np.float64)
        _, e32, err = self.embed(vn)
        low, near = self.leaf_lower(e32, err)  # (n, L)
        # 2. d_best: the best of a few rows from the nearest leaves, re-scored exactly
        first = self._first_rows(e32, near, max(4, int(min_rows)))
        best = rescore(torch.arange(n), torch.from_numpy(first)).numpy().max(1)
        ok = np.isfinite(best)
        d2 = np.where(ok, -best / cf, 0.0)
        # 3. leaves left out: the far bins of their histogram, within SHARE_LEAVES tol_mass
        lbin, lcnt, llow = histogram_shells(low, self.sizes, d2, cf)
        lstar = far_bins(lcnt, llow, d2, cf, SHARE_LEAVES * tol_mass)
        probe = lbin < lstar[:, None]  # (no bin = 255: an empty leaf, never probed)
        out = np.arange(lcnt.shape[1])[None, :] >= lstar[:, None]  # the bins left out
        lcnt, llow = np.where(out, lcnt, 0.0), np.where(out, llow, math.inf)
        scanned = probe.astype(np.float64) @ self.sizes
        searched = ok & (scanned <= max_scan)
        # 4. the scan: the rows of probed leaves that could lie within rho
        with np.errstate(divide="ignore", invalid="ignore"):
            rho = np.sqrt(d2 + np.log(np.maximum(scanned, 1.0) / (SHARE_RANGE * tol_mass)) / cf)
        R = self.scan_radius(np.where(searched, rho, 0.0), err)
        r_low = np.where(searched, self.scan_lower(R.astype(np.float64), err), math.inf)
        qs = np.flatnonzero(searched)
        B = int(SHELL_TOP / SHELL_WIDTH) + 1
        rcnt, rlow = np.zeros((n, B)), np.full((n, B), math.inf)
        n_ret = np.zeros(n)
        cq, ci = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)  # candidates (query, row), by query
        if qs.size:
            lims, _, I, rbin, c, lo = self._scan(e32[qs], self._probe_lists(probe[qs]), R[qs], (err[qs], d2[qs], cf[qs]))
            # 5. returned rows: re-score all but the far bins of their histogram (SHARE_RETURNED)
            rstar = far_bins(c, lo, d2[qs], cf[qs], SHARE_RETURNED * tol_mass)
            qid = np.repeat(np.arange(len(qs)), np.diff(lims))
            must = rbin < rstar[qid]
            out = np.arange(B)[None, :] >= rstar[:, None]
            rcnt[qs], rlow[qs] = np.where(out, c, 0.0), np.where(out, lo, math.inf)
            n_ret[qs] = np.diff(lims)
            cq, ci = qs[qid[must]], I[must]
        # candidates: the rows to re-score (the scan returns each row once per query; the
        # nearest row found first is among them: its leaf and its bin are never left out).
        # A query that needs more rows (min_rows) also takes its first rows.
        short = np.flatnonzero(searched & (np.bincount(cq, minlength=n) < min_rows))
        if short.size:
            mine = np.isin(cq, short)
            q2 = np.concatenate([cq[mine], np.repeat(short, first.shape[1])])
            i2 = np.concatenate([ci[mine], first[short].reshape(-1)])
            key = np.unique(q2[i2 >= 0] * self.M + i2[i2 >= 0])
            cq, ci = np.concatenate([cq[~mine], key // self.M]), np.concatenate([ci[~mine], key % self.M])
            order = np.argsort(cq, kind="stable")
            cq, ci = cq[order], ci[order]
        per = np.bincount(cq, minlength=n)
        searched &= per <= max_rescore
        K = max(1, int(per[searched].max()) if searched.any() else 1)
        idx = np.full((n, K), -1, dtype=np.int64)
        pos = np.arange(len(cq)) - np.repeat(np.cumsum(per) - per, per)
        ok_c = searched[cq]
        idx[cq[ok_c], pos[ok_c]] = ci[ok_c]
        # the shells: leaves left out, probed rows not returned (each >= rho), returned rows not re-scored
        counts = np.concatenate([lcnt, np.where(searched, scanned - n_ret, 0.0)[:, None], rcnt], axis=1)
        lower = np.concatenate([llow, r_low[:, None], rlow], axis=1)
        return SearchResult(searched=torch.from_numpy(searched), idx=torch.from_numpy(idx),
                            counts=torch.from_numpy(counts), lower=torch.from_numpy(lower),
                            scanned=torch.from_numpy(np.where(searched, scanned, 0.0)))

    # ------------------------------------------------------------------ exact nearest rows
    def certified_nearest(self, v: torch.Tensor, k: int, distances, *, max_scan: float):
        """Exact k nearest rows of queries v (n, d) (centered raw, float64). distances(sel,
        idx (m, K)) -> exact squared distances (m, K) (inf where idx is -1). Returns
        ``(d2 (n, k), idx (n, k), ok (n,))``: ok False where the scan limit was hit (the
        caller answers those densely). Every row not re-scored is provably at least as far
        as the k-th returned one.

        Each chunk of QUERY_CHUNK queries bounds the leaves and sets its radii; then one scan
        runs leaf after leaf for all the queries (``_C.leaf_scan_grouped``): a leaf is read
        from memory once for every query that probes it, where a scan query after query is
        bound by memory (10,000 memorization queries on 1.2M rows probe ~200 leaves each,
        ~250 queries per leaf). Queries go GROUPED_QUERIES at a time, which bounds the
        memory of the probe plan (~200 (query, leaf) pairs per query)."""
        n = v.shape[0]
        out_d = np.full((n, k), np.nan)
        out_i = np.full((n, k), -1, dtype=np.int64)
        ok = np.zeros(n, dtype=bool)
        for a in range(0, n, GROUPED_QUERIES):
            b = min(n, a + GROUPED_QUERIES)
            self._nearest_block(v[a:b], k, lambda sel, idx, a=a: distances(sel + a, idx), max_scan,
                                out_d[a:b], out_i[a:b], ok[a:b])
        return torch.from_numpy(out_d), torch.from_numpy(out_i), torch.from_numpy(ok)

    def _nearest_block(self, v, k, distances, max_scan, out_d, out_i, ok) -> None:
        """certified_nearest for queries v (n, d), written into out_d (n, k), out_i (n, k), ok (n,)."""
        n = v.shape[0]
        e32s = np.empty((n, self.dim), dtype=np.float32)
        dk2s = np.full(n, np.inf)
        Rs = np.zeros(n, dtype=np.float32)
        scanned_all = np.zeros(n)
        pairs_q, pairs_l = [], []  # the probed (query, leaf) pairs, by query
        for a in range(0, n, QUERY_CHUNK):
            b = min(n, a + QUERY_CHUNK)
            vn = v[a:b].detach().cpu().numpy()
            _, e32, err = self.embed(vn)
            # the first rows only set dk, the k-th exact distance: 2 leaves of up to 256 rows
            # are enough (8 cost 443 against 331 ms for 512 queries on 1.2M rows); the next
            # leaves by bound refine it
            low, near = self.leaf_lower(e32, err, nearest=8)
            first = self._first_rows(e32, near[:, :2], max(k, 4))
            d2 = distances(torch.arange(a, b), torch.from_numpy(first)).numpy()
            dk2 = self._refine_dk2(e32, err, low, near, d2, k, lambda idx, a=a, b=b: distances(torch.arange(a, b), idx))
            dk = np.sqrt(dk2) * (1 + 1e-12)
            q, l = np.nonzero(low <= dk[:, None])
            full = self.sizes[l] > 0
            q, l = q[full], l[full]
            scanned = np.bincount(q, weights=self.sizes[l], minlength=b - a)
            go = np.isfinite(dk) & (scanned <= max_scan)
            if not go.any():
                continue
            e32s[a:b], dk2s[a:b], scanned_all[a:b] = e32, dk2, scanned
            Rs[a:b] = np.where(go, self.scan_radius(np.where(go, dk, 0.0), err), np.float32(0))
            keep = go[q]
            pairs_q.append(a + q[keep])
            pairs_l.append(l[keep])
        if not pairs_q:
            return
        pq, pl = np.concatenate(pairs_q), np.concatenate(pairs_l)
        qs = np.unique(pq)  # the queries scanned, ascending (pairs are by query)
        at = np.searchsorted(pq, np.append(qs, n))
        # calls of about SCAN_ROWS_PER_CALL scanned rows at most: a call returns, and holds in
        # memory, at most the rows it scans (few near the data, nearly all of them far from it)
        before = np.cumsum(scanned_all[qs]) - scanned_all[qs]
        cuts = np.flatnonzero(np.diff(before // SCAN_ROWS_PER_CALL)) + 1
        for g0, g1 in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(qs)]])):
            gq = qs[g0:g1]
            self.scans += 1
            lims, _, I = _C().leaf_scan_grouped(e32s[gq], at[g0:g1 + 1] - at[g0], pl[at[g0]:at[g1]], Rs[gq], self.emb,
                                                self.starts, self.ids)
            # the scan returns each row once per query, and every row nearer than dk (the k
            # first rows' exact k-th distance): the k nearest rows are among them
            for c in range(0, len(gq), QUERY_CHUNK):
                sub = gq[c:c + QUERY_CHUNK]
                cl = lims[c:c + len(sub) + 1]
                per = np.diff(cl)
                cand = _padded(cl - cl[0], I[cl[0]:cl[-1]], -1)
                dd = distances(torch.from_numpy(sub), torch.from_numpy(cand)).numpy()
                kk = min(k, cand.shape[1])
                top = np.argpartition(dd, kk - 1, axis=1)[:, :kk] if kk < cand.shape[1] else np.argsort(dd, axis=1)
                top = np.take_along_axis(top, np.lexsort((np.take_along_axis(cand, top, 1),
                                                          np.take_along_axis(dd, top, 1)), axis=1), 1)  # ties by row
                got_d, got_i = np.take_along_axis(dd, top, 1), np.take_along_axis(cand, top, 1)
                # certified only when k rows were found and the k-th is no farther than dk
                # (every row not scanned is at least dk away); anything else runs dense
                good = (per >= k) & (got_d[:, -1] <= dk2s[sub]) if kk == k else np.zeros(len(sub), dtype=bool)
                out_d[sub[good]] = got_d[good]
                out_i[sub[good]] = got_i[good]
                ok[sub[good]] = True

    def _refine_dk2(self, e32, err, low, near, d2, k, distances):
        """The k-th exact squared distance (n,) that bounds the nearest-row search: of the
        first rows (exact squared distances d2 (n, F), from the leaves near[:, :2]) and of
        the rows within their k-th distance in the other leaves of near (n, P), the leaves
        of smallest bound (low (n, L)), re-scored exactly. Any k rows' k-th exact distance
        serves (every row nearer is then scanned), and the smaller it is, the fewer leaves
        the search probes (2,000 queries on 1.2M rows: 1.81 -> 1.58 s). distances(idx (n,
        K)) -> (n, K)."""
        dk2 = np.partition(d2, k - 1, axis=1)[:, k - 1] if d2.shape[1] >= k else np.full(d2.shape[0], np.inf)
        more = near[:, 2:]
        if more.shape[1] == 0:
            return dk2
        fin = np.isfinite(dk2)
        dk = np.sqrt(dk2) * (1 + 1e-12)
        more = np.where(np.take_along_axis(low, more, 1) <= dk[:, None], more, -1)
        R = np.where(fin, self.scan_radius(np.where(fin, dk, 0.0), err), np.float32(np.inf))
        lims, _, I = self._scan(e32, more, R.astype(np.float32))
        if len(I) == 0:
            return dk2
        both = np.concatenate([d2, distances(torch.from_numpy(_padded(lims, I, -1))).numpy()], axis=1)
        return np.partition(both, k - 1, axis=1)[:, k - 1]

    # ------------------------------------------------------------------ build
    @classmethod
    def build(cls, dataset, k: int | None = None, leaf_size: int | None = None, tree_dims: int = 4,
              sample_rows: int = 200_000, seed: int = 0) -> "EmbeddingIndex":
        """Embed every row of ``dataset`` and index the embeddings.

        k: principal directions (the embedding has k + 1 coordinates; default
        ``default_k(d)``). leaf_size: rows per leaf, at most (median splits leave 0.5-1 of
        it; default ``default_leaf_size(k)``). tree_dims: leading coordinates the k-d tree
        splits (plus the radial one); sample_rows: rows the principal directions are estimated from (seeded).
        Memory: M (k + 1) float32 for the embeddings.
        """
        if dataset is None or not hasattr(dataset, "raw_block"):
            raise DtypeError(f"dataset: expected an optden.Dataset, got {type(dataset).__name__}")
        M, d = dataset.M, dataset.d
        k = default_k(d) if k is None else k
        leaf_size = default_leaf_size(min(k, d)) if leaf_size is None and isinstance(k, (int, np.integer)) else leaf_size
        for name, val, lo_ in (("k", k, 1), ("leaf_size", leaf_size, 1), ("tree_dims", tree_dims, 1),
                               ("sample_rows", sample_rows, 1)):
            if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < lo_:
                raise InputError(f"{name}: expected an integer >= {lo_}, got {val!r}")
        k = int(min(k, d))
        tree_dims = int(min(tree_dims, k))
        center = np.asarray(dataset.center, dtype=np.float64)
        rng = np.random.default_rng(seed)
        sel = np.sort(rng.choice(M, size=min(M, int(sample_rows)), replace=False))
        S = dataset.raw_rows(sel).to(torch.float64).numpy() - center
        basis = _principal_directions(S, k)
        z = S @ basis
        r0 = float(np.sqrt(np.maximum((S * S).sum(1) - (z * z).sum(1), 0.0)).mean())
        probe = cls.__new__(cls)  # the embedding alone, to embed the rows
        probe.basis, probe.d, probe.k, probe.dim, probe.r0 = basis, d, k, k + 1, r0
        probe.c64 = embedding_float64_error(d, k)
        E = np.empty((M, k + 1), dtype=np.float32)
        err_rows = 0.0
        step = max(1, (32 << 20) // (8 * d))
        norms = np.sqrt(np.asarray(dataset.centered_sqnorms, dtype=np.float64)) * (1 + 1e-15)
        for a in range(0, M, step):
            b = min(M, a + step)
            w = dataset.raw_block(a, b).to(torch.float64).numpy() - center
            _, E[a:b], e = probe.embed(w, norms[a:b])
            err_rows = max(err_rows, float(e.max()))
        tree_cols = np.array(list(range(tree_dims)) + [k], dtype=np.int64)
        order, starts, lo, hi = _kd_leaves(E[:, tree_cols].astype(np.float64), int(leaf_size))
        return cls(dataset, basis, r0, _leaf_blocks(E[order], starts), order, starts, lo, hi, err_rows,
                   dataset.fingerprint, tree_cols)

    # ------------------------------------------------------------------ persistence
    @staticmethod
    def paths(dir) -> tuple[Path, Path]:
        """(arrays ``index_embedding.npz``, metadata ``index_embedding.json``) in ``dir``."""
        dir = Path(dir)
        return dir / "index_embedding.npz", dir / "index_embedding.json"

    def save(self, dir=None) -> Path:
        """Write ``index_embedding.npz`` and ``index_embedding.json`` into ``dir`` (default: the
        dataset's directory); the JSON, written last, records the dataset's fingerprint and
        the arrays' sha256."""
        dir = save_dir(self.dataset, dir)
        npath, jpath = self.paths(dir)
        jpath.unlink(missing_ok=True)
        tag = f".tmp-{os.getpid()}"
        with open(str(npath) + tag, "wb") as f:
            np.savez(f, basis=self.basis, emb=self.emb, ids=self.ids, starts=self.starts, lo=self.lo, hi=self.hi,
                     tree_cols=self.tree_cols)
        os.replace(str(npath) + tag, npath)
        meta = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "kind": self.kind, "M": self.M, "d": self.d,
                "k": self.k, "dtype": self.dataset.dtype, "dataset_sha256": self.fingerprint, "r0": self.r0,
                "err_rows": self.err_rows, "arrays_sha256": sha256_file(npath)}
        Path(str(jpath) + tag).write_text(json.dumps(meta))
        os.replace(str(jpath) + tag, jpath)
        return dir

    @classmethod
    def exists(cls, dataset) -> bool:
        dir = getattr(dataset, "path", None)
        return dir is not None and all(p.is_file() for p in cls.paths(dir))

    @classmethod
    def load(cls, dataset, dir=None) -> "EmbeddingIndex":
        """Open the embedding index saved beside ``dataset`` (or in ``dir``); DatasetNotFoundError
        when missing, DatasetError when corrupt or built for other rows."""
        dir = dir if dir is not None else getattr(dataset, "path", None)
        if dir is None:
            raise DatasetNotFoundError("dir: the dataset has no directory, so it has no saved index")
        npath, jpath = cls.paths(dir)
        if not (npath.is_file() and jpath.is_file()):
            raise DatasetNotFoundError(f"dir: {dir} has no embedding index; build one with "
                                       f"`optden index {dir} --kind embedding`")
        try:
            meta = json.loads(jpath.read_text())
            if meta.get("format") != INDEX_FORMAT or int(meta["version"]) not in (1, 2, INDEX_VERSION):
                raise ValueError(f"format {meta.get('format')!r} version {meta.get('version')}")
            M, d, fp = int(meta["M"]), int(meta["d"]), meta["dataset_sha256"]
        except (ValueError, KeyError, TypeError) as e:
            raise DatasetError(f"{jpath}: malformed index metadata ({e}); rebuild with `optden index`") from None
        if (M, d, meta.get("dtype")) != (dataset.M, dataset.d, dataset.dtype) or fp != dataset.fingerprint:
            raise DatasetError(f"{jpath}: the index was built for other rows than this dataset's; "
                               "rebuild it with `optden index --kind embedding`")
        if sha256_file(npath) != meta.get("arrays_sha256"):
            raise DatasetError(f"{npath}: sha256 differs from the one in {jpath.name}; the index file is corrupt")
        with np.load(npath) as z:
            a = {name: z[name] for name in ("basis", "emb", "ids", "starts", "lo", "hi", "tree_cols")}
        if a["emb"].shape != (M, a["basis"].shape[1] + 1) or a["ids"].shape != (M,) or a["starts"][-1] != M:
            raise DatasetError(f"{npath}: arrays do not match ({M}, {d}) rows")
        version = int(meta["version"])
        if version != INDEX_VERSION:  # an older layout: its rows, stored as this version stores them
            a["emb"] = _leaf_blocks(_stored_rows(a["emb"], a["starts"], np.arange(M), version), a["starts"])
        return cls(dataset, a["basis"], float(meta["r0"]), a["emb"], a["ids"], a["starts"], a["lo"], a["hi"],
                   float(meta["err_rows"]), fp, a["tree_cols"])


def default_k(d: int) -> int:
    """Principal directions of the embedding for rows of dimension d: d / 4, within 32..128.

    Measured (bench_prune.py, 64 queries y_i + sigma n, 1.2M textured 8x8 patches, d = 192;
    1.0M 16x16, d = 768): the share certified against the achievable one, and the time
    against the dense pass, grow with k until the scans of k + 1 coordinates cost more than
    the tighter bounds save. d = 192: k = 32 / 48 / 64 certify 0.969 / 1.0 / 1.0 at sigma
    0.02 (1.6x / 2.6x / 2.9x the dense pass) and 0.59 / 0.66 / 0.67 at 0.05 (0.99x / 1.09x /
    1.03x). d = 768: k = 32 / 64 / 128 / 192 / 256 certify 0.67 / 0.77 / 0.89 / 0.94 / 0.94
    at sigma 0.05 (achievable 0.97; 1.16x / 1.43x / 1.56x / 1.51x / 0.82x). Memory: M (k + 1)
    float32, about the size of uint8 rows at k = d / 4.
    """
    return int(min(128, max(32, int(d) // 4)))


def default_leaf_size(k: int) -> int:
    """Rows per leaf, at most, for an embedding of k principal directions: 256 up to k = 64,
    64 above. Small leaves spend on bounding every leaf (``box_lower``, an (n, leaves)
    float64 matrix) and large ones on scanning rows, whose cost grows with k + 1.

    Measured (bench_prune.py, 64 queries, sigma 0.02 / 0.05 the pruned evaluation's speed-up
    over the dense pass, memorization of 2,000 samples): 1.2M rows of d = 192 (k = 48),
    leaves of 64 / 128 / 256: 5.0x / 7.9x / 8.5x, 1.21x / 1.18x / 1.38x, 14.6x / 14.3x /
    16.8x. 1.0M rows of d = 768 (k = 128), leaves of 256 / 64: 8.7x / 8.8x, 1.90x / 1.94x,
    13.2x / 14.5x, and at sigma 0.05 leaves of 64 certify 0.891 of queries against 0.844
    (0.969 achievable): tighter boxes leave more out.
    """
    return 256 if int(k) <= 64 else 64


def _padded(lims: np.ndarray, vals: np.ndarray, fill) -> np.ndarray:
    """A scan's per-query results (query j's at vals[lims[j]:lims[j + 1]]) as one (n, W)
    matrix, each query's first and ``fill`` after (W: the most any query has, at least 1)."""
    per = np.diff(lims)
    out = np.full((len(per), max(1, int(per.max(initial=0)))), fill, dtype=vals.dtype)
    out[np.repeat(np.arange(len(per)), per), np.arange(len(vals)) - np.repeat(lims[:-1], per)] = vals
    return out


def _leaf_blocks(E: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """The rows' embeddings E (M, dim), leaf after leaf, stored as ``leaf_scan`` reads them
    (INDEX_VERSION 3): each leaf's rows (starts[l] .. starts[l + 1]) split into their first
    min(LEAD, dim) coordinates, coordinate after coordinate (lead, rows), then their other
    coordinates, row after row (rows, dim - lead), in the leaf's own span of the flat array.
    Returns an (M, dim) float32 array whose rows are no longer rows; ``_stored_rows`` reads
    rows back."""
    E = np.ascontiguousarray(E, dtype=np.float32)
    M, dim = E.shape
    lead = min(LEAD, dim)
    flat = np.empty(M * dim, dtype=np.float32)
    for a, b in zip(starts[:-1].tolist(), starts[1:].tolist()):
        n = b - a
        flat[a * dim: a * dim + n * lead] = E[a:b, :lead].T.reshape(-1)
        flat[a * dim + n * lead: b * dim] = E[a:b, lead:].reshape(-1)
    return flat.reshape(M, dim)


def _stored_rows(emb: np.ndarray, starts: np.ndarray, pos: np.ndarray, version: int) -> np.ndarray:
    """The float32 rows (len(pos), dim) at leaf-order positions pos of embeddings stored in
    the layout of index version ``version`` (1: whole rows; 2: the leading block row after
    row, then the others; 3: ``_leaf_blocks``)."""
    pos = np.asarray(pos, dtype=np.int64)
    dim = emb.shape[1]
    if version == 1:
        return np.asarray(emb[pos], dtype=np.float32)
    lead = min(LEAD, dim)
    leaf = np.searchsorted(starts, pos, side="right") - 1
    a, n = starts[leaf], starts[leaf + 1] - starts[leaf]
    p = pos - a
    flat = emb.reshape(-1)
    base = (a * dim)[:, None]
    cols = np.arange(lead)
    head = flat[base + (p * lead)[:, None] + cols] if version == 2 else flat[base + cols * n[:, None] + p[:, None]]
    tail = flat[(a * dim + n * lead + p * (dim - lead))[:, None] + np.arange(dim - lead)]
    return np.concatenate([head, tail], axis=1)


def _principal_directions(S: np.ndarray, k: int) -> np.ndarray:
    """Top k principal directions (d, k) float64 of the centered sample S (n, d), orthonormal
    to float64 rounding (QR of the eigenvectors)."""
    n, d = S.shape
    if d <= 2048:
        C = S.T @ S / max(1, n)
        _, vec = np.linalg.eigh(C)
        P = vec[:, ::-1][:, :k]
    else:  # a covariance of d^2 doubles is too large: a randomized SVD of the sample
        _, _, V = torch.svd_lowrank(torch.from_numpy(S), q=min(d, k + 16), niter=4)
        P = V[:, :k].numpy()
    Q, _ = np.linalg.qr(np.ascontiguousarray(P, dtype=np.float64))
    return np.ascontiguousarray(Q)


def _kd_leaves(X: np.ndarray, leaf: int):
    """A k-d partition of the rows X (M, t): median splits on the widest coordinate until
    at most ``leaf`` rows remain. Returns (order (M,) int64 the rows leaf after leaf,
    starts (L + 1,) the leaves' first positions in order, lo / hi (L, t) their exact boxes)."""
    M = X.shape[0]
    order = np.arange(M)
    bounds = []
    stack = [(0, M)]
    while stack:
        a, b = stack.pop()
        if b - a <= leaf:
            bounds.append(a)
            continue
        seg = X[order[a:b]]
        j = int(np.argmax(seg.max(0) - seg.min(0)))
        mid = (b - a) // 2
        order[a:b] = order[a:b][np.argpartition(seg[:, j], mid)]
        stack.append((a + mid, b))
        stack.append((a, a + mid))
    starts = np.array(sorted(bounds) + [M], dtype=np.int64)
    Xs = X[order]
    return order, starts, np.minimum.reduceat(Xs, starts[:-1]), np.maximum.reduceat(Xs, starts[:-1])
