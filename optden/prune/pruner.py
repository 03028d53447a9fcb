"""Certified evaluation from a pruned candidate set (docs/design.md, "Pruning").

``Pruner.evaluate`` searches a ``PruneIndex`` for each query's candidates, re-scores them
exactly (float64 direct differences), and accepts a query only when the rows it left
out (the index's *shells*: ``count`` rows at exact distance >= ``lower``) weigh at most
``bounds.mass_tolerance(tol)`` of the total; the rest go to the dense pass. Along a
trajectory the certified candidate sets are kept in a ``NeighbourCache``
(``optden.prune.cache``) and re-checked at the next query before any new search.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .. import _ext
from ..engine.bounds import DISTANCE_MARGIN, EPS64, gamma, mass_tolerance
from ..errors import InputError
from .cache import NeighbourCache
from .index import faiss_gpu_available, move_to_shell

#: Candidate-count groups of ``Pruner.evaluate``'s re-score (widths of the padded matrices).
BUCKET_WIDTHS = (64, 1024, 16384)

__all__ = ["Pruner", "PrunedResult", "shell_log_mass", "exact_candidates", "exact_sq_distances"]


@dataclass
class PrunedResult:
    """Per query of a batch (float64 on the query device); only rows with ``ok`` are set.

    ok: (N,) bool certified; dc: (N, d) D* in centered raw space; lse: (N,) logsumexp of
    the candidates' exact logits; top_w / top_idx: (N, k_out) weights and local rows;
    bound: (N,) relative weight of the rows left out; cached: (N,) bool answered from the
    neighbour cache (no search).
    """

    ok: torch.Tensor
    dc: torch.Tensor
    lse: torch.Tensor
    top_w: torch.Tensor
    top_idx: torch.Tensor
    bound: torch.Tensor
    cached: torch.Tensor


def shell_log_mass(coef: torch.Tensor, counts: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """log of sum_s count_s exp(-coef lower_s^2): (n,) upper bound on the left-out mass."""
    lw = torch.where(counts > 0, torch.log(counts.clamp(min=1e-300)) - coef[:, None] * lower**2, -torch.inf)
    lw = torch.where(torch.isinf(lower), torch.full_like(lw, -torch.inf), lw)
    return torch.logsumexp(lw, dim=1)


def exact_candidates(v: torch.Tensor, coef: torch.Tensor, source, idx: torch.Tensor, k_out: int,
                     chunk_bytes: int = 1 << 27):
    """Exact float64 softmax over each query's candidates (direct differences).

    v: (n, d); coef: (n,); idx: (n, K) local rows, -1 = none. Returns ``(lse (n,), dc (n, d)
    centered, top_w (n, min(k_out, K)), top_idx (same), logits (n, K) (-inf where none))``.
    On CPU the C++ re-score (``optden._C.candidate_softmax``) reads the candidate rows in
    place from the dataset's array or memory map; elsewhere a chunked torch gather.
    """
    if _native(source, v):
        lg, lse, dc = _ext.C.candidate_softmax(
            np.ascontiguousarray(v.detach().numpy(), dtype=np.float64),
            np.ascontiguousarray(coef.detach().numpy(), dtype=np.float64),
            source.dataset.raw, np.ascontiguousarray(idx.numpy(), dtype=np.int64),
            np.ascontiguousarray(source.center.numpy(), dtype=np.float64), source.dtype)
        lg, lse, dc = torch.from_numpy(lg), torch.from_numpy(lse), torch.from_numpy(dc)
        w, _ = _softmax_by_sum(lg)
    else:
        lse, dc, w, lg = _torch_candidates(v, coef, source, idx, chunk_bytes)
    kk = min(k_out, idx.shape[1])
    tw, wi = w.topk(kk, dim=1)
    return lse, dc, tw, idx.gather(1, wi), lg


def _softmax_by_sum(lg: torch.Tensor):
    """``(w (n, K), lse (n,))`` of logits lg (n, K), the weights normalised by their sum:
    ``exp(lg - lse)`` would round at the size of the logits (1e11 and up: weights that no
    longer sum to 1)."""
    lmax = lg.max(1, keepdim=True).values
    e = torch.exp(lg - lmax)
    s = e.sum(1, keepdim=True)
    return e / s, (lmax + torch.log(s))[:, 0]


def _native(source, v: torch.Tensor) -> bool:
    """Whether the C++ re-score can read this source's rows: all rows of a dataset, on CPU."""
    return (v.device.type == "cpu" and source.index is None and _ext.C is not None
            and hasattr(_ext.C, "candidate_softmax") and isinstance(getattr(source.dataset, "raw", None), np.ndarray))


