"""Squared-distance gaps to a reference row: the exact re-score's arithmetic.

The softmax of the logits ``-coef ||v - q_i||^2`` depends only on their differences, so the
exact re-score (``optden.engine.precision``) computes, for each query and a reference row
``q_r`` (its best candidate), the gaps

    g_i = ||v - q_i||^2 - ||v - q_r||^2 = a_i . b_i,   a_i = raw_r - raw_i,  b_i = 2 v - q_i - q_r

(q = raw - center) and the logits relative to the reference, ``-coef g_i``. Why not the
direct differences ``||v - q_i||^2``: their rounding grows with the distances themselves,
``(d + 2) u ||v - q||^2``, which for a query far from the data (1e6, 1e16) or a tiny sigma
(coef ~ 1e300) swamps the differences between rows; the gap's rounding is proportional to
``|a|``: zero for a copy of the reference, and relative to the gap's own size otherwise.
The logit scale ``coef`` is applied last, so ``coef * g`` overflows only to -inf (a weight
of exactly 0) for the rows that do not matter.

Two ways, both with a rigorous bound: plain float64 (five roundings and a d-term sum; an
a-priori bound, ``optden.engine.bounds.gap_error_factor``), and compensated (error-free
TwoSum and TwoProduct, Dekker / Ogita-Rump-Oishi style, with a pairwise TwoSum tree over the
d products), about ten times the work, with an a-posteriori bound from the terms it
actually rounded: about one rounding of the result, and exactly 0 when the arithmetic
was exact (an integer-valued query exactly between two rows). The plain one is tried
first; a query whose certificate it cannot meet is redone compensated.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .bounds import EPS64, GAP_ERR_G, GAP_ERR_TINY, QUERY_ERR, gamma, gap_error_factor

__all__ = ["sq_gaps", "ref_sqdist", "two_sum", "two_product", "compensated_sum", "divide", "centered_query",
           "CenteredQuery"]

# Dekker's splitter for float64: 2^27 + 1
_SPLIT = 134217729.0
# TwoProduct's split overflows beyond this magnitude: the compensated gap is then not used
_SPLIT_LIMIT = 2.0**995


def two_sum(a: torch.Tensor, b: torch.Tensor):
    """Knuth's TwoSum: ``(s, e)`` with ``s = fl(a + b)`` and ``a + b = s + e`` exactly."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _split(a: torch.Tensor):
    c = _SPLIT * a
    hi = c - (c - a)
    return hi, a - hi


def two_product(a: torch.Tensor, b: torch.Tensor):
    """Dekker's TwoProduct: ``(p, e)`` with ``p = fl(a b)`` and ``a b = p + e`` exactly
    (no overflow: |a|, |b| < 2^995; products above the subnormal range)."""
    p = a * b
    ah, al = _split(a)
    bh, bl = _split(b)
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def divide(x: torch.Tensor, x_lo, s):
    """``(q, q_lo)``: the double-double quotient (x + x_lo) / s, within 2 u^2 |q| of it (x_lo
    None: 0; s a float or a tensor broadcasting against x)."""
    q = x / s
    p, e = two_product(q, s if isinstance(s, torch.Tensor) else torch.full_like(q, float(s)))
    r = (x - p) - e  # x - p is exact (Sterbenz): p is within an ulp of x
    if x_lo is not None:
        r = r + x_lo
    return q, r / s


