"""Arbitrary-precision oracles (mpmath): the truth where float64 itself is in doubt.

Every float64 input is an exact binary number; these functions compute with enough bits
that nothing is lost before the final rounding to float64: squared distances exactly
(the working precision covers the exponent range of the inputs twice over), then exp and
log at 200 bits beyond it. Memory and time are O(N M d) multiple-precision operations:
for small cases (tests, the property suite), a few thousand values.

Rows are given as stored values ``raw`` with the affine map ``model = raw * scale + offset``
(exactly, in the working precision), as ``optden.Dataset`` defines them; the queries ``u``
are in model space. ``sigma`` is a scalar or one value per query.
"""
from __future__ import annotations

import math

import mpmath
import numpy as np

__all__ = ["denoise", "weights", "log_density", "posterior", "nearest", "working_bits"]


def _arr(a) -> np.ndarray:
    a = np.asarray(a.detach().cpu() if hasattr(a, "detach") else a)
    if a.dtype.kind not in "fiu":  # bfloat16 rows come as torch tensors (converted above)
        raise TypeError(f"expected a real array, got dtype {a.dtype}")
    return a.astype(np.float64).reshape(a.shape[0], -1)


def working_bits(*arrays) -> int:
    """Bits that hold every sum and product of squares of these float64 values exactly,
    plus 200: twice the exponent span of the nonzero values, plus 2 x 53 + margins."""
    exps = []
    for a in arrays:
        a = np.abs(np.asarray(a, dtype=np.float64).reshape(-1))
        a = a[a > 0]
        if a.size:
            exps += [math.frexp(float(a.max()))[1], math.frexp(float(a.min()))[1]]
    span = (max(exps) - min(exps)) if exps else 0
    return 2 * (span + 53) + 64 + 200


def _setup(u, raw, sigma, scale, offset):
    u, raw = _arr(u), _arr(raw)
    n = u.shape[0]
    sig = np.broadcast_to(np.asarray(sigma, dtype=np.float64).reshape(-1), (n,))
    bits = working_bits(u, raw, sig, [scale, offset])
    return u, raw, sig, bits


def _model_rows(raw: np.ndarray, scale: float, offset: float):
    s, o = mpmath.mpf(float(scale)), mpmath.mpf(float(offset))
    return [[mpmath.mpf(float(x)) * s + o for x in row] for row in raw]


def _sqdist(urow, yrows):
    out = []
    for y in yrows:
        acc = mpmath.mpf(0)
        for a, b in zip(urow, y):
            t = a - b
            acc += t * t
        out.append(acc)
    return out


def _logits(u, raw, sigma, scale, offset):
    """(bits, u, y (mp), per query the list of mp logits -||u - y_i||^2 / (2 sigma^2))."""
    u, raw, sig, bits = _setup(u, raw, sigma, scale, offset)
    with mpmath.workprec(bits):
        y = _model_rows(raw, scale, offset)
        out = []
        for urow, s in zip(u, sig):
            um = [mpmath.mpf(float(a)) for a in urow]
            two_s2 = 2 * mpmath.mpf(float(s)) ** 2
            out.append([-q / two_s2 for q in _sqdist(um, y)])
    return bits, y, out, sig


def _unnormalised(row):
    """exp(l_i - max l) of one query's logits, and their sum (in the working precision)."""
    m = max(row)
    e = [mpmath.exp(x - m) for x in row]
    return e, mpmath.fsum(e)


def _per_query(u, raw, sigma, scale, offset, fn) -> list:
    """[fn(logits, model rows, sigma) for each query], computed in the working precision."""
    bits, y, lg, sig = _logits(u, raw, sigma, scale, offset)
    with mpmath.workprec(bits):
        return [fn(row, y, s) for row, s in zip(lg, sig)]


def weights(u, raw, sigma, *, scale: float = 1.0, offset: float = 0.0) -> np.ndarray:
    """softmax_i(-||u - y_i||^2 / 2 sigma^2): (N, M) float64, each weight rounded once."""
    def one(row, y, s):
        e, tot = _unnormalised(row)
        return [float(x / tot) for x in e]

    return np.array(_per_query(u, raw, sigma, scale, offset, one), dtype=np.float64)


def denoise(u, raw, sigma, *, scale: float = 1.0, offset: float = 0.0) -> np.ndarray:
    """D*(u; sigma) = sum_i w_i y_i: (N, d) float64, each value rounded once."""
    def one(row, y, s):
        e, tot = _unnormalised(row)
        return [float(mpmath.fsum(w * yi[j] for w, yi in zip(e, y)) / tot) for j in range(len(y[0]))]

    return np.array(_per_query(u, raw, sigma, scale, offset, one), dtype=np.float64)


def log_density(u, raw, sigma, *, scale: float = 1.0, offset: float = 0.0) -> np.ndarray:
    """log p_sigma(u) = logsumexp_i(l_i) - log M - (d/2) log(2 pi sigma^2): (N,) float64."""
    def one(row, y, s):
        e, tot = _unnormalised(row)
        lse = max(row) + mpmath.log(tot)
        gauss = mpmath.mpf(len(y[0])) / 2 * mpmath.log(2 * mpmath.pi * mpmath.mpf(float(s)) ** 2)
        return float(lse - mpmath.log(len(row)) - gauss)

    return np.array(_per_query(u, raw, sigma, scale, offset, one), dtype=np.float64)


def posterior(u, raw, sigma, k: int, *, scale: float = 1.0, offset: float = 0.0):
    """The k largest weights and their row indices (ties: the smaller index first):
    ``(weights (N, k) float64, indices (N, k) int64)``."""
    def one(row, y, s):
        e, tot = _unnormalised(row)
        order = sorted(range(len(row)), key=lambda i: (-row[i], i))[:k]
        return [float(e[i] / tot) for i in order], order

    res = _per_query(u, raw, sigma, scale, offset, one)
    return np.array([w for w, _ in res], dtype=np.float64), np.array([i for _, i in res], dtype=np.int64)


def nearest(u, raw, k: int = 1, *, scale: float = 1.0, offset: float = 0.0):
    """Exact k nearest rows in model space: ``(distances (N, k) float64, indices (N, k) int64)``,
    ties broken by the smaller index."""
    u, raw, _, bits = _setup(u, raw, 1.0, scale, offset)
    dist, idx = [], []
    with mpmath.workprec(bits):
        y = _model_rows(raw, scale, offset)
        for urow in u:
            sq = _sqdist([mpmath.mpf(float(a)) for a in urow], y)
            order = sorted(range(len(sq)), key=lambda i: (sq[i], i))[:k]
            dist.append([float(mpmath.sqrt(sq[i])) for i in order])
            idx.append(order)
    return np.array(dist, dtype=np.float64), np.array(idx, dtype=np.int64)
