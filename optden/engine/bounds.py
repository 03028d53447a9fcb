"""Every rounding-error bound of the certified pass, in one place.

1. Precision of the certificate (``optden.engine.precision.certify``): the fractions of
   the tolerance that a coarse pass and a left-out mass may use (DENSE_FRACTION,
   MASS_FRACTION).
2. Higham's ``gamma`` and the bound of a GEMM-expansion pass (``gemm_delta``: the float64
   torch backend, and any pass whose GEMM runs with unit roundoff u).
3. The fp32 GPU passes (Triton and CUDA kernels, ``fp32_pass_delta``); notation below.
4. FAISS's float32 distances (``dot_rel_err``, ``faiss_distance_interval``): the bounds that
   make a pruned candidate search certified (``optden.prune``).
5. The exact re-score's squared-distance gaps (``gap_error_factor``, ``optden.engine.gaps``).
6. The posterior statistics (``optden.engine.stats``: ESS, entropy, mean logit, top
   weights) from a pass's certificate (``multiplicative``, ``relative_to_top``, ``excluded``).
7. The local denoisers' float64 direct-difference passes over patches (``direct_pass_delta``,
   ``SKIP_LOGITS``): ``optden.engine.patch_pass`` and csrc/patch_*.cpp.
8. The lower-bound embedding of certified pruning (``embedding_lower``: PCA plus the
   residual norm, ``optden.prune.embedding``).

The C++ cpu backend computes its own bound in csrc/ (see ``optden.engine.backends.cpu``).

fp32 GPU passes. Notation, per query: ``v`` the float64 centered query, V = ||v||; the
kernel dots with rows ``x_i`` of norm at most X (X = Q = max ||raw_i - center|| when it
centers uint8 rows in the kernel, exactly; X = Q + ||center|| when it dots with the raw
rows, and the host adds the common part ``2 coef v.center``). The kernel's value is

    lhat_i = fl32( coef32 * fl32(2 * dot_i - csq32_i) ),   dot_i = fl32(sum_p a_p . x_i)

with ``a_p`` the query pieces (``sum_p a_p = v - r``, the residual ``r`` measured in
float64), ``csq32 = fl32(csq)``, ``coef32 = fl32(coef)``. With ``u`` = U_GPU32 = 2^-23
(twice fp32's unit roundoff, so that round-toward-zero accumulation inside tensor cores
and ``ex2.approx`` are covered) and ``gamma_n = n u / (1 - n u)``:

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

import numpy as np
import torch

__all__ = ["DENSE_FRACTION", "MASS_FRACTION", "dense_threshold", "mass_tolerance", "rescore_budget", "EPS64", "U32", "U_GPU32",
           "U_TF32_IN", "DISTANCE_MARGIN", "gamma", "gemm_delta", "softmax_delta", "fp32_pass_delta",
           "dot_rel_err", "float32_shift", "faiss_distance_interval", "gap_error_factor", "GAP_ERR_G",
           "GAP_ERR_TINY", "QUERY_ERR", "query_delta", "float64_logit_error", "accumulation_eta",
           "query_shift", "shifted_logit_error", "multiplicative", "relative_to_top", "excluded", "MAX_EXCLUDED",
           "covariance_error", "gap_covariance_error", "SKIP_LOGITS", "EXP_REL_ERR", "direct_pass_delta",
           "accumulation_error", "orthonormality_slack", "embedding_float64_error", "embedding_error",
           "embedding_lower", "embedding_lower_terms", "scan_lower_terms"]

# ----------------------------------------------------------------------------- 1. the tolerance's shares

#: A pass is certified DENSE when its logit bound delta <= DENSE_FRACTION * tol: every
#: normalised weight is then off by a factor within exp(+-2 delta), which keeps the
#: relative error of D* within tol with a margin.
DENSE_FRACTION = 0.25
#: A certificate may leave out rows (outside a top K, outside a pruned candidate set)
#: whose relative weight is at most MASS_FRACTION * tol together.
MASS_FRACTION = 0.1


def dense_threshold(tol: float) -> float:
    """The largest logit bound delta that certifies a pass DENSE at tolerance tol."""
    return DENSE_FRACTION * tol


def mass_tolerance(tol: float) -> float:
    """The relative weight a certificate at tolerance tol may leave out."""
    return MASS_FRACTION * tol


def rescore_budget(tol: float) -> float:
    """The misweight (L1 distance of the weights) that the rounding of an exact re-score may
    add at tolerance tol before it is redone in compensated arithmetic: DENSE_FRACTION * tol,
    so a RESCORED certificate stays within 2 MASS_FRACTION tol + DENSE_FRACTION tol < tol / 2."""
    return DENSE_FRACTION * tol


# ----------------------------------------------------------------------------- 2. gamma, GEMM passes

#: Unit roundoff of float64.
EPS64 = 2.0**-53
#: Unit roundoff of float32.
U32 = 2.0**-24
#: fp32's unit roundoff doubled: the GPU passes' u (covers round-toward-zero accumulation
#: inside tensor cores and ex2.approx).
U_GPU32 = 2.0**-23
#: faiss-gpu may run its GEMMs in TF32: each input is cut to a 10-bit mantissa (relative
#: error < 2^-10 whether the hardware rounds or truncates); the products are then exact
#: in float32 and summed in float32. Bound as if it did (see ``dot_rel_err``).
U_TF32_IN = 2.0**-10
#: Relative widening of float64 radii and distances: covers their own rounding (~1e-16 d).
DISTANCE_MARGIN = 1e-9


def gamma(n: int, u: float) -> float:
    """Higham's gamma_n = n u / (1 - n u): bound on the relative error of an n-term sum or
    dot product with unit roundoff u. Defined for n u < 1 only (ValueError otherwise)."""
    if n * u >= 1.0:
        raise ValueError(f"gamma_n(u) is defined for n u < 1 only (n = {n}, u = {u})")
    return n * u / (1.0 - n * u)


def gemm_delta(u: float, d: int, vnorm: torch.Tensor, max_qnorm: float, coef: torch.Tensor, top: torch.Tensor,
               fused: bool = True):
    """Bound (N,) on |coarse - exact| of every row's expansion logit, the GEMM run with unit roundoff u.

    The coarse logit is ``-coef (||v||^2 + ||q||^2 - 2 v.q)``, the norms in float64.
    ``fused=True`` (the safe default): the GEMM accumulates onto the norms, as
    ``torch.addmm(vsq + csq, v, q.T, alpha=-2)`` does, so each of its d additions rounds at
    the size of ``||v||^2 + ||q||^2``: |err| <= gamma_{d+2} (||v|| + ||q||)^2 (Higham's bound
    for ``c + sum a_k b_k`` in any order). ``fused=False``: the dot product is computed on
    its own and added afterwards: |fl(v.q) - v.q| <= gamma_{d+2} ||v|| ||q||, times 2.
    The +2 covers the rounding of v and q to the working precision. The float64 norms add
    gamma_{d+2} (||v||^2 + ||q||^2) (the query's is common to all rows, but lse and the
    re-score compare coarse with exact logits); the final sums and the multiplication by
    coef add a few roundings of the magnitudes involved.
    """
    g = gamma(d + 2, u)
    if fused:
        dot_err = g * (vnorm + max_qnorm) ** 2
    else:
        dot_err = 2.0 * g * vnorm * max_qnorm
    norm_err = gamma(d + 2, EPS64) * (vnorm**2 + max_qnorm**2)
    sum_err = 4.0 * EPS64 * (vnorm + max_qnorm) ** 2
    return coef * (dot_err + norm_err + sum_err) + 4.0 * EPS64 * top.abs()


# ----------------------------------------------------------------------------- 3. fp32 GPU passes


def softmax_delta(tiles_per_split: int, block_m_max: int) -> float:
    """Logit-equivalent bound of the fp32 online softmax and weighted sum (item 4)."""
    t = int(tiles_per_split)
    return U_GPU32 * (420 + 8 * t) + gamma(2 * block_m_max + 4 * t, U_GPU32) + 2.0**-19


def fp32_pass_delta(v: torch.Tensor, resid: torch.Tensor, coef: torch.Tensor, *, d: int, pieces: int,
                    x_norm: float, q_norm: float, tiles_per_split: int, block_m_max: int,
                    top: torch.Tensor) -> torch.Tensor:
    """delta (N,) of an fp32 kernel pass (steps 1-4 of "fp32 GPU passes" in the module docstring).

    v: (N, d) float64 centered queries; resid: (N,) ||v - sum of pieces||; coef: (N,);
    x_norm: X, bound on the norm of the vectors the kernel dots with; q_norm: Q, max
    centered row norm; top: (N,) the largest coarse logit (float64, common part included).
    """
    V = v.norm(dim=1) * (1.0 + 4 * d * EPS64)
    X = float(x_norm)
    Q = float(q_norm)
    dot_err = resid * (1.0 + 1e-9) * X + 4 * EPS64 * V * X + gamma(pieces * d + pieces, U_GPU32) * 1.01 * V * X
    G = 2.0 * (1.01 * V * X + dot_err) + 1.01 * Q * Q
    d_logit = coef * (2.0 * dot_err + 4.0 * U_GPU32 * G) * (1.0 + 4.0 * U_GPU32)
    d_host = 8.0 * (d + 4) * EPS64 * coef * (V + X + Q) ** 2
    d_sm = softmax_delta(tiles_per_split, block_m_max)
    out = d_logit + d_host + d_sm + 4.0 * EPS64 * top.abs()
    return torch.where(torch.isfinite(out), out, torch.full_like(out, math.inf))


# ----------------------------------------------------------------------------- 4. FAISS distances


def dot_rel_err(n: int, u_in: float) -> float:
    """Relative error bound of an n-term float32 dot product (or sum of squares) whose
    inputs were first rounded with unit roundoff ``u_in`` (0: exact float32 inputs;
    ``U_TF32_IN`` for TF32 tensor cores), products exact, accumulated in float32:
    ``|fl(sum a_i b_i) - sum a_i b_i| <= dot_rel_err * sum |a_i b_i|``, i.e.
    ``(1 + u_in)^2 (1 + gamma_n(2^-24)) - 1`` (Higham, Thm 3.1, with perturbed inputs).
    Finite and positive for every n < 2^24: the TF32 input rounding is not folded into
    the accumulation's gamma (gamma_n(2^-11) has a pole at n = 2048)."""
    return (1.0 + u_in) ** 2 * (1.0 + gamma(n, U32)) - 1.0


