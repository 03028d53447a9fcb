"""What the posterior says, certified: diagnostics from the pass that computes D*, and
the posterior covariance ``Cov[y | u]`` (the Jacobian of D* times sigma^2).

``OptimalDenoiser.diagnostics`` returns a :class:`Diagnostics` (built by
``diagnostics_from``); ``OptimalDenoiser.posterior_cov`` a :class:`PosteriorCov`.
Neither imports the denoiser: they take what they need from it as arguments.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from .engine.bounds import (EPS64, accumulation_eta, covariance_error, float64_logit_error, gamma, gap_covariance_error,
                            gemm_delta, query_shift, shifted_logit_error)
from .engine.gaps import sq_gaps
from .engine.precision import RESCORED, exact_logits, heaviest_distinct_logit, rescore
from .errors import InputError
from .validate import check_positive_int

__all__ = ["Diagnostics", "diagnostics_from", "uniform_diagnostics", "DIAGNOSTIC_FIELDS", "PosteriorCov", "CovEig"]

#: The certified per-query statistics of ``Diagnostics`` (each with ``<name>_err``).
DIAGNOSTIC_FIELDS = ("ess", "entropy", "max_weight", "top_mass", "log_p", "dlogp_dsigma")


@dataclass
class Diagnostics:
    """How concentrated the posterior is, per query (float64 (N,) unless noted), with a
    certified bound ``<name>_err`` on the error of each (docs/design.md, section 2).

    ess:           effective sample size 1 / sum w_i^2 (1 on one row, M when uniform).
    entropy:       -sum w_i log w_i (0 .. log M).
    max_weight:    the largest weight; top_mass: the weight of the k heaviest rows.
    log_p:         log p_sigma(u) of the smoothed empirical distribution (of the class).
    dlogp_dsigma:  d log p_sigma(u) / d sigma = E_w ||u - y||^2 / sigma^3 - d / sigma.
    top_index:     (N,) int64, the dataset row of the largest weight.
    denoised:      (N, d) D*(u; sigma) in model space, from the same pass.
    sigma:         (N,) the noise levels; k: the top-mass count.
    mode:          per query, the certificate: "dense", "rescored" or "exact".
    certified:     (N,) bool, every bound within the contract at the denoiser's tol
                   (relative, against max(1, |value|) for the entropy and log p and
                   against max(|value|, d / sigma) for d log p / d sigma).

    Trajectories (``optden.sample(..., record=True)``) stack these into (K, N) fields.
    """

    ess: torch.Tensor
    ess_err: torch.Tensor
    entropy: torch.Tensor
    entropy_err: torch.Tensor
    max_weight: torch.Tensor
    max_weight_err: torch.Tensor
    top_mass: torch.Tensor
    top_mass_err: torch.Tensor
    log_p: torch.Tensor
    log_p_err: torch.Tensor
    dlogp_dsigma: torch.Tensor
    dlogp_dsigma_err: torch.Tensor
    top_index: torch.Tensor
    denoised: torch.Tensor
    sigma: torch.Tensor
    certified: torch.Tensor
    k: int
    mode: list

    def __len__(self) -> int:
        return self.sigma.shape[-1]

    def as_dict(self) -> dict:
        """Plain lists (JSON-ready), without ``denoised``."""
        out = {}
        for f in fields(self):
            val = getattr(self, f.name)
            if f.name == "denoised":
                continue
            out[f.name] = val.tolist() if isinstance(val, torch.Tensor) else val
        return out

    def put(self, idx: list, other: "Diagnostics") -> None:
        """Overwrite the queries at positions ``idx`` (a list of ints) with ``other``'s (same k)."""
        where = torch.tensor(idx, dtype=torch.int64)
        for f in fields(self):
            val = getattr(self, f.name)
            if isinstance(val, torch.Tensor):
                val[where.to(val.device)] = getattr(other, f.name).to(val.device)
        for j, m in zip(idx, other.mode):
            self.mode[j] = m

    @classmethod
    def empty(cls, n: int, d: int, k: int, device) -> "Diagnostics":
        """NaN-poisoned diagnostics of n queries (a slot nothing writes shows up)."""
        kw = {}
        for f in fields(cls):
            if f.name in ("k", "mode"):
                continue
            shape = (n, d) if f.name == "denoised" else (n,)
            dtype = {"top_index": torch.int64, "certified": torch.bool}.get(f.name, torch.float64)
            kw[f.name] = (torch.full(shape, torch.nan, dtype=dtype, device=device) if dtype == torch.float64
                          else torch.zeros(shape, dtype=dtype, device=device))
        return cls(**kw, k=k, mode=[""] * n)

    @classmethod
    def cat(cls, items: list) -> "Diagnostics":
        """Diagnostics of disjoint batches of queries -> one over all of them (in order)."""
        if not items:
            raise ValueError("items: expected at least one Diagnostics")
        kw = {}
        for f in fields(cls):
            vals = [getattr(it, f.name) for it in items]
            if isinstance(vals[0], torch.Tensor):
                kw[f.name] = torch.cat(vals, dim=vals[0].dim() - (2 if f.name == "denoised" else 1))
            elif f.name == "k":
                kw[f.name] = vals[0]
            else:
                kw[f.name] = [m for v in vals for m in v]
        return cls(**kw)

    @classmethod
    def stack(cls, items: list) -> "Diagnostics":
        """Diagnostics of the same queries at K steps -> one whose tensors are (K, N, ...)
        and whose mode is a list of K lists."""
        if not items:
            raise ValueError("items: expected at least one Diagnostics")
        kw = {}
        for f in fields(cls):
            vals = [getattr(it, f.name) for it in items]
            kw[f.name] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else (
                vals[0] if f.name == "k" else vals)
        return cls(**kw)


