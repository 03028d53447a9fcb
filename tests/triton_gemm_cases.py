"""GEMM-pass kernel cases (``optden.kernels.dense_gemm``), run by tests/test_triton.py under TRITON_INTERPRET=1.

Like tests/triton_cases.py these run in a child pytest (Triton decides interpreter or
compiler at import). Shapes are tiny and odd (the interpreter runs numpy per tile):
B not a multiple of BLOCK_M, d not a multiple of BLOCK_D, N below BLOCK_N. Outputs are
poisoned with NaN before the kernels write them. The GEMM pass is selected with
OPTDEN_TRITON_PASS=gemm; the bound is checked against float64 on adversarial data.
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
from optden.engine.backends.gpu_gemm_pass import split_query_int8
from optden.engine.bounds import gemm_logits_delta, wsum_delta
from optden.engine.backends.gpu_gemm_pass import NO_ACC_DELTA
from optden.engine.precision import exact_logits
from optden.engine.rows import RowSource
from triton_cases import test_dense_mode_from_the_triton_pass_at_loose_tol as _dense_at_loose_tol
from triton_cases import test_denoiser_real_images as _real_images
from triton_cases import test_fewer_rows_than_a_block as _fewer_rows


@pytest.fixture(scope="module")
def K():
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("tests/triton_gemm_cases.py runs under TRITON_INTERPRET=1 (see tests/test_triton.py)")
    mod = importlib.import_module("optden.kernels.dense_gemm")
    assert mod.INTERPRETED
    return mod


@pytest.fixture
def gemm_pass(monkeypatch):
    monkeypatch.setenv("OPTDEN_TRITON_PASS", "gemm")


def _u8(rng, M, d):
    return torch.from_numpy(rng.integers(0, 256, (M, d), dtype=np.uint8))


def _stats(x):
    raw = x.to(torch.float64)
    center = raw.mean(0).round()
    csq = ((raw - center) ** 2).sum(1)
    return center, csq, float(csq.max().sqrt())


@pytest.mark.parametrize("pieces", [2, 3])
def test_split_kernel_matches_the_reference_split(K, pieces, rng):
    """``gemm_split`` (one launch) gives the pieces of ``split_query_int8`` bit for bit, and the
    norms the host needs; a zero query, a spike and a query too small for fp32 scales included."""
    N, d = 5, 77
    v = torch.from_numpy(rng.standard_normal((N, d))) * 100.0
    v[1] = 0.0
    v[2, 5] = 1e6
    v[3] *= 1e-40
    c = torch.from_numpy(rng.integers(0, 256, d).astype(np.float64))
    qp, sc, st = K.gemm_split(v, 128.0 - c, pieces)
    q, s, resid, absum, valid = split_query_int8(v, pieces)
    assert torch.equal(qp, q) and torch.equal(sc, s)
    torch.testing.assert_close(st[:, 2], resid, rtol=1e-12, atol=1e-300)
    torch.testing.assert_close(st[:, 3], absum, rtol=1e-12, atol=1e-300)
    assert (st[:, 4] > 0).tolist() == valid.tolist() == [True, True, True, False, True]
    torch.testing.assert_close(st[:, 0], (v * v).sum(1), rtol=1e-12, atol=0)
    torch.testing.assert_close(st[:, 1], v @ (128.0 - c), rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("pieces", [2, 3])
def test_logits_kernel_against_float64_ref(K, pieces, rng):
    """Logits and row-tile statistics (poisoned first) within the rigorous bound of float64.

    B = 70 rows (BLOCK_M = 32: the last tile partial), d = 37 (BLOCK_D = 32), N = 3 (< BLOCK_N);
    coef from 1e-4 to 5 / var: the bound goes from tiny to loose.
    """
    B, d, N = 70, 37, 3
    x = _u8(rng, B, d)
    center, csq, qn = _stats(x)
    v = torch.from_numpy(rng.standard_normal((N, d))) * 40.0 + (x[:N].double() - center)
    coef = torch.tensor([1e-4, 3e-2, 5.0], dtype=torch.float64) / x.double().var()
    qp, sc, resid, absum, valid = split_query_int8(v, pieces)
    bm = K.INTERP_LOGITS[0]
    T = math.ceil(B / bm)
    out = (torch.full((N, B), math.nan), torch.full((T, N), math.nan), torch.full((T, N), math.nan))
    K.launch_logits(x, qp, sc, csq.float(), coef.float(), out)
    logits, tmax, tsum = (t.double() for t in out)
    assert not any(torch.isnan(t).any() for t in (logits, tmax, tsum))
    rl, rm, rs = K.gemm_logits_ref(x, center, csq, v, coef, bm)
    xn = qn + float((center - 128).norm())
    delta = gemm_logits_delta(v, resid, absum, valid, coef, pieces=pieces, x_norm=xn, q_norm=qn,
                              block_m_max=bm, top=rl.abs().max(1).values)
    assert ((logits - rl).abs() <= delta[:, None]).all()
    assert ((tmax - rm).abs() <= delta[None, :]).all()
    assert ((tsum.log() - rs.log()).abs() <= 3 * delta[None, :]).all()
    assert float(delta[0]) < 1e-4  # not vacuous where the logits are small


def test_logits_kernel_two_and_three_pieces_agree_with_their_bounds(K, rng):
    """The third piece shrinks the bound by about 2^7 and the kernel's error with it."""
    B, d, N = 40, 64, 2
    x = _u8(rng, B, d)
    center, csq, qn = _stats(x)
    v = torch.from_numpy(rng.standard_normal((N, d))) * 60.0
    coef = torch.full((N,), 1.0, dtype=torch.float64)
    errs, deltas = [], []
    for p in (2, 3):
        qp, sc, resid, absum, valid = split_query_int8(v, p)
        lg, _, _ = K.gemm_logits(x, qp, sc, csq.float(), coef.float())
        rl, _, _ = K.gemm_logits_ref(x, center, csq, v, coef, K.INTERP_LOGITS[0])
        errs.append(float((lg.double() - rl).abs().max()))
        deltas.append(float(gemm_logits_delta(v, resid, absum, valid, coef, pieces=p, x_norm=qn + float((center - 128).norm()),
                                              q_norm=qn, block_m_max=K.INTERP_LOGITS[0], top=rl.abs().max(1).values).max()))
    assert errs[0] <= deltas[0] and errs[1] <= deltas[1]
    assert deltas[1] < deltas[0] / 8


