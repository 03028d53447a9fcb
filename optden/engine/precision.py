"""The precision mechanism (docs/design.md, "The precision contract"): coarse pass, error bound, exact re-score.

A backend's coarse pass gives, per query, an online softmax over coarse logits, the top
K coarse logits, and ``delta``: a rigorous bound on |coarse - exact| for every row's
logit (only the row-dependent part matters: an error common to all rows cancels in the
softmax). ``certify`` then picks, per query:

* ``DENSE``: delta <= tol / 4 (``bounds.DENSE_FRACTION``). Every weight is off by a factor within exp(+-2 delta),
  so the coarse softmax already meets the tolerance.
* ``RESCORED``: the gap between the best and the K-th coarse logit exceeds
  ``T + 2 delta`` with ``T = log((M - K) / tol_mass)``: every row outside the top K has
  weight below ``exp(-T)`` times the largest, so together at most ``tol_mass`` of the
  total. The K rows are re-scored exactly (float64 direct differences).
* otherwise the query is passed to ``fallback`` (a more precise coarse pass, e.g. the
  float64 torch backend behind a fast low-precision one) and certified again; with no
  fallback left, ``EXACT``: a full pass of float64 direct differences over every row
  (rare: small sigma with many near-equidistant rows).

Logits are ``l_i = -coef ||v - q_i||^2`` with ``v`` the centered raw query and ``q_i``
the centered raw row (``coef = scale^2 / (2 sigma^2)``).

A pass that accumulated the pass statistics (``Partial.has_stats``) is certified with
them: ``Certified.stats`` holds the posterior's ESS, entropy, mean logit and top weights
with bounds from the same mode (``optden.engine.stats``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .bounds import dense_threshold, mass_tolerance, query_shift
from .partial import Partial
from .stats import PassStats, from_exact, from_partial, from_topk

DENSE, RESCORED, EXACT = 0, 1, 2
MODE_NAMES = {DENSE: "dense", RESCORED: "rescored", EXACT: "exact"}

# Default tolerance on the relative error of D* (the contract is 1e-5; keep a margin).
DEFAULT_TOL = 1e-6


@dataclass
class Certified:
    """Certified result per query (float64, on the query device).

    dc:        (N, d) D* in centered raw space.
    lse:       (N,) logsumexp of the logits (within ``excluded`` of the truth, log-wise).
    top_w:     (N, K) largest weights, descending; top_idx: (N, K) their source positions.
    excluded:  (N,) bound on the relative weight that the result leaves out or misweights.
    mode:      (N,) int8, DENSE / RESCORED / EXACT.
    delta:     (N,) the coarse-pass bound that was certified against (the fallback's, for
               the queries the fallback certified).
    stats:     the posterior statistics and their bounds (``optden.engine.stats.PassStats``),
               when the pass accumulated them; else None.
    """

    dc: torch.Tensor
    lse: torch.Tensor
    top_w: torch.Tensor
    top_idx: torch.Tensor
    excluded: torch.Tensor
    mode: torch.Tensor
    delta: torch.Tensor
    stats: PassStats | None = None


def exact_logits(v: torch.Tensor, coef: torch.Tensor, rows: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """Exact float64 logits by direct differences.

    v: (n, d) float64; coef: (n,); rows: (n, K, d) raw rows gathered per query.
    Returns (n, K) float64 ``-coef ||v - (rows - center)||^2``.
    """
    diff = v[:, None, :] - (rows.to(torch.float64) - center)
    return -coef[:, None] * (diff * diff).sum(-1)


def rescore(v, coef, source, top_idx, chunk_bytes=1 << 27):
    """Exact logits (n, K) of the K candidate rows top_idx (n, K) of each query, chunked over queries."""
    n, k = top_idx.shape
    d = v.shape[1]
    per_query = max(1, chunk_bytes // max(1, k * d * 8))
    out = []
    for a in range(0, n, per_query):
        b = min(n, a + per_query)
        rows = source.gather(top_idx[a:b]).reshape(b - a, k, d)
        out.append(exact_logits(v[a:b], coef[a:b], rows, source.center))
    return torch.cat(out)


def exact_pass(v: torch.Tensor, coef: torch.Tensor, source, k: int, stats: bool = False) -> Partial:
    """Online softmax over every row with float64 direct-difference logits: a ``Partial``
    whose logits are exact (delta 0). Memory is one block of ``n * B * d`` doubles, so the
    caller passes few queries. stats: accumulate the pass statistics too."""
    n, d = v.shape
    part = Partial.empty(n, d, k, v.device, stats=stats)
    rows_per_block = max(1, (1 << 24) // max(1, n * d))
    for off, raw, _ in source.blocks():
        for a in range(0, raw.shape[0], rows_per_block):
            q = raw[a : a + rows_per_block].to(torch.float64) - source.center
            diff = v[:, None, :] - q[None, :, :]
            part.absorb(-coef[:, None] * (diff * diff).sum(-1), q, off + a)
    return part


def heaviest_distinct_logit(v: torch.Tensor, coef: torch.Tensor, source, top_raw: torch.Tensor) -> torch.Tensor:
    """Per query, the largest exact float64 logit over the rows that differ from its top row.

    v: (n, d) float64 centered raw queries; coef: (n,); top_raw: (n, d) each query's top row
    as stored. Returns (n,) float64, -inf where every row equals the top row. One float64
    pass over the rows (the posterior covariance's scale is set by this row when the data
    set's copies of the top row fill a whole top K).
    """
    n, d = v.shape
    best = torch.full((n,), -math.inf, dtype=torch.float64, device=v.device)
    rows_per_block = max(1, (1 << 24) // max(1, n * d))
    for _, raw, _ in source.blocks():
        for a in range(0, raw.shape[0], rows_per_block):
            r = raw[a : a + rows_per_block]
            q = r.to(torch.float64) - source.center
            diff = v[:, None, :] - q[None, :, :]
            lam = -coef[:, None] * (diff * diff).sum(-1)
            copy = (r[None, :, :] == top_raw[:, None, :]).all(-1)
            best = torch.maximum(best, lam.masked_fill(copy, -math.inf).max(dim=1).values)
    return best


def certify(p, v: torch.Tensor, coef: torch.Tensor, source, tol: float = DEFAULT_TOL, fallback=None) -> Certified:
    """Turn a coarse ``Partial`` into a certified result (see the module docstring).

    v: (N, d) float64 centered raw queries; coef: (N,) float64; ``source`` the row source
    the pass ran over (M rows). tol: target relative error of D*.
    fallback: None, or a callable ``(v_sub, coef_sub) -> Partial`` giving a more precise
    coarse pass for the queries this pass cannot certify.
    """
    n, k = p.top_val.shape
    M = source.M
    tol_mass = mass_tolerance(tol)
    dc = p.mean()
    lse = p.lse()
    top_w = torch.exp(p.top_val - lse[:, None])
    top_idx = p.top_idx.clone()
    excluded = torch.expm1(2.0 * p.delta)
    delta = p.delta.clone()  # per query: the bound of the pass that certified it
    mode = torch.full((n,), DENSE, dtype=torch.int8, device=v.device)
    stats = None
    if p.has_stats:  # DENSE statistics for all; the other modes overwrite theirs below
        vnorm, shift, qmax, d = v.norm(dim=1), query_shift(v, source.center), source.max_cnorm, v.shape[1]
        stats = from_partial(p, M, coef, vnorm, shift, qmax, d)

    need = ~(p.delta <= dense_threshold(tol))  # a NaN bound (overflowing input) is never DENSE
    if bool(need.any()):
        T = math.log(max(M - k, 1) / tol_mass)
        gap = p.top_val[:, 0] - p.top_val[:, -1]
        ok_topk = need & ((k >= M) | (gap > T + 2.0 * p.delta))
        sel = ok_topk.nonzero().flatten()
        if sel.numel():
            lg = rescore(v[sel], coef[sel], source, p.top_idx[sel])
            lse_k = torch.logsumexp(lg, dim=1)
            w = torch.exp(lg - lse_k[:, None])
            rows = source.gather(p.top_idx[sel]).reshape(sel.numel(), k, -1).to(torch.float64) - source.center
            dc[sel] = torch.einsum("nk,nkd->nd", w, rows)
            lse[sel] = lse_k
            order = w.argsort(dim=1, descending=True, stable=True)
            top_w[sel] = w.gather(1, order)
            top_idx[sel] = p.top_idx[sel].gather(1, order)
            # outside rows: logit <= top_val[K-1] + delta, best exact logit = lg.max()
            out_log = (p.top_val[sel, -1] + p.delta[sel] - lg.max(1).values) + math.log(max(M - k, 0) or 1)
            excluded[sel] = torch.where(
                torch.tensor(k >= M, device=v.device), torch.zeros_like(out_log), torch.exp(out_log)
            )
            mode[sel] = RESCORED
            if stats is not None:
                stats.put(sel, from_topk(lg, p.top_val[sel, -1] + p.delta[sel], M, coef[sel], shift[sel], qmax, d))
        fail = (need & ~ok_topk).nonzero().flatten()
        if fail.numel() and fallback is not None:
            sub = certify(fallback(v[fail], coef[fail]), v[fail], coef[fail], source, tol)
            dc[fail], lse[fail], top_w[fail], top_idx[fail] = sub.dc, sub.lse, sub.top_w, sub.top_idx
            excluded[fail], mode[fail], delta[fail] = sub.excluded, sub.mode, sub.delta
            if stats is not None:  # a fallback without statistics leaves them poisoned
                stats.put(fail, sub.stats if sub.stats is not None else PassStats.empty(fail.numel(), k, v.device))
            fail = fail[:0]
        for a in range(0, fail.numel(), 8):
            idx = fail[a : a + 8]
            ex = exact_pass(v[idx], coef[idx], source, k, stats=stats is not None)
            lse_e = ex.lse()
            dc[idx] = ex.mean()
            lse[idx] = lse_e
            top_w[idx] = torch.exp(ex.top_val - lse_e[:, None])
            top_idx[idx] = ex.top_idx
            excluded[idx] = 0.0
            mode[idx] = EXACT
            if stats is not None:
                stats.put(idx, from_exact(ex, M, coef[idx], vnorm[idx], shift[idx], qmax, d))
    return Certified(dc=dc, lse=lse, top_w=top_w, top_idx=top_idx, excluded=excluded, mode=mode, delta=delta,
                     stats=stats)