@dataclass
class CenteredQuery:
    """Model-space queries u (n, d) in a pass's centered raw units.

    ``v`` (n, d) is ``(u - offset) / scale - center`` in plain float64: what the coarse pass
    sees. ``error_norm()`` bounds ``||v - exact||`` per query (cheap, first order: it joins
    the DENSE certificate), and ``residual()`` gives the exact residual ``v_lo`` of v (the
    conversion in error-free arithmetic: the exact re-score answers for the query the
    caller gave) with its bound ``v_err``, for the few queries that are re-scored.
    u_lo: what rounding x / s left out of u (None: u is exact). ``q[idx]`` selects queries.
    """

    u: torch.Tensor
    u_lo: torch.Tensor | None
    offset: float
    scale: float
    center: torch.Tensor
    v: torch.Tensor
    center_norm: float | None = None

    def __getitem__(self, idx) -> "CenteredQuery":
        return CenteredQuery(self.u[idx], None if self.u_lo is None else self.u_lo[idx], self.offset, self.scale,
                             self.center, self.v[idx], self.center_norm)

    def error_norm(self) -> torch.Tensor:
        """(n,) bound on ||v - exact||: each of the three roundings is relative u, together
        within 4u (|v| + |center|) per component, plus |u_lo| / scale."""
        cn = float(self.center.norm()) if self.center_norm is None else self.center_norm
        out = (4.0 * EPS64) * (self.v.norm(dim=1) + cn)
        if self.u_lo is not None:
            out = out + self.u_lo.norm(dim=1) / abs(float(self.scale))
        return out

    def error_max(self) -> float:
        """A bound on every query's ``error_norm()`` at once: sqrt(d) max |v| for ||v||."""
        cn = float(self.center.norm()) if self.center_norm is None else self.center_norm
        out = 4.0 * EPS64 * (math.sqrt(self.v.shape[1]) * float(self.v.abs().max()) + cn)
        if self.u_lo is not None:
            out += float(self.u_lo.norm(dim=1).max()) / abs(float(self.scale))
        return out

    def residual(self):
        """``(v_lo, v_err)`` (n, d): ``v + v_lo`` is the exact centered query within v_err
        (a handful of u^2 roundings: QUERY_ERR (|v| + |center| + |offset| / scale))."""
        u, offset, scale, center = self.u, float(self.offset), float(self.scale), self.center
        h, l = two_sum(u, torch.full_like(u, -offset))
        if self.u_lo is not None:
            l = l + self.u_lo
        t, t_lo = divide(h, l, scale)
        # beyond Dekker's split (|t| ~ 1e299) the quotient's residual is not computed: bounded instead
        big = ~torch.isfinite(t_lo) | (t.abs() >= _SPLIT_LIMIT)
        t_lo = torch.where(big, torch.zeros_like(t_lo), t_lo)
        w, l2 = two_sum(t, -center)
        w_hi, w_lo = two_sum(w, l2 + t_lo)  # w_hi + w_lo: the exact query, as a double-double
        v_lo = (w_hi - self.v) + w_lo  # w_hi - v is exact (they are ulps apart): one rounding
        v_err = QUERY_ERR * (w_hi.abs() + center.abs() + abs(offset) / scale) + EPS64 * v_lo.abs()
        v_err = torch.where(big, v_err + 2.0 * EPS64 * t.abs(), v_err)
        return v_lo, v_err


def centered_query(u: torch.Tensor, u_lo, offset: float, scale: float, center: torch.Tensor,
                   center_norm: float | None = None) -> CenteredQuery:
    """Model-space queries u (n, d) float64 (+ residual u_lo) -> ``CenteredQuery``
    (center_norm: ||center||, when the caller has it)."""
    return CenteredQuery(u, u_lo, offset, scale, center, (u - offset) / scale - center, center_norm)


def compensated_sum(x: torch.Tensor, extra: torch.Tensor):
    """Sum over the last dimension of x plus ``extra`` (same shape): a pairwise TwoSum tree
    over x, whose exact error terms are summed in float64 together with ``extra``, added
    to the tree's result once at the end. Returns ``(sum, spread)``: spread is the sum of
    the absolute values of the terms summed in plain float64 (the tree's error terms and
    ``extra``): that sum's rounding is at most gamma_{2 n + L} spread."""
    err = extra.sum(-1)
    spread = extra.abs().sum(-1)
    while x.shape[-1] > 1:
        if x.shape[-1] % 2:
            x = torch.cat([x, torch.zeros_like(x[..., :1])], dim=-1)
        s, e = two_sum(x[..., 0::2], x[..., 1::2])
        err = err + e.sum(-1)
        spread = spread + e.abs().sum(-1)
        x = s
    return x[..., 0] + err, spread


