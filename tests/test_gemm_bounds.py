"""The GEMM pass's bound (``optden.engine.bounds (gemm_logits_delta, wsum_delta)``) against float64, without Triton.

The logits kernel's arithmetic is emulated exactly: the int8 x int8 dots are integers
(int64 here, int32 on the tensor cores: both exact), and the fp32 epilogue is replayed
operation by operation in fp32, once with separate roundings and once with the fused
multiply-adds a GPU compiler may form. Many random draws, adversarial ones included
(queries on a row, of huge and tiny norm, duplicated rows, rows of only 0 and 255,
sigma 1e-3..1e3): the error never exceeds the bound. The kernels themselves are checked
against the same bound in the interpreter (tests/triton_gemm_cases.py) and on GPUs
(tests/gpu/test_gpu_gemm_pass.py).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from optden.engine.backends.gpu_gemm_pass import split_query_int8
from optden.engine.bounds import gemm_logits_delta, wsum_delta

SCALE = 2.0 / 255.0  # uint8 images mapped to [-1, 1]


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).to(torch.float64)


def emulate_logits(x: torch.Tensor, qp, sc, csq, coef, fma: bool) -> torch.Tensor:
    """The logits kernel's result (N, B) as float64 values of its fp32 arithmetic."""
    r = x.to(torch.int64) - 128
    dot = None
    for q, s in zip(qp, sc):
        i_p = _f32((q.to(torch.int64) @ r.T).to(torch.float64))  # exact integer, then fl32
        s64 = s.to(torch.float64)[:, None]
        if dot is None:
            dot = _f32(i_p * s64)
        elif fma:  # fl(i_p * s + dot): the product is exact in float64 (24 x 24 bits)
            dot = _f32(i_p * s64 + dot)
        else:
            dot = _f32(dot + _f32(i_p * s64))
    csq32 = _f32(csq)[None, :]
    g = _f32(2.0 * dot - csq32)  # 2 dot is exact: with or without an FMA, one rounding
    return _f32(_f32(coef)[:, None] * g)