def contract_scale(name: str, value: torch.Tensor, d: int, sigma: torch.Tensor) -> torch.Tensor:
    """The magnitude a statistic's error is measured against (docs/design.md, section 2):
    the value itself (ESS, top weights), max(1, |value|) (entropy, log p: both cross 0 or
    approach it where a relative bound is ill-posed), max(|value|, d / sigma) for
    d log p / d sigma (the difference of E ||u - y||^2 / sigma^3 and d / sigma)."""
    if name in ("entropy", "log_p"):
        return value.abs().clamp(min=1.0)
    if name == "dlogp_dsigma":
        return torch.maximum(value.abs(), d / sigma)
    return value.abs()


def diagnostics_from(stats, dc_model: torch.Tensor, sigma: torch.Tensor, rows: torch.Tensor, d: int, k: int,
                     top_index: torch.Tensor, mode: list, tol: float) -> Diagnostics:
    """A ``Diagnostics`` from certified pass statistics (``optden.engine.stats.PassStats``).

    dc_model: (N, d) D* in model space; sigma: (N,) float64; rows: (N,) the number of rows
    each query's posterior runs over (M, or the class's); top_index: (N,) dataset rows.
    The statistics' intervals become errors, plus the float64 rounding of the formulas:
    log p = lse - log M - (d/2) log(2 pi sigma^2) and d log p / d sigma = (2 A - d) / sigma.
    """
    half_log = 0.5 * d * torch.log(2.0 * math.pi * sigma**2)
    log_m = torch.log(rows.to(torch.float64))
    lse, A = stats.lse, stats.neglogit
    log_p = lse - log_m - half_log
    log_p_err = stats.err("lse") + 4.0 * EPS64 * (lse.abs() + log_m + half_log.abs())
    dlogp = (2.0 * A - d) / sigma
    dlogp_err = 2.0 * stats.err("neglogit") / sigma + 4.0 * EPS64 * (2.0 * A.abs() + d) / sigma
    t1, t1_lo, t1_hi = stats.top_mass(1)
    tk, tk_lo, tk_hi = stats.top_mass(k)
    kw = {
        "ess": stats.ess, "ess_err": stats.err("ess"),
        "entropy": stats.entropy, "entropy_err": stats.err("entropy"),
        "max_weight": t1, "max_weight_err": torch.maximum(t1_hi - t1, t1 - t1_lo),
        "top_mass": tk, "top_mass_err": torch.maximum(tk_hi - tk, tk - tk_lo),
        "log_p": log_p, "log_p_err": log_p_err,
        "dlogp_dsigma": dlogp, "dlogp_dsigma_err": dlogp_err,
    }
    ok = torch.ones_like(sigma, dtype=torch.bool)
    for name in DIAGNOSTIC_FIELDS:
        ok &= kw[name + "_err"] <= tol * contract_scale(name, kw[name], d, sigma)  # False for NaN
    return Diagnostics(**kw, top_index=top_index, denoised=dc_model, sigma=sigma, certified=ok, k=k, mode=mode)


def uniform_diagnostics(dc_model: torch.Tensor, rows: torch.Tensor, d: int, k: int,
                        top_index: torch.Tensor) -> Diagnostics:
    """The diagnostics at sigma = inf (pure noise), where every logit is 0 and the weights
    are uniform over each query's rows: ESS = rows, entropy = log rows, max weight 1 / rows,
    top mass k / rows, log p = -inf (the density vanishes) and d log p / d sigma = 0 (the
    limit of (2 A - d) / sigma), exact but for the rounding of log, 1 / rows and k / rows.

    dc_model: (N, d) D* (the mean of the rows); rows: (N,) their number; top_index: (N,)
    the row reported as heaviest (every row ties; the first). Bounds need no pass.
    """
    r = rows.to(torch.float64)
    ent, t1, tk = torch.log(r), 1.0 / r, torch.clamp(k / r, max=1.0)
    zero = torch.zeros_like(r)
    kw = {"ess": r, "ess_err": zero, "entropy": ent, "entropy_err": 2.0 * EPS64 * ent,
          "max_weight": t1, "max_weight_err": EPS64 * t1, "top_mass": tk, "top_mass_err": EPS64 * tk,
          "log_p": torch.full_like(r, -math.inf), "log_p_err": zero, "dlogp_dsigma": zero.clone(),
          "dlogp_dsigma_err": zero}
    return Diagnostics(**kw, top_index=top_index, denoised=dc_model, sigma=torch.full_like(r, math.inf),
                       certified=torch.ones_like(r, dtype=torch.bool), k=k, mode=["exact"] * r.shape[0])


# --------------------------------------------------------------------------------------------
# The posterior covariance Cov[y | u] = sum_i w_i (y_i - D)(y_i - D)^T.


@dataclass
class CovEig:
    """Top eigenpairs of ``Cov[y | u]`` per query (model units).

    values: (N, k) descending; vectors: (N, k, d) orthonormal; residuals: (N, k)
    ``||C' x - lambda x||`` of each pair under the computed operator C' (the true residual
    is within ``bound`` more); bound: (N,) ``PosteriorCov.bound``.
    """

    values: torch.Tensor
    vectors: torch.Tensor
    residuals: torch.Tensor
    bound: torch.Tensor


