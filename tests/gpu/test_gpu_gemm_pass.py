"""The GEMM pass (``optden.kernels.dense_gemm``) on a GPU against float64, at kernel level and at scale.

Run with ``pytest -m gpu`` (skipped without CUDA; no CUDA call at import or collection).
Kernel-level tests run every configuration of ``LOGITS_CONFIGS`` / ``WSUM_CONFIGS`` at
CIFAR width (d = 3072) with poisoned outputs and check every value against the float64
reference within the rigorous bound (test_gpu_backends.py's k = M test checks every row of
the pass, the default for uint8 rows); the scale tests ("cifar_size", "million" in their
names: the second half of bench/gpu_check.sh) run the ``triton`` backend with
OPTDEN_TRITON_PASS=gemm through the denoiser and compare D* and log p with float64
direct differences over every row. The fused pass stays tested by test_gpu_backends.py
with OPTDEN_TRITON_PASS=fused here.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import optden
from optden import reference as R
from test_gpu_backends import _clustered_u8, _denoiser, _exact_denoise, _queries, rel_err
from tolerances import DENOISE_RTOL, LOG_DENSITY_RTOL

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (GPU test suite: pytest -m gpu)")


@pytest.fixture
def gemm(monkeypatch):
    monkeypatch.setenv("OPTDEN_TRITON_PASS", "gemm")


def _cifar_width_case(rng, B=4099, d=3072, N=37):
    g = torch.Generator(device="cuda").manual_seed(int(rng.integers(1 << 30)))
    x = torch.randint(0, 256, (B, d), generator=g, dtype=torch.uint8, device="cuda")
    center = x.double().mean(0).round()
    csq = ((x.double() - center) ** 2).sum(1)
    v = x[:N].double() - center + 3.0 * torch.randn(N, d, generator=g, dtype=torch.float64, device="cuda")
    v[-1] *= 1e4  # one query of large norm
    coef = torch.logspace(-9, 1, N, dtype=torch.float64, device="cuda")
    return x, center, csq, v, coef


#: The configurations of LOGITS_CONFIGS (named here: collection imports no Triton).
LOGITS_NAMES = ["n16", "n32", "n64", "n128"]


@pytest.mark.parametrize("pieces", [2, 3])
@pytest.mark.parametrize("config", LOGITS_NAMES)
def test_gemm_logits_kernel_every_config_vs_float64(config, pieces, rng):
    """Logits and row-tile statistics of each configuration (poisoned first) within the bound."""
    from optden.engine.backends.gpu_gemm_pass import split_query_int8
    from optden.engine.bounds import gemm_logits_delta
    from optden.kernels import dense_gemm as K

    assert sorted(K.LOGITS_CONFIGS) == sorted(LOGITS_NAMES)
    if pieces > K.LOGITS_CONFIGS[config][5]:
        pytest.skip(f"{config} holds at most {K.LOGITS_CONFIGS[config][5]} pieces")
    x, center, csq, v, coef = _cifar_width_case(rng)
    B, N = x.shape[0], v.shape[0]
    qp, sc, resid, absum, valid = split_query_int8(v, pieces)
    bm, T = K.logits_tiles(B, N, pieces, True, config)
    out = (torch.full((N, B), math.nan, device="cuda"), torch.full((T, N), math.nan, device="cuda"),
           torch.full((T, N), math.nan, device="cuda"))
    K.launch_logits(x, qp, sc, csq.float(), coef.float(), out, config=config)
    logits, tmax, tsum = (t.double() for t in out)
    assert not any(torch.isnan(t).any() for t in (logits, tmax, tsum))
    rl, rm, rs = K.gemm_logits_ref(x, center, csq, v, coef, bm)
    qn = float(csq.max().sqrt())
    delta = gemm_logits_delta(v, resid, absum, valid, coef, pieces=pieces, x_norm=qn + float((center - 128).norm()),
                              q_norm=qn, block_m_max=bm, top=rl.abs().max(1).values)
    assert ((logits - rl).abs() <= delta[:, None]).all()
    assert ((tmax - rm).abs() <= delta[None, :]).all()
    assert ((tsum.log() - rs.log()).abs() <= 3 * delta[None, :]).all()


@pytest.mark.parametrize("pieces", [2, 3])
def test_gemm_split_kernel_matches_the_reference_split(pieces, rng):
    """The query pieces of one launch equal ``split_query_int8``'s bit for bit at ImageNet-64 width."""
    from optden.engine.backends.gpu_gemm_pass import split_query_int8
    from optden.kernels import dense_gemm as K

    v = torch.randn(70, 12288, dtype=torch.float64, device="cuda") * 90.0
    v[0] = 0.0
    v[1, 3] = 1e7
    c128 = 128.0 - torch.randint(0, 256, (12288,), device="cuda").double()
    qp, sc, st = K.gemm_split(v, c128, pieces)
    q, s, resid, absum, valid = split_query_int8(v, pieces)
    assert torch.equal(qp, q) and torch.equal(sc, s) and bool(((st[:, 4] > 0) == valid).all())
    torch.testing.assert_close(st[:, 2], resid, rtol=1e-12, atol=1e-300)
    torch.testing.assert_close(st[:, 3], absum, rtol=1e-12, atol=1e-300)
    torch.testing.assert_close(st[:, 1], v @ c128, rtol=1e-10, atol=1e-6)