def float32_shift(resid: np.ndarray, max_cnorm: float) -> np.ndarray:
    """Bound (N,) on how far rounding to float32 moved a query and any row: the query's
    residual ``||v - v32||`` (N,), widened, plus ``||q - q32|| <= u ||q||`` for the rows
    (both added to distances by the triangle inequality)."""
    return resid * (1.0 + DISTANCE_MARGIN) + U32 * max_cnorm * 2.0


def faiss_distance_interval(D: np.ndarray, x32: np.ndarray, shift: np.ndarray, *, d: int, max_cnorm: float,
                            u_in: float, direct: bool):
    """Exact (lower, upper) bounds on the distances from v whose float32 squared values
    FAISS computed as D (N,) or (N, K); +inf where D is not finite (no result).

    x32: (N, d) the float32 queries FAISS saw; shift: (N,) ``float32_shift``; d: the
    dimension; max_cnorm: the largest row norm; u_in: the input rounding of FAISS's GEMM
    (0, or ``U_TF32_IN`` on faiss-gpu). direct: FAISS computed by direct differences
    (relative error ``2 dot_rel_err(d + 2)``) rather than by the expansion
    ``||x||^2 + ||y||^2 - 2 x.y`` (absolute error ``2 dot_rel_err(d + 4) (||x|| + R)^2``,
    a factor 2 of slack, R the largest float32 row norm).
    """
    D = np.where(np.isfinite(D) & (D < 1e38), D.astype(np.float64), np.inf)
    if D.ndim == 2:
        shift = shift[:, None]
    if direct:
        g = 2.0 * dot_rel_err(d + 2, u_in)
        low2, up2 = D * (1.0 - g), D * (1.0 + g)
    else:
        xn = np.sqrt((x32.astype(np.float64) ** 2).sum(1))
        R = max_cnorm * (1.0 + 2 * U32)  # the float32 copy of the rows
        err = 2.0 * dot_rel_err(d + 4, u_in) * (xn + R) ** 2
        err = err[:, None] if D.ndim == 2 else err
        low2, up2 = D - err, D + err
    low = np.clip(np.sqrt(np.clip(low2, 0.0, None)) * (1.0 - DISTANCE_MARGIN) - shift, 0.0, None)
    up = np.sqrt(up2) * (1.0 + DISTANCE_MARGIN) + shift
    return low, up


