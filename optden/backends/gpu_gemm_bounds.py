"""Rigorous error bound (``delta``) of the GEMM pass (``optden.kernels.dense_gemm``). Pure torch.

Notation, per query: ``v`` the float64 centered query, V = ||v||; ``r_i = raw_i - 128``
(exact int8), X >= max_i ||r_i|| (the host uses Q + ||center - 128||), Q = max centered
row norm. The host splits ``v`` into P int8 pieces with fp32 scales, ``sum_p s_p q_p``,
and measures in float64 the residual ``R = v - sum_p s_p q_p`` and ``A = sum_p ||s_p q_p||``.

1. Dots. ``I_p = q_p . r_i`` is an integer (int8 x int8 tensor cores, int32 accumulation:
   exact for d <= 131072, no assumption about the tensor cores' rounding). The epilogue
   forms ``dot = sum_p fl(fl(I_p) s_p)`` in fp32: P + 1 roundings of at most 2^-24 each on
   terms whose magnitudes sum to ``sum_p s_p |I_p| <= A X``, so
   ``|dot - v.r_i| <= ||R|| X + P u A X``  (u = 2^-23 = twice fp32's unit roundoff).
   This is the ``resid`` of ``optden.kernels.bounds.fp32_pass_delta`` with no
   accumulation term (``pieces=0``): items 2 (the fp32 logit ``coef (2 dot - csq)``), 3
   (the float64 common part, here ``-coef (||v||^2 - 2 v.(128 - center))``, whose vector
   ``128 - center`` has norm <= X) and the float64 top logit apply unchanged. The
   row-tile statistics (max, sum of exp over BLOCK_M rows in fp32, merged on the host in
   float64) are one split of one tile: ``softmax_delta(1, BLOCK_M)``.
2. Weighted sum (``wsum_delta``), only for the queries it runs on: ``p = exp(l - mref)`` in
   fp32 (as the fused pass: u (420) for |l - mref| <= 104; rows further down underflow
   and are dropped, a relative mass below M e^-87); two bf16 pieces, residual
   <= 2^-16 p; products with the uint8 rows exact; each step of BLOCK_K rows sums 2 BLOCK_K
   products in a fresh fp32 tensor-core accumulator. With truncating alignment inside a
   block FMA of k products (k + 1 addends, each off by less than an ulp of the largest,
   then a truncated normalisation) a step's error is at most 2 n u sum|products| for n
   products; the T steps of a split are then added in fp32 (gamma_T). Every row's
   contribution to ``acc`` and ``s`` is thus off by a relative factor within
   ``u 420 + gamma_{4 BLOCK_K + T + 4} + 2^-16 (1.01)``, a logit-equivalent error (as in
   the fused pass's item 4).
"""
from __future__ import annotations

import math

import torch

from optden.kernels.bounds import U32, fp32_pass_delta, gamma

#: Range of the pieces' scales: s |I_p| stays a normal fp32 number for every 1 <= |I_p| < 2^31.
_SCALE_MIN = 2.0**-100
_SCALE_MAX = 2.0**90  # times |I_p| < 2^31 stays below fp32's 2^128


def split_query_int8(v: torch.Tensor, pieces: int):
    """v (N, d) float64 -> int8 pieces ``q`` (P, N, d), fp32 scales ``s`` (P, N) and their errors.

    The reference of ``optden.kernels.dense_gemm.gemm_split`` (one launch on the device).
    ``v ~ sum_p s_p q_p`` with ``s_1 = fl32(max|v| / 127 (1 + 2^-20)) >= max|v| / 127`` and
    ``s_p = s_1 2^(-7 (p - 1))``: each piece rounds the residual of the previous ones
    (``|r_p| <= s_p / 2``), so ``|q_p| <= 64`` for p > 1 and every piece gains 7 bits; the
    subtractions are exact (Sterbenz), the scales powers-of-two apart (two sweeps over the
    query on the device instead of one per piece). Returns ``(q, s, resid, absum, valid)``:
    resid (N,) = ``||v - sum_p s_p q_p||`` (float64, the exact residual's norm), absum (N,) =
    ``sum_p ||s_p q_p||``, valid (N,) bool: False where a scale falls outside
    [2^-100, 2^90] (the kernel's fp32 products could under- or overflow; those queries get
    an infinite bound).
    """
    if pieces < 1:
        raise ValueError(f"pieces: expected >= 1, got {pieces}")
    amax = v.abs().amax(1)
    s1 = torch.where(amax > 0, (amax / 127.0 * (1.0 + 2.0**-20)).to(torch.float32).double(), torch.ones_like(amax))
    valid = (s1 <= _SCALE_MAX) & (s1 * 2.0 ** (-7 * (pieces - 1)) >= _SCALE_MIN)
    s1 = torch.where(valid, s1, torch.ones_like(s1))
    r = v.clone()
    qs, ss = [], []
    absum = torch.zeros(v.shape[0], dtype=torch.float64, device=v.device)
    for p in range(pieces):
        s = s1 * 2.0 ** (-7 * p)
        q = torch.floor(r / s[:, None] + 0.5).clamp_(-127, 127)  # as the kernel rounds
        r = r - q * s[:, None]  # exact (Sterbenz): s q has 31 bits and |r - s q| <= s / 2
        absum += s * q.norm(dim=1)
        qs.append(q.to(torch.int8))
        ss.append(s.to(torch.float32))
    return torch.stack(qs).contiguous(), torch.stack(ss).contiguous(), r.norm(dim=1), absum, valid


def wsum_delta(block_k: int, steps: int) -> float:
    """Logit-equivalent bound of the weighted sum (item 2): BLOCK_K rows per step, ``steps`` steps per split."""
    return U32 * 420 + gamma(4 * int(block_k) + int(steps) + 4) + 1.01 * 2.0**-16


def gemm_logits_delta(v: torch.Tensor, resid: torch.Tensor, absum: torch.Tensor, valid: torch.Tensor,
                      coef: torch.Tensor, *, pieces: int, x_norm: float, q_norm: float, block_m_max: int,
                      top: torch.Tensor) -> torch.Tensor:
    """delta (N,) of the GEMM pass's logits and row-tile statistics (item 1 of the module docstring).

    v: (N, d) float64 centered queries; resid, absum, valid: (N,) from ``split_query_int8``;
    coef: (N,) float64; x_norm: X >= max ||raw_i - 128||; q_norm: Q, the max centered row
    norm; block_m_max: the largest row tile of the launches; top: (N,) the largest coarse
    logit (float64, common part included; 0 for an estimate before the pass).
    """
    d = v.shape[1]
    resid_eff = resid + pieces * U32 * absum * (1.0 + 1e-6)
    out = fp32_pass_delta(v, resid_eff, coef, d=d, pieces=0, x_norm=x_norm, q_norm=q_norm,
                          tiles_per_split=1, block_m_max=block_m_max, top=top)
    return torch.where(valid, out, torch.full_like(out, math.inf))
