"""Property-based reliability suite (hypothesis): random shapes, dtypes, strides, sigmas
(scalar, per sample, extreme), duplicated rows and far queries thrown at ``den``,
``denoise_certified``, ``posterior``, ``nearest`` and ``log_density``.

For every example the outcome is one of two: a clear optden error (an ``OptdenError`` whose
message names the argument), or a result within its certified bound of the mpmath oracle
(``optden.reference.mp``). Anything else (another exception, NaN, a result outside its
bound) fails. Inputs in the contract's range (sigma 1e-3..1e3, queries within 1e3 of the
data) must give a result, not an error.

Profiles: ``ci`` (the default: a fixed example budget, derandomized, about 30 s on 2 cores)
and ``deep`` (OPTDEN_HYPOTHESIS_PROFILE=deep: 25 times the examples, fresh randomness).
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import optden  # noqa: E402
from optden.reference import mp as MP  # noqa: E402

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                     HealthCheck.filter_too_much])
settings.register_profile("ci", max_examples=150, derandomize=True, database=None, print_blob=True, **_COMMON)
settings.register_profile("deep", max_examples=3750, print_blob=True, **_COMMON)
settings.load_profile(os.environ.get("OPTDEN_HYPOTHESIS_PROFILE", "ci"))

DTYPES = ("uint8", "float16", "bfloat16", "float32")
QUERY_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64)


# ----------------------------------------------------------------------------- strategies


@st.composite
def datasets(draw):
    """(Dataset, raw values (M, d) float64): small, odd shapes, duplicated rows."""
    dtype = draw(st.sampled_from(DTYPES))
    m = draw(st.integers(1, 12))
    d = draw(st.integers(1, 24))
    seed = draw(st.integers(0, 2**31 - 1))
    g = np.random.default_rng(seed)
    if dtype == "uint8":
        rows = g.integers(0, 256, (m, d), dtype=np.uint8)
        if draw(st.booleans()):  # flat patches: many equal values
            rows = (rows // 128 * 255).astype(np.uint8)
    else:
        mag = 10.0 ** draw(st.integers(-3, 3))
        rows = (g.standard_normal((m, d)) * mag).astype(np.float32)
    copies = draw(st.integers(0, 3))  # duplicated rows: ties that split weight
    if copies:
        rows = np.concatenate([rows, rows[g.integers(0, m, copies)]])
    space = {} if dtype == "uint8" else {"scale": 1.0, "offset": 0.0}  # float rows are model space as given
    if dtype == "bfloat16":
        ds = optden.Dataset.from_array(torch.from_numpy(rows).to(torch.bfloat16), **space)
    else:
        ds = optden.Dataset.from_array(rows.astype(np.float16) if dtype == "float16" else rows, **space)
    raw = ds.raw_rows(np.arange(ds.M)).double().numpy()
    return ds, raw


@st.composite
def queries(draw, ds):
    """(x: a tensor or array (N, ...) possibly non-contiguous, of any query dtype; its float64
    values (N, d); True when it lies in the contract's range)."""
    y = ds.model_rows(np.arange(ds.M)).numpy()
    n = draw(st.integers(1, 3))
    g = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["near", "row", "midpoint", "noise", "far", "huge"]))
    spread = float(np.abs(y).max()) + 1.0
    i, j = g.integers(0, ds.M, n), g.integers(0, ds.M, n)
    if kind == "near":
        x = y[i] + 10.0 ** draw(st.integers(-6, 0)) * spread * g.standard_normal((n, ds.d))
    elif kind == "row":
        x = y[i].copy()
    elif kind == "midpoint":
        x = 0.5 * (y[i] + y[j])
    elif kind == "noise":
        x = spread * g.standard_normal((n, ds.d))
    elif kind == "far":
        x = 10.0 ** draw(st.integers(4, 16)) * np.sign(g.standard_normal((n, ds.d)) + 0.1)
    else:
        x = 10.0 ** draw(st.integers(30, 150)) * g.standard_normal((n, ds.d))
    event(f"query {kind}")
    qdt = draw(st.sampled_from(QUERY_DTYPES))
    t = torch.from_numpy(x)
    if qdt == torch.int64:
        t = t.clamp(-2**62, 2**62).round()
    t = t.to(qdt)
    vals = t.double().reshape(n, ds.d).numpy().copy()
    layout = draw(st.sampled_from(["flat", "image", "strided", "numpy"]))
    if layout == "image" and len(ds.image_shape) == 3:
        t = t.reshape(n, *ds.image_shape)
    elif layout == "strided":  # a non-contiguous view holding the same values
        wide = torch.zeros(n, 2 * ds.d, dtype=t.dtype)
        wide[:, ::2] = t
        t = wide[:, ::2]
    elif layout == "numpy" and qdt in (torch.float64, torch.float32, torch.int64):
        t = t.numpy()
    in_range = kind in ("near", "row", "midpoint", "noise") and bool(np.isfinite(vals).all())
    return t, vals, in_range