# ----------------------------------------------------------------------------- 5. exact re-scoring by gaps


def gap_error_factor(d: int) -> float:
    """The factor F of the rounding bound ``err <= F W + GAP_ERR_G |g|`` of a squared-distance
    gap ``g = ||v - q_i||^2 - ||v - q_r||^2`` computed in plain float64 by
    ``optden.engine.gaps.sq_gaps`` as ``a . b`` with ``a = raw_r - raw_i`` and
    ``b = 2 v - q_i - q_r`` (q = raw - center), where ``W = sum_j |a_j| (|v_j| + |q_r,j| +
    |q_i,j|)``. Everything is relative to the float64 query v the pass is given, the stored
    rows and the float64 center.

    It is taken as ``a . t - a . q_i`` with ``t = 2 v - q_r``: each of a, q_r, q_i, t rounds
    once (relative u), so ``a_j (t_j - q_i,j)`` is within 4u |a_j| (|v_j| + |q_r,j| + |q_i,j|)
    (1 + 2u) of the exact product, and the two d-term sums add gamma_d (sum |a| |t| +
    sum |a| |q_i|) <= 2 gamma_d (1 + u) W: F = 1.01 (2 gamma_d + 6u) (6u for 4u, a margin);
    the final subtraction is in GAP_ERR_G.
    (The compensated gaps carry an a-posteriori bound computed from the terms they
    rounded, in ``sq_gaps`` itself.)
    """
    return 1.01 * (2.0 * gamma(max(d, 1), EPS64) + 6.0 * EPS64)


#: The part of a gap's bound proportional to |g| itself: the final rounding of a
#: gap (u), the rounding of coef = scale^2 / (2 sigma^2) (4u) and of the product coef * g (u),
#: and the online softmax's exp and rescaling of a logit coef * g (4u), with a margin.
GAP_ERR_G = 11.0 * EPS64
#: An absolute term for products that underflow to subnormals in the compensated sum (per
#: component of the dot product).
GAP_ERR_TINY = 4.0 * 2.0**-1074

#: The double-double conversion of a model-space query to centered raw units
#: (``gaps.centered_query``) is within QUERY_ERR (|v| + |center| + |offset| / scale) of
#: the exact one, per component: a handful of u^2 roundings, with a margin.
QUERY_ERR = 8.0 * EPS64**2


def query_delta(coef: torch.Tensor, max_cnorm: float, err_norm) -> torch.Tensor | float:
    """Bound (N,) on how much the row-dependent part of any logit, ``2 coef q_i . v``, moves
    between the float64 query v a coarse pass sees and the exact one, ``err_norm`` (N,) away
    at most: ``2 coef max ||q_i|| err_norm`` (Cauchy-Schwarz), with a margin. Added to a
    pass's delta, so a DENSE certificate holds for the query the caller gave. 0 for None."""
    if err_norm is None:
        return 0.0
    return 2.02 * coef * float(max_cnorm) * err_norm


# ----------------------------------------------------------------------------- 6. posterior statistics
#
# The statistics of the posterior weights w (``optden.engine.stats``): P = sum w^2 (ESS = 1/P),
# the entropy H = -sum w log w, A = -sum w l (the mean negative logit, E ||u - y||^2 / 2 sigma^2),
# lse = log sum e^l and the top weights. Each is bounded from what the pass's certificate
# says, in one of two forms, then widened for the rows the result leaves out (``excluded``):
#
# * a logit bound (DENSE, EXACT): every kept row's computed logit l' is within eta of the
#   truth, so every normalised weight is off by a factor within exp(+-2 eta) (``multiplicative``);
# * exact logits of the top K rows (RESCORED): per row, the gap x_j = l_0 - l_j to the
#   top row is known to within eta_j, and every statistic is a monotone function of the
#   sums R = sum_{j>0} e^{-x_j}, Q = sum e^{-2 x_j}, G = sum x_j e^{-x_j} (``relative_to_top``):
#   tight where the posterior is concentrated (ESS - 1 and H of order e^{-gap}), where a
#   multiplicative bound would be far too loose.
#
# Intervals are (lo, hi) pairs of (N,) float64 tensors, widened for their own float64 rounding.


