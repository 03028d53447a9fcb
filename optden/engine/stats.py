"""Certified statistics of the posterior weights, from the same pass as D*.

Per query, with w the softmax of the logits l_i = -||u - y_i||^2 / (2 sigma^2) over M rows:

    ESS       1 / sum w_i^2                (1 on a single row, M when uniform)
    entropy   -sum w_i log w_i             (0 .. log M)
    A         -sum w_i l_i = E_w ||u - y||^2 / (2 sigma^2)   (d log p / d sigma = (2 A - d) / sigma)
    lse       log sum exp(l_i)             (log p = lse - log M - (d/2) log(2 pi sigma^2))
    top weights and the mass of the top k

``certify`` (``optden.engine.precision``) computes them beside D* when the pass
accumulated the pass statistics (``Partial.empty(..., stats=True)``), in the mode that
certified the query:

- DENSE: from the pass's sums s, s2, e1 (``from_partial``): every kept logit within the
  pass's delta, so ``bounds.multiplicative``; the rows a cpu pass left out
  (``Partial.left_out``) are ``bounds.excluded``.
- RESCORED: from the exact logits of the top K (``from_topk``): ``bounds.relative_to_top``,
  then the weight outside the top K, at most (M - K) exp(top_val[K-1] + delta - lse), is
  ``bounds.excluded``.
- EXACT: the float64 direct-difference pass (``from_exact``): its rows within
  X = log M + 80 of the max have logits within the float64 error of
  ``bounds.float64_logit_error``; the others weigh below e^-80 together. That error is
  uniform (it grows with the largest logit: far from the data, 1e7 nats and more), so the
  same pass's exact top K, relative to the top row (``from_topk``), is tighter where the
  posterior is concentrated; each query reports the tighter of the two.

Every statistic is returned with an interval that holds the true value (the bound is
what the certificate implies, not an estimate); ``PassStats.err`` is the half-width
that contains the computed value's error. The truth is that of the model-space query u:
the float64 rounding of its centered raw form v (``bounds.query_shift``) is one more
logit error of every row (``bounds.shifted_logit_error``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from .bounds import (accumulation_eta, excluded, float64_logit_error, multiplicative, relative_to_top,
                     shifted_logit_error)

__all__ = ["PassStats", "from_partial", "from_topk", "from_exact", "EXACT_CUT_NATS"]

#: The exact pass's statistics count rows within log M + EXACT_CUT_NATS of the max logit
#: as kept (their float64 logit error is bounded uniformly); the rest weigh < e^-80.
EXACT_CUT_NATS = 80.0

_SCALARS = ("ess", "entropy", "neglogit", "lse")


@dataclass
class PassStats:
    """Per query (float64, on the query device): each statistic's computed value and an
    interval [lo, hi] that holds the true one.

    ess, entropy, neglogit (A = -E_w[l]), lse: (N,) values; ``<name>_lo``, ``<name>_hi``:
    (N,) bounds. w: (N, K) the computed top weights, descending; w_lo, w_hi: (N, K)
    bounds on the true weights of those rows before the excluded mass; eps: (N,) bound
    on the weight of the rows outside the ones the statistics were computed over.
    """

    ess: torch.Tensor
    ess_lo: torch.Tensor
    ess_hi: torch.Tensor
    entropy: torch.Tensor
    entropy_lo: torch.Tensor
    entropy_hi: torch.Tensor
    neglogit: torch.Tensor
    neglogit_lo: torch.Tensor
    neglogit_hi: torch.Tensor
    lse: torch.Tensor
    lse_lo: torch.Tensor
    lse_hi: torch.Tensor
    w: torch.Tensor
    w_lo: torch.Tensor
    w_hi: torch.Tensor
    eps: torch.Tensor

    @classmethod
    def empty(cls, n: int, k: int, device) -> "PassStats":
        """NaN-poisoned statistics of n queries with k top weights (a slot no mode fills shows)."""
        def nan(*shape):
            return torch.full(shape, torch.nan, dtype=torch.float64, device=device)

        return cls(**{f.name: nan(n, k) if f.name.startswith("w") else nan(n) for f in fields(cls)})

    def put(self, idx, other: "PassStats") -> None:
        """Write the statistics of the queries ``idx`` (an index tensor or slice) from ``other``."""
        for f in fields(self):
            src = getattr(other, f.name)
            dst = getattr(self, f.name)
            if src.dim() == 2 and src.shape[1] != dst.shape[1]:  # fewer top weights: pad with 0
                k = min(src.shape[1], dst.shape[1])
                dst[idx] = torch.nn.functional.pad(src[:, :k], (0, dst.shape[1] - k))
            else:
                dst[idx] = src

    def err(self, name: str) -> torch.Tensor:
        """(N,) bound on |computed - true| of a scalar statistic ("ess", "entropy", "neglogit", "lse")."""
        if name not in _SCALARS:
            raise ValueError(f"name: expected one of {_SCALARS}, got {name!r}")
        v = getattr(self, name)
        return torch.maximum(getattr(self, name + "_hi") - v, v - getattr(self, name + "_lo"))

    def top_mass(self, k: int):
        """(value, lo, hi), each (N,): the weight of the k heaviest rows (k <= K).

        lo: the computed top k's true weight (at least its rows' lower bounds, times 1 - eps);
        hi: the k largest upper bounds (rows outside the top K are below the K-th, or in
        eps), plus eps.
        """
        if not 1 <= k <= self.w.shape[1]:
            raise ValueError(f"k: expected 1..{self.w.shape[1]}, got {k}")
        value = self.w[:, :k].sum(1)
        lo = (1.0 - self.eps.clamp(max=1.0)) * self.w_lo[:, :k].sum(1)
        hi = (self.w_hi.topk(k, dim=1).values.sum(1) + self.eps).clamp(max=1.0)
        return value, lo, hi


def _assemble(iv: dict, eps, n_out, w, w_lo, w_hi) -> PassStats:
    iv = excluded(iv, eps, n_out)
    P, P_lo, P_hi = iv["P"]
    kw = {"ess": 1.0 / P, "ess_lo": 1.0 / P_hi, "ess_hi": 1.0 / P_lo}
    for out, key in (("entropy", "H"), ("neglogit", "A"), ("lse", "lse")):
        val, lo, hi = iv[key]
        kw[out], kw[out + "_lo"], kw[out + "_hi"] = val, lo, hi
    return PassStats(**kw, w=w, w_lo=w_lo, w_hi=w_hi, eps=eps)


def from_partial(p, M: int, coef: torch.Tensor, vnorm: torch.Tensor, shift: torch.Tensor, qmax: float, d: int,
                 *, exact: bool = False) -> PassStats:
    """Statistics of a pass that accumulated ``STATS`` (``p.has_stats``), certified by its
    logit bound ``p.delta`` (DENSE) or, ``exact=True``, by the float64 error of the
    exact pass's direct differences. coef (N,); vnorm (N,) the query norms ||v||; shift
    (N,) ``bounds.query_shift``; qmax the largest centered row norm; d the dimension.
    """
    if not p.has_stats:
        raise ValueError("p: the pass did not accumulate the pass statistics (stats=True)")
    n = p.m.shape[0]
    zero = torch.zeros_like(p.m)
    eta_f = accumulation_eta(M)
    conv = shifted_logit_error(vnorm + qmax, coef, shift)  # every row is within ||v|| + qmax of v
    if exact:
        # rows within X of the max: logits within delta of the truth; the rest weigh < M e^{-0.9 X + 2 delta}
        X = math.log(max(M, 1)) + EXACT_CUT_NATS
        delta = float64_logit_error((p.m.abs() + X)[:, None], coef, qmax, d)[:, 0] + conv
        xi = M * X * math.exp(-X)  # what the rows beyond the cut add to s, s2 (relative) and -e1/s
        iv = multiplicative(delta + eta_f + xi, p.m, p.s, p.s2, p.e1, delta, slack=torch.full_like(p.m, xi))
        eps = (M * torch.exp(-0.9 * X + 2.0 * delta)).clamp(max=1.0)
        eta = delta + eta_f + xi
    else:
        delta = p.delta + conv
        eta = delta + eta_f
        iv = multiplicative(eta, p.m, p.s, p.s2, p.e1, delta)
        eps = zero if p.left_out is None else p.left_out
    lse = iv["lse"][0]
    w = torch.exp(p.top_val - lse[:, None])
    fac = torch.exp(2.0 * eta)[:, None]
    n_out = torch.full((n,), float(M), dtype=torch.float64, device=p.m.device)
    return _assemble(iv, eps, n_out, w, w / fac, (w * fac).clamp(max=1.0))


def from_topk(lg: torch.Tensor, outside_max: torch.Tensor, M: int, coef: torch.Tensor, shift: torch.Tensor,
              qmax: float, d: int) -> PassStats:
    """Statistics of the exact float64 logits ``lg`` (n, K) of the top K rows (RESCORED):
    ``bounds.relative_to_top``, and ``outside_max`` (n,) an upper bound on the true logit
    of every other row (the coarse K-th logit + delta) gives their weight, at most
    (M - K) exp(outside_max - lse), as the excluded mass. coef, shift (n,) as in
    ``from_partial``."""
    n, K = lg.shape
    lam = lg.sort(dim=1, descending=True).values
    dist = torch.sqrt(lam.abs() / coef[:, None])  # ||v - q|| of each row
    err = float64_logit_error(lam, coef, qmax, d) + shifted_logit_error(dist, coef, shift) * (1.0 + 1e-12)
    iv, w, w_lo, w_hi = relative_to_top(lam, err)
    out = max(M - K, 0)
    if out:
        conv = shifted_logit_error(torch.sqrt(outside_max.abs() / coef) , coef, shift)
        eps = (out * torch.exp(outside_max + conv - iv["lse"][1]) * (1.0 + 1e-12)).clamp(max=1.0)
    else:
        eps = torch.zeros(n, dtype=torch.float64, device=lg.device)
    n_out = torch.full((n,), float(max(out, 1)), dtype=torch.float64, device=lg.device)
    return _assemble(iv, eps, n_out, w, w_lo, w_hi)


def from_exact(p, M: int, coef: torch.Tensor, vnorm: torch.Tensor, shift: torch.Tensor, qmax: float,
               d: int) -> PassStats:
    """Statistics of the float64 direct-difference pass ``p`` (``precision.exact_pass`` with
    stats): per query the tighter of ``from_partial(exact=True)`` (every kept row's logit
    within one uniform error) and ``from_topk`` over the pass's own top K (exact logits,
    each within its own error relative to the top row; every other row's computed logit
    is below the K-th, so its true one is below the K-th's plus its float64 error). Both
    intervals hold, so either may be reported; arguments as in ``from_partial``."""
    whole = from_partial(p, M, coef, vnorm, shift, qmax, d, exact=True)
    K = p.top_val.shape[1]
    if K > M or not bool(torch.isfinite(p.top_val).all()):
        return whole
    kth = p.top_val[:, -1:]
    outside = (kth + float64_logit_error(kth, coef, qmax, d) * (1.0 + 1e-12))[:, 0]
    top = from_topk(p.top_val, outside, M, coef, shift, qmax, d)
    return _tighter(whole, top)


def _tighter(a: PassStats, b: PassStats) -> PassStats:
    """Per query, all of ``a`` or all of ``b``: the one whose largest scalar error, relative
    to max(1, |value|), is smaller (NaN errors lose)."""
    def worst(st):
        e = torch.stack([st.err(name) / getattr(st, name).abs().clamp(min=1.0) for name in _SCALARS])
        return torch.nan_to_num(e, nan=math.inf).max(dim=0).values

    pick = worst(b) < worst(a)
    kw = {}
    for f in fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        kw[f.name] = torch.where(pick[:, None] if x.dim() == 2 else pick, y, x)
    return PassStats(**kw)