def sigmas(n: int):
    """A scalar or (n,) sigma: mostly 1e-3..1e3 (log-uniform), sometimes extreme or invalid."""
    ok = st.floats(-3, 3).map(lambda e: 10.0 ** e)
    extreme = st.sampled_from([1e-150, 1e-120, 1e-40, 1e-10, 1e10, 1e40, 1e120, 1e-170, 1e170])
    bad = st.sampled_from([0.0, -1.0, math.nan, math.inf, -math.inf])
    # which kind, by a selector whose "simplest" value 0 is the ordinary case
    one = st.tuples(st.integers(0, 9), ok, extreme, bad).map(lambda t: t[1] if t[0] < 7 else t[2] if t[0] < 9 else t[3])
    per_sample = st.lists(one, min_size=n, max_size=n).map(lambda v: torch.tensor(v, dtype=torch.float64))
    return st.tuples(st.integers(0, 9), one, per_sample).map(
        lambda t: t[1] if t[0] < 6 else t[2] if t[0] < 9 else torch.ones(n + 1))  # the last: a wrong shape


def counts(m: int):
    """k for posterior / nearest: mostly 1..m, sometimes 0 or m + 1 (refused)."""
    return st.tuples(st.integers(0, 7), st.integers(1, m), st.sampled_from([0, m + 1])).map(
        lambda t: t[2] if t[0] == 5 else t[1])


def sigma_values(sigma, n: int) -> np.ndarray:
    """sigma as (n,) float64 values; NaN for a shape that is not a scalar or (n,)."""
    a = np.asarray(sigma, dtype=np.float64).reshape(-1)
    return np.broadcast_to(a, (n,)) if a.size in (1, n) else np.full(n, np.nan)


def contract_range(sig: np.ndarray) -> bool:
    return bool(np.all((sig >= 1e-3) & (sig <= 1e3)))


# ----------------------------------------------------------------------------- the outcome


def clear_error(exc: BaseException, names=("x", "sigma", "k")) -> None:
    """An optden error whose message starts by naming an argument (else the test fails)."""
    assert isinstance(exc, optden.OptdenError), f"not an optden error: {type(exc).__name__}: {exc}"
    msg = str(exc)
    assert any(msg.startswith(f"{n}:") for n in names), f"the message names no argument: {msg}"
    event(f"clear error ({type(exc).__name__}: {msg[:40]})")


def run(fn, in_range: bool):
    """fn() -> its result, or None after a clear error; an error is a failure in range."""
    try:
        return fn()
    except optden.OptdenError as exc:
        if in_range and not isinstance(exc, optden.PrecisionError):
            raise
        clear_error(exc)
        return None


def denoise_bound_ok(out: np.ndarray, bound: np.ndarray, truth: np.ndarray, y: np.ndarray) -> None:
    """||D - D*|| <= L1(weights) max_i ||y_i - D*|| (weights sum to one), plus the final
    rounding of the weighted sum."""
    for n in range(out.shape[0]):
        spread = float(np.linalg.norm(y - truth[n], axis=1).max())
        err = float(np.linalg.norm(out[n] - truth[n]))
        slack = 1e-12 * (float(np.linalg.norm(truth[n])) + spread) + 1e-300
        assert err <= float(bound[n]) * spread + slack, (err, float(bound[n]), spread)


