"""Float64 oracles of what the posterior says: its diagnostics, its covariance, the
derivatives of D*, the score and the log density.

Written for clarity, not speed (O(N M d) memory for the covariance of each query is
O(d^2)); each is computed in the form that keeps float64 accurate where the posterior
is concentrated: weights relative to the top row (gaps x_i = l_max - l_i >= 0, so the
sums R = sum_{i != top} e^{-x_i} keep their digits even when they are 1e-200), and
covariances from rows centered on D* by explicit differences.

Notation (docs/design.md, "The math"): rows y (M, d) in model space, queries u (N, d),
sigma a scalar or (N,), logits l_i = -||u - y_i||^2 / (2 sigma^2), weights w = softmax(l).
"""
from __future__ import annotations

import math

import numpy as np

from .dense import _as_2d, _sigma, logits  # private: the shared argument handling of the oracles

__all__ = ["diagnostics", "posterior_cov", "denoiser_jacobian", "denoiser_dsigma", "log_density_dsigma",
           "score_jacobian"]


def _gaps(u, y, sigma):
    """(x (N, M) = l_max - l >= 0, top (N,) argmax, l_max (N,), R (N,) = sum over the other rows of e^{-x})."""
    lg = logits(u, y, sigma)
    top = np.argmax(lg, axis=1)  # the first of tied rows
    # the gaps themselves, (y_t - y_i) . (2u - y_t - y_i) / (2 sigma^2): their rounding scales
    # with ||y_t - y_i|| ||u||, not with ||u||^2 as differences of logits do (a far query's
    # logits are 1e7 nats, its weights would be off by 1e-8); a nearer row found by them
    # (direct differences misordered it) becomes the top once
    x = np.empty_like(lg)
    for n in range(len(lg)):
        for _ in range(2):
            a = y[top[n]] - y
            x[n] = (a @ (2.0 * u[n] - y[top[n]]) - np.einsum("ij,ij->i", a, y)) / (2.0 * sigma[n] ** 2)
            if x[n].min() >= 0:
                break
            top[n] = int(np.argmin(x[n]))
        x[n] = np.maximum(x[n], 0.0)
    lmax = lg[np.arange(len(lg)), top]
    e = np.exp(-x)
    e[np.arange(len(lg)), top] = 0.0
    return x, top, lmax, e.sum(1)


def diagnostics(u, y, sigma, k: int = 10) -> dict:
    """What ``OptimalDenoiser.diagnostics`` certifies, per query (each (N,) float64 unless noted):

    ``ess`` 1 / sum w^2; ``entropy`` -sum w log w; ``max_weight``; ``top_mass`` the weight of
    the k heaviest rows; ``log_p`` log p_sigma(u); ``dlogp_dsigma`` d log p / d sigma =
    E_w ||u - y||^2 / sigma^3 - d / sigma; ``top_index`` (N,) int64 the heaviest row (the
    first of tied ones).
    """
    u2, y2 = _as_2d(u), _as_2d(y)
    n, (M, d) = u2.shape[0], y2.shape
    s = _sigma(sigma, n)
    x, top, lmax, R = _gaps(u2, y2, s)
    S = 1.0 + R
    w = np.exp(-x) / S[:, None]
    mean_gap = (w * x).sum(1)  # E_w [l_max - l]
    ess = S**2 / np.exp(-2.0 * x).sum(1)
    entropy = np.log1p(R) + mean_gap  # -sum w log w with log w = -x - log S
    A = -lmax + mean_gap  # -E_w[l] = E_w ||u - y||^2 / (2 sigma^2)
    kk = min(k, M)
    top_mass = -np.sort(-w, axis=1)[:, :kk].sum(1)
    return {
        "ess": ess,
        "entropy": entropy,
        "max_weight": 1.0 / S,
        "top_mass": top_mass,
        "log_p": lmax + np.log1p(R) - math.log(M) - 0.5 * d * np.log(2.0 * math.pi * s**2),
        "dlogp_dsigma": (2.0 * A - d) / s,
        "top_index": top.astype(np.int64),
    }


def _around_top(u, y, sigma):
    """(u (N, d), y (M, d), sigma (N,), w (N, M), x (N, M) gaps, top (N,)) for the forms below."""
    u2, y2 = _as_2d(u), _as_2d(y)
    s = _sigma(sigma, u2.shape[0])
    x, top, _, R = _gaps(u2, y2, s)
    return u2, y2, s, np.exp(-x) / (1.0 + R)[:, None], x, top


def posterior_cov(u, y, sigma) -> np.ndarray:
    """Cov[y | u] = sum_i w_i (y_i - D)(y_i - D)^T per query: (N, d, d) float64, computed
    around the top row, ``sum w b b^T - m m^T`` with b = y - y_top (explicit differences)
    and m = D - y_top = sum w b: no cancellation where the posterior is concentrated."""
    u2, y2, s, w, _, top = _around_top(u, y, sigma)
    out = np.empty((u2.shape[0], y2.shape[1], y2.shape[1]))
    for n in range(u2.shape[0]):
        B = y2 - y2[top[n]]
        m = w[n] @ B
        out[n] = (B * w[n][:, None]).T @ B - np.outer(m, m)
    return out


def denoiser_jacobian(u, y, sigma) -> np.ndarray:
    """dD*/du = Cov[y | u] / sigma^2 (symmetric): (N, d, d) float64."""
    s = _sigma(sigma, _as_2d(u).shape[0])
    return posterior_cov(u, y, s) / s[:, None, None] ** 2


def denoiser_dsigma(u, y, sigma) -> np.ndarray:
    """dD*/dsigma = sum_i w_i (y_i - D)(||u - y_i||^2 - E_w ||u - y||^2) / sigma^3 = (2 / sigma)
    Cov_w(y, x) with x = l_max - l the gaps: (N, d) float64 (around the top row)."""
    u2, y2, s, w, x, top = _around_top(u, y, sigma)
    out = np.empty((u2.shape[0], y2.shape[1]))
    for n in range(u2.shape[0]):
        c = x[n] - w[n] @ x[n]
        out[n] = (w[n] * c) @ (y2 - y2[top[n]])
    return 2.0 * out / s[:, None]


def log_density_dsigma(u, y, sigma) -> np.ndarray:
    """d log p_sigma(u) / d sigma = E_w ||u - y||^2 / sigma^3 - d / sigma: (N,) float64."""
    return diagnostics(u, y, sigma, k=1)["dlogp_dsigma"]


def score_jacobian(u, y, sigma) -> np.ndarray:
    """d score / du = (dD*/du - I) / sigma^2, the Hessian of log p_sigma: (N, d, d) float64."""
    u2 = _as_2d(u)
    s = _sigma(sigma, u2.shape[0])
    return (denoiser_jacobian(u2, y, s) - np.eye(u2.shape[1])[None]) / s[:, None, None] ** 2