def sq_gaps(v: torch.Tensor, raw: torch.Tensor, ref: torch.Tensor, center: torch.Tensor,
            compensated: bool = False, v_lo=None, v_err=None):
    """Gaps of rows to each query's reference row, and rigorous bounds on their error.

    v: (n, d) float64 centered raw queries; raw: (n, B, d) or (B, d) rows (their stored
    values, any float or integer dtype); ref: (n, d) each query's reference row (stored
    values); center: (d,) float64; v_lo, v_err: the query's residual and its bound
    (``centered_query``; None: v is exact): the gaps are those of ``v + v_lo``, whose
    residual moves each by ``2 a . v_lo`` (added, in both ways).
    Returns ``(g, err)``, (n, B) float64: g_i ~ ||v - q_i||^2 - ||v - q_r||^2 (exactly 0 for a
    row equal to the reference), and ``|g_i - exact| <= err_i`` (``bounds.gap_error_factor``;
    +inf where the compensated arithmetic would overflow).
    """
    raw = raw.to(torch.float64)
    ref = ref.to(torch.float64)
    if raw.dim() == 2:
        raw = raw[None]
    d = v.shape[1]
    if not compensated:
        # g = a . (2v - q_r) - a . q_i: two batched mat-vecs and one elementwise product
        # (bounds.gap_error_factor covers this order of operations)
        q = raw - center
        qr = ref - center
        a = ref[:, None, :] - raw
        t = 2.0 * v - qr
        aq = a * q  # |a q| = |a| |q|: the bound's second sum from the same products
        g = _matvec(a, t) - aq.sum(-1)
        lo_err = None
        if v_lo is not None:  # the residual's share, 2 a . v_lo: a d-term sum of tiny products
            g = g + 2.0 * _matvec(a, v_lo)
            lo_err = gamma(d + 2, EPS64) * v_lo.abs()
        a_abs = a.abs()
        size = _matvec(a_abs, v.abs() + qr.abs()) + aq.abs().sum(-1)
        err = gap_error_factor(d) * size + GAP_ERR_G * g.abs()
        return g, err + _query_term(a_abs, lo_err, v_err)
    # double-double a, q_r, q_i (exact), then b = 2v - q_r - q_i: its low part b_lo rounds four
    # times, within beta = gamma_4 (|l1| + |qr_lo| + |l2| + |q_lo| + 2 |v_lo|)
    a_hi, a_lo = two_sum(ref[:, None, :], -raw)
    q_hi, q_lo = two_sum(raw, -center)
    qr_hi, qr_lo = two_sum(ref, -center)
    h, l1 = two_sum(2.0 * v, -qr_hi)
    b_hi, l2 = two_sum(h[:, None, :], -q_hi)
    b_lo = (l1 - qr_lo)[:, None, :] + (l2 - q_lo)
    beta = (l1.abs() + qr_lo.abs())[:, None, :] + l2.abs() + q_lo.abs()
    if v_lo is not None:
        b_lo = b_lo + 2.0 * v_lo[:, None, :]
        beta = beta + 2.0 * v_lo.abs()[:, None, :]
    p, pe = two_product(a_hi, b_hi)  # exact: a_hi b_hi = p + pe
    ab_lo, al_b = a_hi * b_lo, a_lo * b_hi
    extra = pe + (ab_lo + al_b)
    g, spread = compensated_sum(p, extra)
    # a-posteriori (Ogita, Rump, Oishi): every neglected or rounded term, as computed; all
    # zero when the arithmetic was exact (integer rows, an exactly equidistant query)
    levels = max(1, math.ceil(math.log2(max(d, 2))))
    local = (EPS64 * extra.abs() + gamma(2, EPS64) * (ab_lo.abs() + al_b.abs()) + (a_lo * b_lo).abs()
             + (a_hi.abs() + a_lo.abs()) * gamma(4, EPS64) * beta).sum(-1)
    err = 1.01 * (gamma(2 * d + levels, EPS64) * spread + local) + GAP_ERR_G * g.abs() + GAP_ERR_TINY * d
    err = err + _query_term(a_hi.abs(), None, v_err)
    too_big = (a_hi.abs().amax(-1) >= _SPLIT_LIMIT) | (b_hi.abs().amax(-1) >= _SPLIT_LIMIT) | ~torch.isfinite(g)
    return g, torch.where(too_big, torch.full_like(err, torch.inf), err)


def ref_sqdist(v: torch.Tensor, v_lo, ref: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """(n,) ||v + v_lo - (ref - center)||^2 for each query's reference row ref (n, d) (stored
    values), taken as ``(v + v_lo + center) - ref`` in raw units with error-free sums: the
    difference keeps its digits down to ~u^2 |v| even when the query is the row itself,
    where rounding ``ref - center`` first leaves ~u |ref| behind (and coef times its square,
    ~1e299 at sigma = 1e-150, is the whole log density)."""
    ref = ref.to(torch.float64)
    h, l = two_sum(v, center.expand_as(v))
    t = h - ref  # exact when h and ref are within a factor 2 (Sterbenz): the case that matters
    if v_lo is not None:
        l, e = two_sum(l, v_lo)
        diff = (t + l) + e
    else:
        diff = t + l
    return (diff * diff).sum(1)


def _matvec(a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(n, B) sum_j a[n, i, j] t[n, j] for a (n, B, d) and t (n, d): a batched mat-vec."""
    return torch.bmm(a, t[:, :, None])[:, :, 0]


def _query_term(a_abs: torch.Tensor, lo_err, v_err):
    """2 sum_j |a_j| (lo_err_j + v_err_j) (1.01): how far the rounding of the residual's share
    (lo_err) and the residual's own bound (v_err) move a gap. a_abs: (n, B, d) = |a|;
    lo_err, v_err: (n, d) or None."""
    if lo_err is None and v_err is None:
        return 0.0
    r = (lo_err if lo_err is not None else 0.0) + (v_err if v_err is not None else 0.0)
    return 2.02 * _matvec(a_abs, r)