@pytest.mark.parametrize("config", ["n16", "n64"])
def test_gemm_wsum_kernel_every_config_vs_float64(config, rng):
    """Per-split weighted sums (bf16 tensor cores; poisoned first) within ``wsum_delta``."""
    from optden.engine.bounds import wsum_delta
    from optden.kernels import dense_gemm as K

    assert sorted(K.WSUM_CONFIGS) == ["n16", "n64"]
    B, d, N, rps = 4099, 3072, 37, 1024
    g = torch.Generator(device="cuda").manual_seed(int(rng.integers(1 << 30)))
    x = torch.randint(0, 256, (B, d), generator=g, dtype=torch.uint8, device="cuda")
    logits = -40.0 * torch.rand(N, B, generator=g, device="cuda")
    mref = logits.max(1).values
    S = math.ceil(B / rps)
    out = (torch.full((S, N, d), math.nan, device="cuda"), torch.full((S, N), math.nan, device="cuda"))
    K.launch_wsum(x, logits, mref, rps, out, config=config)
    acc, s = (t.double() for t in out)
    assert not torch.isnan(acc).any() and not torch.isnan(s).any()
    ra, rs = K.gemm_wsum_ref(x, logits.double(), mref.double(), rps)
    bk = K.WSUM_CONFIGS[config][1]
    dw = wsum_delta(bk, math.ceil(rps / bk))
    p_abs = torch.stack([torch.exp(logits.double()[:, a:a + rps] - mref.double()[:, None]) @ x.double()[a:a + rps]
                         for a in range(0, B, rps)])
    assert ((acc - ra).abs() <= math.expm1(dw) * p_abs + 1e-30).all()
    assert ((s - rs).abs() <= math.expm1(dw) * rs + 1e-30).all()


@pytest.mark.parametrize("pass_name", ["gemm", "fused"])
def test_both_passes_meet_the_contract_on_real_images(pass_name, digits_u8, faces_u8, rng, monkeypatch):
    monkeypatch.setenv("OPTDEN_TRITON_PASS", pass_name)
    for data in (digits_u8, faces_u8):
        ds = optden.Dataset.from_array(data)
        den = _denoiser(ds, "triton")
        y = ds.model_rows(np.arange(ds.M)).numpy()
        for sigma in (1e-3, 1e-2, 0.1, 1.0, 10.0, 1e3):
            x = _queries(y, sigma, rng)
            ev = den.denoise_certified(torch.from_numpy(x).cuda(), sigma)
            assert rel_err(ev.denoised, R.denoise(x, y, sigma)) <= DENOISE_RTOL, (pass_name, sigma)
            ldr = R.log_density(x, y, sigma)
            ld = den.log_density(torch.from_numpy(x).cuda(), sigma).cpu().numpy()
            assert np.max(np.abs(ld - ldr) / np.abs(ldr)) <= LOG_DENSITY_RTOL, (pass_name, sigma)


def test_gemm_pass_cifar_size_batches(gemm, rng):
    """M = 50,000 x 3072 (CIFAR size): batches of 1, 64 and 512 queries through the denoiser,
    8 of each checked against float64 direct differences over every row; sigma 2e-3..80."""
    raw = _clustered_u8(50_000, 3072, seed=int(rng.integers(1 << 30)), centers=5000).cpu().numpy()
    ds = optden.Dataset.from_array(raw)
    den = _denoiser(ds, "triton")
    for n, sigma in ((1, 2e-3), (64, 0.05), (64, 1.0), (512, 0.5), (8, 80.0)):
        idx = torch.from_numpy(rng.integers(0, ds.M, n))
        y = ds.model_rows(idx.numpy()).cuda()
        x = y + sigma * torch.randn_like(y)
        ev = den.denoise_certified(x, sigma)
        ref, lse = _exact_denoise(den, x[:8], sigma)
        assert rel_err(ev.denoised[:8], ref) <= DENOISE_RTOL, (n, sigma)
        assert float(((ev.lse[:8] - lse).abs() / lse.abs()).max()) <= LOG_DENSITY_RTOL, (n, sigma)


def test_gemm_pass_million_rows(gemm, rng):
    """1,000,003 rows of d = 768 (several chunks at N = 512): D* and log p against float64 direct differences."""
    raw = _clustered_u8(1_000_003, 768, seed=int(rng.integers(1 << 30)), centers=20_000)
    ds = optden.Dataset.from_array(raw.cpu().numpy())
    den = _denoiser(ds, "triton", block_rows=1 << 16)
    for n, sigma in ((3, 2e-3), (512, 0.1), (3, 10.0)):
        idx = torch.from_numpy(rng.integers(0, ds.M, n))
        y = ds.model_rows(idx.numpy()).cuda()
        x = torch.cat([y + sigma * torch.randn_like(y), torch.randn(1, ds.d, device="cuda", dtype=torch.float64)])
        ev = den.denoise_certified(x, sigma)
        sub = torch.cat([x[:3], x[-1:]])
        ref, lse = _exact_denoise(den, sub, sigma)
        got = torch.cat([ev.denoised[:3], ev.denoised[-1:]])
        got_lse = torch.cat([ev.lse[:3], ev.lse[-1:]])
        assert rel_err(got, ref) <= DENOISE_RTOL, (n, sigma)
        assert float(((got_lse - lse).abs() / lse.abs()).max()) <= LOG_DENSITY_RTOL, (n, sigma)
