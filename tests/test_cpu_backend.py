"""The ``cpu`` backend (optden._C dense pass) against the float64 oracle."""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

import optden
from optden import _ext
from optden.engine import dispatch
from optden import reference as R
from optden.engine.backends.cpu import CpuBackend
from optden.data.storage import to_numpy
from optden.errors import BackendUnavailableError
from optden.engine.precision import EXACT, certify
from tolerances import DENOISE_RTOL, LOG_DENSITY_RTOL, SIGMAS, model_rows, rel_err

C = _ext.C
# the kernel paths this CPU runs (build_info lists them; not only the default, which
# OPTDEN_CPU_PATH may lower)
PATHS = ["portable"] + [p for p in ("avx2", "avx512") if p in C.build_info()["cpu"]["dense_paths"]]


def make_ds(dtype: str, M: int, d: int, rng) -> optden.Dataset:
    if dtype == "uint8":
        return optden.Dataset.from_array(rng.integers(0, 256, (M, d), dtype=np.uint8))
    x = torch.from_numpy(rng.standard_normal((M, d)).astype(np.float32))
    return optden.Dataset.from_array(x.to(getattr(torch, dtype)))


def centered(ds, src, x: np.ndarray, sigma: float):
    """(v, coef) of queries x (N, d) in model space, as OptimalDenoiser builds them."""
    u = torch.from_numpy(x)
    v = (u - ds.offset) / ds.scale - src.center
    coef = torch.full((x.shape[0],), ds.scale**2 / (2.0 * sigma**2), dtype=torch.float64)
    return v, coef


def assert_within_certificate(d_star, ref, rows, delta):
    """A pass's weighted mean d_star (N, d) against the exact one ref (N, d): its weights are
    within total variation expm1(2 delta) (N,) of the exact ones, so per query
    ||d_star - ref|| <= expm1(2 delta) max_i ||rows_i - ref|| (rows (M, d), same space)."""
    spread = np.sqrt(((rows[None, :, :] - ref[:, None, :]) ** 2).sum(-1)).max(1)
    err = np.linalg.norm(d_star - ref, axis=1)
    assert np.all(err <= np.expm1(2 * delta) * spread + 1e-12 * (1 + np.linalg.norm(ref, axis=1))), (err, delta, spread)


def recording_fallback(den):
    """Wrap the denoiser's fallback (the float64 torch pass): record what it was asked."""
    calls = []
    orig = den._fallback

    def fb(src, k):
        inner = orig(src, k)

        def run(v, coef):
            p = inner(v, coef)
            calls.append((src, v, coef, p))
            return p

        return run

    den._fallback = fb
    return calls


def test_registered_auto_and_reasons():
    assert "cpu" in dispatch.names()
    assert dispatch.get("cpu").availability() == []
    assert isinstance(dispatch.select("auto", torch.device("cpu"), "uint8", 64), CpuBackend)
    assert optden.info()["backends"]["cpu"]["available"] is True
    why = dispatch.get("cpu").not_supported_reasons(torch.device("cuda"), "uint8", 64)
    assert why and "CPU" in why[0]
    with pytest.raises(BackendUnavailableError, match="CPU"):
        dispatch.select("cpu", torch.device("cuda"), "uint8", 64)
    ds = optden.Dataset.from_array(np.zeros((3, 4), np.uint8))
    assert optden.OptimalDenoiser(ds).backend.name == "cpu"


