"""Triton kernel cases, run by tests/test_triton.py in a child pytest with TRITON_INTERPRET=1.

Triton decides interpreter-or-compiler when ``triton`` itself is imported (its own
``tl.zeros`` etc. are jit functions too), so these cases cannot share a process with
tests that compile for a GPU: the file name keeps pytest from collecting it directly.
Shapes are tiny (the interpreter runs numpy per tile); queries and data are fresh.
"""
from __future__ import annotations

import importlib
import math
import os

import numpy as np
import pytest
import torch

import optden
from optden.engine import dispatch
from optden import reference as R
from optden.engine.precision import exact_logits
from optden.engine.rows import RowSource
from tolerances import DENOISE_RTOL, LOG_DENSITY_RTOL

_MOD = "optden.kernels.dense"


@pytest.fixture(scope="module")
def K():
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("tests/triton_cases.py runs under TRITON_INTERPRET=1 (see tests/test_triton.py)")
    mod = importlib.import_module(_MOD)
    assert mod.INTERPRETED
    return mod


def _rows(dtype: str, rng, M: int, d: int) -> torch.Tensor:
    if dtype == "uint8":
        return torch.from_numpy(rng.integers(0, 256, (M, d), dtype=np.uint8))
    x = torch.from_numpy(rng.standard_normal((M, d)) * 3.0 + 1.5)
    return x.to(getattr(torch, dtype))


def _rel(a, b) -> float:
    a = np.asarray(a, dtype=np.float64).reshape(len(b), -1)
    b = np.asarray(b, dtype=np.float64).reshape(len(b), -1)
    return float((np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)).max())


@pytest.mark.parametrize("dtype,tf32", [("uint8", True), ("uint8", False), ("float16", True),
                                        ("bfloat16", True), ("float32", False)])
def test_kernel_against_float64_ref(K, dtype, tf32, rng):
    """Raw kernel outputs (poisoned first) within the rigorous bound of the float64 reference.

    B = 70 rows (not a multiple of BLOCK_M = 32), d = 37 (odd, not a multiple of
    BLOCK_D = 64), N = 3 queries (fewer than BLOCK_N = 16), 2 splits (the last partial).
    """
    from optden.engine.bounds import fp32_pass_delta

    B, d, N, rps = 70, 37, 3, 48
    x = _rows(dtype, rng, B, d)
    raw = x.to(torch.float64)
    centered = dtype == "uint8"
    center = raw.mean(0).round() if centered else raw.mean(0)
    csq = ((raw - center) ** 2).sum(1)
    v = torch.from_numpy(rng.standard_normal((N, d))) * raw.std() + (raw[:N] - center)
    coef = torch.tensor([1e-4, 3e-2, 5.0], dtype=torch.float64) / raw.var()
    hi, lo, resid = K.split_query_tf32(v) if tf32 else K.split_query_fp32(v)
    S = 2
    out = tuple(torch.full(shape, math.nan, dtype=torch.float32) for shape in [(N, B), (S, N), (S, N), (S, N, d)])
    K.launch(x, center.float(), csq.float(), hi, lo, coef.float(), rps, out, centered=centered, tf32=tf32)
    logits, m, s, acc = (t.double() for t in out)
    for t in (logits, m, s, acc):
        assert not torch.isnan(t).any()
    rl, rm, rs, racc = K.dense_partial_ref(x, center, csq, v, coef, rps, centered=centered)
    cn = float(center.norm())
    qn = float(csq.max().sqrt())
    delta = fp32_pass_delta(v, resid, coef, d=d, pieces=2 if tf32 else 1, x_norm=qn if centered else qn + cn,
                            q_norm=qn, tiles_per_split=math.ceil(rps / K.BLOCK_M_MIN), block_m_max=K.BLOCK_M_MAX,
                            top=rl.abs().max(1).values)
    assert ((logits - rl).abs() <= delta[:, None]).all()
    assert ((m - rm).abs() <= delta[None, :]).all()
    assert ((s.log() - rs.log()).abs() <= 3 * delta[None, :]).all()
    # weighted sums: every weight within exp(+-3 delta) of the reference's
    p_abs = torch.stack([torch.exp(rl[:, a:a + rps] - rm[j][:, None]) @ raw[a:a + rps].abs()
                         for j, a in enumerate(range(0, B, rps))])
    assert ((acc - racc).abs() <= torch.expm1(3 * delta)[None, :, None] * p_abs + 1e-30).all()
    # and the bound is not vacuous where fp32 is accurate (moderate coef)
    assert float(delta[0]) < 1e-2


@pytest.mark.parametrize("dtype", ["uint8", "float16", "bfloat16", "float32"])
def test_delta_bounds_every_coarse_logit(K, dtype, rng):
    """With k = M the backend returns every row's coarse logit: all within delta of exact."""
    M, d = 45, 29
    ds = optden.Dataset.from_array(_rows(dtype, rng, M, d))
    src = RowSource(ds, torch.device("cpu"), 20)  # blocks of 20 rows: 3 kernel calls, last partial
    b = dispatch.get("triton")
    v = ds.model_rows(np.arange(4)).double() + 0.05 * torch.from_numpy(rng.standard_normal((4, d)))
    v = (v - ds.offset) / ds.scale - src.center
    for sigma in (1e-3, 1e-1, 1e1, 1e3):
        coef = torch.full((4,), ds.scale**2 / (2 * sigma**2), dtype=torch.float64)
        p = b.partial(v, coef, src, M)
        assert sorted(p.top_idx[0].tolist()) == list(range(M))
        assert (p.top_val[:, :-1] >= p.top_val[:, 1:]).all()
        rows = src.gather(torch.arange(M)).reshape(1, M, d).expand(4, M, d)
        ex = exact_logits(v, coef, rows, src.center)
        assert ((p.top_val - ex.gather(1, p.top_idx)).abs() <= p.delta[:, None]).all(), sigma
        assert ((p.m + p.s.log() - ex.logsumexp(1)).abs() <= p.delta).all(), sigma
        w = torch.softmax(ex, 1)
        dc_ref = w @ (rows[0].double() - src.center)
        scale = w @ (rows[0].double().abs() + src.center.abs())
        # a pass may leave acc NaN for a query whose bound keeps it from DENSE (the GEMM pass)
        has = torch.isfinite(p.acc).all(1)
        assert (has | (p.delta >= 0.25)).all()
        err = (p.acc / p.s[:, None] - dc_ref).abs()
        assert (err[has] <= torch.expm1(3 * p.delta[has])[:, None] * scale[has] + 1e-12).all()