# ----------------------------------------------------------------------------- the properties


def draw_case(data):
    """(dataset, raw values, x, its values, sigma, sigma's values, in the contract's range)."""
    ds, raw = data.draw(datasets())
    x, vals, q_ok = data.draw(queries(ds))
    sigma = data.draw(sigmas(vals.shape[0]))
    sig = sigma_values(sigma, vals.shape[0])
    return ds, raw, x, vals, sigma, sig, q_ok and contract_range(sig)


@given(data=st.data())
def test_denoise_within_its_certified_bound(data):
    ds, raw, x, vals, sigma, sig, in_range = draw_case(data)
    den = optden.OptimalDenoiser(ds, backend=data.draw(st.sampled_from(["auto", "torch"])))
    ev = run(lambda: den.denoise_certified(x, sigma), in_range)
    if ev is None:
        return
    assert np.all(sig > 0) and not np.isnan(sig).any()  # anything else must have been refused
    assert np.isfinite(vals).all()
    out = ev.denoised.numpy()
    assert np.isfinite(out).all() and (ev.bound.numpy() <= den.tol).all()
    truth = MP.denoise(vals, raw, sig, scale=ds.scale, offset=ds.offset)
    y = ds.model_rows(np.arange(ds.M)).numpy()
    denoise_bound_ok(out, ev.bound.numpy(), truth, y)
    # the plain call: the same numbers, in x's dtype (float64 for integer queries)
    plain = run(lambda: den(x, sigma), in_range)
    assert plain is not None
    plain = torch.as_tensor(plain)
    assert plain.shape == tuple(x.shape)
    eps = torch.finfo(plain.dtype).eps
    np.testing.assert_allclose(plain.double().reshape(out.shape).numpy(), out.astype(np.float64),
                               rtol=2 * eps + 2 * den.tol, atol=2 * eps * (np.abs(out).max() + 1e-300))


@given(data=st.data())
def test_log_density_and_posterior(data):
    ds, raw, x, vals, sigma, sig, in_range = draw_case(data)
    den = optden.OptimalDenoiser(ds)
    ld = run(lambda: den.log_density(x, sigma), in_range)
    if ld is not None:
        truth = MP.log_density(vals, raw, sig, scale=ds.scale, offset=ds.offset)
        ld = ld.numpy()
        assert not np.isnan(ld).any()
        both_inf = np.isinf(truth) & (ld == truth)
        with np.errstate(invalid="ignore"):  # inf - inf where both are -inf
            err = np.abs(np.where(both_inf, 0.0, ld - truth))
        assert (err <= 1e-6 * np.maximum(1.0, np.abs(np.where(both_inf, 0.0, truth)))).all(), (ld, truth)
    k = data.draw(counts(ds.M))
    post = run(lambda: den.posterior(x, sigma, k=k), in_range and 1 <= k <= ds.M)
    if post is not None:
        w, idx = post[0].numpy(), post[1].numpy()
        ev = den.denoise_certified(x, sigma)
        wt = MP.weights(vals, raw, sig, scale=ds.scale, offset=ds.offset)
        assert (np.diff(w, axis=1) <= 0).all()
        true_at = np.take_along_axis(wt, idx, 1)  # the true weights of the rows it names
        bound = ev.bound.numpy()[:, None]
        assert (np.abs(w - true_at) <= bound + 1e-12).all(), (w, true_at, bound)
        best = -np.sort(-wt, axis=1)[:, :k]  # ties: another row of the same weight is as good
        assert (np.abs(w - best) <= 2 * bound + 1e-12).all()