@pytest.mark.parametrize("data,path", [("digits_u8", "auto"), ("faces_u8", "auto"), ("faces_u8", "portable")])
def test_contract_real_images(data, path, request, rng, monkeypatch):
    """D* and log density within the contract over the sigma range, every kind of query."""
    monkeypatch.setenv("OPTDEN_CPU_PATH", "" if path == "auto" else path)
    ds = optden.Dataset.from_array(request.getfixturevalue(data))
    den = optden.OptimalDenoiser(ds, backend="cpu", block_rows=257)  # 257 divides no M here
    fallbacks = recording_fallback(den)
    y = model_rows(ds)
    worst = 0.0
    for sigma in SIGMAS:
        i = rng.integers(0, ds.M, 3)
        a, b = rng.integers(0, ds.M, 2)
        x = np.concatenate([
            y[i] + sigma * rng.standard_normal((3, ds.d)),            # near a row
            0.5 * (y[a] + y[b])[None] + 1e-4 * rng.standard_normal((1, ds.d)),  # between two rows
            max(sigma, 1.0) * rng.standard_normal((2, ds.d)),         # pure noise
        ])
        ev = den.denoise_certified(torch.from_numpy(x), sigma)
        assert torch.isfinite(ev.denoised).all()
        err = rel_err(ev.denoised, R.denoise(x, y, sigma))
        worst = max(worst, err)
        assert err <= DENOISE_RTOL, (sigma, err, ev.mode)
        ld, ldr = den.log_density(torch.from_numpy(x), sigma).numpy(), R.log_density(x, y, sigma)
        assert np.max(np.abs(ld - ldr) / np.abs(ldr)) <= LOG_DENSITY_RTOL, sigma
    # the exact integer dot products leave delta tight enough that a query falls back to
    # the float64 torch pass only where that pass cannot certify it either (many rows
    # within log(M / tol) of the best, e.g. duplicated flat patches: the exact pass's job)
    for src, v, coef, p in fallbacks:
        assert (certify(p, v, coef, src, den.tol).mode == EXACT).all()


@pytest.mark.parametrize("dtype", ["uint8", "float16", "bfloat16", "float32"])
@pytest.mark.parametrize("M,d,N", [(1, 37, 1), (5, 105, 3), (300, 37, 6), (300, 105, 1)])
def test_partial_against_oracle(dtype, M, d, N, rng):
    """The raw pass (no certificate) at sigmas where it is DENSE: lse, D*, top-K."""
    ds = make_ds(dtype, M, d, rng)
    y = model_rows(ds)
    den = optden.OptimalDenoiser(ds, backend="cpu", block_rows=64)  # M < block and M > block
    src = den.source()
    k = min(M, 8)
    for sigma in (0.3, 3.0, 1e3):
        sig = sigma * float(np.abs(y).max() + 1)
        x = y[rng.integers(0, M, N)] + sig * rng.standard_normal((N, d))
        v, coef = centered(ds, src, x, sig)
        p = dispatch.get("cpu").partial(v, coef, src, k)
        for t in (p.m, p.s, p.acc, p.top_val, p.delta):
            assert torch.isfinite(t).all()
        lg = R.logits(x, y, sig)
        lse_ref = R.log_density(x, y, sig) + np.log(M) + 0.5 * d * np.log(2 * np.pi * sig**2)
        # the raw pass is within its bound: logits within delta, weights within exp(2 delta)
        bound = 1e-10 + 4.0 * float(p.delta.max())
        np.testing.assert_allclose((p.m + torch.log(p.s)).numpy(), lse_ref, rtol=1e-12, atol=bound)
        dc = (p.acc / p.s[:, None] + src.center) * ds.scale + ds.offset
        ref = R.denoise(x, y, sig)
        assert_within_certificate(dc.numpy(), ref, y, p.delta.numpy())
        order = np.argsort(-lg, axis=1, kind="stable")[:, :k]
        np.testing.assert_allclose(p.top_val.numpy(), np.take_along_axis(lg, order, 1), rtol=1e-9, atol=1e-9)
        # top_idx: the exact logits at the returned rows are the top-K values (ties may permute)
        np.testing.assert_allclose(np.take_along_axis(lg, p.top_idx.numpy(), 1), np.take_along_axis(lg, order, 1),
                                   rtol=1e-9, atol=1e-9)
    ev = den.denoise_certified(torch.from_numpy(y[:N] + 1e-3 * rng.standard_normal((N, d))), 1e-3)
    assert rel_err(ev.denoised, R.denoise(y[:N] + 0, y, 1e-3)) < 1.0  # finite, sane
    assert torch.isfinite(ev.denoised).all()