@dataclass
class _Products:
    """What one pass over a query's rows gives for vectors V (raw units, rows centered on q_top).

    cv: (n, d, J) C V; t: (n, J) Cov_w(V . q, x) with x = l_top - l the gaps; u: (n, d) Cov_w(q, x).
    """

    cv: torch.Tensor
    t: torch.Tensor
    u: torch.Tensor


def _moments(q, logits, lse_ref, l_top, q_top, V, acc):
    """Fold rows q (B, d) (centered raw, shared by the n queries) into the running sums ``acc``.

    logits: (n, B) of the rows; lse_ref: (n,) the normaliser's reference (the weights are
    p = exp(l - lse_ref), normalised at the end by their own sum); l_top, q_top: (n,),
    (n, d) the top row's logit and row; V: (n, d, J). Every sum is over b = q - q_top, the
    rows relative to each query's top row: the top row's own b is exactly 0, so a
    posterior concentrated on it leaves no rounding of its weight times |q_top| behind
    (which, subtracted at the end, swamped a C of 1e-35 by 2000x).
    """
    p = torch.exp(logits - lse_ref[:, None])  # (n, B), <= ~1
    x = l_top[:, None] - logits  # gaps
    b = q[None, :, :] - q_top[:, None, :]  # (n, B, d)
    a = torch.einsum("nbd,ndj->nbj", b, V)  # (q - q_top) . V
    pa = p[:, :, None] * a
    px = p * x
    # out of place: V may be a torch.func-batched tangent (jacfwd), which cannot be added into plain tensors
    terms = {"S": p.sum(1), "Sx": px.sum(1), "Sxx": (px * x).sum(1), "Sq": torch.einsum("nb,nbd->nd", p, b),
             "Sxq": torch.einsum("nb,nbd->nd", px, b), "Sa": pa.sum(1), "Sax": (pa * x[:, :, None]).sum(1),
             "Saq": torch.einsum("nbj,nbd->njd", pa, b)}
    for key, val in terms.items():
        acc[key] = acc[key] + val


def _new_moments(n, d, J, device):
    z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
    return {"S": z(n), "Sx": z(n), "Sxx": z(n), "Sq": z(n, d), "Sxq": z(n, d), "Sa": z(n, J), "Sax": z(n, J),
            "Saq": z(n, J, d)}


def _finish(acc) -> _Products:
    """The products from the sums of ``_moments`` (all over b = q - q_top)."""
    S = acc["S"][:, None]
    m1 = acc["Sq"] / S  # E[q] - q_top
    Ea = acc["Sa"] / S  # E[a] = m1 . V
    Ex = acc["Sx"][:, None] / S
    cv = acc["Saq"] / S[:, :, None] - Ea[:, :, None] * m1[:, None, :]
    t = acc["Sax"] / S - Ea * Ex
    u = acc["Sxq"] / S - m1 * Ex
    return _Products(cv=cv.transpose(1, 2), t=t, u=u)


#: Rows whose weight is below e^-SELECT_NATS of the largest... (see ``PosteriorCov``): the
#: support keeps every row within log(M / (tol * SELECT_MASS)) nats of log-sum-exp.
SELECT_MASS = 1e-3
#: The covariance's target is COV_TOL_FACTOR times the denoiser's tol: 1e-5 (the contract
#: of matvecs and Jacobian products) at the default tol 1e-6, as D*'s contract is 10 tol.
COV_TOL_FACTOR = 10.0
#: A second-heaviest row this many nats below the top puts C below float64's range.
UNDERFLOW_NATS = 700.0
#: Power steps of the lower bound on ||C||_2 that ``certified`` compares the bound with.
POWER_STEPS = 8
#: How many more nats of rows a support whose left-out weight keeps it from being
#: certified takes in its second (last) selection pass.
WIDEN_NATS = 40.0
#: Bytes of float64 temporaries one streamed block may hold (rows x queries x vectors).
BLOCK_BYTES = 1 << 25


def _outside_gap_error(eps, S2, Exx, coef, n_out, lse_lo, lse_hi, A_hi, l_top):
    """What rows outside a support (weight <= eps) can add to Cov_w(v . q, x), per unit ||v||:
    at most sqrt(T_q X) + eps sqrt(S2 Exx), with T_q the trace bound of their second moment
    (``bounds.covariance_error``) and X >= sum_out w x^2: x = l_top - l, sum_out w l^2 =
    sum_out w (log w + lse)^2 <= 2 eps log^2(n_out / eps) + 2 eps lse^2 (t log^2 t is concave
    below 1/e, so spreading eps evenly maximises it)."""
    if not float(eps) > 0:
        return torch.zeros_like(S2)
    spread = torch.log(n_out.clamp(min=1.0) / eps)
    lse2 = torch.maximum(lse_lo.abs(), lse_hi.abs()) ** 2
    Tq = eps * S2 + (2.0 * eps / coef) * (spread + (-lse_lo).clamp(min=0.0) + A_hi)
    X = 2.0 * (2.0 * eps * spread**2 + 2.0 * eps * lse2) + 2.0 * eps * l_top**2
    return torch.sqrt(Tq * X) + eps * torch.sqrt(S2 * Exx)