def _rows(kind: str, rng, M: int, d: int) -> torch.Tensor:
    if kind == "duplicated":
        base = rng.integers(0, 256, (max(1, M // 4), d), dtype=np.uint8)
        return torch.from_numpy(base[rng.integers(0, len(base), M)])
    if kind == "extreme":
        return torch.from_numpy((rng.integers(0, 2, (M, d)) * 255).astype(np.uint8))
    if kind == "constant":
        return torch.from_numpy(np.full((M, d), int(rng.integers(0, 256)), dtype=np.uint8))
    return torch.from_numpy(rng.integers(0, 256, (M, d), dtype=np.uint8))


def _queries(kind: str, rng, x: torch.Tensor, center: torch.Tensor, n: int) -> torch.Tensor:
    d = x.shape[1]
    near = x[rng.integers(0, len(x), n)].double() - center
    if kind == "on-row":
        return near
    if kind == "near":
        return near + torch.from_numpy(rng.standard_normal((n, d))) * 10.0 ** rng.uniform(-3, 2)
    if kind == "huge":
        return torch.from_numpy(rng.standard_normal((n, d))) * 10.0 ** rng.uniform(5, 12)
    if kind == "tiny":
        return torch.from_numpy(rng.standard_normal((n, d))) * 10.0 ** rng.uniform(-12, -3)
    if kind == "spike":  # all the norm in one coordinate: the pieces' worst case
        v = torch.zeros(n, d, dtype=torch.float64)
        v[:, int(rng.integers(0, d))] = 10.0 ** rng.uniform(0, 6)
        v[:, 0] += 1e-3
        return v
    raise ValueError(kind)


def test_split_query_int8_pieces():
    rng = np.random.default_rng(1)
    v = torch.from_numpy(rng.standard_normal((5, 300))) * 100.0
    v[1] = 0.0
    v[2, 7] = 1e6
    prev = None
    for p in (1, 2, 3):
        q, s, resid, absum, valid = split_query_int8(v, p)
        assert q.dtype == torch.int8 and q.shape == (p, 5, 300) and s.dtype == torch.float32
        assert int(q.abs().max()) <= 127 and bool(valid.all())
        approx = (q.double() * s.double()[:, :, None]).sum(0)
        torch.testing.assert_close(resid, (v - approx).norm(dim=1), rtol=1e-12, atol=0)
        assert float(resid[1]) == 0.0 and float(absum[1]) == 0.0
        # the guarantee: every coordinate of the residual is within half the last scale
        assert bool((resid <= s[-1].double() * 0.5 * 300**0.5).all())
        if prev is not None:  # and each piece gains about 7 bits on random queries
            assert bool((resid[[0, 3, 4]] < prev[[0, 3, 4]] / 32).all())
        prev = resid
    with pytest.raises(ValueError, match="pieces"):
        split_query_int8(v, 0)


def test_split_query_int8_flags_scales_outside_fp32_range():
    v = torch.tensor([[1e-40, 0.0], [1e40, 1.0], [3.0, -2.0]], dtype=torch.float64)
    *_, valid = split_query_int8(v, 3)
    assert valid.tolist() == [False, False, True]
    q, s, resid, absum, valid = split_query_int8(v, 2)
    delta = gemm_logits_delta(v, resid, absum, valid, torch.ones(3, dtype=torch.float64), pieces=2, x_norm=300.0,
                              q_norm=300.0, block_m_max=128, top=torch.zeros(3, dtype=torch.float64))
    assert math.isinf(float(delta[0])) and math.isinf(float(delta[1])) and math.isfinite(float(delta[2]))


@pytest.mark.parametrize("fma", [False, True])
def test_bound_holds_on_many_adversarial_draws(fma):
    """400 draws: the emulated kernel's logits are within delta of float64, and the bound is tight
    enough to matter (within a factor of 1e4 of the worst error seen)."""
    rng = np.random.default_rng(20261205 + fma)
    kinds_rows = ["random", "duplicated", "extreme", "constant"]
    kinds_q = ["on-row", "near", "huge", "tiny", "spike"]
    worst = 0.0
    tight = 0.0
    for draw in range(400):
        M, d, n = int(rng.integers(1, 60)), int(rng.integers(1, 400)), int(rng.integers(1, 6))
        x = _rows(kinds_rows[draw % 4], rng, M, d)
        raw = x.double()
        center = raw.mean(0).round()
        csq = ((raw - center) ** 2).sum(1)
        v = _queries(kinds_q[draw % 5], rng, x, center, n)
        sigma = 10.0 ** rng.uniform(-3, 3, n)
        coef = torch.from_numpy(SCALE**2 / (2.0 * sigma**2))
        pieces = 2 + draw % 2
        qp, sc, resid, absum, valid = split_query_int8(v, pieces)
        got = emulate_logits(x, qp, sc, csq, coef, fma)
        exact = coef[:, None] * (2.0 * v @ (raw - 128.0).T - csq[None, :])
        qn = float(csq.max().sqrt())
        xn = qn + float((center - 128.0).norm())
        delta = gemm_logits_delta(v, resid, absum, valid, coef, pieces=pieces, x_norm=xn, q_norm=qn,
                                  block_m_max=128, top=exact.abs().max(1).values)
        ok = valid & torch.isfinite(got).all(1)
        err = (got - exact).abs()[ok]
        assert (err <= delta[ok][:, None]).all(), (draw, float((err / delta[ok][:, None]).max()))
        if ok.any():
            ratio = err.max(1).values / delta[ok]
            worst = max(worst, float(ratio.max()))
            tight = max(tight, float(ratio[delta[ok] > 1e-6].max()) if bool((delta[ok] > 1e-6).any()) else 0.0)
    print(f"worst error / bound {worst:.3g}, largest ratio where the bound exceeds 1e-6: {tight:.3g}")
    assert worst <= 1.0
    assert tight > 1e-4  # the bound is not vacuous: some draws come within 1e4 of it


def test_wsum_delta_grows_with_the_accumulation():
    assert wsum_delta(16, 1) < wsum_delta(64, 1) < wsum_delta(64, 64)
    # exp (420 u = 5e-5), the bf16 residual of the weights (1.5e-5) and 320 accumulations (4e-5):
    # below the GEMM pass's ACC_DELTA_MAX, so a weighted sum can be DENSE at tol = 1e-3
    from optden.engine.backends.gpu_gemm_pass import ACC_DELTA_MAX

    assert 2.0**-16 < wsum_delta(64, 64) < 0.5 * ACC_DELTA_MAX