@given(data=st.data())
def test_nearest_is_exact(data):
    ds, raw = data.draw(datasets())
    x, vals, q_ok = data.draw(queries(ds))
    k = data.draw(counts(ds.M))
    den = optden.OptimalDenoiser(ds, backend=data.draw(st.sampled_from(["auto", "torch"])))
    res = run(lambda: den.nearest(x, k=k), q_ok and 1 <= k <= ds.M)
    if res is None:
        return
    dist, idx = res[0].numpy(), res[1].numpy()
    tdist, _ = MP.nearest(vals, raw, k, scale=ds.scale, offset=ds.offset)
    np.testing.assert_allclose(dist, tdist, rtol=1e-12, atol=1e-13 * (np.abs(vals).max() + 1))
    # the rows it names are at the distances it gives
    y = ds.model_rows(np.arange(ds.M)).numpy()
    named = np.linalg.norm(vals[:, None, :] - y[idx], axis=2)
    np.testing.assert_allclose(named, dist, rtol=1e-9, atol=1e-12 * (np.abs(vals).max() + 1))


@given(data=st.data())
def test_pruned_nearest_is_exact(data):
    """Certified nearest rows from the lower-bound embedding (leaf layout, grouped scans,
    the dk refinement) against the mpmath oracle, on any small data: odd dimensions (fewer
    than the scan's 8 leading coordinates too), duplicated rows, any k and leaf size."""
    from optden.prune import EmbeddingIndex

    ds, raw = data.draw(datasets())
    x, vals, q_ok = data.draw(queries(ds))
    assume(q_ok)
    k = data.draw(st.integers(1, ds.M))
    idx = EmbeddingIndex.build(ds, k=data.draw(st.integers(1, max(1, ds.d))), leaf_size=data.draw(st.integers(1, 9)))
    den = optden.OptimalDenoiser(ds, prune=idx)
    dist, got = (t.numpy() for t in den.nearest(x, k=k))
    event(f"the embedding scanned: {idx.scans > 0}")
    tdist, _ = MP.nearest(vals, raw, k, scale=ds.scale, offset=ds.offset)
    np.testing.assert_allclose(dist, tdist, rtol=1e-12, atol=1e-13 * (np.abs(vals).max() + 1))
    y = ds.model_rows(np.arange(ds.M)).numpy()
    named = np.linalg.norm(vals[:, None, :] - y[got], axis=2)
    np.testing.assert_allclose(named, dist, rtol=1e-9, atol=1e-12 * (np.abs(vals).max() + 1))


@given(data=st.data())
def test_bad_arguments_are_clear_errors(data):
    """Wrong shapes, NaN / inf queries, bad sigma, complex or object data, empty batches."""
    ds, _ = data.draw(datasets())
    den = optden.OptimalDenoiser(ds)
    n = data.draw(st.integers(1, 3))
    bad = data.draw(st.sampled_from(["wrong d", "nan", "inf", "empty", "complex", "strings", "bool sigma",
                                     "sigma shape", "sigma nan", "sigma 0", "sigma neg", "scalar x"]))
    event(bad)
    x = torch.zeros(n, ds.d, dtype=torch.float64)
    sigma = 1.0
    if bad == "wrong d":
        x = torch.zeros(n, ds.d + data.draw(st.integers(1, 3)))
    elif bad == "nan":
        x[0, 0] = math.nan
    elif bad == "inf":
        x[-1, -1] = -math.inf
    elif bad == "empty":
        x = torch.zeros(0, ds.d)
    elif bad == "complex":
        x = torch.zeros(n, ds.d, dtype=torch.complex64)
    elif bad == "strings":
        x = np.array([["a"] * ds.d] * n)
    elif bad == "bool sigma":
        sigma = True
    elif bad == "sigma shape":
        sigma = torch.ones(n + 2)
    elif bad == "sigma nan":
        sigma = math.nan
    elif bad == "sigma 0":
        sigma = 0.0
    elif bad == "sigma neg":
        sigma = -0.5
    else:
        x = torch.tensor(0.5)
    calls = {"den": lambda: den(x, sigma), "denoise_certified": lambda: den.denoise_certified(x, sigma),
             "log_density": lambda: den.log_density(x, sigma), "posterior": lambda: den.posterior(x, sigma, k=1),
             "nearest": lambda: den.nearest(x, k=1)}
    for name, fn in calls.items():
        if name == "nearest" and ("sigma" in bad):
            continue  # nearest takes no sigma
        with pytest.raises(optden.OptdenError) as e:
            fn()
        clear_error(e.value)