def _subset(d: dict, rows: list) -> dict:
    """The entries of a stream entry / pass result for the queries ``rows`` (lists and (n, ...) tensors)."""
    out = {}
    for k, val in d.items():
        if isinstance(val, torch.Tensor) and val.dim() >= 1:
            out[k] = val[rows]
        elif isinstance(val, list):
            out[k] = [val[r] for r in rows]
        else:
            out[k] = val
    return out


class _Support:
    """One query's rows that carry its posterior weight, held explicitly (float64, raw units).

    b: (n_s, d) rows minus the top row (exact for uint8 rows); lam: (n_s,) their logits
    relative to the top row's, -coef g with g the squared-distance gaps (``gaps.sq_gaps``):
    never l_top - x, whose rounding at the size of l_top (1e7 nats far from the data, an
    ulp of 2e-9) would dwarf the gaps' own error; l_top: the top row's absolute float64
    logit; eta: the error bound of the gaps (nats); eps: the weight of the rows left out;
    n_out: how many.
    """

    def __init__(self, rows, l_top, coef, shift, gaps, eps, n_out):
        g, g_err = gaps  # (n_s,) each: gaps to the top row (0 at it) and their bounds
        top = int(g.argmin())
        self.q_top = rows[top]
        self.b = rows - self.q_top
        self.l_top = l_top - coef * g[top]  # the gaps may find a row nearer than the logits' top
        x = coef * (g - g[top])
        self.lam = -x
        # the gaps' error scales with ||y_i - y_top|| ||v||, not with ||v||^2 as differences of
        # direct-difference logits do; the query's own rounding (shift) moves gap i by at most
        # 2 ||b_i|| shift; 2 u x: the product with coef
        err = coef * (g_err + g_err[top] + 2.0 * self.b.norm(dim=1) * shift * (1.0 + 1e-12))
        self.eta = float((err + 2.0 * EPS64 * x.abs()).max()) + accumulation_eta(g.numel())
        self.eps, self.n_out = eps, n_out

    def eig(self, k: int):
        """The k largest eigenpairs (raw units) of this support's C = A^T A, A = sqrt(w) (b - m1):
        (values (k,), vectors (d, k)); beyond the rank, 0 and an orthonormal completion."""
        w = torch.softmax(self.lam, 0)
        A = torch.sqrt(w)[:, None] * (self.b - w @ self.b)
        _, sv, Vh = torch.linalg.svd(A, full_matrices=False)
        vals = torch.zeros(k, dtype=torch.float64, device=A.device)
        r = min(k, sv.numel())
        vals[:r] = sv[:r] ** 2
        Q = Vh[:r].T
        if r < k:  # complete with directions orthogonal to the rows' span (eigenvalue 0)
            g = torch.Generator(device="cpu").manual_seed(0)
            extra = torch.randn(A.shape[1], k - r, generator=g, dtype=torch.float64).to(A.device)
            basis = torch.linalg.qr(torch.cat([Vh.T, extra], 1)).Q
            Q = torch.cat([Q, basis[:, Vh.shape[0]:Vh.shape[0] + k - r]], 1)
        return vals, Q

    def products(self, V: torch.Tensor) -> _Products:
        """V: (d, J) raw-space vectors -> products of this one query."""
        acc = _new_moments(1, self.b.shape[1], V.shape[1], V.device)
        zero = torch.zeros(1, self.b.shape[1], dtype=torch.float64, device=V.device)
        # rows already centered on q_top: pass q = b, q_top = 0
        _moments(self.b, self.lam[None], self.lam.logsumexp(0)[None], torch.zeros_like(self.l_top)[None], zero,
                 V[None], acc)
        return _finish(acc)