def _exact_logits_ld(ds, src, x, sigma):
    """-coef ||v - q_i||^2 in extended precision (numpy longdouble): (N, M)."""
    ld = np.longdouble
    v = ((x.astype(ld) - ld(ds.offset)) / ld(ds.scale)) - src.center.numpy().astype(ld)
    q = ds.raw_block(0, ds.M).to(torch.float64).numpy().astype(ld) - src.center.numpy().astype(ld)
    coef = ld(ds.scale) ** 2 / (2 * ld(sigma) ** 2)
    return -coef * ((v[:, None, :] - q[None]) ** 2).sum(-1)


@pytest.mark.parametrize("dtype,limbs", [("uint8", 1), ("uint8", 2), ("uint8", 0), ("float32", 0), ("bfloat16", 0),
                                         ("float16", 0)])
def test_delta_bounds_the_coarse_error(dtype, limbs, faces_u8, rng):
    """|coarse logit - exact logit| <= delta for every row (k = M gives every coarse logit)."""
    if dtype == "uint8":
        ds = optden.Dataset.from_array(faces_u8[:150])
    else:
        ds = make_ds(dtype, 150, 105, rng)
    den = optden.OptimalDenoiser(ds, backend="torch")
    src = den.source()
    y = model_rows(ds)
    be = CpuBackend(limbs=limbs)
    for sigma in (1e-3, 0.05, 1.0, 100.0):
        x = y[rng.integers(0, ds.M, 4)] + sigma * rng.standard_normal((4, ds.d))
        v, coef = centered(ds, src, x, sigma)
        # the pass takes v as given; the exact logits use the same float64 v
        p = be.partial(v, coef, src, ds.M)
        exact = _exact_logits_ld(ds, src, (v.numpy() + src.center.numpy()) * ds.scale + ds.offset, sigma)
        exact = -coef.numpy()[:, None].astype(np.longdouble) * (
            (v.numpy().astype(np.longdouble)[:, None, :]
             - (ds.raw_block(0, ds.M).double().numpy().astype(np.longdouble) - src.center.numpy())[None]) ** 2).sum(-1)
        coarse = p.top_val.numpy().astype(np.longdouble)
        ex = np.take_along_axis(exact, p.top_idx.numpy(), 1)
        err = np.abs(coarse - ex).max(axis=1).astype(np.float64)
        assert np.all(err <= p.delta.numpy()), (sigma, err, p.delta)
        if limbs == 1:  # one 15-bit limb: a real error, and the bound is not vacuous
            assert np.all(p.delta.numpy() < 1e4 * np.maximum(err, 1e-300))


def test_delta_tight_enough_for_dense(faces_u8, rng):
    """Mid-range sigma: the automatic limb count reaches delta <= tol / 4 (DENSE)."""
    ds = optden.Dataset.from_array(faces_u8)
    den = optden.OptimalDenoiser(ds, backend="cpu")
    src = den.source()
    y = model_rows(ds)
    for sigma in (0.05, 0.3, 3.0):
        x = y[rng.integers(0, ds.M, 4)] + sigma * rng.standard_normal((4, ds.d))
        v, coef = centered(ds, src, x, sigma)
        p = dispatch.get("cpu").partial(v, coef, src, 16)
        assert bool((p.delta <= 0.25 * den.tol).all()), (sigma, p.delta)
        cert = certify(p, v, coef, src, den.tol)
        assert (cert.mode == 0).all()