def float64_logit_error(lam: torch.Tensor, coef: torch.Tensor, qmax: float, d: int) -> torch.Tensor:
    """Bound (n, K) on |fl(l) - l| of float64 direct-difference logits ``lam`` (n, K) =
    -coef ||v - (raw - center)||^2 (``precision.exact_logits``), coef (n,).

    The d differences, d squares, d - 1 additions and the product with coef give a relative
    error gamma_{d+3} (Higham, sums of positive terms); rows centered in float64 (float data)
    move each difference by u |q_j|, at most ``2 u coef ||v - q|| ||q||`` on the logit.
    """
    g = gamma(d + 3, EPS64)
    a = lam.abs() / (1.0 - g)
    return g * a + 2.01 * EPS64 * torch.sqrt(a * coef[:, None]) * qmax


def query_shift(v: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """Bound (N,) on how far float64 moved the centered raw queries ``v = (u - offset) / scale
    - center`` (N, d) from the model-space queries u they stand for: three roundings, of
    at most u |t| each with |t| <= |v_j| + |center_j|, so ``||dv|| <= 1.01 u (3 ||v|| + 2 ||center||)``."""
    return 1.01 * EPS64 * (3.0 * v.norm(dim=1) + 2.0 * float(center.norm()))


def shifted_logit_error(dist: torch.Tensor, coef: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Bound on how much a query shift of ``shift`` (N,) moves the logit -coef ||v - q||^2 of
    a row at distance ``dist`` (N,) or (N, K): ``coef (2 dist shift + shift^2)``."""
    if dist.dim() == 2:
        coef, shift = coef[:, None], shift[:, None]
    return coef * (2.0 * dist * shift + shift * shift)


def accumulation_eta(rows: int) -> float:
    """Logit-equivalent relative error of a float64 pass's sums of positive terms over ``rows``
    rows (exp's rounding, the rescalings of the online softmax, the additions): each term of
    s, s2 and -e1 is off by a relative factor within exp(+-eta)."""
    return gamma(2 * rows + 8, EPS64) + 4 * EPS64


def _widen(lo, hi, rel: float):
    return lo - rel * lo.abs(), hi + rel * hi.abs()


def multiplicative(eta, m, s, s2, e1, delta, slack=None):
    """Intervals of the statistics of a pass whose kept rows' logits are within ``delta`` of
    the truth, its sums within the logit-equivalent ``eta`` (>= delta; ``accumulation_eta``
    added), over the kept rows (before ``excluded``). m, s, s2, e1 (N,): the pass's
    ``Partial`` (``STATS``). slack (N,): an absolute error of the computed -e1 / s (rows the
    exact pass counted beyond its cut), or None.

    With r = e^{2 eta} - 1 and w' = w r_i (r_i in e^{+-2 eta}) normalised:
    - P' = s2 / s^2 is within e^{+-4 eta} of P;
    - H' = log s - e1 / s: H' - H = sum (1 - r_i) w_i log w_i - sum w'_i log r_i, so
      |H' - H| <= r H + 2 eta;
    - A' = -m - e1 / s: |A' - A| <= delta + sum |w' - w| |l - m'| <= delta + r (e^{2 eta} G' + delta)
      with G' = -e1 / s = E_w' [m' - l'] (and 2 eta G' for the rounding of e1);
    - lse' = m + log s within delta + eta.
    Returns dict name -> (value, lo, hi) for "P", "H", "A", "lse".
    """
    r = torch.expm1(2.0 * eta)
    P = s2 / (s * s)
    G = -e1 / s
    sl = torch.zeros_like(G) if slack is None else slack
    H = torch.log(s) + G
    A = -m + G
    lse = m + torch.log(s)
    a_err = delta + r * ((r + 1.0) * (G + sl) + delta) + 2.0 * eta * G + sl + 4.0 * EPS64 * A.abs()
    h_lo = ((H - sl - 2.0 * eta) / (1.0 + r)).clamp(min=0.0)
    h_hi = (H + sl + 2.0 * eta) / (1.0 - r)
    l_err = delta + eta + 2.0 * EPS64 * (lse.abs() + 1.0)
    rel = 8 * EPS64
    return {
        "P": (P, *_widen(P * torch.exp(-4.0 * eta), P * torch.exp(4.0 * eta), rel)),
        "H": (H, *_widen(h_lo, h_hi, rel)),
        "A": (A, *_widen(A - a_err, A + a_err, rel)),
        "lse": (lse, lse - l_err, lse + l_err),
    }


def _xexp(x):
    return x * torch.exp(-x)


def relative_to_top(lam: torch.Tensor, err: torch.Tensor):
    """Intervals of the statistics of the rows of exact logits ``lam`` (n, K), sorted
    descending, each within ``err`` (n, K) of the truth (``float64_logit_error``), over
    these K rows (before ``excluded``).

    With x'_j = lam_0 - lam_j, the true gap x_j is within eta_j = err_0 + err_j (+ the
    rounding of x') of x'_j; R, Q, G (module comment) are sums of terms monotone in x_j
    (x e^{-x} rises to 1/e at x = 1, then falls), bounded term by term; then
    ESS = (1 + R)^2 / (1 + Q) rises with R and falls with Q, H = log(1 + R) + G / (1 + R)
    rises with G and, in R, falls then rises (its minimum at R = G - 1), A = -l_0 + G / (1 + R),
    lse = l_0 + log(1 + R), and each true weight w_j = e^{-x_j} / (1 + R).
    Returns (dict name -> (value, lo, hi) for "P", "H", "A", "lse"; w (n, K) the computed
    weights; w_lo, w_hi (n, K) bounds on the true ones).
    """
    n, K = lam.shape
    x = lam[:, :1] - lam
    eta = err[:, :1] + err + 2.0 * EPS64 * x
    eta[:, 0] = 0.0
    one = torch.ones(n, 1, dtype=lam.dtype, device=lam.device)
    e_mid = torch.exp(-x)
    e_lo, e_hi = torch.exp(-(x + eta)), torch.exp(-(x - eta))
    f_a, f_b = _xexp(x - eta), _xexp(x + eta)
    f_lo = torch.minimum(f_a, f_b)
    f_hi = torch.where((x - eta <= 1.0) & (x + eta >= 1.0), torch.full_like(x, math.exp(-1.0)), torch.maximum(f_a, f_b))
    gk = gamma(K + 2, EPS64)

    def tail(t):  # sum over j > 0
        return t[:, 1:].sum(1)

    R, R_lo, R_hi = tail(e_mid), tail(e_lo) * (1 - gk), tail(e_hi) * (1 + gk)
    Q, Q_lo, Q_hi = tail(e_mid**2), tail(e_lo**2) * (1 - gk), tail(e_hi**2) * (1 + gk)
    G, G_lo, G_hi = tail(_xexp(x)), tail(f_lo) - gk * tail(f_lo.abs()), tail(f_hi) + gk * tail(f_hi.abs())

    def ent(r, g):
        return torch.log1p(r) + g / (1.0 + r)

    def ratio_lo(g):  # smallest g / (1 + R) over R in [R_lo, R_hi]
        return torch.where(g >= 0, g / (1.0 + R_hi), g / (1.0 + R_lo))

    def ratio_hi(g):
        return torch.where(g >= 0, g / (1.0 + R_lo), g / (1.0 + R_hi))

    P = (1.0 + Q) / (1.0 + R) ** 2
    P_lo, P_hi = (1.0 + Q_lo) / (1.0 + R_hi) ** 2, (1.0 + Q_hi) / (1.0 + R_lo) ** 2
    H = ent(R, G)
    H_lo = ent(torch.minimum(torch.maximum(G_lo - 1.0, R_lo), R_hi), G_lo).clamp(min=0.0)
    H_hi = torch.maximum(ent(R_lo, G_hi), ent(R_hi, G_hi))
    l0, e0 = lam[:, 0], err[:, 0]
    A = -l0 + G / (1.0 + R)
    A_lo, A_hi = -l0 - e0 + ratio_lo(G_lo), -l0 + e0 + ratio_hi(G_hi)
    lse = l0 + torch.log1p(R)
    lse_lo, lse_hi = l0 - e0 + torch.log1p(R_lo), l0 + e0 + torch.log1p(R_hi)
    w = e_mid / (1.0 + R)[:, None]
    w_lo = torch.cat([one, e_lo[:, 1:]], 1) / (1.0 + R_hi)[:, None]
    w_hi = torch.cat([one, e_hi[:, 1:]], 1) / (1.0 + R_lo)[:, None]
    rel = gamma(4 * K + 16, EPS64)
    out = {
        "P": (P, *_widen(P_lo, P_hi, rel)),
        "H": (H, *_widen(H_lo, H_hi, rel)),
        "A": (A, *_widen(A_lo, A_hi, rel)),
        "lse": (lse, *_widen(lse_lo, lse_hi, rel)),
    }
    return out, w, *_widen(w_lo, w_hi, rel)


#: Left-out mass above which ``excluded`` gives up (the entropy bound needs eps <= 1/e).
MAX_EXCLUDED = 1.0 / 3.0


def excluded(iv: dict, eps: torch.Tensor, n_out: torch.Tensor):
    """Widen the intervals ``iv`` (``multiplicative`` / ``relative_to_top``) of the statistics
    over the kept rows for up to ``eps`` (N,) of the total weight lying on at most
    ``n_out`` (N,) other rows.

    The true weights are (1 - eps_t) w on the kept rows and eps_t <= eps elsewhere, so
    - P = (1 - eps_t)^2 P_kept + P_out, 0 <= P_out <= eps_t^2;
    - H = (1 - eps_t) H_kept - (1 - eps_t) log(1 - eps_t) + H_out, 0 <= H_out <= eps_t log(n_out / eps_t)
      (the uniform spread maximises it; both extra terms rise with eps_t for eps_t <= 1/e);
    - A = (1 - eps_t) A_kept + sum_out w (-l), and sum_out w (-l) = sum_out (-w log w) - eps_t lse
      is in [0, eps_t log(n_out / eps_t) + eps_t max(0, -lse)] (logits are <= 0);
    - lse = lse_kept - log(1 - eps_t).
    Beyond ``MAX_EXCLUDED`` the bounds are the trivial ones (inf). Returns a new dict.
    """
    big = eps > MAX_EXCLUDED
    e = eps.clamp(min=0.0, max=MAX_EXCLUDED)
    nout = n_out.to(e.dtype).clamp(min=1.0)
    spread = torch.where(e > 0, e * torch.log(nout / e.clamp(min=1e-300)), torch.zeros_like(e))
    inf = torch.full_like(e, math.inf)
    out = {}
    P, P_lo, P_hi = iv["P"]
    out["P"] = (P, (1.0 - e) ** 2 * P_lo, torch.where(big, inf, P_hi + e * e))
    H, H_lo, H_hi = iv["H"]
    out["H"] = (H, (1.0 - e) * H_lo, torch.where(big, inf, H_hi - (1.0 - e) * torch.log1p(-e) + spread))
    lse, lse_lo, lse_hi = iv["lse"]
    A, A_lo, A_hi = iv["A"]
    out["A"] = (A, (1.0 - e) * A_lo, torch.where(big, inf, A_hi + spread + e * (-lse_lo).clamp(min=0.0)))
    out["lse"] = (lse, lse_lo, torch.where(big, inf, lse_hi - torch.log1p(-e)))
    return out


def covariance_error(S2, eta, eps, coef, n_out, lse_lo, A_hi, round_err):
    """Bound on ||C' - C||_2 of a computed posterior covariance C' (raw units), its weights
    normalised over kept rows whose logits are within ``eta`` of each other's truth (the
    computed weights within e^{+-2 eta} of the true renormalised ones), with ``eps`` of the
    weight elsewhere: ``(rel, abs)`` (N,) each, ``||C' - C||_2 <= rel ||C||_2 + abs``.

    S2 = sum w' ||q - q_top||^2 (>= tr C of the kept rows, up to e^{2 eta}); with
    r = e^{2 eta} - 1 and C computed around the weighted mean:
    - reweighting: sum (w' - w)(q - D)(q - D)^T lies between -r C and r C (PSD order): at most
      r ||C||; the mean moves by ||D' - D|| <= r sqrt(tr C): r^2 tr C <= r^2 e^{2 eta} S2;
    - the rows outside: C = (1 - eps) C_kept + B, B = eps C_out + eps (1 - eps) (mu_kept -
      mu_out)(...)^T >= 0 below sum_out w (q - mu_kept)(q - mu_kept)^T, whose trace is at most
      (2 / coef) sum_out w (-l) + 2 eps ||v - mu_kept||^2 <= (2 eps / coef) (log(n_out / eps)
      + max(0, -lse_lo) + A_hi) (``excluded``'s bound on sum_out w (-l); Jensen's
      ||v - mu||^2 <= E ||v - q||^2 = A / coef); and ||C_kept|| <= ||C|| / (1 - eps), so the
      reweighting and the eps C_kept term are (r + eps) / (1 - eps) relative;
    - ``round_err``: the float64 rounding of the products (per caller), absolute.
    """
    r = torch.expm1(2.0 * eta)
    e = eps.clamp(min=0.0, max=0.5)
    spread = torch.where(e > 0, torch.log(n_out.to(e.dtype).clamp(min=1.0) / e.clamp(min=1e-300)),
                         torch.zeros_like(e))
    rel = (r + e) / (1.0 - e)
    absolute = r * r * (1.0 + r) * S2 + (2.0 * e / coef) * (spread + (-lse_lo).clamp(min=0.0) + A_hi) + round_err
    return torch.where(eps > 0.5, torch.full_like(rel, math.inf), rel), absolute


def gap_covariance_error(S2, Exx, eta, round_err):
    """Bound (N,) per unit ||V|| on the error of a computed Cov_w(V . q, x) (x = l_top - l the
    logit gaps; d D* / d sigma = (2 / sigma) Cov_w(q, x) in raw units), with the weights as
    in ``covariance_error`` and every gap within eta. With r = e^{2 eta} - 1, S2 and
    Exx = E_w' [x'^2] the computed second moments:
    - the gaps' error: sum w' (a - a') xi <= eta sqrt(V^T C' V) <= eta sqrt((1 + r) S2);
    - the reweighting: Cov_w'(a, x) - Cov_w(a, x) = sum (w' - w)(a - a)(x - x) - (a' - a)(x' - x),
      at most (r + r^2) sd_a sd_x with sd_a <= sqrt((1 + r) S2) ||V|| and
      sd_x <= sqrt(1 + r) (sqrt(Exx) + eta);
    - ``round_err``: the float64 rounding (per caller).
    """
    r = torch.expm1(2.0 * eta)
    sa = torch.sqrt((1.0 + r) * S2)
    sx = torch.sqrt(1.0 + r) * (torch.sqrt(Exx) + eta)
    return eta * sa + (r + r * r) * sa * sx + round_err


# ----------------------------------------------------------------------------- 8. the lower-bound embedding

# The embedding of ``optden.prune.embedding``: with P (d, k) float64 (the top principal
# directions of the centered rows; its columns orthonormal up to rounding) and a constant
# r0, a centered vector w maps to e(w) = [P^T w, ||w - P P^T w|| - r0] in R^(k+1). With
# E = P^T P - I and e_P >= ||E||_2, for any w: ||P^T w||^2 + ||w - P P^T w||^2 =
# ||w||^2 + (P^T w)^T E (P^T w) <= (1 + eta) ||w||^2, eta = e_P (1 + e_P); and the second
# coordinate's difference obeys | ||B u|| - ||B y|| | <= ||B (u - y)|| (B = I - P P^T is
# linear). So ||e(u) - e(y)|| <= sqrt(1 + eta) ||u - y||: a distance in k + 1 dimensions
# that is a lower bound on the true one, up to the roundings bounded below.


def orthonormality_slack(P: np.ndarray) -> float:
    """eta (see above) for the float64 basis P (d, k): ||P^T P - I||_F computed in float64,
    plus the rounding of that product (k^2 entries, each off by <= gamma_d(EPS64) times
    ||p_i|| ||p_j|| <= 1 + e), widened."""
    P = np.asarray(P, dtype=np.float64)
    d, k = P.shape
    e = float(np.linalg.norm(P.T @ P - np.eye(k))) * (1.0 + 1e-6) + k * gamma(d + 2, EPS64) * 2.0
    return e * (1.0 + e)


def embedding_float64_error(d: int, k: int) -> float:
    """C such that the float64 embedding of a vector w computed as ``optden.prune.embedding``
    does it (z = P^T w, b = w - P z, ||b||, minus r0; BLAS in any order) is within
    C (||w|| + |r0|) of the exact e(w) (Euclidean norm over the k + 1 coordinates).

    Per step, for ||P||_2 <= 1.01: ||z - P^T w|| <= sqrt(k) gamma_d 1.01 ||w||; P z adds
    sqrt(d) gamma_k 1.01 ||z|| and 1.01 times z's error; the subtraction u (||w|| + ||P z||);
    the norm gamma_{d+2} ||b||; the shift u |.|. Every norm involved is <= 1.03 (||w|| + |r0|).
    """
    u = EPS64
    return 1.1 * (2.0 * math.sqrt(k) * gamma(d, u) + math.sqrt(d) * gamma(k, u) + gamma(d + 2, u) + 4.0 * u)


def embedding_error(e64: np.ndarray, e32: np.ndarray, w_norm: np.ndarray, r0: float, c64: float) -> np.ndarray:
    """Bound (n,) on ||e32 - e(w)||: the float32 embedding that FAISS sees against the exact one.

    e64 / e32: (n, k + 1) the float64 embedding and its float32 rounding; w_norm (n,) ||w||;
    c64: ``embedding_float64_error``. The rounding to float32 is measured (a float32 and a
    float64 within a factor 2 subtract exactly, Sterbenz) and widened for its norm."""
    diff = np.linalg.norm(e32.astype(np.float64) - e64, axis=1) * (1.0 + 1e-9)
    return diff + c64 * (np.asarray(w_norm, dtype=np.float64) + abs(r0)) * (1.0 + 1e-9) + 1e-300


def embedding_lower(low_emb: np.ndarray, err_query, err_rows: float, eta: float) -> np.ndarray:
    """Exact lower bound on the true distance ||v - q|| from a lower bound ``low_emb`` on
    ||e32(v) - e32(q)|| (float32 embeddings; from a scanned float32 distance through
    ``faiss_distance_interval``, or from a leaf's box): ``max(0, low_emb - shift) * factor``
    with ``(shift, factor) = embedding_lower_terms(err_query, err_rows, eta)``.
    err_query: (n,) or (n, 1) ``embedding_error`` of the queries; err_rows: the largest of the rows'."""
    shift, factor = embedding_lower_terms(err_query, err_rows, eta)
    return np.clip(np.asarray(low_emb, dtype=np.float64) - shift, 0.0, None) * factor


def scan_lower_terms(dim: int):
    """(s2, margin) of a float32 direct-difference squared distance D over ``dim``
    coordinates: the distance is at least ``sqrt(D s2) margin`` (``faiss_distance_interval``
    with direct=True: relative error 2 dot_rel_err(dim + 2) of D, then DISTANCE_MARGIN).
    ``optden._C.leaf_scan`` applies them to every row it returns."""
    return 1.0 - 2.0 * dot_rel_err(dim + 2, 0.0), 1.0 - DISTANCE_MARGIN


def embedding_lower_terms(err_query, err_rows: float, eta: float):
    """(shift, factor) of ``embedding_lower``: the embedding errors of query and row are
    subtracted (triangle inequality), then the distance is divided by sqrt(1 + eta) and
    widened by DISTANCE_MARGIN (covers the float64 roundings of the box or scan bound, at
    most (k + 4) 2^-53 relative). ``optden._C.box_lower`` applies the same two terms."""
    return np.asarray(err_query, dtype=np.float64) + err_rows, (1.0 - DISTANCE_MARGIN) / math.sqrt(1.0 + eta)


# ----------------------------------------------------------------------------- the GEMM pass
# Rigorous error bound (``delta``) of the GEMM pass (``optden.kernels.dense_gemm``,
# host side in ``optden.engine.backends.gpu_gemm_pass``).
#
# Rigorous error bound (``delta``) of the GEMM pass (``optden.kernels.dense_gemm``). Pure torch.
#
# Notation, per query: ``v`` the float64 centered query, V = ||v||; ``r_i = raw_i - 128``
# (exact int8), X >= max_i ||r_i|| (the host uses Q + ||center - 128||), Q = max centered
# row norm. The host splits ``v`` into P int8 pieces with fp32 scales, ``sum_p s_p q_p``,
# and measures in float64 the residual ``R = v - sum_p s_p q_p`` and ``A = sum_p ||s_p q_p||``.
#
# 1. Dots. ``I_p = q_p . r_i`` is an integer (int8 x int8 tensor cores, int32 accumulation:
#    exact for d <= 131072, no assumption about the tensor cores' rounding). The epilogue
#    forms ``dot = sum_p fl(fl(I_p) s_p)`` in fp32: P + 1 roundings of at most 2^-24 each on
#    terms whose magnitudes sum to ``sum_p s_p |I_p| <= A X``, so
#    ``|dot - v.r_i| <= ||R|| X + P u A X``  (u = 2^-23 = twice fp32's unit roundoff).
#    This is the ``resid`` of ``fp32_pass_delta`` with no
#    accumulation term (``pieces=0``): items 2 (the fp32 logit ``coef (2 dot - csq)``), 3
#    (the float64 common part, here ``-coef (||v||^2 - 2 v.(128 - center))``, whose vector
#    ``128 - center`` has norm <= X) and the float64 top logit apply unchanged. The
#    row-tile statistics (max, sum of exp over BLOCK_M rows in fp32, merged on the host in
#    float64) are one split of one tile: ``softmax_delta(1, BLOCK_M)``.
# 2. Weighted sum (``wsum_delta``), only for the queries it runs on: ``p = exp(l - mref)`` in
#    fp32 (as the fused pass: u (420) for |l - mref| <= 104; rows further down underflow
#    and are dropped, a relative mass below M e^-87); two bf16 pieces, residual
#    <= 2^-16 p; products with the uint8 rows exact; each step of BLOCK_K rows sums 2 BLOCK_K
#    products in a fresh fp32 tensor-core accumulator. With truncating alignment inside a
#    block FMA of k products (k + 1 addends, each off by less than an ulp of the largest,
#    then a truncated normalisation) a step's error is at most 2 n u sum|products| for n
#    products; the T steps of a split are then added in fp32 (gamma_T). Every row's
#    contribution to ``acc`` and ``s`` is thus off by a relative factor within
#    ``u 420 + gamma_{4 BLOCK_K + T + 4} + 2^-16 (1.01)``, a logit-equivalent error (as in
#    the fused pass's item 4).


def wsum_delta(block_k: int, steps: int) -> float:
    """Logit-equivalent bound of the weighted sum (item 2): BLOCK_K rows per step, ``steps`` steps per split."""
    return U32 * 420 + gamma(4 * int(block_k) + int(steps) + 4, U32) + 1.01 * 2.0**-16


def gemm_logits_delta(v: torch.Tensor, resid: torch.Tensor, absum: torch.Tensor, valid: torch.Tensor,
                      coef: torch.Tensor, *, pieces: int, x_norm: float, q_norm: float, block_m_max: int,
                      top: torch.Tensor) -> torch.Tensor:
    """delta (N,) of the GEMM pass's logits and row-tile statistics (item 1 of the module docstring).

    v: (N, d) float64 centered queries; resid, absum, valid: (N,) from ``gpu_gemm_pass.split_query_int8``;
    coef: (N,) float64; x_norm: X >= max ||raw_i - 128||; q_norm: Q, the max centered row
    norm; block_m_max: the largest row tile of the launches; top: (N,) the largest coarse
    logit (float64, common part included; 0 for an estimate before the pass).
    """
    d = v.shape[1]
    resid_eff = resid + pieces * U32 * absum * (1.0 + 1e-6)
    out = fp32_pass_delta(v, resid_eff, coef, d=d, pieces=0, x_norm=x_norm, q_norm=q_norm,
                          tiles_per_split=1, block_m_max=block_m_max, top=top)
    return torch.where(valid, out, torch.full_like(out, math.inf))


# ----------------------------------------------------------------------------- 7. direct-difference patch passes

#: Rows whose logit is more than SKIP_LOGITS below the best one are left out of the local
#: denoisers' passes (``optden.engine.patch_pass``, csrc/patch_*.cpp): each weighs less than
#: e^-45 = 2.9e-20 of the largest, and ``direct_pass_delta`` counts them as misweighted.
SKIP_LOGITS = 45.0
#: Relative error bound of the float64 exp the passes use (torch's SLEEF exp is within
#: 1 ulp; the C++ kernels' polynomial exp within 6e-15, see csrc/patch_kernels.h).
EXP_REL_ERR = 1e-14


def direct_pass_delta(terms: int, top: torch.Tensor, rows: int, skip: float = SKIP_LOGITS) -> torch.Tensor:
    """delta (N,) of a pass whose logits are float64 direct differences,
    ``l = -coef * sum of at most `terms` squares (v_j - q_j)^2``, over ``rows`` rows.

    Each square has three roundings and the sum of nonnegative terms in any order (box sums
    included) adds gamma_{terms-1}, the product with coef one more: |l^ - l| <= g |l| with
    g = gamma_{terms+3} (relative to the logit, which no cancellation can spoil). With m^ = top
    the largest computed logit:

    * rows with l^ >= m^ - skip: |l^| <= |m^| + skip, so their logits are within
      g' (|m^| + skip) of the truth (g' = g / (1 - g));
    * rows below (left out, or kept with any error): each weighs at most
      exp(-skip + g' (2 |m^| + skip)) of the largest, so together a relative mass
      ``rows * exp(...)``, counted twice (computed and true weights);
    * the exp's relative error EXP_REL_ERR.

    The float64 sums s and acc over the rows add an absolute error to the weighted mean that
    is no weight perturbation: ``accumulation_error``.
    """
    g = gamma(int(terms) + 3, EPS64)
    g1 = g / (1.0 - g)
    a = top.abs()
    out = g1 * (a + skip) + 2.0 * rows * torch.exp(-skip + g1 * (2.0 * a + skip)) + EXP_REL_ERR
    return torch.where(torch.isfinite(out), out, torch.full_like(out, math.inf))


def accumulation_error(rows: int, max_abs: float) -> float:
    """Bound on |acc / s - exact mean| from the float64 sums of a pass over ``rows`` rows
    whose values are at most ``max_abs`` in magnitude: acc is within gamma_rows of
    sum p |q| <= s max_abs and s within gamma_rows of itself, so the quotient is off by at
    most 2 gamma_rows max_abs (to first order; the factor 1.01 covers the rest)."""
    return 2.02 * gamma(int(rows) + 1, EPS64) * float(max_abs)