class PosteriorCov:
    """The posterior covariance ``C = Cov[y | u] = sum_i w_i (y_i - D)(y_i - D)^T`` of N queries
    (model units), certified; ``dD*/du = C / sigma^2``.

    Built by ``OptimalDenoiser.posterior_cov`` from the certified pass: each query's
    support, the rows that carry its weight, is kept explicitly when it fits
    ``memory_budget`` (a RESCORED query's top K; otherwise the rows within
    log(M / (tol SELECT_MASS)) nats of log-sum-exp, found by one float64 pass), with
    logits from the squared-distance gaps to the top row; a query whose support does not fit streams its
    rows at every product (float64 GEMM logits, ``bounds.gemm_delta``). Products are
    computed around the query's top row (no cancellation where the posterior is
    concentrated): ``C v = E[(q - q_top)((q - q_top) . v)] - m1 (m1 . v)``.

    matvec(v): C v for v (N, d) or (N, d, J) (J vectors per query, one pass);
    eig(k): the top k eigenpairs (Lanczos, ``scipy.sparse.linalg.eigsh``, over matvec);
    bound: (N,) certified ``||C' - C||_2`` (model units; ``bounds.covariance_error`` with
    ||C|| at most its trace): every product is within ``bound * ||v||`` of the truth;
    rel_bound (N,): within ``rel_bound * ||C||_2 * ||v||`` (the tight one); certified (N,):
    rel_bound within the contract. sigma, denoised (N, d), mode as evaluated.
    """

    def __init__(self, d: int, scale: float, sigma: torch.Tensor, denoised: torch.Tensor, mode: list):
        n = sigma.shape[0]
        self.d, self.scale, self.sigma, self.denoised, self.mode = d, float(scale), sigma, denoised, mode
        self.device = sigma.device
        self._support: list = [None] * n
        self._streams: list = []  # (positions, src, v, coef, lse_ref, l_top, q_top, eta, qmax)
        self.bound = torch.full((n,), torch.nan, dtype=torch.float64, device=self.device)
        self._bound_t = torch.full_like(self.bound, torch.nan)  # per unit ||v||, raw units, of Cov_w(v.q, x)
        #: rel_bound: (N,) every product within ``rel_bound ||C||_2 ||v||`` of the truth (the
        #: relative part of ``bounds.covariance_error`` plus its absolute part over a lower
        #: bound on ||C||_2: a Rayleigh quotient of C' after POWER_STEPS power steps, or for a
        #: streamed query the computed trace over d; inf where C underflows float64, a
        #: posterior on one row with ESS - 1 < 1e-300); certified: rel_bound <= COV_TOL_FACTOR tol.
        self.certified = torch.zeros(n, dtype=torch.bool, device=self.device)
        self.rel_bound = torch.full_like(self.bound, torch.inf)

    def __len__(self) -> int:
        return self.sigma.shape[0]

    @property
    def support_rows(self) -> list:
        """Per query, the rows held explicitly (None: the query streams its rows)."""
        return [None if sp is None else sp.b.shape[0] for sp in self._support]

    # ------------------------------------------------------------------ construction
    def add_group(self, pos: list, src, v, coef, cert, tol: float, memory_budget: int) -> None:
        """Add the queries at positions ``pos`` (list of ints) of one row source: v (n, d)
        centered raw queries, coef (n,), cert their ``Certified`` (with ``stats``).

        A RESCORED query's support is its top K; if that leaves too much weight out for a
        relative bound (``certified``), or the query was DENSE / EXACT, the support is
        every row within log(M / (tol SELECT_MASS)) nats of the second-heaviest row (C
        lives on the rows other than the top: their weight sets its scale), found by one
        float64 pass; one whose support does not fit its share of ``memory_budget`` streams.
        """
        n, d = v.shape
        st = cert.stats
        shift = query_shift(v, src.center)
        max_rows = memory_budget // max(1, n) // (8 * d)  # 0: every query streams
        rescored = (cert.mode == RESCORED).tolist()
        todo = []
        for j in range(n):
            if rescored[j] and self._add_support(pos[j], src, v, coef, st, shift, j, cert.top_idx[j], st.eps[j], tol,
                                                 max_rows):
                continue
            todo.append(j)
        if not todo:
            return
        # the top K's exact logits (K d work): the second-heaviest row's logit sets the cut
        # (C lives on the rows other than the top); every row outside the top K is below
        # min_K lam + 2 delta (its coarse logit is below the K-th coarse one, itself within
        # delta of an exact one): when that is under the cut, the top K is the support, no
        # selection pass (a concentrated posterior, whatever its weights underflow to)
        K = cert.top_idx.shape[1]
        lam, order = rescore(v[todo], coef[todo], src, cert.top_idx[todo]).sort(dim=1, descending=True)
        # C's scale is set by the heaviest row that differs from the top one, not by the
        # second-heaviest: copies of the top row (b = 0) have no part in C, and a data set's
        # duplicates (a uniform patch repeated 135 times) can fill the whole top K; then one
        # float64 pass finds that row (cutting at a copy's logit dropped the rows that make C)
        top_rows = src.gather(cert.top_idx[todo].gather(1, order)).reshape(len(todo), K, v.shape[1])
        copy = (top_rows == top_rows[:, :1]).all(dim=2)
        l2 = lam.masked_fill(copy, -math.inf).max(dim=1).values
        unseen = torch.isinf(l2).nonzero()[:, 0]
        if unseen.numel():
            sub = torch.as_tensor(todo, device=v.device)[unseen]
            l2[unseen] = heaviest_distinct_logit(v[sub], coef[sub], src, top_rows[unseen, 0])
        # every row a copy of the top one: C = 0 exactly; a cut below every logit keeps it finite
        floor = -coef[todo] * (v[todo].norm(dim=1) + src.max_cnorm) ** 2 * (1.0 + 1e-6) - 1.0
        cut = torch.where(torch.isinf(l2), floor, l2 - math.log(src.M / (tol * SELECT_MASS)))
        if K < src.M:
            out_max = (lam[:, -1] + 2.0 * cert.delta[todo]
                       + float64_logit_error(lam[:, -1:], coef[todo], src.max_cnorm, v.shape[1])[:, 0]
                       + shifted_logit_error(v[todo].norm(dim=1) + src.max_cnorm, coef[todo], shift[todo]))
            # a second row e^-700 below the top: C is below float64's range (it underflows to 0
            # whatever the support), so no pass can make it relatively exact: the top K will do
            covered = ((out_max < cut) | (l2 - lam[:, 0] < -UNDERFLOW_NATS)).tolist()
            left = []
            for a, j in enumerate(todo):
                if covered[a]:
                    eps = ((src.M - K) * torch.exp(out_max[a] - st.lse_lo[j])).clamp(max=1.0)
                    if self._add_support(pos[j], src, v, coef, st, shift, j, cert.top_idx[j], eps, tol, max_rows,
                                         force=bool(l2[a] - lam[a, 0] < -UNDERFLOW_NATS)):
                        continue
                left.append(a)
            todo, cut = [todo[a] for a in left], cut[left]
        if not todo:
            return
        # one float64 pass for the rest: the rows above the cut of each query and, for a query
        # with too many of them to hold, the moments its streamed bound needs
        entry = self._stream_entry([pos[j] for j in todo], src, v[todo], coef[todo], cert, todo, shift)
        streamed = []
        for extra in (0.0, WIDEN_NATS):
            pr = self._stream_products(entry, torch.zeros(len(todo), v.shape[1], 0, dtype=torch.float64,
                                                          device=self.device), select=(cut - extra, max_rows))
            again = []
            for a, j in enumerate(todo):
                if pr["picks"][a] is None:
                    if extra == 0.0:
                        streamed.append(a)
                    continue
                idx, out_max = pr["picks"][a]
                eps = ((src.M - idx.numel()) * torch.exp(out_max - st.lse_lo[j])).clamp(max=1.0)
                self._add_support(pos[j], src, v, coef, st, shift, j, idx, eps, tol, max_rows, force=True)
                if not bool(self.certified[pos[j]]) and float(eps) > 0:
                    again.append(a)
            if extra == 0.0 and streamed:
                self._add_stream(_subset(entry, streamed), _subset(pr, streamed), cert, [todo[a] for a in streamed],
                                 tol)
            # far from the data the rows left out weigh more against C than against the total
            # (their distance enters): those queries once more with a wider support
            if not again or extra > 0.0:
                break
            todo, cut, entry = [todo[a] for a in again], cut[again], _subset(entry, again)

    def _add_support(self, p, src, v, coef, st, shift, j, idx, eps, tol, max_rows, force=False) -> bool:
        """Hold query j's rows ``idx`` explicitly; False (nothing kept) when they are more than
        ``max_rows``, or the bound is not within tol of the covariance's size and ``force`` is off."""
        d = v.shape[1]
        if idx.numel() > max_rows:
            return False
        raw = src.gather(idx).reshape(idx.numel(), d)
        lam = exact_logits(v[j:j + 1], coef[j:j + 1], raw[None], src.center)[0]
        top = int(lam.argmax())
        g, g_err = sq_gaps(v[j:j + 1], raw, raw[top:top + 1], src.center)
        sup = _Support(raw.to(torch.float64) - src.center, lam[top], coef[j], shift[j], (g[0], g_err[0]), eps,
                       src.M - idx.numel())
        self._set_bound(p, sup, coef[j], st, j, d, src, tol)
        if not (force or bool(self.certified[p])):
            return False
        self._support[p] = sup
        return True

    def _set_bound(self, p, sup: _Support, coef, st, j, d, src, tol):
        w = torch.softmax(sup.lam, 0)
        S2 = (w * (sup.b * sup.b).sum(1)).sum()
        m1 = w @ sup.b
        # tr C = S2 - ||m1||^2 (a lower bound, less the rounding of both)
        trace = (S2 - (m1 * m1).sum()) - 4.0 * gamma(sup.lam.numel() + d + 4, EPS64) * S2
        Exx = (w * sup.lam**2).sum()  # E_w x^2, the gaps to the top row
        eta = torch.as_tensor(sup.eta, dtype=torch.float64, device=self.device)
        g = gamma(sup.lam.numel() + d + 8, EPS64)
        rnd = 8.0 * g * S2 + (0.0 if src.dtype == "uint8" else 4.0 * EPS64 * S2)
        n_out = torch.tensor(float(sup.n_out), dtype=torch.float64, device=self.device)
        lse_lo, lse_hi, A_hi = st.lse_lo[j], st.lse_hi[j], st.neglogit_hi[j]
        rel, ab = covariance_error(S2, eta, sup.eps, coef, n_out, lse_lo, A_hi, rnd)
        bt = gap_covariance_error(S2, Exx, eta, 8.0 * g * torch.sqrt(S2) * (torch.sqrt(Exx) + 1.0))
        bt = bt + _outside_gap_error(sup.eps, S2, Exx, coef, n_out, lse_lo, lse_hi, A_hi, sup.l_top)
        # ||C'||_2 from below: the trace over the rank, or a Rayleigh quotient of a few power steps
        A = torch.sqrt(w)[:, None] * (sup.b - m1)
        x = A[int((A * A).sum(1).argmax())]
        for _ in range(POWER_STEPS):
            x = A.T @ (A @ x)
            x = x / x.norm().clamp(min=1e-300)
        rq = ((A @ x).norm() ** 2 / (x @ x).clamp(min=1e-300)) * (1.0 - 4.0 * g)
        rank = min(d, sup.lam.numel() - 1)
        self._certify(p, rel, ab, (1.0 + torch.expm1(2.0 * eta)) * S2 / (1.0 - sup.eps.clamp(max=0.5)),
                      torch.maximum(trace / max(rank, 1), rq), tol)
        self._bound_t[p] = bt

    def _certify(self, p, rel, ab, norm_hi, norm_lo, tol: float) -> None:
        """Record a query's bounds from ``||C' - C|| <= rel ||C|| + ab`` (raw units): the
        absolute ``bound`` with ||C|| <= norm_hi (an upper bound: the trace), and
        ``rel_bound`` with ||C|| >= (norm_lo - ab) / (1 + rel), norm_lo a lower bound on
        ||C'||_2; ``certified`` when that is within COV_TOL_FACTOR * tol."""
        self.bound[p] = (rel * norm_hi + ab) * self.scale**2
        lam_lo = (norm_lo - ab) / (1.0 + rel)
        out = torch.where(lam_lo > 0, rel + ab / lam_lo.clamp(min=1e-300), torch.full_like(lam_lo, math.inf))
        self.rel_bound[p] = out
        self.certified[p] = out <= COV_TOL_FACTOR * tol

    def _stream_entry(self, pos, src, v, coef, cert, rows, shift) -> dict:
        """What a streamed product of the queries ``rows`` of ``cert`` needs: their top row
        (q_top, its exact logit l_top), the certified lse as the weights' reference, and
        eta, the bound of the gaps l_top - l (float64 GEMM logits, ``bounds.gemm_delta``)."""
        d = v.shape[1]
        st = cert.stats
        raw_top = src.gather(cert.top_idx[rows, 0]).reshape(len(rows), d)
        l_top = exact_logits(v, coef, raw_top[:, None, :], src.center)[:, 0]
        vn = v.norm(dim=1)
        delta = gemm_delta(EPS64, d, vn, src.max_cnorm, coef, st.lse[rows].abs() + st.neglogit[rows].abs())
        # the gaps l_top - l mix the top row's direct-difference logit with the pass's GEMM ones
        top_err = float64_logit_error(l_top[:, None], coef, src.max_cnorm, d)[:, 0]
        eta = delta + top_err + shifted_logit_error(vn + src.max_cnorm, coef, shift[rows]) + accumulation_eta(src.M)
        return {"pos": pos, "src": src, "v": v, "coef": coef, "lse": st.lse[rows], "l_top": l_top,
                "q_top": raw_top.to(torch.float64) - src.center, "eta": eta,
                "lse_lo": st.lse_lo[rows], "A_hi": st.neglogit_hi[rows]}

    def _add_stream(self, entry, pr, cert, rows, tol) -> None:
        """Stream the queries of ``entry``, with the moments ``pr`` of a pass over their rows."""
        self._streams.append(entry)
        src, eta, coef = entry["src"], entry["eta"], entry["coef"]
        d = entry["v"].shape[1]
        S2, Exx = pr["S2"], pr["Exx"]
        g_d, g_m = gamma(d + 2, EPS64), gamma(src.M + 2, EPS64)
        qm = src.max_cnorm
        rnd = (4.0 * g_d + 4.0 * g_m) * qm * torch.sqrt(S2) + 8.0 * g_m * S2
        rel, ab = covariance_error(S2, eta, torch.zeros_like(eta), coef, torch.ones_like(eta), entry["lse_lo"],
                                   entry["A_hi"], rnd)
        bt = gap_covariance_error(S2, Exx, eta, (4.0 * g_d + 8.0 * g_m) * (qm + torch.sqrt(S2)) * (torch.sqrt(Exx) + 1.0))
        idx = torch.tensor(entry["pos"], dtype=torch.int64, device=self.device)
        self._certify(idx, rel, ab, (1.0 + torch.expm1(2.0 * eta)) * S2, pr["trace"] / d, tol)
        self._bound_t[idx] = bt

    def _stream_products(self, e, V, select=None):
        """One float64 pass over a stream group's rows for V (n, d, J): moments, S2 and E x^2.

        select: (cut (n,), max_rows): also ``picks``, per query the rows whose logit is >= cut
        with an upper bound on every other row's true logit (a row left out is below
        cut + gemm_delta), or None when more than max_rows rows pass."""
        n, d, J = V.shape
        src, v, coef = e["src"], e["v"], e["coef"]
        vsq = (v * v).sum(1)
        acc = _new_moments(n, d, J, self.device)
        acc["S2"] = torch.zeros(n, dtype=torch.float64, device=self.device)
        tsq = (e["q_top"] ** 2).sum(1)
        step = max(1, BLOCK_BYTES // max(1, 8 * n * max(J, d)))
        found, count = [[] for _ in range(n)], [0] * n
        for off, raw, csq in src.blocks():
            for a in range(0, raw.shape[0], step):
                q = raw[a:a + step].to(torch.float64) - src.center
                cs = csq[a:a + step]
                lg = torch.addmm(vsq[:, None] + cs[None, :], v, q.T, alpha=-2.0).mul_(-coef[:, None])
                if select is not None:
                    keep = lg >= select[0][:, None]
                    for j in keep.any(1).nonzero().flatten().tolist():
                        if count[j] <= select[1]:
                            loc = keep[j].nonzero().flatten() + (off + a)
                            found[j].append(loc)
                            count[j] += loc.numel()
                _moments(q, lg, e["lse"], e["l_top"], e["q_top"], V, acc)
                p = torch.exp(lg - e["lse"][:, None])
                b2 = (cs[None, :] + tsq[:, None] - 2.0 * e["q_top"] @ q.T).clamp(min=0.0)
                acc["S2"] = acc["S2"] + (p * b2).sum(1)
        S2 = acc["S2"] / acc["S"]
        m1 = acc["Sq"] / acc["S"][:, None] - e["q_top"]
        S2_err = 8.0 * gamma(d + 4, EPS64) * src.max_cnorm**2 + 1e-12 * S2
        out = {"products": _finish(acc), "S2": S2 + S2_err, "Exx": acc["Sxx"] / acc["S"],
               "trace": (S2 - S2_err - (m1 * m1).sum(1)) * (1.0 - 1e-12)}
        if select is not None:
            cut, max_rows = select
            delta = gemm_delta(EPS64, d, vsq.sqrt(), src.max_cnorm, coef, cut.abs())
            conv = shifted_logit_error(vsq.sqrt() + src.max_cnorm, coef, query_shift(v, src.center))
            out["picks"] = [None if not 0 < count[j] <= max_rows else (torch.cat(found[j]), cut[j] + delta[j] + conv[j])
                            for j in range(n)]
        return out

    # ------------------------------------------------------------------ products
    def _raw_products(self, V: torch.Tensor) -> _Products:
        """V: (N, d, J) raw-space vectors -> products for every query."""
        pos, parts = [], []
        for p, sup in enumerate(self._support):
            if sup is not None:
                pos.append(p)
                parts.append(sup.products(V[p]))
        for e in self._streams:
            pos.extend(e["pos"])
            idx = torch.tensor(e["pos"], dtype=torch.int64, device=self.device)
            parts.append(self._stream_products(e, V[idx])["products"])
        # assembled out of place (V may be a torch.func-batched tangent): the queries in order
        inv = torch.argsort(torch.tensor(pos, dtype=torch.int64, device=self.device))
        return _Products(*(torch.cat([getattr(pr, f) for pr in parts])[inv] for f in ("cv", "t", "u")))

    def _vectors(self, v, name="v"):
        t = torch.as_tensor(v)
        n = len(self)
        if t.shape[0] != n:
            raise InputError(f"{name}: expected {n} rows (one per query), got shape {tuple(t.shape)}")
        if t.dim() >= 2 and int(torch.tensor(t.shape[1:]).prod()) == self.d:
            return t.reshape(n, self.d, 1).to(self.device, torch.float64), tuple(t.shape)
        if t.dim() == 3 and t.shape[1] == self.d:
            return t.to(self.device, torch.float64), None
        raise InputError(f"{name}: expected (N, d) = ({n}, {self.d}), (N, *image) or (N, d, J), "
                         f"got shape {tuple(t.shape)}")

    def matvec(self, v) -> torch.Tensor:
        """``C v`` (model units): v (N, d) or (N, *image shape) -> the same shape; v (N, d, J)
        (J vectors per query) -> (N, d, J). Exact to ``bound * ||v||`` per vector."""
        V, shape = self._vectors(v)
        if not bool(torch.isfinite(V).all()):
            raise InputError("v: contains NaN or inf")
        out = self._raw_products(V).cv * self.scale**2
        return out.reshape(shape) if shape is not None else out

    def products(self, v):
        """For the derivatives of D* (``optden.autograd``): with v (N, d, J) in model units,
        ``(C v (N, d, J), (dD*/dsigma) . v (N, J), dD*/dsigma (N, d))`` and the bounds of the
        last two per unit ||v|| (N,)."""
        V, _ = self._vectors(v)
        pr = self._raw_products(V)
        f = (2.0 / self.sigma) * self.scale
        return pr.cv * self.scale**2, pr.t * f[:, None], pr.u * f[:, None], self._bound_t * f

    def eig(self, k: int = 4, tol: float = 0.0) -> CovEig:
        """The k largest eigenvalues (descending) and eigenvectors of each query's C, with the
        residual ``||C' x - lambda x||`` of each pair (one batched ``matvec``).

        Lanczos (``scipy.sparse.linalg.eigsh`` on a ``LinearOperator`` over the certified
        product, tolerance ``tol``, 0: machine precision); for a query whose support holds
        at most d rows, C = A^T A with A = sqrt(w) (b - m1) has rank below d and its
        singular value decomposition (``torch.linalg.svd``) gives the pairs exactly (the
        missing ones are 0, with vectors completing an orthonormal basis); the dense
        symmetric solver when d <= 2k + 1.
        """
        import numpy as np
        from scipy.sparse.linalg import LinearOperator, eigsh

        n, d = len(self), self.d
        k = check_positive_int(k, "k", 1, d)
        vals = torch.empty(n, k, dtype=torch.float64)
        vecs = torch.empty(n, k, d, dtype=torch.float64)
        for p in range(n):
            def mv(x, p=p):
                X = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64).reshape(d, -1)).to(self.device)
                return self._one(p, X).cpu().numpy().reshape(x.shape)

            sup = self._support[p]
            if d <= 2 * k + 1:
                C = torch.from_numpy(mv(np.eye(d)))
                w, Q = torch.linalg.eigh(0.5 * (C + C.T))
                w, Q = w.flip(0)[:k], Q.flip(1)[:, :k]
            elif sup is not None and sup.b.shape[0] <= d:
                w, Q = sup.eig(k)
                w = w * self.scale**2
            else:
                op = LinearOperator((d, d), matvec=mv, matmat=mv, dtype=np.float64)
                v0 = np.random.default_rng(p).standard_normal(d)
                w_np, Q_np = eigsh(op, k=k, which="LA", v0=v0, tol=tol)
                order = np.argsort(-w_np)
                w, Q = torch.from_numpy(w_np[order]), torch.from_numpy(Q_np[:, order])
            vals[p], vecs[p] = w.cpu(), Q.T.cpu()
        V = vecs.transpose(1, 2).to(self.device)
        res = (self.matvec(V) - V * vals.to(self.device)[:, None, :]).norm(dim=1)
        return CovEig(values=vals.to(self.device), vectors=vecs.to(self.device), residuals=res, bound=self.bound.clone())

    def _one(self, p: int, X: torch.Tensor) -> torch.Tensor:
        """C X for query p alone: X (d, J) model-space vectors -> (d, J) model units."""
        sup = self._support[p]
        if sup is not None:
            return sup.products(X).cv[0] * self.scale**2
        for e in self._streams:
            if p in e["pos"]:
                sub = _subset(e, [e["pos"].index(p)])
                return self._stream_products(sub, X[None])["products"].cv[0] * self.scale**2
        raise RuntimeError(f"query {p} has no support")