@pytest.mark.parametrize("dtype", ["uint8", "float32", "float16", "bfloat16"])
@pytest.mark.parametrize("n", [3, 5])
def test_paths_agree(dtype, n, rng):
    """Every kernel path gives the same pass: integer dots are bitwise equal across paths;
    float rows (centered in registers at n <= 4, through a copy above) agree to rounding."""
    ds = make_ds(dtype, 200, 105, rng)
    den = optden.OptimalDenoiser(ds, backend="torch")
    src = den.source()
    x = model_rows(ds)[:n] + 0.5 * rng.standard_normal((n, 105))
    v, coef = centered(ds, src, x, 2.0)
    parts = [CpuBackend(path=p).partial(v, coef, src, 10) for p in PATHS]
    for p in parts[1:]:
        if dtype == "uint8":
            assert torch.equal(p.top_val, parts[0].top_val)
        torch.testing.assert_close(p.top_val, parts[0].top_val, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(p.acc / p.s[:, None], parts[0].acc / parts[0].s[:, None], rtol=1e-12, atol=1e-12)
    for missing in {"avx2", "avx512"} - set(PATHS):
        with pytest.raises(ValueError, match="path"):
            C.DensePass(v.numpy(), coef.numpy(), src.center.numpy(), src.max_cnorm, 3, dtype, missing, 1e-8, 0)


def test_labels_posterior_nearest(digits_u8, rng):
    """Class-conditional rows (a gathered source), posterior and nearest match the oracle."""
    labels = rng.integers(0, 3, len(digits_u8))
    ds = optden.Dataset.from_array(digits_u8, labels=labels)
    den = optden.OptimalDenoiser(ds, backend="cpu", block_rows=100)
    y = model_rows(ds)
    x = y[:4] + 0.2 * rng.standard_normal((4, ds.d))
    lab = np.array([0, 1, 2, 0])
    out = den(torch.from_numpy(x), 0.2, labels=torch.from_numpy(lab)).numpy()
    for j in range(4):
        rows = np.flatnonzero(labels == lab[j])
        assert rel_err(out[j : j + 1], R.denoise(x[j : j + 1], y[rows], 0.2)) <= DENOISE_RTOL
    w, idx = den.posterior(torch.from_numpy(x), 0.2, k=5)
    wr, ir = R.posterior(x, y, 0.2, 5)
    np.testing.assert_allclose(w.numpy(), wr, rtol=1e-6, atol=1e-12)
    dist, nidx = den.nearest(torch.from_numpy(x), k=3)
    dr, nr = R.nearest(x, y, 3)
    np.testing.assert_allclose(dist.numpy(), dr, rtol=1e-10)
    np.testing.assert_array_equal(nidx.numpy(), nr)


def test_dense_pass_errors(rng):
    v, coef, c = np.zeros((2, 5)), np.ones(2), np.zeros(5)
    with pytest.raises(ValueError, match="path"):
        C.DensePass(v, coef, c, 1.0, 3, "uint8", "bogus", 1e-8, 0)
    with pytest.raises(ValueError, match="dtype"):
        C.DensePass(v, coef, c, 1.0, 3, "int16", "auto", 1e-8, 0)
    with pytest.raises(ValueError, match="coef"):
        C.DensePass(v, -coef, c, 1.0, 3, "uint8", "auto", 1e-8, 0)
    with pytest.raises(ValueError, match="limbs"):
        C.DensePass(v, coef, c, 1.0, 3, "uint8", "auto", 1e-8, 7)
    for bad in (np.nan, np.inf, -np.inf):  # anywhere, including the last entry
        for pos in ((0, 0), (1, 2), (1, 4)):
            vb = v.copy()
            vb[pos] = bad
            with pytest.raises(ValueError, match="v: contains NaN or inf"):
                C.DensePass(vb, coef, c, 1.0, 3, "uint8", "auto", 1e-8, 0)
    # the int path needs an integral center in [-255, 255]; anything else runs in float64
    for center, arith in ((c, "int-limbs"), (c - 255.0, "int-limbs"), (c + 0.5, "float64"),
                          (c - 256.0, "float64"), (np.full(5, np.nan), "float64")):
        assert C.DensePass(v, coef, center, 1.0, 3, "uint8", "auto", 1e-8, 0).arith == arith
    dp = C.DensePass(v, coef, c, 1.0, 3, "uint8", "auto", 1e-8, 0)
    with pytest.raises(ValueError, match="raw"):
        dp.update(np.zeros((4, 6), np.uint8), np.zeros(4), 0)
    with pytest.raises(ValueError, match="raw"):
        dp.update(np.zeros((4, 5), np.float32), np.zeros(4), 0)
    with pytest.raises(ValueError, match="csq"):
        dp.update(np.zeros((4, 5), np.uint8), np.zeros(3), 0)
    dp.update(np.zeros((4, 5), np.uint8), np.zeros(4), 0)
    m, s, acc, tv, ti, delta = dp.finish()
    assert np.isfinite(tv).all() and sorted(ti[0].tolist()) == [0, 1, 2] and np.all(s == 4.0)
    with pytest.raises(RuntimeError, match="finish"):
        dp.update(np.zeros((4, 5), np.uint8), np.zeros(4), 0)


def test_raw_numpy_bfloat16_bits():
    t = torch.tensor([[1.5, -2.0]], dtype=torch.bfloat16)
    a = to_numpy(t)
    assert a.dtype == np.int16 and a.flags.c_contiguous
    assert torch.equal(torch.from_numpy(a).view(torch.bfloat16), t)


def test_bench_quick(tmp_path, monkeypatch):
    """bench/bench_dense.py --quick runs end to end and writes its CSV."""
    bench = os.path.join(os.path.dirname(__file__), "..", "bench")
    monkeypatch.syspath_prepend(bench)  # as `python bench/bench_dense.py` has it: bench/_common.py
    path = os.path.join(bench, "bench_dense.py")
    spec = importlib.util.spec_from_file_location("bench_dense", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for dtype in ("uint8", "float16"):
        out = tmp_path / f"q_{dtype}.csv"
        assert mod.main(["--quick", "--csv", str(out), "--dtype", dtype]) == 0
        text = out.read_text().splitlines()
        assert text[0].startswith("method,N,M,d,dtype,sigma,time_s")
        methods = {line.split(",")[0] for line in text[1:]}
        assert methods == {"cpu", "torch", "naive_fp32"}
        assert {line.split(",")[4] for line in text[1:]} == {dtype}


@pytest.mark.parametrize("integral", [True, False])
@pytest.mark.parametrize("N", [3, 5, 11])  # float path: rows centered in registers at N <= 4; the int
# path's weighted sum reads uint8 in place for N <= 8
def test_dense_pass_direct_uint8(integral, N, rng):
    """DensePass on its own: exact int path for an integral center, float64 path otherwise."""
    M, d = 333, 70
    x = rng.integers(0, 256, (M, d), dtype=np.uint8)
    c = np.round(x.mean(0)) if integral else x.mean(0)
    q = x - c
    csq = (q * q).sum(1)
    v = q[rng.integers(0, M, N)] + 30.0 * rng.standard_normal((N, d))
    coef = rng.uniform(1e-4, 1e-2, N)
    dp = C.DensePass(v, coef, c, float(np.sqrt(csq.max())), 6, "uint8", "auto", 1e-8, 0)
    assert dp.arith == ("int-limbs" if integral else "float64")
    for a in range(0, M, 100):  # several calls carry the state across blocks
        dp.update(x[a : a + 100], csq[a : a + 100], a)
    m, s, acc, tv, ti, delta = dp.finish()
    lg = -coef[:, None] * ((v[:, None, :] - q[None]) ** 2).sum(-1)
    lse = np.log(np.exp(lg - lg.max(1, keepdims=True)).sum(1)) + lg.max(1)
    np.testing.assert_allclose(m + np.log(s), lse, rtol=1e-12, atol=2 * delta.max())
    w = np.exp(lg - lse[:, None])
    assert_within_certificate(acc / s[:, None], w @ q, q, delta)
    np.testing.assert_array_equal(np.sort(ti, 1), np.sort(np.argsort(-lg, 1)[:, :6], 1))
    assert np.all(np.abs(tv - np.take_along_axis(lg, ti, 1)) <= delta[:, None])


def test_memmapped_dataset_streams(tmp_path, faces_u8, rng, monkeypatch):
    """A memory-mapped dataset is streamed in blocks (prefetcher) and gives the same D*."""
    monkeypatch.setattr("optden.engine.backends.cpu._STREAM_CALL_BYTES", 192 * 100)  # 100-row blocks
    np.save(tmp_path / "x.npy", faces_u8)
    ds = optden.Dataset.from_npy(tmp_path / "x.npy")
    den = optden.OptimalDenoiser(ds, backend="cpu")
    y = model_rows(ds)
    x = y[:3] + 0.1 * rng.standard_normal((3, ds.d))
    assert rel_err(den(torch.from_numpy(x), 0.1), R.denoise(x, y, 0.1)) <= DENOISE_RTOL


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("d", [2048, 70_000])
def test_bright_rows_long_dots_do_not_overflow(path, d):
    """All-255 rows against bright queries: integer partial sums exceed 2^31 (int16 limbs at
    d = 2048; the int8 coarse limb, 255 * 127 per column, at d = 70,000)."""
    M = 4
    x = np.zeros((M, d), np.uint8)
    x[0] = 255
    ds = optden.Dataset.from_array(x)
    y = model_rows(ds)
    u = np.vstack([y[0], 0.5 * (y[0] + y[1])])
    den = optden.OptimalDenoiser(ds, backend="cpu", prune="off", topk=1)
    den.backend = CpuBackend(path=path)
    ev = den.denoise_certified(torch.from_numpy(u), 0.5)
    assert rel_err(ev.denoised, R.denoise(u, y, 0.5)) <= DENOISE_RTOL


@pytest.mark.parametrize("path", PATHS)
def test_coarse_limb_leaves_out_only_negligible_rows(path, digits_u8, rng):
    """M >> K at small sigma: most rows are left out after the coarse limb, yet D* meets
    the contract, the top weights are exact to the bound, and delta covers the weight of
    the rows left out (checked against the float64 oracle's weights)."""
    ds = optden.Dataset.from_array(digits_u8)
    den = optden.OptimalDenoiser(ds, backend="torch")
    src = den.source()
    y = model_rows(ds)
    be = CpuBackend(path=path)
    for sigma, few in ((0.05, True), (0.3, True), (1.0, False), (30.0, False)):
        x = y[rng.integers(0, ds.M, 6)] + sigma * rng.standard_normal((6, ds.d))
        v, coef = centered(ds, src, x, sigma)
        p = be.partial(v, coef, src, 8)
        if few:
            assert be.last_info["refined"] < 0.5, (sigma, be.last_info)
        cert = certify(p, v, coef, src, den.tol)
        top_true = np.take_along_axis(R.weights(x, y, sigma), cert.top_idx.numpy(), 1)  # float64 oracle
        kept = top_true > 1e-280
        misweight = np.where(kept, np.abs(cert.top_w.numpy() / np.where(kept, top_true, 1.0) - 1.0), 0.0)
        assert np.all(misweight.max(1) <= cert.excluded.numpy() + 1e-12), (sigma, misweight.max(1), cert.excluded)
        d_model = (cert.dc + src.center).numpy() * ds.scale + ds.offset
        assert rel_err(d_model, R.denoise(x, y, sigma)) <= DENOISE_RTOL, sigma


def test_same_inputs_bit_identical(rng):
    """Two passes over the same rows give the same bits: which thread sees which rows (and
    so the skip decisions and the weights' quantization) does not vary between runs."""
    M, d, N = 3000, 75, 9
    x = rng.integers(0, 256, (M, d), dtype=np.uint8)
    c = np.round(x.mean(0))
    q = x - c
    csq = (q * q).sum(1)
    for sigma_raw in (5.0, 60.0, 3000.0):  # few rows matter .. all rows matter
        v = q[rng.integers(0, M, N)] + sigma_raw * rng.standard_normal((N, d))
        coef = np.full(N, 1.0 / (2 * sigma_raw**2))
        outs = []
        for _ in range(3):
            dp = C.DensePass(v, coef, c, float(np.sqrt(csq.max())), 8, "uint8", "auto", 1e-8, 0)
            dp.update(x, csq, 0)
            outs.append(dp.finish())
        for o in outs[1:]:
            for a, b in zip(o, outs[0]):
                np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("k", [1, 8, 64, 400])
def test_top_k_candidates_in_two_stages(path, k, rng):
    """Many sub-blocks at small sigma, so rows become top-K candidates one sub-block at a
    time: whether refined in full, through limb 1 first (then kept or left out), or limb 1
    of every row by the tiled kernel, the top K returned are the true top K, each logit
    within delta of its float64 value, and leaving rows out keeps delta honest."""
    M, d, N = 4000, 150, 7
    x = rng.integers(0, 256, (M, d), dtype=np.uint8)
    c = np.round(x.mean(0))
    q = x - c
    csq = (q * q).sum(1)
    for sigma_raw in (2.0, 12.0):
        v = q[rng.integers(0, M, N)] + sigma_raw * rng.standard_normal((N, d))
        coef = np.full(N, 1.0 / (2 * sigma_raw**2))
        dp = C.DensePass(v, coef, c, float(np.sqrt(csq.max())), k, "uint8", path, 1e-8, 0)
        dp.update(x, csq, 0)
        m, s, acc, top_val, top_idx, delta = dp.finish()
        if k <= 64:  # (k = 400 is a tenth of the rows: most are candidates somewhere)
            assert dp.refined < 0.5, (sigma_raw, dp.refined)
        exact = -coef[:, None] * ((v[:, None, :] - q[None, :, :]) ** 2).sum(-1)  # (N, M) float64
        for n in range(N):
            got = exact[n, top_idx[n]]
            assert np.all(np.abs(top_val[n] - got) <= delta[n] + 1e-9 * np.abs(got)), (n, k)
            kth = np.sort(exact[n])[::-1][k - 1]
            assert got.min() >= kth - 2 * delta[n] - 1e-9 * abs(kth), (n, k)
            assert len(set(top_idx[n].tolist())) == k
        # the weighted mean against the float64 one, within the certificate
        w = np.exp(exact - exact.max(1, keepdims=True))
        ref = (w @ q) / w.sum(1, keepdims=True)
        assert_within_certificate(acc / s[:, None], ref, q, delta)


def test_denoise_without_top_weights(faces_u8, rng, monkeypatch):
    """D* (no top weights wanted) keeps one top row per pass where the bound is tight and
    repeats the pass with the full top K only for the queries whose bound is loose."""
    ds = optden.Dataset.from_array(faces_u8)
    den = optden.OptimalDenoiser(ds, backend="cpu")
    y = model_rows(ds)
    calls = []
    orig = den.backend.partial

    def spy(v, coef, src, k):
        p = orig(v, coef, src, k)
        calls.append((v.shape[0], k, p.delta.clone()))
        return p

    monkeypatch.setattr(den.backend, "partial", spy)
    redone = 0
    for sigma in SIGMAS:
        x = np.concatenate([y[rng.integers(0, ds.M, 3)] + sigma * rng.standard_normal((3, ds.d)),
                            max(sigma, 1.0) * rng.standard_normal((2, ds.d))])
        calls.clear()
        out = den(torch.from_numpy(x), sigma)
        assert rel_err(out, R.denoise(x, y, sigma)) <= DENOISE_RTOL, sigma
        (n1, k1, d1), *rest = calls
        assert (n1, k1) == (5, 1)
        loose = int((~(d1 <= 0.25 * den.tol)).sum())
        assert [(n, k) for n, k, _ in rest] == ([(loose, den.topk)] if loose else [])
        redone += loose
        ev = den.denoise_certified(torch.from_numpy(x), sigma)  # top weights wanted: one pass, K = topk
        assert calls[-1][:2] == (5, den.topk) and ev.top_w.shape == (5, den.topk)
        assert rel_err(ev.denoised, R.denoise(x, y, sigma)) <= DENOISE_RTOL, sigma
    assert redone > 0  # the smallest sigmas leave some bound above tol / 4: the repeat ran


@pytest.mark.parametrize("d", [77, 200, 1000])
def test_one_query_all_limbs_in_one_pass(d, rng):
    """Large sigma, one query: after two dense sub-blocks a thread takes every limb of a row in
    one pass (dot_fused1). The same integers and decisions: bitwise the pass the query gets
    inside a batch of two (which never fuses), on every kernel path, within the certificate."""
    M = max(1600, 128 * 4 * (os.cpu_count() or 1))  # several sub-blocks per thread
    X = rng.integers(0, 256, (M, d), dtype=np.uint8)
    center = np.round(X.mean(0))
    csq = ((X - center) ** 2).sum(1)
    scale = 2 / 255
    for sigma in (20.0, 200.0):
        v = X[rng.integers(0, M, 2)] - center + sigma / scale * rng.standard_normal((2, d))
        coef = np.full(2, scale**2 / (2 * sigma**2))
        ref = None
        for path in PATHS:
            one = C.DensePass(v[:1], coef[:1], center, float(np.sqrt(csq.max())), 4, "uint8", path, 1e-8, 0)
            one.update(X, csq, 0)
            two = C.DensePass(v, coef, center, float(np.sqrt(csq.max())), 4, "uint8", path, 1e-8, 0)
            two.update(X, csq, 0)
            a, b = one.finish(), two.finish()
            for x, y in zip(a, b):
                assert np.array_equal(x, y[:1]), (path, sigma)
            ref = a if ref is None else ref
            for x, y in zip(ref, a):
                assert np.array_equal(x, y), (path, sigma)
        m, s, acc, tv, ti, delta = ref
        q = (X - center).astype(np.float64)
        lg = -coef[0] * ((v[0] - q) ** 2).sum(1)
        w = np.exp(lg - lg.max())
        exact = (w[:, None] * q).sum(0) / w.sum()
        assert_within_certificate(acc / s[:, None], exact[None], q, delta)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("N", [1, 5])
def test_float_path_converts_rows_exactly(path, N, rng):
    """The float path's rows in float64: every finite fp16 and bf16 value (subnormals, -0,
    the largest), fp32 extremes and every uint8 convert exactly on every kernel path, the
    one rounding being the subtraction of the center. A pass over one row gives it the
    weight exp(l - max l) = 1 exactly, so its weighted sum is the centered row itself.
    N = 1 centers the rows in registers inside the weighted sum (acc_raw), N = 5 through a
    float64 copy (center_row). Widths: 4096 (every value in the vector loop), 4101 (a
    tail of 5 per row, converted one by one) and 3 (all in the tail, a random subset)."""
    h = np.arange(1 << 16, dtype=np.uint16)
    finite16 = h[(h & 0x7C00) != 0x7C00]  # fp16 exponent not all ones
    finite_bf = h[(h & 0x7F80) != 0x7F80]
    f32 = np.concatenate([rng.standard_normal(500).astype(np.float32) * np.float32(1e30),
                          np.array([0.0, -0.0, 1e-45, -1e-45, 1.2e-38, 3.4e38, -3.4e38], dtype=np.float32)])
    cases = [
        ("float16", finite16, finite16.view(np.float16).astype(np.float64)),
        ("bfloat16", finite_bf, (finite_bf.astype(np.uint32) << 16).view(np.float32).astype(np.float64)),
        ("float32", f32, f32.astype(np.float64)),
        ("uint8", np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.float64)),
    ]
    for dtype, bits, exact in cases:
        for w in (4096, 4101, 3):
            pick = np.arange(len(bits)) if w > 3 else rng.choice(len(bits), min(len(bits), 3 * 128), replace=False)
            pick = np.resize(pick, -(-len(pick) // w) * w).reshape(-1, w)  # the last row wraps around
            center = np.round(rng.standard_normal(w) * 4.0, 2)
            for row in pick:
                raw = np.ascontiguousarray(bits[row][None])
                ref = exact[row] - center
                csq = np.array([ref @ ref])
                dp = C.DensePass(np.zeros((N, w)), np.ones(N), center, float(np.sqrt(csq[0])), 1, dtype, path)
                dp.update(raw, csq, 0)
                _, s, acc, *_ = dp.finish()
                assert np.all(s == 1.0) and np.array_equal(acc, np.broadcast_to(ref, acc.shape)), (dtype, w, row[:4])