@pytest.mark.parametrize("data", ["digits_u8", "faces_u8"])
def test_denoiser_real_images(K, data, request, rng):
    """backend="triton" meets the contract on real images (subsampled), sigma 1e-3..1e3."""
    full = request.getfixturevalue(data)
    sub = np.sort(rng.choice(len(full), size=151, replace=False))  # 151 rows: no block divides it
    ds = optden.Dataset.from_array(full[sub])
    den = optden.OptimalDenoiser(ds, backend="triton", block_rows=64)
    assert den.backend.name == "triton"
    y = ds.model_rows(np.arange(ds.M)).numpy()
    modes = set()
    for sigma in (1e-3, 3e-2, 1.0, 1e3):
        i = rng.integers(0, ds.M, 2)
        x = np.concatenate([y[i] + sigma * rng.standard_normal((2, ds.d)),
                            max(sigma, 1.0) * rng.standard_normal((1, ds.d))])
        ev = den.denoise_certified(torch.from_numpy(x), sigma)
        assert not torch.isnan(ev.denoised).any()
        assert _rel(ev.denoised, R.denoise(x, y, sigma)) <= DENOISE_RTOL, sigma
        ld = ev.lse.numpy() - math.log(ds.M) - 0.5 * ds.d * math.log(2 * math.pi * sigma**2)
        ldr = R.log_density(x, y, sigma)
        assert np.max(np.abs(ld - ldr) / np.abs(ldr)) <= LOG_DENSITY_RTOL, sigma
        modes.update(ev.mode)
    assert "rescored" in modes  # the Triton pass itself certified some queries


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_denoiser_float_data(K, dtype, rng):
    ds = optden.Dataset.from_array(_rows(dtype, rng, 97, 37))
    den = optden.OptimalDenoiser(ds, backend="triton")
    y = ds.model_rows(np.arange(ds.M)).numpy()
    for sigma in (1e-2, 1.0, 1e2):
        x = y[rng.integers(0, ds.M, 2)] + sigma * rng.standard_normal((2, ds.d))
        assert _rel(den(torch.from_numpy(x), sigma), R.denoise(x, y, sigma)) <= DENOISE_RTOL


@pytest.mark.parametrize("M", [1, 5])
def test_fewer_rows_than_a_block(K, M, rng):
    """M = 1 and M = 5 (< BLOCK_M), one query (N = 1 < BLOCK_N), d = 37."""
    ds = optden.Dataset.from_array(rng.integers(0, 256, (M, 37), dtype=np.uint8))
    den = optden.OptimalDenoiser(ds, backend="triton")
    y = ds.model_rows(np.arange(M)).numpy()
    x = rng.standard_normal((1, 37))
    for sigma in (1e-3, 1.0, 1e3):
        assert _rel(den(torch.from_numpy(x), sigma), R.denoise(x, y, sigma)) <= DENOISE_RTOL
    w, idx = den.posterior(torch.from_numpy(x), 0.5, k=M)
    rw, ridx = R.posterior(x, y, 0.5, M)
    np.testing.assert_allclose(w.numpy(), rw, rtol=1e-6, atol=1e-300)


def test_dense_mode_from_the_triton_pass_at_loose_tol(K, digits_u8, rng, monkeypatch):
    """At tol = 1e-3 and large sigma the fp32 pass is certified DENSE on its own (no fallback)."""
    ds = optden.Dataset.from_array(digits_u8[:200])
    den = optden.OptimalDenoiser(ds, backend="triton", tol=1e-3)

    def no_fallback(src, k):
        def fail(v, coef):
            raise AssertionError("the float64 fallback ran")
        return fail

    monkeypatch.setattr(den, "_fallback", no_fallback)
    y = ds.model_rows(np.arange(ds.M)).numpy()
    x = y[:3] + 100.0 * rng.standard_normal((3, ds.d))
    ev = den.denoise_certified(torch.from_numpy(x), 100.0)
    assert ev.mode == ["dense"] * 3
    assert float(ev.bound.max()) <= 1e-3
    assert _rel(ev.denoised, R.denoise(x, y, 100.0)) <= 1e-3


def test_interpreter_is_never_auto_but_can_be_forced(K, digits_u8):
    ds = optden.Dataset.from_array(digits_u8[:50])
    assert optden.OptimalDenoiser(ds).backend.name != "triton"  # slow interpreter: not "auto"
    assert optden.OptimalDenoiser(ds, backend="triton").backend.name == "triton"
    info = optden.info()["backends"]["triton"]
    assert info["available"] and info["priority"] < optden.info()["backends"]["torch"]["priority"]
