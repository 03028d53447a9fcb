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
  total. The K rows are re-scored exactly (``rescore_softmax``).
* otherwise the query is passed to ``fallback`` (a more precise coarse pass, e.g. the
  float64 torch backend behind a fast low-precision one) and certified again; with no
  fallback left, ``EXACT``: a full float64 pass over every row (``exact_pass``; rare:
  small sigma with many near-equidistant rows).

Logits are ``l_i = -coef ||v - q_i||^2`` with ``v`` the centered raw query and ``q_i``
the centered raw row (``coef = scale^2 / (2 sigma^2)``).

The exact re-score and the exact pass work with logits relative to a reference row (the
nearest), from the squared-distance gaps of ``optden.engine.gaps``, and normalise the
weights by their sum: both keep the result right when the logits are huge (a query far
from the data, a tiny sigma), where ``exp(l - lse)`` and direct differences lose every
digit that tells rows apart. The gaps carry a rigorous rounding bound, and the
certificate includes it (``gap_softmax``): plain float64 first, compensated arithmetic
for the queries whose bound it cannot meet. ``excluded`` bounds the L1 distance between
the returned weights and the exact ones (a relative weight left out counts twice: it is
missing, and the weights kept are renormalised without it).

A pass that accumulated the pass statistics (``Partial.has_stats``) is certified with
them: ``Certified.stats`` holds the posterior's ESS, entropy, mean logit and top weights
with bounds from the same mode (``optden.engine.stats``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .bounds import EPS64, dense_threshold, mass_tolerance, query_delta, query_shift, rescore_budget
from .gaps import ref_sqdist, sq_gaps
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
    excluded:  (N,) bound on sum_i |w_i - exact w_i| over all rows: the weight the result
               leaves out (twice) or misweights.
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
    """Float64 logits by direct differences, for tests and references (not used to certify:
    their rounding, (d + 2) u |logit|, is not bounded here; see ``rescore_softmax``).

    v: (n, d) float64; coef: (n,); rows: (n, K, d) raw rows gathered per query.
    Returns (n, K) float64 ``-coef ||v - (rows - center)||^2``.
    """
    diff = v[:, None, :] - (rows.to(torch.float64) - center)
    return -coef[:, None] * (diff * diff).sum(-1)


def _query_chunks(n: int, k: int, d: int, chunk_bytes: int):
    """Slices of n queries whose (k, d) float64 candidate rows take about chunk_bytes each."""
    per_query = max(1, chunk_bytes // max(1, k * d * 8))
    return [slice(a, min(n, a + per_query)) for a in range(0, n, per_query)]


def rescore(v, coef, source, top_idx, chunk_bytes=1 << 27):
    """Direct-difference logits (n, K) of the K candidate rows top_idx (n, K) of each query
    (``exact_logits``), chunked over queries: ``optden.posterior``'s support rows (certify
    itself re-scores from gaps, ``rescore_softmax``)."""
    n, k = top_idx.shape
    d = v.shape[1]
    return torch.cat([exact_logits(v[c], coef[c], _gathered(source, top_idx[c], d), source.center)
                      for c in _query_chunks(n, k, d, chunk_bytes)])


def gap_softmax(g: torch.Tensor, err: torch.Tensor, coef: torch.Tensor):
    """The softmax of the logits ``-coef g`` (n, B) and a bound on its error.

    g, err: gaps and their bounds (``gaps.sq_gaps``); coef: (n,).
    Returns ``(w (n, B), m (n,), log_s (n,), misweight (n,))``: the weights normalised by
    their sum (never ``exp(l - lse)``, whose subtraction rounds at the size of the
    logits), the largest logit m and ``log sum exp(l - m)``, and a rigorous bound on
    ``sum_i |w_i - exact w_i|``: with every true unnormalised weight in
    ``[lo_i, hi_i] = exp(-coef (g_i +- err_i))``, the L1 distance of two normalised
    vectors is at most ``2 sum_i (hi_i - lo_i) / sum_i lo_i``. +inf where it cannot say.
    """
    c = coef[:, None]
    x = -c * g
    m = x.max(1).values
    e = torch.exp(x - m[:, None])
    s = e.sum(1)
    lo = torch.exp(-c * (g + err) - m[:, None])
    hi = torch.exp(-c * (g - err) - m[:, None])  # -coef (g - err): no inf - inf for a far row
    mis = torch.nan_to_num(2.0 * (hi - lo).sum(1) / lo.sum(1), nan=torch.inf)  # inf - inf: nothing certain
    return e / s[:, None], m, torch.log(s), mis


def _gathered(source, idx: torch.Tensor, d: int) -> torch.Tensor:
    """Raw rows (n, K, d) at local positions idx (n, K), in their storage dtype."""
    return source.gather(idx).reshape(idx.shape[0], idx.shape[1], d)


def _residual(query, idx):
    """``(v_lo, v_err)`` of the queries idx (``gaps.CenteredQuery.residual``), or (None, None)."""
    return (None, None) if query is None else query[idx].residual()


def rows_of(t, idx):
    """t[idx], or None for None (the optional per-query tensors v_lo, v_err)."""
    return None if t is None else t[idx]


def rescore_softmax(v: torch.Tensor, coef: torch.Tensor, source, top_idx: torch.Tensor, budget: float,
                    v_lo=None, v_err=None, chunk_bytes: int = 1 << 26):
    """The exact softmax over each query's K candidates, certified.

    v: (n, d) float64 centered queries; coef: (n,); top_idx: (n, K) local candidate rows
    (column 0 the coarse best: the first reference row). Gaps to the reference
    (``gaps.sq_gaps``), re-taken from the best candidate when another one is nearer;
    queries whose misweight exceeds ``budget`` in plain float64 are redone compensated.
    v_lo, v_err: the queries' residual and its bound (``gaps.centered_query``), or None.
    Returns ``(w (n, K), dc (n, d) centered, lse (n,), misweight (n,), lg (n, K))``, lg
    the absolute logits ``-coef (||v - q_r||^2 + g_i)`` of the candidates (for the pass
    statistics, ``optden.engine.stats.from_topk``).
    """
    n, k = top_idx.shape
    d = v.shape[1]
    outs = []
    for c in _query_chunks(n, k, d, chunk_bytes):
        vv, cc, idx = v[c], coef[c], top_idx[c]
        lo, er = rows_of(v_lo, c), rows_of(v_err, c)
        rows = _gathered(source, idx, d)
        nq = vv.shape[0]
        ref_pos = torch.zeros(nq, dtype=torch.int64, device=v.device)  # the coarse best first
        w = torch.empty(nq, k, dtype=torch.float64, device=v.device)
        gaps = torch.empty(nq, k, dtype=torch.float64, device=v.device)
        m, log_s, mis = (torch.empty(nq, dtype=torch.float64, device=v.device) for _ in range(3))
        sel = torch.arange(nq, device=v.device)
        for compensated in (False, True):
            g, err = _gaps_from_nearest(vv[sel], rows[sel], ref_pos, sel, source.center, compensated,
                                        rows_of(lo, sel), rows_of(er, sel))
            w[sel], m[sel], log_s[sel], mis[sel] = gap_softmax(g, err, cc[sel])
            gaps[sel] = g
            sel = sel[~(mis[sel] <= budget)]  # what plain float64 could not certify: compensated
            if not sel.numel():
                break
        ref = rows[torch.arange(nq, device=v.device), ref_pos]
        ref_sq = _ref_sqdist(vv, lo, ref, source.center)
        dc = torch.einsum("nk,nkd->nd", w, rows.to(torch.float64) - source.center)
        outs.append((w, dc, -cc * ref_sq + m + log_s, mis, -cc[:, None] * (ref_sq[:, None] + gaps)))
    return tuple(torch.cat(t) for t in zip(*outs))


def _gaps_from_nearest(v, rows, ref_pos, sel, center, compensated, v_lo, v_err, rounds: int = 3):
    """Gaps (n, K) of the candidate rows (n, K, d) to the nearest of them, by the gaps
    themselves: the reference starts at ``ref_pos[sel]`` and moves to a candidate with a
    negative gap (nearer than it) until none is, at most ``rounds`` times. A reference
    that is not the nearest gives the rows that matter logits of the size of their gap to
    it, and its rounding bound with them. Updates ``ref_pos[sel]`` in place."""
    ar = torch.arange(rows.shape[0], device=rows.device)
    for _ in range(rounds):
        pos = ref_pos[sel]
        g, err = sq_gaps(v, rows, rows[ar, pos], center, compensated, v_lo, v_err)
        gmin, best = g.min(1)
        moved = gmin < 0
        if not bool(moved.any()):
            break
        ref_pos[sel] = torch.where(moved, best, pos)
    return g, err


def candidate_sqdist(v: torch.Tensor, source, top_idx: torch.Tensor, v_lo=None) -> torch.Tensor:
    """Squared distances (n, K) of each query's candidate rows top_idx (n, K), as
    ``||v - q_r||^2 + g_i`` with r the nearest candidate and g_i the gaps of
    ``gaps.sq_gaps``: they order the candidates right where direct differences cannot
    (a query far from the data). v_lo: the queries' residual (``gaps.centered_query``) or None."""
    n, k = top_idx.shape
    rows = _gathered(source, top_idx, v.shape[1])
    ref = rows[:, 0]
    g, _ = sq_gaps(v, rows, ref, source.center, v_lo=v_lo)
    best = g.argmin(1)
    if bool((best != 0).any()):
        ref = rows[torch.arange(n, device=v.device), best]
        g, _ = sq_gaps(v, rows, ref, source.center, v_lo=v_lo)
    return _ref_sqdist(v, v_lo, ref, source.center)[:, None] + g


def _ref_sqdist(v, v_lo, ref, center) -> torch.Tensor:
    """(n,) squared distance of each query to its reference row (``gaps.ref_sqdist``): the
    absolute part of the log-sum-exp."""
    return ref_sqdist(v, v_lo, ref, center)


def nearest_rows(v: torch.Tensor, source) -> torch.Tensor:
    """(n,) local position of each query's nearest row by float64 direct differences (a
    reference row for ``exact_pass``: exact to rounding, which the gaps then resolve)."""
    n, d = v.shape
    best = torch.full((n,), torch.inf, dtype=torch.float64, device=v.device)
    pos = torch.zeros(n, dtype=torch.int64, device=v.device)
    rows_per_block = max(1, (1 << 22) // max(1, n * d))
    for off, raw, _ in source.blocks():
        for a in range(0, raw.shape[0], rows_per_block):
            diff = v[:, None, :] - (raw[a : a + rows_per_block].to(torch.float64) - source.center)
            dist, j = (diff * diff).sum(-1).min(1)
            better = dist < best
            best = torch.where(better, dist, best)
            pos = torch.where(better, j + off + a, pos)
    return pos


def exact_pass(v: torch.Tensor, coef: torch.Tensor, source, k: int, ref: torch.Tensor | None = None,
               compensated: bool = False, v_lo=None, v_err=None, stats: bool = False):
    """Online softmax over every row with logits relative to a reference row, from their
    gaps (``gaps.sq_gaps``): logit_i = -coef (||v - q_i||^2 - ||v - q_r||^2).

    v: (n, d) float64; coef: (n,); ref: (n,) local position of each query's reference row
    (default ``nearest_rows``); v_lo, v_err as for ``rescore_softmax``; stats: accumulate
    the pass statistics too (``absolute`` turns them to absolute logits). Memory is one
    block of ``n * B * d`` doubles (a few copies), so the caller passes few queries.
    Returns ``(part, ref_sq, misweight)``: a ``Partial`` of the relative logits (its
    ``lse() - coef * ref_sq`` is the log-sum-exp of the absolute ones), ``ref_sq`` (n,)
    = ||v - q_r||^2, and the bound of ``gap_softmax`` accumulated over the rows.
    """
    n, d = v.shape
    if ref is None:
        ref = nearest_rows(v, source)
    ref_raw = source.gather(ref).reshape(n, d)
    part = Partial.empty(n, d, k, v.device, stats=stats)
    part.m.zero_()  # the reference row's logit: a lower bound on the max, so no block starts from -inf
    spread = torch.zeros(n, dtype=torch.float64, device=v.device)  # sum (hi - lo), in the frame of part.m
    low = torch.zeros(n, dtype=torch.float64, device=v.device)  # sum lo
    c = coef[:, None]
    rows_per_block = max(1, (1 << (19 if compensated else 21)) // max(1, n * d))
    for off, raw, _ in source.blocks():
        for a in range(0, raw.shape[0], rows_per_block):
            blk = raw[a : a + rows_per_block]
            g, err = sq_gaps(v, blk, ref_raw, source.center, compensated, v_lo, v_err)
            x = -c * g
            new_m = torch.maximum(part.m, x.max(1).values)
            alpha = torch.exp(part.m - new_m)
            lo = torch.exp(-c * (g + err) - new_m[:, None])
            hi = torch.exp(-c * (g - err) - new_m[:, None])
            spread = spread * alpha + (hi - lo).sum(1)
            low = low * alpha + lo.sum(1)
            part.absorb(x, blk.to(torch.float64) - source.center, off + a)
    mis = torch.nan_to_num(2.0 * spread / low, nan=torch.inf)
    return part, _ref_sqdist(v, v_lo, ref_raw, source.center), mis


def absolute(part: Partial, coef: torch.Tensor, ref_sq: torch.Tensor) -> Partial:
    """``exact_pass``'s partial (logits relative to the reference row) with absolute logits
    ``-coef ||v - q_i||^2``, in place: m and top_val move by ``-coef ref_sq``; s, acc and
    the pass statistics (relative to m) stay."""
    shift = coef * ref_sq
    part.m = part.m - shift
    part.top_val = part.top_val - shift[:, None]
    return part


def _exact_certified(v, coef, source, k, ref, budget, v_lo, v_err, stats: bool = False):
    """``exact_pass`` in plain float64, redone compensated for the queries whose misweight
    exceeds ``budget``, from the nearest row found (again while the pass finds a nearer
    one than its reference). Returns (dc, lse, top_w, top_idx, misweight, the pass's
    partial with absolute logits, ``absolute``; with its statistics when ``stats``)."""
    part, ref_sq, mis = exact_pass(v, coef, source, k, ref, False, v_lo, v_err, stats)
    redo = (~(mis <= budget)).nonzero().flatten()
    used = None
    for _ in range(3):
        if not redo.numel():
            break
        finite = torch.isfinite(part.m[redo])
        new_ref = torch.where(finite, part.top_idx[redo, 0], nearest_rows(v[redo], source))
        if used is not None:  # only where the last pass found a nearer row than its reference
            redo, new_ref = redo[new_ref != used], new_ref[new_ref != used]
            if not redo.numel():
                break
        sub, sq2, mis2 = exact_pass(v[redo], coef[redo], source, k, new_ref, True, rows_of(v_lo, redo),
                                    rows_of(v_err, redo), stats)
        for name in ("m", "s", "acc", "top_val", "top_idx") + (("s2", "e1") if stats else ()):
            getattr(part, name)[redo] = getattr(sub, name)
        ref_sq[redo], mis[redo] = sq2, mis2
        keep = ~(mis2 <= budget)
        redo, used = redo[keep], new_ref[keep]
    top_w = torch.exp(part.top_val - part.m[:, None]) / part.s[:, None]
    dc, lse = part.mean(), part.lse() - coef * ref_sq
    return dc, lse, top_w, part.top_idx, mis, absolute(part, coef, ref_sq)


def _shift_dense_lse(lse: torch.Tensor, dense: torch.Tensor, v: torch.Tensor, coef: torch.Tensor, query) -> None:
    """A coarse pass saw v, not the exact query v + r (``gaps.CenteredQuery.residual``):
    the part of every logit common to all rows, ``-coef (2 v.r + ||r||^2)``, is missing from
    its lse (the row-dependent part, ``2 coef q_i.r``, is in ``bounds.query_delta``). Added
    in place to the ``dense`` (N,) bool queries where it can move lse by more than a
    rounding: a query at a row at a tiny sigma (coef ~ 1e296) has lse off by 1e266 without it."""
    en = query.error_norm()
    idx = (dense & (coef * en * (2.0 * v.norm(dim=1) + en) > EPS64 * (1.0 + lse.abs()))).nonzero().flatten()
    if idx.numel():
        r, _ = query[idx].residual()
        lse[idx] = lse[idx] - coef[idx] * ((2.0 * v[idx] + r) * r).sum(1)


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


def certify(p, v: torch.Tensor, coef: torch.Tensor, source, tol: float = DEFAULT_TOL, fallback=None,
            query=None) -> Certified:
    """Turn a coarse ``Partial`` into a certified result (see the module docstring).

    v: (N, d) float64 centered raw queries; coef: (N,) float64; ``source`` the row source
    the pass ran over (M rows). tol: target relative error of D*.
    fallback: None, or a callable ``(v_sub, coef_sub) -> Partial`` giving a more precise
    coarse pass for the queries this pass cannot certify.
    query: the ``gaps.CenteredQuery`` v came from (None: v is the exact query). The
    certificate is then for the query the caller gave: the pass's delta grows by
    ``bounds.query_delta`` of its conversion error, and the exact re-score adds the exact
    residual of v.
    """
    n, k = p.top_val.shape
    M = source.M
    budget = rescore_budget(tol)
    dc = p.mean()
    lse = p.lse()
    # normalised by s, not by exp(top - lse): lse = m + log s rounds at the size of m
    top_w = torch.exp(p.top_val - p.m[:, None]) / p.s[:, None]
    top_idx = p.top_idx.clone()
    pdelta = p.delta + query_delta(coef, source.max_cnorm, None if query is None else query.error_norm())
    excluded = torch.expm1(2.0 * pdelta)
    delta = pdelta.clone()  # per query: the bound of the pass that certified it
    mode = torch.full((n,), DENSE, dtype=torch.int8, device=v.device)
    stats = None
    if p.has_stats:  # DENSE statistics for all; the other modes overwrite theirs below
        vnorm, shift, qmax, d = v.norm(dim=1), query_shift(v, source.center), source.max_cnorm, v.shape[1]
        stats = from_partial(p, M, coef, vnorm, shift, qmax, d)

    need = ~(pdelta <= dense_threshold(tol))  # a NaN bound (overflowing input) is never DENSE
    if query is not None:
        _shift_dense_lse(lse, ~need, v, coef, query)
    if bool(need.any()):
        T = math.log(max(M - k, 1) / mass_tolerance(tol))
        gap = p.top_val[:, 0] - p.top_val[:, -1]
        # every kept coarse logit finite: an overflowing pass (tiny sigma, far query) leaves
        # -inf / NaN entries whose positions are padding, not rows
        ok_topk = need & torch.isfinite(p.top_val).all(1) & ((k >= M) | (gap > T + 2.0 * pdelta))
        sel = ok_topk.nonzero().flatten()
        if sel.numel():
            w, dc[sel], lse[sel], mis, lg = rescore_softmax(v[sel], coef[sel], source, p.top_idx[sel], budget,
                                                            *_residual(query, sel))
            order = w.argsort(dim=1, descending=True, stable=True)
            top_w[sel] = w.gather(1, order)
            top_idx[sel] = p.top_idx[sel].gather(1, order)
            # rows outside the top K: true logit <= top_val[K-1] + delta, the best's >= top_val[0] - delta;
            # their relative mass counts twice in the L1 distance (left out, and the K renormalised)
            if k >= M:
                out = torch.zeros_like(mis)
            else:
                out = 2.0 * torch.exp(-gap[sel] + 2.0 * pdelta[sel] + math.log(M - k))
            excluded[sel] = out + mis + out * mis
            mode[sel] = RESCORED
            if stats is not None:
                stats.put(sel, from_topk(lg, p.top_val[sel, -1] + p.delta[sel], M, coef[sel], shift[sel], qmax, d))
        fail = (need & ~ok_topk).nonzero().flatten()
        if fail.numel() and fallback is not None:
            sub = certify(fallback(v[fail], coef[fail]), v[fail], coef[fail], source, tol,
                          query=None if query is None else query[fail])
            dc[fail], lse[fail], top_w[fail], top_idx[fail] = sub.dc, sub.lse, sub.top_w, sub.top_idx
            excluded[fail], mode[fail], delta[fail] = sub.excluded, sub.mode, sub.delta
            if stats is not None:  # a fallback without statistics leaves them poisoned
                stats.put(fail, sub.stats if sub.stats is not None else PassStats.empty(fail.numel(), k, v.device))
            fail = fail[:0]
        for a in range(0, fail.numel(), 8):
            idx = fail[a : a + 8]
            usable = torch.isfinite(p.top_val[idx, 0])  # the coarse best as reference, unless the pass overflowed
            ref = p.top_idx[idx, 0] if bool(usable.all()) else None
            dc[idx], lse[idx], top_w[idx], top_idx[idx], excluded[idx], ex = _exact_certified(
                v[idx], coef[idx], source, k, ref, budget, *_residual(query, idx), stats=stats is not None)
            mode[idx] = EXACT
            if stats is not None:
                stats.put(idx, from_exact(ex, M, coef[idx], vnorm[idx], shift[idx], qmax, d))
    return Certified(dc=dc, lse=lse, top_w=top_w, top_idx=top_idx, excluded=excluded, mode=mode, delta=delta,
                     stats=stats)
