"""Rigorous error bound (``delta``) of the fp32 GPU passes (Triton and CUDA kernels).

Pure torch (no Triton): shared by ``optden.backends.triton`` and ``optden.backends.cuda``.

Notation, per query: ``v`` the float64 centered query, V = ||v||; the kernel dots with
rows ``x_i`` of norm at most X (X = Q = max ||raw_i - center|| when it centers uint8
rows in the kernel, exactly; X = Q + ||center|| when it dots with the raw rows, and the
host adds the common part ``2 coef v.center``). The kernel's value is

    lhat_i = fl32( coef32 * fl32(2 * dot_i - csq32_i) ),   dot_i = fl32(sum_p a_p . x_i)

with ``a_p`` the query pieces (``sum_p a_p = v - r``, the residual ``r`` measured in
float64), ``csq32 = fl32(csq)``, ``coef32 = fl32(coef)``. With ``u`` = 2^-23 (twice
fp32's unit roundoff, so that round-toward-zero accumulation inside tensor cores and
``ex2.approx`` are covered) and ``gamma_n = n u / (1 - n u)``:

1. |dot_i - v.x_i| <= ||r|| X + gamma_{P d + P} * 1.01 V X         (P pieces, any order)
2. |g_i| <= G := 2 (1.01 V X + dot_err) + 1.01 Q^2, and the subtraction, the rounding of
   csq and coef and the final product each add at most u G coef:
   |lhat_i - coef (2 v.x_i - csq_i)| <= coef (2 dot_err + 4 u G) (1 + 4u).
3. The host adds the common part (-coef ||v||^2, and +2 coef v.center when the kernel
   used raw rows) in float64: at most 8 (d + 4) eps64 coef (V + X + Q)^2.
4. The online softmax in fp32 (``p = exp(l - m)``: |l - m| <= 104 before underflow;
   T rescalings per split; sums over tiles of BLOCK_M rows) and the weighted sum
   (TF32 pieces of p, residual < 2^-20 p; fp32 accumulation) perturb each row's
   contribution by a relative factor within exp(+-delta_sm) with
   delta_sm = u (420 + 8 T) + gamma_{2 BLOCK_M_MAX + 4 T} + 2^-19: a logit-equivalent
   error (a relative error eps on a row's weight is a logit error log(1 + eps)); the
   accumulation error of acc and s is bounded by the same expression as such a weight
   perturbation, so certify's DENSE criterion covers it too. Rows whose weight
   underflows (below e^-87 of the largest) are dropped, a relative mass below
   M e^-87, far under any delta this bound produces.

delta = (2) + (3) + (4) + 4 eps64 |top logit| (the float64 additions on the host).
"""
from __future__ import annotations

import math

import torch

U32 = 2.0**-23
EPS64 = 2.0**-53


def gamma(n: int, u: float = U32) -> float:
    """Higham's gamma_n = n u / (1 - n u)."""
    if n * u >= 0.5:
        raise ValueError(f"gamma: n u = {n * u} is too large for a meaningful bound")
    return n * u / (1.0 - n * u)


def softmax_delta(tiles_per_split: int, block_m_max: int) -> float:
    """Logit-equivalent bound of the fp32 online softmax and weighted sum (item 4)."""
    t = int(tiles_per_split)
    return U32 * (420 + 8 * t) + gamma(2 * block_m_max + 4 * t) + 2.0**-19


def fp32_pass_delta(v: torch.Tensor, resid: torch.Tensor, coef: torch.Tensor, *, d: int, pieces: int,
                    x_norm: float, q_norm: float, tiles_per_split: int, block_m_max: int,
                    top: torch.Tensor) -> torch.Tensor:
    """delta (N,) of an fp32 kernel pass (items 1-4 of the module docstring).

    v: (N, d) float64 centered queries; resid: (N,) ||v - sum of pieces||; coef: (N,);
    x_norm: X, bound on the norm of the vectors the kernel dots with; q_norm: Q, max
    centered row norm; top: (N,) the largest coarse logit (float64, common part included).
    """
    V = v.norm(dim=1) * (1.0 + 4 * d * EPS64)
    X = float(x_norm)
    Q = float(q_norm)
    dot_err = resid * (1.0 + 1e-9) * X + 4 * EPS64 * V * X + gamma(pieces * d + pieces) * 1.01 * V * X
    G = 2.0 * (1.01 * V * X + dot_err) + 1.01 * Q * Q
    d_logit = coef * (2.0 * dot_err + 4.0 * U32 * G) * (1.0 + 4.0 * U32)
    d_host = 8.0 * (d + 4) * EPS64 * coef * (V + X + Q) ** 2
    d_sm = softmax_delta(tiles_per_split, block_m_max)
    out = d_logit + d_host + d_sm + 4.0 * EPS64 * top.abs()
    return torch.where(torch.isfinite(out), out, torch.full_like(out, math.inf))