def test_wsum_kernel_against_float64_ref(K, rng):
    """Per-split weighted sums (poisoned first) within the weighted-sum bound of float64.

    B = 70 rows in splits of 48 (the last partial), d = 37, N = 3; the weights come from
    the kernel's own fp32 logits, so only the weighted sum's rounding is measured.
    """
    B, d, N, rps = 70, 37, 3, 48
    x = _u8(rng, B, d)
    logits = torch.from_numpy(rng.uniform(-30.0, 0.0, (N, B))).float()
    logits[1, 5] = -200.0  # underflows to a zero weight
    mref = logits.max(1).values
    S = math.ceil(B / rps)
    out = (torch.full((S, N, d), math.nan), torch.full((S, N), math.nan))
    K.launch_wsum(x, logits, mref, rps, out)
    acc, s = (t.double() for t in out)
    assert not torch.isnan(acc).any() and not torch.isnan(s).any()
    ra, rs = K.gemm_wsum_ref(x, logits.double(), mref.double(), rps)
    bk = K.INTERP_WSUM[1]
    dw = wsum_delta(bk, math.ceil(rps / bk))
    p_abs = torch.stack([torch.exp(logits.double()[:, a:a + rps] - mref.double()[:, None]) @ x.double()[a:a + rps]
                         for a in range(0, B, rps)])
    assert ((acc - ra).abs() <= math.expm1(dw) * p_abs + 1e-30).all()
    assert ((s - rs).abs() <= math.expm1(dw) * rs + 1e-30).all()


