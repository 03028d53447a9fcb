"""The precision mechanism (docs/design.md, "The precision contract"): the coarse-pass bound, certify's modes, the certificate.

Truth here is computed by direct differences in extended precision (x87 long double, a
64-bit significand: 2^11 times finer than float64), so that the float64 coarse pass's
bound can be checked against something more exact than itself.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import optden
from optden import reference as R
from optden.engine import bounds, dispatch, precision
from optden.engine.gaps import centered_query
from optden.engine.partial import Partial
from optden.engine.rows import RowSource
from tolerances import DENOISE_RTOL, LOG_DENSITY_RTOL, model_rows, rel_err

TOL = precision.DEFAULT_TOL
CPU = torch.device("cpu")
EXTENDED = np.finfo(np.longdouble).nmant >= 63  # x86 long double (or IEEE quad)


# ----------------------------------------------------------------------------- helpers


def raw_f64(ds, idx=None) -> np.ndarray:
    raw = np.asarray(ds.raw if idx is None else ds.raw[idx])
    if ds.dtype == "bfloat16":
        return torch.from_numpy(raw.view(np.int16).copy()).view(torch.bfloat16).double().numpy()
    return raw.astype(np.float64)


def _exact_sqdist_fraction(v: np.ndarray, q: np.ndarray) -> np.ndarray:
    """||v_n - q_i||^2 in exact rational arithmetic, rounded once: (N, M) float64."""
    out = np.empty((v.shape[0], q.shape[0]))
    qf = [[Fraction(float(a)) for a in row] for row in q]
    for n, vrow in enumerate(v):
        vf = [Fraction(float(a)) for a in vrow]
        for i, row in enumerate(qf):
            out[n, i] = float(sum((a - b) ** 2 for a, b in zip(vf, row)))
    return out


def exact_logits(v: torch.Tensor, coef: torch.Tensor, ds, idx=None) -> np.ndarray:
    """Logits -coef ||v - (raw_i - center)||^2 of rows ``idx`` (default all), far more exact
    than float64: (N, M) long double (exact rationals where long double is only float64)."""
    q = raw_f64(ds, idx)
    if not EXTENDED:
        c = np.asarray(ds.center)
        return -coef.numpy()[:, None] * _exact_sqdist_fraction(v.numpy() + c, q)
    ql = q.astype(np.longdouble) - np.asarray(ds.center, dtype=np.longdouble)
    vl = v.numpy().astype(np.longdouble)
    out = np.empty((vl.shape[0], ql.shape[0]), dtype=np.longdouble)
    for n in range(vl.shape[0]):
        diff = vl[n][None, :] - ql
        out[n] = -np.longdouble(coef[n].item()) * (diff * diff).sum(1)
    return out


def exact_weights(lg: np.ndarray) -> np.ndarray:
    """softmax over rows of (N, M) extended-precision logits, as float64."""
    m = lg.max(1, keepdims=True)
    e = np.exp(lg - m)
    return (e / e.sum(1, keepdims=True)).astype(np.float64)


def centered(ds, x: np.ndarray, sigma, block_rows: int = 257):
    """(RowSource, v (N, d) centered raw queries, coef (N,)) for model-space queries x."""
    src = RowSource(ds, CPU, block_rows)
    v = torch.from_numpy((np.asarray(x, dtype=np.float64) - ds.offset) / ds.scale) - src.center
    sig = np.broadcast_to(np.asarray(sigma, dtype=np.float64), (len(x),))
    coef = torch.from_numpy(ds.scale**2 / (2.0 * sig**2))
    return src, v, coef


def queries(y: np.ndarray, sigma: float, rng, n: int = 3) -> np.ndarray:
    """Near rows (y_i + sigma n), between the two closest rows of a subset, pure noise, far away."""
    i = rng.integers(0, len(y), n)
    near = y[i] + sigma * rng.standard_normal((n, y.shape[1]))
    sub = rng.choice(len(y), size=min(len(y), 150), replace=False)
    d2 = ((y[sub, None, :] - y[None, sub, :]) ** 2).sum(-1)
    d2[d2 == 0] = np.inf
    a, b = np.unravel_index(np.argmin(d2), d2.shape)
    between = 0.5 * (y[sub[a]] + y[sub[b]]) + 1e-4 * rng.standard_normal((1, y.shape[1]))
    noise = max(sigma, 1.0) * rng.standard_normal((n, y.shape[1]))
    far = 1e3 * rng.standard_normal((1, y.shape[1]))  # |v| >> |q|: the norms dominate the sums
    return np.concatenate([near, between, noise, far])


class Float32Expansion(dispatch.Backend):
    """A deliberately low-precision coarse pass: expansion logits with a float32 dot product.

    ``-coef (||v||^2 + ||q||^2 - 2 fl32(v . q))`` (norms in float64, dot computed on its
    own), bounded by ``gemm_delta(2^-24, ..., fused=False)``. What a fast kernel does.
    """

    name = "float32-expansion (test)"

    def partial(self, v, coef, source, k):
        n, d = v.shape
        part = Partial.empty(n, d, k, v.device)
        vsq = (v * v).sum(1)
        v32, c32 = v.float(), source.center.float()
        for off, raw, csq in source.blocks():
            q = raw.to(torch.float64) - source.center
            dot = (v32 @ (raw.float() - c32).T).double()
            part.absorb(-coef[:, None] * ((vsq[:, None] + csq[None, :]) - 2.0 * dot), q, off)
        part.delta = bounds.gemm_delta(2.0**-24, d, vsq.sqrt(), source.max_cnorm, coef, part.top_val[:, 0],
                                       fused=False)
        return part


def usable_backends(ds) -> list:
    """Every registered backend that can run this data on the CPU (torch always can)."""
    return [dispatch.get(n) for n in dispatch.names() if not dispatch.reasons(n, CPU, ds.dtype, ds.d)]


def dataset(kind: str, request, rng):
    if kind == "faces":
        return optden.Dataset.from_array(request.getfixturevalue("faces_u8"))
    if kind == "float32":
        return optden.Dataset.from_array(rng.standard_normal((301, 37)).astype(np.float32) * 2 + 0.5)
    return optden.Dataset.from_array(torch.from_numpy(rng.standard_normal((211, 50)) * 5).bfloat16())


def star(M: int = 80, d: int = 96, r: int = 10):
    """M <= d distinct uint8 rows, all at distance r from the base image (128 everywhere)."""
    q = np.full((M, d), 128, dtype=np.uint8)
    q[np.arange(M), np.arange(M)] += r
    return optden.Dataset.from_array(q)


# ----------------------------------------------------------------------------- (a) the bound itself


def test_exact_helper_is_exact(faces_u8, rng):
    """The extended-precision logits agree with exact rationals (and with the float64 oracle)."""
    ds = optden.Dataset.from_array(faces_u8[:40])
    x = model_rows(ds)[:2] + 1e-3 * rng.standard_normal((2, 192))
    src, v, coef = centered(ds, x, 1e-3)
    lg = exact_logits(v, coef, ds)
    frac = -coef.numpy()[:, None] * _exact_sqdist_fraction(v.numpy() + src.center.numpy(), raw_f64(ds))
    np.testing.assert_allclose(lg.astype(np.float64), frac, rtol=4e-16)
    # v/coef are the oracle's logits in centered raw coordinates
    np.testing.assert_allclose(lg.astype(np.float64), R.logits(x, model_rows(ds), 1e-3), rtol=1e-12)


@pytest.mark.parametrize("backend", ["registered", "float32"])
@pytest.mark.parametrize("kind", ["faces", "float32", "bfloat16"])
def test_gemm_delta_bounds_coarse_logits(kind, backend, request, rng):
    """|coarse - exact| <= delta for the top-K rows and for every row, and delta is not vacuous,
    for every usable registered backend (torch, and cpu where optden._C is built) and for a
    float32 pass bounded by gemm_delta(2^-24)."""
    ds = dataset(kind, request, rng)
    y = model_rows(ds)
    backends = usable_backends(ds) if backend == "registered" else [Float32Expansion()]
    assert backends
    for be in backends:
        check_delta(be, ds, y, rng)


def check_delta(be, ds, y, rng):
    ratios = []
    for sigma in (1e-3, 1.0, 1e3):
        x = queries(y, sigma, rng)
        src, v, coef = centered(ds, x, sigma)
        exact = exact_logits(v, coef, ds)
        for k in (16, ds.M):  # the top K, then every row
            part = be.partial(v, coef, src, k)
            assert (part.top_val[:, :-1] >= part.top_val[:, 1:]).all()
            if k == ds.M:
                assert (part.top_idx.sort(1).values == torch.arange(ds.M)).all()  # every row is compared
            ex = np.take_along_axis(exact, part.top_idx.numpy(), 1)
            err = np.abs(part.top_val.numpy().astype(np.longdouble) - ex).max(1).astype(np.float64)
            delta = part.delta.numpy()
            assert (err <= delta).all(), f"{be.name} sigma={sigma} k={k}: error/delta up to {(err / delta).max():.3g}"
            ratios.append(float((err / delta).max()))
            # the top-K rows are the K largest exact logits up to 2 delta
            kth = np.sort(exact, axis=1)[:, ::-1][:, k - 1].astype(np.float64)
            assert (ex.min(1).astype(np.float64) >= kth - 2 * delta).all()
    # measured: the worst query's error is 1/10 to 1/300 of delta; a bound 1e4 times the
    # error would be useless for certification
    assert min(ratios) > 1e-4, (be.name, ratios)


def test_fused_gemm_needs_the_fused_bound(faces_u8, rng):
    """torch.addmm(norms, v, q.T) accumulates onto the norms: its error scales with
    (|v| + |q|)^2, not |v| |q| (far queries show it; the bound covers both forms)."""
    ds = optden.Dataset.from_array(faces_u8)
    x = 1e3 * rng.standard_normal((6, 192))
    src, v, coef = centered(ds, x, 1.0)
    ones = torch.ones(6, dtype=torch.float64)
    q = torch.from_numpy(raw_f64(ds)) - src.center
    vsq = (v * v).sum(1)
    csq = torch.from_numpy(np.array(ds.centered_sqnorms))
    fused = -torch.addmm(vsq[:, None] + csq[None, :], v, q.T, alpha=-2.0)
    split = -((vsq[:, None] + csq[None, :]) - 2.0 * (v @ q.T))
    exact = exact_logits(v, ones, ds)
    eps = 2.0**-53
    top = fused.max(1).values
    for lg, is_fused in ((fused, True), (split, False)):
        err = np.abs(lg.numpy().astype(np.longdouble) - exact).max(1).astype(np.float64)
        delta = bounds.gemm_delta(eps, 192, vsq.sqrt(), src.max_cnorm, ones, top, fused=is_fused).numpy()
        assert (err <= delta).all()
    tight = bounds.gemm_delta(eps, 192, vsq.sqrt(), src.max_cnorm, ones, top, fused=False)
    assert (bounds.gemm_delta(eps, 192, vsq.sqrt(), src.max_cnorm, ones, top) >= tight).all()  # default = safe


# ----------------------------------------------------------------------------- (b) certify


def check_weights(top_w, idx, excl, modes, ds, exact, w_oracle):
    """The returned top weights (N, K) of rows idx (N, K) are within the bound ``excl`` (N,)
    of the truth, and in RESCORED mode the rows left out weigh at most ``excl``."""
    w_exact = exact_weights(exact)
    top_true = np.take_along_axis(w_exact, idx, 1)
    # float64 rounding of direct differences (the re-score), which `excluded` leaves out:
    # |fl(-coef ||v - q||^2) - exact| <= coef gamma_{d+2} ||v - q||^2 for the returned rows
    sq = -np.take_along_axis(exact, idx, 1).astype(np.float64).min(1)
    rounding = np.expm1(2 * bounds.gamma(ds.d + 2, 2.0**-53) * sq) + 1e-12
    for j, mode in enumerate(modes):
        kept = top_true[j] > 1e-280
        misweight = np.abs(top_w[j][kept] / top_true[j][kept] - 1.0).max()
        assert misweight <= excl[j] + rounding[j], (mode, misweight, excl[j], rounding[j])
        if mode == precision.RESCORED:
            outside = np.delete(w_oracle[j], idx[j]).sum()  # the rows the result leaves out
            assert outside <= excl[j] + 1e-15, (outside, excl[j])
        if mode == precision.EXACT:  # only the float64 pass's own rounding, bounded (engine/gaps.py)
            assert excl[j] <= bounds.rescore_budget(TOL)


def check_certified(cert, ds, x, sigma, v, coef, src):
    """The certificate against the truth: excluded >= the true excluded / misweighted
    weight; D* and lse within the contract. Returns the modes."""
    y = model_rows(ds)
    exact = exact_logits(v, coef, ds)
    excl = cert.excluded.numpy()
    assert np.isfinite(excl).all() and (excl >= 0).all()
    modes = cert.mode.tolist()
    idx = src.global_index(cert.top_idx).numpy()
    check_weights(cert.top_w.numpy(), idx, excl, modes, ds, exact, R.weights(x, y, sigma))
    for j, mode in enumerate(modes):
        if mode == precision.DENSE:
            assert cert.delta[j] <= bounds.dense_threshold(TOL) and excl[j] == pytest.approx(math.expm1(2 * cert.delta[j]))
    d_model = (cert.dc + src.center).numpy() * ds.scale + ds.offset
    assert rel_err(d_model, R.denoise(x, y, sigma)) <= DENOISE_RTOL
    lse_true = np.log(np.exp(exact - exact.max(1, keepdims=True)).sum(1)) + exact.max(1)
    lse_err = np.abs(cert.lse.numpy() - lse_true.astype(np.float64))
    assert (lse_err <= np.maximum(np.log1p(excl), 0) + 2 * cert.delta.numpy() + 1e-15 * np.abs(lse_true.astype(float))).all()
    return modes


def test_certify_dense_at_large_sigma(faces_u8, rng):
    ds = optden.Dataset.from_array(faces_u8)
    y = model_rows(ds)
    for sigma in (1.0, 30.0):  # float64 pass: every kind of query
        x = queries(y, sigma, rng)
        src, v, coef = centered(ds, x, sigma)
        cert = precision.certify(dispatch.get("torch").partial(v, coef, src, 64), v, coef, src, TOL)
        modes = check_certified(cert, ds, x, sigma, v, coef, src)
        # the far query (last): a fused addmm's error grows with |v|^2, re-scored at sigma = 1
        assert modes[:-1] == [precision.DENSE] * (len(x) - 1) and modes[-1] != precision.EXACT
    # a float32 dot product is certified as it is only at larger sigma (its error grows with |v|)
    sigma = 300.0
    x = y[rng.choice(ds.M, 4, replace=False)] + 0.1 * rng.standard_normal((4, 192))
    src, v, coef = centered(ds, x, sigma)
    cert = precision.certify(Float32Expansion().partial(v, coef, src, 64), v, coef, src, TOL)
    assert check_certified(cert, ds, x, sigma, v, coef, src) == [precision.DENSE] * 4


def test_certify_rescored_at_small_sigma(faces_u8, rng):
    ds = optden.Dataset.from_array(faces_u8)
    y = model_rows(ds)
    # rows whose 64th neighbour is far enough for a top-64 certificate at sigma = 1e-2
    # (copies and flat patches tie: those are the EXACT case below)
    sq = (y * y).sum(1)
    d2 = np.sort(sq[:, None] + sq[None, :] - 2 * y @ y.T, axis=1)[:, 64]
    unique = np.flatnonzero(d2 > 0.05)
    assert len(unique) > 100
    for sigma, backends in ((1e-3, (Float32Expansion(), dispatch.get("torch"))), (1e-2, (Float32Expansion(),))):
        x = y[rng.choice(unique, 5, replace=False)] + sigma * rng.standard_normal((5, 192))
        src, v, coef = centered(ds, x, sigma)
        for be in backends:
            part = be.partial(v, coef, src, 64)
            assert (part.delta > bounds.dense_threshold(TOL)).all()  # the coarse softmax alone cannot be trusted
            cert = precision.certify(part, v, coef, src, TOL)
            assert check_certified(cert, ds, x, sigma, v, coef, src) == [precision.RESCORED] * 5


def test_certify_exact_and_fallback_for_equidistant_rows(faces_u8, rng):
    """Near-equidistant rows at small sigma: no top-K gap. Without a fallback the rows are
    all re-scored (EXACT); with one, the precise pass certifies them."""
    sigma = 1e-3
    for ds, x in (
        (star(), np.full((3, 96), 0.0) + 2e-5 * rng.standard_normal((3, 96)) + (128 * 2 / 255 - 1)),
        (optden.Dataset.from_array(faces_u8), None),  # 135 copies of one flat patch
    ):
        if x is None:
            vals, counts = np.unique(faces_u8, axis=0, return_counts=True)
            dup = vals[np.argmax(counts)]
            assert counts.max() > 64
            x = (dup * (2 / 255) - 1)[None, :] + 1e-4 * rng.standard_normal((2, 192))
        src, v, coef = centered(ds, x, sigma)
        # the float64 pass resolves the star's rows (it is DENSE there, below); not the copies
        for be in (Float32Expansion(),) if ds.M == 80 else (Float32Expansion(), dispatch.get("torch")):
            part = be.partial(v, coef, src, 64)
            gap = part.top_val[:, 0] - part.top_val[:, -1]
            # no certifiable top-K gap (copies differ only by the pass's rounding, within 2 delta)
            assert (gap <= math.log((ds.M - 64) / bounds.mass_tolerance(TOL)) + 2 * part.delta).all()
            assert (part.delta > bounds.dense_threshold(TOL)).all()
            cert = precision.certify(part, v, coef, src, TOL)
            assert check_certified(cert, ds, x, sigma, v, coef, src) == [precision.EXACT] * len(x)
        calls = []

        def fallback(vs, cs):
            calls.append(vs.shape[0])
            return dispatch.get("torch").partial(vs, cs, src, 64)

        part = Float32Expansion().partial(v, coef, src, 64)
        cert = precision.certify(part, v, coef, src, TOL, fallback=fallback)
        assert calls == [len(x)]
        modes = check_certified(cert, ds, x, sigma, v, coef, src)
        if ds.M == 80:  # the float64 pass is precise enough for the star: its softmax is certified
            assert modes == [precision.DENSE] * len(x)


def test_certify_mixed_batch(faces_u8, rng):
    """One call, per-query sigma: each query gets its own mode."""
    ds = optden.Dataset.from_array(faces_u8)
    y = model_rows(ds)
    vals, counts = np.unique(faces_u8, axis=0, return_counts=True)
    dup = vals[np.argmax(counts)] * (2 / 255) - 1
    x = np.stack([y[5] + 0.1 * rng.standard_normal(192), y[9] + 1e-2 * rng.standard_normal(192),
                  dup + 1e-4 * rng.standard_normal(192)])
    sigma = np.array([300.0, 1e-2, 1e-3])
    src, v, coef = centered(ds, x, sigma)
    part = Float32Expansion().partial(v, coef, src, 64)
    cert = precision.certify(part, v, coef, src, TOL)
    modes = []
    for j in range(3):
        one = precision.Certified(*(getattr(cert, f)[j : j + 1] for f in
                                    ("dc", "lse", "top_w", "top_idx", "excluded", "mode", "delta")))
        modes += check_certified(one, ds, x[j : j + 1], sigma[j], v[j : j + 1], coef[j : j + 1], src)
    assert modes == [precision.DENSE, precision.RESCORED, precision.EXACT]


# ----------------------------------------------------------------------------- (c) naive fp32 vs the certificate


def test_fp32_bound_explains_the_naive_failure(faces_u8, rng):
    """At sigma = 1e-3 the naive float32 expansion moves logits by far more than the contract
    allows (test_denoiser shows what that does to D*), within the a-priori bound, which says
    it cannot be certified; the centered pass
    with float64 norms errs far less, still more than the tolerance: its bound refuses the
    coarse softmax, and the certified result meets the contract with a tiny bound."""
    ds = optden.Dataset.from_array(faces_u8)
    y = model_rows(ds)
    sigma = 1e-3
    tex = y[y.std(axis=1) > 0.15]
    sq = (tex * tex).sum(1)
    d2 = sq[:, None] + sq[None, :] - 2 * tex @ tex.T
    d2[d2 < 1e-9] = np.inf  # identical rows
    a, b = np.unravel_index(np.argmin(d2), d2.shape)
    x = 0.5 * (tex[a] + tex[b]) + 1e-4 * rng.standard_normal((4, 192))
    src, v, coef = centered(ds, x, sigma)
    exact = exact_logits(v, coef, ds).astype(np.float64)  # = the model-space logits
    # naive: what most public code does, all float32 in model space
    xt, yt = torch.from_numpy(x).float(), torch.from_numpy(y).float()
    naive = (-((xt * xt).sum(1, keepdim=True) - 2 * xt @ yt.T + (yt * yt).sum(1)) / (2 * sigma**2)).double().numpy()
    naive_err = np.abs(naive - exact).max(1)
    u32, xn, yn = 2.0**-24, np.linalg.norm(x, axis=1), np.linalg.norm(y, axis=1).max()
    # a-priori: fp32 norms and a GEMM accumulated onto them, each rounding at (|x| + |y|)^2
    naive_bound = (3 * bounds.gamma(194, u32) * (xn + yn) ** 2 + 4 * u32 * np.abs(exact).max(1)) / (2 * sigma**2)
    assert (naive_err > 1.0).all() and (naive_err <= naive_bound).all() and (naive_bound > 1e3).all()
    # centered, float64 norms, float32 dot: still off by more than e^1, within its bound,
    # which refuses the coarse softmax
    part = Float32Expansion().partial(v, coef, src, 64)
    err = np.abs(part.top_val.numpy() - np.take_along_axis(exact, part.top_idx.numpy(), 1)).max(1)
    assert (err > 1.0).all() and (err <= part.delta.numpy()).all()
    assert (part.delta > bounds.dense_threshold(TOL)).all()
    cert = precision.certify(part, v, coef, src, TOL)
    assert check_certified(cert, ds, x, sigma, v, coef, src) == [precision.RESCORED] * 4
    assert (cert.excluded <= bounds.mass_tolerance(TOL)).all()


# ----------------------------------------------------------------------------- (d) Evaluation


def test_evaluation_bound_and_mode(faces_u8, rng):
    ds = optden.Dataset.from_array(faces_u8, labels=np.arange(len(faces_u8)) % 3)
    y = model_rows(ds)
    torch_den = optden.OptimalDenoiser(ds, backend="torch", block_rows=300)
    auto_den = optden.OptimalDenoiser(ds, block_rows=300)
    vals, counts = np.unique(faces_u8, axis=0, return_counts=True)
    dup = vals[np.argmax(counts)] * (2 / 255) - 1
    seen = set()
    for sigma in (1e-3, 1.0, 100.0):
        x = np.concatenate([queries(y, sigma, rng, n=2), dup[None] + 1e-4 * rng.standard_normal((1, 192))])
        ref = R.denoise(x, y, sigma)
        w_oracle = R.weights(x, y, sigma)
        src, v, coef = centered(ds, x, sigma, block_rows=300)
        exact = exact_logits(v, coef, ds)
        # the denoiser's conversion of the queries: float64 v plus its residual (engine/gaps.py)
        q = centered_query(torch.from_numpy(x), None, ds.offset, ds.scale, src.center)
        direct = precision.certify(dispatch.get("torch").partial(q.v, coef, src, 64), q.v, coef, src, TOL, query=q)
        for den in [torch_den] + ([auto_den] if auto_den.backend.name != "torch" else []):
            ev = den.denoise_certified(torch.from_numpy(x), sigma)
            assert set(ev.mode) <= {"dense", "rescored", "exact"} and len(ev.mode) == len(x)
            assert rel_err(ev.denoised, ref) <= DENOISE_RTOL
            # dense: expm1(2 delta) with delta <= tol / 4; rescored: at most tol / 10
            assert (ev.bound >= 0).all() and (ev.bound <= 0.5 * TOL * (1 + 1e-6)).all()
            ld = den.log_density(torch.from_numpy(x), sigma).numpy()
            assert np.max(np.abs(ld - R.log_density(x, y, sigma)) / np.abs(ld)) <= LOG_DENSITY_RTOL
            codes = [{v_: k_ for k_, v_ in precision.MODE_NAMES.items()}[m] for m in ev.mode]
            check_weights(ev.top_w.numpy(), ev.top_idx.numpy(), ev.bound.numpy(), codes, ds, exact, w_oracle)
            seen.update(ev.mode)
        # the torch denoiser reports exactly what certify says for its pass
        ev = torch_den.denoise_certified(torch.from_numpy(x), sigma)
        assert ev.mode == [precision.MODE_NAMES[m] for m in direct.mode.tolist()]
        torch.testing.assert_close(ev.bound, direct.excluded, rtol=1e-12, atol=0)
        torch.testing.assert_close(ev.top_idx, direct.top_idx)
    assert seen == {"dense", "rescored", "exact"}
    # class-conditional: the certificate is over the class's rows
    ev = torch_den.denoise_certified(torch.from_numpy(y[:4] + 1e-2), 1e-2, labels=torch.tensor([0, 1, 2, 0]))
    for j, c in enumerate([0, 1, 2, 0]):
        rows = np.flatnonzero(ds.labels == c)
        ref = R.denoise(y[j : j + 1] + 1e-2, y[rows], 1e-2)
        assert rel_err(ev.denoised[j : j + 1], ref) <= DENOISE_RTOL
        assert set(ev.top_idx[j].tolist()) <= set(rows.tolist())
