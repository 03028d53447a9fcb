"""Float64 reference implementation of the empirical optimal denoiser.

Written for clarity, not speed: every backend is tested against these functions.
All inputs are converted to float64 numpy arrays; nothing here is blocked or pruned,
so memory is O(N * M) and the functions are meant for small problems (tests, checks).

Notation (docs/design.md, "The math"): training rows ``y`` of shape (M, d) in model space,
queries ``u`` of shape (N, d) in the scaled coordinate, ``sigma`` a scalar or (N,).
"""
from __future__ import annotations

import math

import numpy as np

__all__ = [
    "logits",
    "weights",
    "denoise",
    "score",
    "log_density",
    "posterior",
    "nearest",
]


def _as_2d(a) -> np.ndarray:
    a = np.asarray(a.detach().cpu() if hasattr(a, "detach") else a, dtype=np.float64)
    return a.reshape(a.shape[0], -1)


def _sigma(sigma, n: int) -> np.ndarray:
    s = np.asarray(sigma.detach().cpu() if hasattr(sigma, "detach") else sigma, dtype=np.float64)
    return np.broadcast_to(s.reshape(-1) if s.ndim else s, (n,)).astype(np.float64)


def logits(u, y, sigma) -> np.ndarray:
    """-||u_n - y_i||^2 / (2 sigma_n^2) by direct differences: (N, M) float64."""
    u, y = _as_2d(u), _as_2d(y)
    s = _sigma(sigma, u.shape[0])
    sq = ((u[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    return -sq / (2.0 * s[:, None] ** 2)


def _logsumexp(a: np.ndarray) -> np.ndarray:
    m = a.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(a - m).sum(axis=1, keepdims=True)))[:, 0]


def _relative_logits(u2: np.ndarray, y2: np.ndarray, s: np.ndarray):
    """Logits relative to each query's nearest row r, ``-(||u - y_i||^2 - ||u - y_r||^2) / (2 sigma^2)``
    (N, M), and the nearest row's own logit (N,).

    The difference of squared distances is taken as ``(y_r - y_i) . (2 u - y_r - y_i)``: its
    rounding is relative to the difference, where direct differences round at the size of
    the distances (for a query far from every row, 1e16 say, they carry no digit of it).
    """
    sq = ((u2[:, None, :] - y2[None, :, :]) ** 2).sum(-1)
    r = sq.argmin(axis=1)
    yr = y2[r]
    gap = ((yr[:, None, :] - y2[None, :, :]) * ((2.0 * u2 - yr)[:, None, :] - y2[None, :, :])).sum(-1)
    two_s2 = 2.0 * s[:, None] ** 2
    with np.errstate(over="ignore"):  # a tiny sigma: the far rows' logits are -inf, weight 0
        return -gap / two_s2, -sq[np.arange(len(r)), r] / two_s2[:, 0]


def weights(u, y, sigma) -> np.ndarray:
    """softmax_i(-||u - y_i||^2 / 2 sigma^2): (N, M) float64, rows sum to one.

    Normalised by their sum, ``exp(l - max) / sum exp(l - max)``: ``exp(l - lse)`` would
    subtract two numbers of the logits' size (1e11 and more for a far query) and lose
    the weights' digits.
    """
    u2, y2 = _as_2d(u), _as_2d(y)
    rel, _ = _relative_logits(u2, y2, _sigma(sigma, u2.shape[0]))
    e = np.exp(rel - rel.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def denoise(u, y, sigma) -> np.ndarray:
    """D*(u; sigma) = sum_i w_i y_i: (N, d) float64."""
    return weights(u, y, sigma) @ _as_2d(y)


def score(u, y, sigma) -> np.ndarray:
    """grad log p_sigma(u) = (D*(u) - u) / sigma^2: (N, d) float64."""
    u2 = _as_2d(u)
    s = _sigma(sigma, u2.shape[0])
    return (denoise(u2, y, s) - u2) / s[:, None] ** 2


def log_density(u, y, sigma) -> np.ndarray:
    """log p_sigma(u) of the Gaussian-smoothed empirical distribution: (N,) float64."""
    u2, y2 = _as_2d(u), _as_2d(y)
    s = _sigma(sigma, u2.shape[0])
    m, d = y2.shape
    rel, ref = _relative_logits(u2, y2, s)
    return ref + _logsumexp(rel) - math.log(m) - 0.5 * d * np.log(2.0 * math.pi * s**2)


def posterior(u, y, sigma, k: int):
    """The k largest weights and their row indices, sorted by decreasing weight.

    Returns ``(weights (N, k) float64, indices (N, k) int64)``; ties broken by the
    smaller index.
    """
    w = weights(u, y, sigma)
    order = np.lexsort((np.broadcast_to(np.arange(w.shape[1]), w.shape), -w), axis=1)[:, :k]
    return np.take_along_axis(w, order, axis=1), order.astype(np.int64)


def nearest(u, y, k: int = 1):
    """Exact k nearest rows by Euclidean distance: (distances (N, k), indices (N, k))."""
    u2, y2 = _as_2d(u), _as_2d(y)
    dist = np.sqrt(((u2[:, None, :] - y2[None, :, :]) ** 2).sum(-1))
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(dist, order, axis=1), order.astype(np.int64)