def _adversarial_rows(kind: str, rng, M: int, d: int) -> torch.Tensor:
    if kind == "random":
        return _u8(rng, M, d)
    if kind == "duplicated":  # every row twice or more: ties everywhere
        base = rng.integers(0, 256, (max(1, M // 3), d), dtype=np.uint8)
        return torch.from_numpy(base[rng.integers(0, len(base), M)])
    if kind == "extreme":  # rows of 0 and 255 only: the largest norms and magnitudes
        return torch.from_numpy((rng.integers(0, 2, (M, d)) * 255).astype(np.uint8))
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["random", "duplicated", "extreme"])
def test_gemm_delta_bounds_every_coarse_logit(K, gemm_pass, kind, rng):
    """With k = M the pass returns every coarse logit: all within delta of float64 direct
    differences, for queries near rows, far away (large norm) and between rows, sigma 1e-3..1e3."""
    M, d = 45, 29
    ds = optden.Dataset.from_array(_adversarial_rows(kind, rng, M, d).numpy())
    src = RowSource(ds, torch.device("cpu"), 20)  # blocks of 20 rows: 3 chunks, last partial
    b = dispatch.get("triton")
    y = ds.model_rows(np.arange(M)).double()
    u = torch.cat([y[:2] + 0.05 * torch.from_numpy(rng.standard_normal((2, d))),
                   y[2:3] + 1e3 * torch.from_numpy(rng.standard_normal((1, d))),  # far: large norm
                   0.5 * (y[3:4] + y[4:5])])
    v = (u - ds.offset) / ds.scale - src.center
    rows = src.gather(torch.arange(M)).reshape(1, M, d).expand(4, M, d)
    for sigma in (1e-3, 1e-1, 1e1, 1e3):
        coef = torch.full((4,), ds.scale**2 / (2 * sigma**2), dtype=torch.float64)
        p = b.partial(v, coef, src, M)
        assert sorted(p.top_idx[0].tolist()) == list(range(M))
        ex = exact_logits(v, coef, rows, src.center)
        assert ((p.top_val - ex.gather(1, p.top_idx)).abs() <= p.delta[:, None]).all(), sigma
        assert ((p.m + p.s.log() - ex.logsumexp(1)).abs() <= p.delta).all(), sigma
        has = torch.isfinite(p.acc).all(1)
        assert (has | (p.delta >= NO_ACC_DELTA)).all()  # no weighted sum: never DENSE
        w = torch.softmax(ex, 1)
        dc_ref = w @ (rows[0].double() - src.center)
        scale = w @ (rows[0].double().abs() + src.center.abs())
        err = (p.acc / p.s[:, None] - dc_ref).abs()
        assert (err[has] <= torch.expm1(3 * p.delta[has])[:, None] * scale[has] + 1e-12).all(), sigma
        if sigma == 1e3:
            assert bool(has[:2].all())  # large sigma: the weighted sum ran


def test_gemm_bound_many_draws(K, rng):
    """Many random draws (norms from 1e-2 to 1e6, duplicated rows, coef 1e-12..1e3): the
    kernel's logits never leave the bound, with 2 and 3 pieces."""
    worst = 0.0
    for draw in range(12):
        B, d, N = int(rng.integers(1, 50)), int(rng.integers(1, 80)), int(rng.integers(1, 5))
        x = _adversarial_rows(["random", "duplicated", "extreme"][draw % 3], rng, B, d)
        center, csq, qn = _stats(x)
        v = torch.from_numpy(rng.standard_normal((N, d)) * 10.0 ** rng.uniform(-2, 6, (N, 1)))
        if draw % 4 == 0:
            v[0] = x[0].double() - center  # a query exactly on a row
        coef = torch.from_numpy(10.0 ** rng.uniform(-12, 3, N))
        p = 2 + draw % 2
        qp, sc, resid, absum, valid = split_query_int8(v, p)
        lg, tm, ts = K.gemm_logits(x, qp, sc, csq.float(), coef.float())
        rl, rm, rs = K.gemm_logits_ref(x, center, csq, v, coef, K.INTERP_LOGITS[0])
        delta = gemm_logits_delta(v, resid, absum, valid, coef, pieces=p, x_norm=qn + float((center - 128).norm()),
                                  q_norm=qn, block_m_max=K.INTERP_LOGITS[0], top=rl.abs().max(1).values)
        ok = torch.isfinite(rl).all(1) & torch.isfinite(delta)
        err = (lg.double() - rl).abs()
        assert (err[ok] <= delta[ok][:, None]).all(), draw
        worst = max(worst, float((err[ok] / delta[ok][:, None]).max()) if ok.any() else 0.0)
    assert worst < 1.0


@pytest.mark.parametrize("data", ["digits_u8", "faces_u8"])
def test_gemm_denoiser_real_images(K, gemm_pass, data, request, rng):
    """The fused pass's case, with the GEMM pass: the contract on real images, sigma 1e-3..1e3."""
    _real_images(K, data, request, rng)


def test_gemm_dense_at_loose_tol(K, gemm_pass, digits_u8, rng, monkeypatch):
    """The fused pass's case, with the GEMM pass: its weighted sum runs and certifies DENSE at tol = 1e-3."""
    _dense_at_loose_tol(K, digits_u8, rng, monkeypatch)


@pytest.mark.parametrize("M", [1, 5])
def test_gemm_fewer_rows_than_a_tile(K, gemm_pass, M, rng):
    """The fused pass's case, with the GEMM pass: M = 1 and 5 rows (< BLOCK_M), N = 1, d = 37."""
    _fewer_rows(K, M, rng)


def test_gemm_pass_reports_its_choices(K, rng):
    """info: 3 pieces for few queries, 2 for many unless their bound is loose; weighted sums
    only where the bound allows DENSE."""
    from optden.engine.backends.gpu_gemm_pass import gemm_partial

    ds = optden.Dataset.from_array(rng.integers(0, 256, (50, 24), dtype=np.uint8))
    src = RowSource(ds, torch.device("cpu"), 50)
    v = torch.from_numpy(rng.standard_normal((2, 24))) * 30.0
    for coef, n_acc in ((1e-9, 2), (1.0, 0)):
        info = {}
        p = gemm_partial(v, torch.full((2,), coef, dtype=torch.float64), src, 4, info=info)
        assert info["pieces"] == 3 and info["weighted_sums"] == n_acc
        assert bool(torch.isfinite(p.acc).all()) == (n_acc == 2)
    many = torch.from_numpy(rng.standard_normal((20, 24))) * 30.0
    for coef, pieces, n_acc in ((1e-6, 2, 20), (1e3, 3, 0)):
        info = {}
        p = gemm_partial(many, torch.full((20,), coef, dtype=torch.float64), src, 4, info=info)
        assert info["pieces"] == pieces and info["weighted_sums"] == n_acc
        assert bool(torch.isfinite(p.acc).all()) == (n_acc == 20)
    # 600 rows in tiles of 32: the top 3 come from the 3 tiles with the largest maxima
    big = RowSource(optden.Dataset.from_array(rng.integers(0, 256, (600, 24), dtype=np.uint8)), torch.device("cpu"), 600)
    c1 = torch.full((2,), 1e-3, dtype=torch.float64)
    few, every = gemm_partial(v, c1, big, 3), gemm_partial(v, c1, big, 600)
    assert torch.equal(few.top_val, every.top_val[:, :3])
    with pytest.raises(ValueError, match="uint8"):
        gemm_partial(v, torch.ones(2, dtype=torch.float64),
                     RowSource(optden.Dataset.from_array(rng.standard_normal((5, 24)).astype(np.float32)),
                               torch.device("cpu"), 5), 2)