def exact_sq_distances(v: torch.Tensor, source, idx: torch.Tensor) -> torch.Tensor:
    """Exact squared distances (n, K) float64 of the candidate rows idx (n, K) from v (n, d),
    inf where idx is -1 (the logits of ``exact_candidates`` at coef 1)."""
    if _native(source, v) and hasattr(_ext.C, "candidate_sqdist"):  # the re-score's arithmetic, no softmax
        return torch.from_numpy(_ext.C.candidate_sqdist(
            np.ascontiguousarray(v.detach().numpy(), dtype=np.float64), source.dataset.raw,
            np.ascontiguousarray(idx.numpy(), dtype=np.int64),
            np.ascontiguousarray(source.center.numpy(), dtype=np.float64), source.dtype))
    one = torch.ones(v.shape[0], dtype=torch.float64, device=v.device)
    return -_torch_candidates(v, one, source, idx, 1 << 27)[3]


def _torch_candidates(v, coef, source, idx, chunk_bytes):
    """The torch re-score: (lse, dc, weights (n, K), logits (n, K)); only valid pairs are
    computed, in chunks of about ``chunk_bytes``."""
    n, K = idx.shape
    d = v.shape[1]
    qi, ci = (idx >= 0).nonzero(as_tuple=True)
    rid = idx[qi, ci]
    per = max(1, chunk_bytes // (8 * d))
    lg = torch.full((n, K), -torch.inf, dtype=torch.float64, device=v.device)

    def rows(a, b):
        return source.gather(rid[a:b]).to(torch.float64) - source.center

    kept = None
    for a in range(0, rid.numel(), per):
        b = min(rid.numel(), a + per)
        q = rows(a, b)
        diff = v[qi[a:b]] - q
        lg[qi[a:b], ci[a:b]] = -coef[qi[a:b]] * (diff * diff).sum(1)
        kept = q if rid.numel() <= per else None
    w, lse = _softmax_by_sum(lg)
    dc = torch.zeros(n, d, dtype=torch.float64, device=v.device)
    for a in range(0, rid.numel(), per):
        b = min(rid.numel(), a + per)
        q = kept if kept is not None else rows(a, b)
        # (n, b - a) sparse weights (pairs are sorted by query) times the rows (b - a, d)
        crow = torch.searchsorted(qi[a:b], torch.arange(n + 1, device=v.device))
        with warnings.catch_warnings():  # "sparse CSR is beta": the product below is plain
            warnings.simplefilter("ignore", UserWarning)
            S = torch.sparse_csr_tensor(crow, torch.arange(b - a, device=v.device), w[qi[a:b], ci[a:b]],
                                        size=(n, b - a))
        dc += S @ q
    return lse, dc, w, lg


def direct_misweight(lg: torch.Tensor, d: int) -> torch.Tensor:
    """(n,) bound on the L1 misweight of the softmax of direct-difference logits lg (n, K)
    (-inf: no candidate): each is within gamma_{d+3} |l| (1.01) of the exact one (the
    differences, their squares and sum, coef), so the true unnormalised weights lie in
    exp(l -+ that) and the L1 distance of the normalised ones is at most
    2 sum (hi - lo) / sum lo. Large for a query far from the data at small sigma: the
    query then runs dense, whose re-score works from gaps (``engine/gaps.py``)."""
    err = 1.01 * gamma(d + 3, EPS64) * lg.abs()
    m = lg.max(1, keepdim=True).values
    lo = torch.exp(lg - err - m)
    hi = torch.exp(torch.where(torch.isfinite(lg), lg + err, lg) - m)
    return torch.nan_to_num(2.0 * (hi - lo).sum(1) / lo.sum(1), nan=torch.inf)


class Pruner:
    """Certified top-k evaluation over a ``PruneIndex`` or an ``EmbeddingIndex`` (all rows of its dataset).

    tol: target relative error of D* (as ``OptimalDenoiser.tol``); a query is certified
    when the relative weight of every row left out is <= ``bounds.mass_tolerance(tol)``
    (the same margin as ``optden.engine.precision.certify``). k0: first search width; widened x4 up to kmax (capped
    at M / 64), then the caller falls back to the dense pass. max_probe_frac: IVF queries that would need
    more than this fraction of the rows are left to the dense pass (cheaper there).
    Embedding index (``optden.prune.embedding``): one certified search per call; a query
    whose search would scan more than ``max_scan_frac`` of the rows, or re-score more than
    ``max_rescore`` candidates, goes dense; exact nearest rows (``OptimalDenoiser.nearest``)
    may scan ``max_scan_nearest_frac`` of the rows.
    """

    def __init__(self, index, source, tol: float = 1e-6, k0: int = 64, kmax: int = 4096,
                 max_probe_frac: float = 0.25, sample_rows: int = 1024, seed: int = 0, first_probes: int = 4,
                 max_scan_frac: float = 0.1, max_rescore: int = 8192, max_scan_nearest_frac: float = 0.3):
        if source.M != index.M:
            raise InputError("source: the pruned path needs all rows (class-conditional runs dense)")
        self.index = index
        self.source = source
        self.tol_mass = mass_tolerance(float(tol))
        self.k0 = max(1, min(int(k0), index.M))
        # the exact float64 re-score of a row costs ~10x a dense-pass row: beyond M / 64
        # candidates (x the widening rounds) the dense pass is cheaper
        self.kmax = min(index.M, max(4 * self.k0, min(int(kmax), index.M // 64)),
                        2048 if faiss_gpu_available() else index.M)
        self.max_probe_frac = float(max_probe_frac)
        self.max_scan_frac = float(max_scan_frac)
        # exact nearest rows scan cheaper rows (most stop after 8 coordinates, and no shells
        # are binned): 0.3 of the rows against 0.1 measured 5.1x -> 5.7x the dense pass
        # for 2,000 memorization queries on 1.2M rows
        self.max_scan_nearest_frac = float(max_scan_nearest_frac)
        self.max_rescore = int(max_rescore)
        self.first_probes = max(1, int(first_probes))
        self.cache = NeighbourCache()
        self.last = {"searched": 0, "certified": 0, "seconds": 0.0}
        self.stats = {"queries": 0, "certified": 0, "cached": 0, "dense": 0, "searches": 0, "rows_scored": 0,
                      "rows_scanned": 0.0}
        g = np.random.default_rng(seed)
        ns = min(index.M, int(sample_rows))
        self._sample = torch.from_numpy(np.sort(g.choice(index.M, ns, replace=False))).to(source.device)
        self._sample_rows = None

    # ---------------------------------------------------------------- gate
    def worth_trying(self, v: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        """(N,) bool: queries whose posterior looks concentrated enough to certify with
        kmax rows (estimated from a fixed random sample of rows). Cost only, never
        correctness: a query let through that cannot certify goes dense after searching."""
        if self._sample_rows is None:
            self._sample_rows = self.source.gather(self._sample).to(torch.float64) - self.source.center
        q = self._sample_rows
        lg = -coef[:, None] * torch.cdist(v, q, compute_mode="donot_use_mm_for_euclid_dist") ** 2
        frac = torch.exp(lg - lg.max(1, keepdim=True).values).mean(1)  # effective share of rows
        return frac * self.index.M <= 0.25 * self.kmax

    # ---------------------------------------------------------------- IVF probes
    def _probes(self, v: torch.Tensor, coef: torch.Tensor, dref: torch.Tensor):
        """Lists each query must search: all but the smallest-bound lists whose summed
        bound stays <= tol_mass / 2 of exp(-coef dref^2). Returns (probes (n, P) -1 padded,
        rows needed (n,))."""
        low = self.index.centroid_lower(v)  # (n, nlist)
        sizes = torch.from_numpy(self.index.list_sizes).to(v.device)
        lw = torch.log(sizes.clamp(min=1e-300))[None, :] - coef[:, None] * (low**2 - dref[:, None] ** 2)
        lw = torch.where(sizes[None, :] > 0, lw, torch.full_like(lw, -torch.inf))
        order = lw.argsort(dim=1)  # ascending: smallest bounds first
        srt = lw.gather(1, order)
        cum = torch.logcumsumexp(srt, dim=1)
        skip = cum <= math.log(0.5 * self.tol_mass)
        need = ~skip
        P = int(need.sum(1).max())
        # the needed lists are the tail of `order`; take the last P and blank the skipped
        tail = order[:, -P:] if P else order[:, :0]
        tail_need = need[:, -P:] if P else need[:, :0]
        probes = torch.where(tail_need, tail, torch.full_like(tail, -1))
        rows = (sizes[None, :].expand_as(lw).gather(1, order) * need).sum(1)
        return probes, rows

    def _dref_loose(self, v: torch.Tensor) -> torch.Tensor:
        """Upper bound on the nearest row's distance: min over lists of ||v - c|| + r."""
        c = torch.from_numpy(self.index.centroids).to(v.device)
        r = torch.from_numpy(self.index.radii).to(v.device)
        dist = torch.cdist(v, c, compute_mode="donot_use_mm_for_euclid_dist")
        sizes = torch.from_numpy(self.index.list_sizes).to(v.device)
        dist = torch.where(sizes[None, :] > 0, dist * (1 + 1e-9) + r, torch.full_like(dist, torch.inf))
        return dist.min(1).values

    def _trim(self, idx, lg, lse, coef, counts, lower):
        """Shrink a certified candidate set before caching it: candidates whose exact logit
        is below ``lse - log(M / tol_mass) - 10`` move to a new shell (their count and their
        smallest exact distance), so cache hits re-score only the rows that matter."""
        keep = lg >= (lse - math.log(self.index.M / self.tol_mass) - 10.0)[:, None]
        drop = (idx >= 0) & ~keep
        dist2 = torch.where(drop, -lg / coef[:, None], torch.full_like(lg, torch.inf))
        low = torch.sqrt(dist2.min(1).values.clamp(min=0.0)) * (1.0 - DISTANCE_MARGIN)
        return move_to_shell(idx, keep, counts, lower, low)

    # ---------------------------------------------------------------- evaluate
    def evaluate(self, v: torch.Tensor, coef: torch.Tensor, k_out: int, use_cache: bool = True,
                 gate: bool = True, k_need: int | None = None, search=None) -> PrunedResult:
        """Certified evaluation of centered raw queries v (N, d) float64, coef (N,).

        k_out: width of top_w / top_idx; k_need: how many of them must be real rows
        (default k_out; entries past a query's candidates have weight 0 and index -1).
        search: None (search every query the cache did not answer), or a callable
        ``(positions (m,) int64) -> (m,) bool`` choosing which of them to search
        (``optden.prune.policy``); the others are left uncertified (dense). ``last``
        records the search part: queries searched, certified, seconds.

        Rows that cannot be certified within kmax candidates have ``ok`` False (the
        caller runs the dense pass for them). Never returns an uncertified ``ok`` row.
        """
        n, d = v.shape
        dev = v.device
        k_out = max(1, min(k_out, self.index.M))
        nan = torch.nan
        res = PrunedResult(
            ok=torch.zeros(n, dtype=torch.bool, device=dev),
            dc=torch.full((n, d), nan, dtype=torch.float64, device=dev),
            lse=torch.full((n,), nan, dtype=torch.float64, device=dev),
            top_w=torch.full((n, k_out), nan, dtype=torch.float64, device=dev),
            top_idx=torch.full((n, k_out), -1, dtype=torch.int64, device=dev),
            bound=torch.full((n,), nan, dtype=torch.float64, device=dev),
            cached=torch.zeros(n, dtype=torch.bool, device=dev),
        )
        self.stats["queries"] += n
        key = (self.index.fingerprint, self.index.kind)
        k_need = k_out if k_need is None else max(1, min(int(k_need), k_out))

        def accept(sel, idx, counts, lower, store: bool):
            """Rescore candidates of queries sel exactly; set the certified ones; return
            ``(failed queries, their best exact logit)``. idx is left-packed (each query's
            candidates first, -1 after): queries are taken in groups of similar candidate
            counts, each cut to its own width, since one padded (n, K) matrix costs every
            query the widest one's K (at sigma 0.02 on 1.2M rows: medians of 4-7
            candidates, a few queries with 10^4, and ~35 of a call's ~100 ms spent on
            padding in the torch steps below)."""
            per = (idx >= 0).sum(1)
            if idx.shape[1] <= BUCKET_WIDTHS[0] or sel.numel() <= 1:
                return accept_group(sel, idx, counts, lower, store)
            failed, lmax, lo = [], [], -1
            for hi in [b for b in BUCKET_WIDTHS if b < idx.shape[1]] + [idx.shape[1]]:
                grp = (per > lo) & (per <= hi)
                lo = hi
                if bool(grp.any()):
                    width = max(1, int(per[grp].max()))
                    f, m = accept_group(sel[grp], idx[grp, :width], counts[grp], lower[grp], store)
                    failed.append(f)
                    lmax.append(m)
            return torch.cat(failed), torch.cat(lmax)

        def accept_group(sel, idx, counts, lower, store: bool):
            lse, dc, tw, ti, lg = exact_candidates(v[sel], coef[sel], self.source, idx, k_out)
            lmax = lg.max(1).values
            self.stats["rows_scored"] += int((idx >= 0).sum())
            bound = torch.exp(shell_log_mass(coef[sel], counts, lower) - lse) + direct_misweight(lg, v.shape[1])
            good = (bound <= self.tol_mass) & ((idx >= 0).sum(1) >= k_need)
            g = sel[good]
            kk = tw.shape[1]
            res.ok[g] = True
            res.dc[g], res.lse[g], res.bound[g] = dc[good], lse[good], bound[good]
            res.top_w[g, :kk], res.top_idx[g, :kk] = tw[good], ti[good]
            if kk < k_out:
                res.top_w[g, kk:] = 0.0
            if store and use_cache and g.numel():
                self.cache.store(key, v, g, *self._trim(idx[good], lg[good], lse[good], coef[g],
                                                       counts[good], lower[good]))
            return sel[~good], lmax[~good]

        pending = torch.arange(n, device=dev)
        if use_cache and self.cache.idx is not None and self.cache.idx.shape[1] < k_need:
            self.cache.clear()  # cached candidate sets are narrower than the weights asked for
        if use_cache:
            rows, idx, counts, lower = self.cache.lookup(key, v)
            if rows.numel():
                failed, _ = accept(rows, idx, counts, lower, store=False)
                hit = rows[res.ok[rows]]
                res.cached[hit] = True
                self.cache.hits += int(hit.numel())
                self.cache.misses += int(failed.numel())
                self.cache.invalidate(failed)
                pending = (~res.ok).nonzero().flatten()
        if pending.numel() and search is not None:
            pending = pending[search(pending).to(pending.device)]
        t0 = time.perf_counter()
        before = int(res.ok.sum())
        if pending.numel() and self.index.kind == "embedding":
            self._search_embedding(v, coef, pending, accept, k_need)
        elif pending.numel():
            if gate:
                pending = pending[self.worth_trying(v[pending], coef[pending])]
            self._search_index(v, coef, pending, accept, k_need)
        self.last = {"searched": int(pending.numel()), "certified": int(res.ok.sum()) - before,
                     "seconds": time.perf_counter() - t0}
        done = int(res.ok.sum())
        self.stats["certified"] += done
        self.stats["cached"] += int(res.cached.sum())
        self.stats["dense"] += n - done
        return res

    def _search_embedding(self, v, coef, pending, accept, k_need: int) -> None:
        """One certified search of the embedding index for queries v[pending]; accept() the
        ones it searched (the others stay uncertified: dense)."""
        src = self.source

        def rescore(sel, idx):  # exact logits of rows idx for the queries pending[sel]
            q = pending[sel.to(pending.device)]
            return exact_candidates(v[q], coef[q], src, idx.to(v.device), 1)[4].cpu()

        found = self.index.certified_candidates(v[pending], coef[pending], self.tol_mass, rescore,
                                                max_scan=self.max_scan_frac * self.index.M,
                                                max_rescore=self.max_rescore, min_rows=k_need)
        self.stats["searches"] += 1
        self.stats["rows_scanned"] += float(found.scanned.sum())
        ok = found.searched.to(pending.device)
        if bool(ok.any()):
            dev = v.device
            accept(pending[ok], found.idx[ok.cpu()].to(dev), found.counts[ok.cpu()].to(dev),
                   found.lower[ok.cpu()].to(dev), store=True)

    def _search_index(self, v, coef, pending, accept, k_need: int) -> None:
        """Flat / IVF ``PruneIndex`` searches, widened x4 up to kmax, for queries v[pending]."""
        dev = v.device
        k = max(self.k0, k_need)
        dref = None
        while pending.numel():
            probes = None
            if self.index.kind == "ivf" and dref is None:
                # first round: the few lists nearest by centroid, to find an exact best distance
                c = torch.from_numpy(self.index.centroids).to(dev)
                cd = torch.cdist(v[pending], c, compute_mode="donot_use_mm_for_euclid_dist")
                probes = cd.topk(min(self.index.nlist, self.first_probes), dim=1, largest=False).indices
            elif self.index.kind == "ivf":
                probes, need_rows = self._probes(v[pending], coef[pending], dref)
                fits = need_rows <= self.max_probe_frac * self.index.M
                pending, probes = pending[fits], probes[fits]
                if pending.numel() == 0:
                    break
            cand = self.index.search(v[pending], k, probes)
            cand = cand.truncate(coef[pending], math.log(self.index.M / self.tol_mass) + 10.0)
            self.stats["searches"] += 1
            failed, lmax = accept(pending, cand.idx, cand.counts, cand.lower, store=True)
            if failed.numel() == 0 or k >= self.kmax:
                break
            # widen: x4 candidates, and (IVF) the probes for the exact best distance found
            pending = failed
            if self.index.kind == "ivf":  # exact best distance found so far (an upper bound on d_1)
                dref = torch.sqrt(torch.clamp(-lmax / coef[failed], min=0.0)) * (1 + 1e-9)
                dref = torch.minimum(dref, self._dref_loose(v[failed]))
            k = min(self.kmax, 4 * k)
