"""GPU backends (torch, triton, cuda) against the float64 oracle, at real scale.

Run with ``pytest -m gpu`` on a machine with a CUDA device (skipped elsewhere). Oracles:
``optden.reference`` (numpy float64) for every row where it fits in host memory (real
images, and CIFAR size M = 50,000, d = 3072); at M >= 1e6 rows the oracle is
``optden.engine.precision.exact_pass``: float64 squared-distance gaps to each query's nearest
row, over every row on the GPU (independent of the expansion all coarse passes use). Every test is marked ``gpu``
(``pytestmark``) and skipped without CUDA; no CUDA call happens at import or collection.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import optden
from optden.engine import dispatch
from optden import reference as R
from optden.engine.precision import exact_logits, exact_pass
from tolerances import DENOISE_RTOL, LOG_DENSITY_RTOL, SIGMAS

pytestmark = pytest.mark.gpu

BACKENDS = ["torch", "triton", "cuda"]


@pytest.fixture(scope="module", autouse=True)
def _needs_cuda():
    """Skip without CUDA; checked when the tests start (autouse: before other module fixtures), never at collection."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (GPU test suite: pytest -m gpu)")


@pytest.fixture(autouse=True)
def _fixed_triton_config(monkeypatch):
    """One fixed Triton configuration (autotuning every shape would take minutes); the
    tests that check the autotuned kernel set OPTDEN_TRITON_AUTOTUNE=1 themselves."""
    monkeypatch.setenv("OPTDEN_TRITON_AUTOTUNE", "0")


def rel_err(out, ref) -> float:
    out = torch.as_tensor(out, dtype=torch.float64).cpu().reshape(len(ref), -1)
    ref = torch.as_tensor(ref, dtype=torch.float64).cpu().reshape(len(ref), -1)
    return float(((out - ref).norm(dim=1) / ref.norm(dim=1)).max())


def _denoiser(ds, backend, **kw):
    why = dispatch.reasons(backend, torch.device("cuda"), ds.dtype, ds.d)
    assert not why, f"backend {backend!r} cannot run on this GPU machine: {why}"
    return optden.OptimalDenoiser(ds, device="cuda", backend=backend, **kw)


def _clustered_u8(M: int, d: int, seed: int, centers: int = 1000) -> torch.Tensor:
    """(M, d) uint8 rows on the GPU: cluster centers plus small integer perturbations (near neighbours exist)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    base = torch.randint(0, 256, (centers, d), generator=g, device="cuda", dtype=torch.int16)
    lab = torch.randint(0, centers, (M,), generator=g, device="cuda")
    noise = torch.randint(-6, 7, (M, d), generator=g, device="cuda", dtype=torch.int16)
    return (base[lab] + noise).clamp_(0, 255).to(torch.uint8)


def _queries(y: np.ndarray, sigma: float, rng, n: int = 4) -> np.ndarray:
    i = rng.integers(0, len(y), n)
    near = y[i] + sigma * rng.standard_normal((n, y.shape[1]))
    mid = 0.5 * (y[i[:2]] + y[(i[:2] + 1) % len(y)])
    noise = max(sigma, 1.0) * rng.standard_normal((2, y.shape[1]))
    return np.concatenate([near, mid, noise])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("data", ["digits_u8", "faces_u8"])
def test_contract_real_images(backend, data, request, rng):
    ds = optden.Dataset.from_array(request.getfixturevalue(data))
    den = _denoiser(ds, backend)
    y = ds.model_rows(np.arange(ds.M)).numpy()
    for sigma in SIGMAS:
        x = _queries(y, sigma, rng)
        ev = den.denoise_certified(torch.from_numpy(x).cuda(), sigma)
        assert rel_err(ev.denoised, R.denoise(x, y, sigma)) <= DENOISE_RTOL, (backend, sigma)
        ld = den.log_density(torch.from_numpy(x).cuda(), sigma).cpu().numpy()
        ldr = R.log_density(x, y, sigma)
        assert np.max(np.abs(ld - ldr) / np.abs(ldr)) <= LOG_DENSITY_RTOL, (backend, sigma)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cifar_size_full_oracle(backend, rng):
    """M = 50,000 rows of d = 3072 (CIFAR-10 size), every row seen by the numpy oracle."""
    raw = _clustered_u8(50_000, 3072, seed=int(rng.integers(1 << 30)), centers=5000).cpu().numpy()
    ds = optden.Dataset.from_array(raw)
    den = _denoiser(ds, backend)
    y = ds.model_rows(np.arange(ds.M)).numpy()
    for sigma in (2e-3, 0.05, 1.0, 80.0):
        x = _queries(y, sigma, rng, n=2)
        out = den(torch.from_numpy(x).cuda(), sigma)
        assert rel_err(out, R.denoise(x, y, sigma)) <= DENOISE_RTOL, (backend, sigma)


@pytest.fixture(scope="module")
def million_rows():
    """1,000,003 rows of d = 768 uint8, clustered, resident on the GPU (768 MB)."""
    raw = _clustered_u8(1_000_003, 768, seed=1234, centers=20_000)
    return optden.Dataset.from_array(raw.cpu().numpy())


def _exact_denoise(den, x: torch.Tensor, sigma: float):
    """The float64 exact pass over every row on the GPU: (D* (N, d), lse (N,))."""
    ds = den.dataset
    src = den.source()
    v = (x.double() - ds.offset) / ds.scale - src.center
    coef = torch.full((x.shape[0],), ds.scale**2 / (2 * sigma**2), dtype=torch.float64, device=x.device)
    # exact_pass: a Partial of logits relative to each query's nearest row, its squared
    # distance, and the misweight bound
    outs = [(i, *exact_pass(v[i:i + 2], coef[i:i + 2], src, 1)) for i in range(0, x.shape[0], 2)]
    dc = torch.cat([part.mean() for _, part, _, _ in outs])
    lse = torch.cat([part.lse() - coef[i:i + 2] * ref_sq for i, part, ref_sq, _ in outs])
    return (dc + src.center) * ds.scale + ds.offset, lse


@pytest.mark.parametrize("backend", BACKENDS)
def test_million_rows_against_float64_direct_differences(backend, million_rows, rng):
    ds = million_rows
    den = _denoiser(ds, backend, block_rows=1 << 16)
    idx = torch.from_numpy(rng.integers(0, ds.M, 3))
    y = ds.model_rows(idx.numpy()).cuda()
    for sigma in (2e-3, 0.1, 10.0):
        x = torch.cat([y + sigma * torch.randn_like(y), torch.randn(1, ds.d, device="cuda", dtype=torch.float64)])
        ref, lse = _exact_denoise(den, x, sigma)
        ev = den.denoise_certified(x, sigma)
        assert rel_err(ev.denoised, ref) <= DENOISE_RTOL, (backend, sigma)
        assert float(((ev.lse - lse).abs() / lse.abs()).max()) <= LOG_DENSITY_RTOL, (backend, sigma)


def test_backends_agree_on_a_large_batch(million_rows, rng):
    """64 queries over 1e6 rows: triton and cuda agree with the float64 torch backend."""
    ds = million_rows
    x = ds.model_rows(rng.integers(0, ds.M, 64)).cuda()
    x = x + 0.05 * torch.randn_like(x)
    outs = {b: _denoiser(ds, b, block_rows=1 << 16)(x, 0.05) for b in BACKENDS}
    for b in ("triton", "cuda"):
        assert rel_err(outs[b], outs["torch"]) <= DENOISE_RTOL, b


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", ["uint8", "float16", "bfloat16", "float32"])
def test_delta_bounds_every_row_on_gpu(backend, dtype, rng):
    """With k = M the pass returns every coarse logit: each within delta of the exact one."""
    M, d = 3001, 3072
    g = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    if dtype == "uint8":
        raw = torch.randint(0, 256, (M, d), generator=g, dtype=torch.uint8)
    else:
        raw = (torch.randn(M, d, generator=g) * 2 + 0.5).to(getattr(torch, dtype))
    ds = optden.Dataset.from_array(raw)
    den = _denoiser(ds, backend, block_rows=1000)
    src = den.source()
    v = (ds.model_rows(np.arange(4)).cuda() + 0.01 * torch.randn(4, d, device="cuda", dtype=torch.float64))
    v = (v - ds.offset) / ds.scale - src.center
    rows = src.gather(torch.arange(M, device="cuda")).reshape(M, d)
    for sigma in (1e-3, 1e-1, 10.0, 1e3):
        coef = torch.full((4,), ds.scale**2 / (2 * sigma**2), dtype=torch.float64, device="cuda")
        p = den.backend.partial(v, coef, src, M)
        ex = torch.cat([exact_logits(v[i:i + 1], coef[i:i + 1], rows[None], src.center) for i in range(4)])
        assert ((p.top_val - ex.gather(1, p.top_idx)).abs() <= p.delta[:, None]).all(), sigma
        assert ((p.m + p.s.log() - ex.logsumexp(1)).abs() <= p.delta).all(), sigma


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_queries(backend, faces_u8, rng):
    ds = optden.Dataset.from_array(faces_u8)
    den = _denoiser(ds, backend)
    y = ds.model_rows(np.arange(ds.M)).numpy()
    x = _queries(y, 0.05, rng)
    wide = torch.zeros(x.shape[0], 2 * ds.d, dtype=torch.float64, device="cuda")
    wide[:, ::2] = torch.from_numpy(x).cuda()
    strided = wide[:, ::2]  # stride 2 along d
    assert not strided.is_contiguous()
    assert rel_err(den(strided, 0.05), R.denoise(x, y, 0.05)) <= DENOISE_RTOL
    tx = torch.from_numpy(np.ascontiguousarray(x.T)).cuda().T  # column-major
    assert rel_err(den(tx, 0.05), R.denoise(x, y, 0.05)) <= DENOISE_RTOL


def test_triton_kernel_with_strided_rows(rng, monkeypatch):
    """The (autotuned) kernel reads rows through their row stride (a view into a wider buffer)."""
    from optden.kernels import dense as K

    monkeypatch.setenv("OPTDEN_TRITON_AUTOTUNE", "1")

    B, d, N = 1000, 3000, 5
    wide = torch.randint(0, 256, (B, d + 72), dtype=torch.uint8, device="cuda")
    x = wide[:, 36:36 + d]
    assert not x.is_contiguous() and x.stride(1) == 1
    center = x.double().mean(0).round()
    csq = ((x.double() - center) ** 2).sum(1)
    v = torch.randn(N, d, dtype=torch.float64, device="cuda") * 40
    coef = torch.full((N,), 1e-4, dtype=torch.float64, device="cuda")
    hi, lo, _ = K.split_query_tf32(v)
    got = K.dense_partial(x, center.float(), csq.float(), hi, lo, coef.float(), 256, centered=True, tf32=True)
    want = K.dense_partial(x.contiguous(), center.float(), csq.float(), hi, lo, coef.float(), 256, centered=True, tf32=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_side_streams(backend, digits_u8, rng):
    """Results on a side stream (and two concurrent streams) equal the default stream's."""
    ds = optden.Dataset.from_array(digits_u8)
    den = _denoiser(ds, backend)
    y = ds.model_rows(np.arange(ds.M)).numpy()
    x = torch.from_numpy(_queries(y, 0.1, rng)).cuda()
    ref = den(x, 0.1)
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    with torch.cuda.stream(s1):
        a = den(x, 0.1)
    with torch.cuda.stream(s2):
        b = den(x.flip(0), 0.1)
    torch.cuda.synchronize()
    torch.testing.assert_close(a, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b.flip(0), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_pass_memory_is_bounded(backend, million_rows, rng):
    """Extra GPU memory of a pass stays within the chunk budgets (never N x M)."""
    from optden.engine.backends.gpu_pass import ACC_BYTES, LOGIT_BYTES

    ds = million_rows
    den = _denoiser(ds, backend, block_rows=1 << 16)
    src = den.source()
    n = 512
    x = ds.model_rows(rng.integers(0, ds.M, n)).cuda()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    v = (x - ds.offset) / ds.scale - src.center
    coef = torch.full((n,), ds.scale**2 / (2 * 0.1**2), dtype=torch.float64, device="cuda")
    den.backend.partial(v, coef, src, 64)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    full = n * ds.M * 4  # an N x M fp32 logit matrix
    assert extra <= LOGIT_BYTES + 3 * ACC_BYTES + 64 * n * ds.d, extra
    assert extra < full


@pytest.mark.parametrize("backend", BACKENDS)
def test_streamed_rows(backend, faces_u8, rng):
    """Rows streamed from host memory (resident=False) give the same certified result."""
    ds = optden.Dataset.from_array(faces_u8)
    den = _denoiser(ds, backend, resident=False, block_rows=333)
    y = ds.model_rows(np.arange(ds.M)).numpy()
    x = _queries(y, 0.02, rng)
    assert rel_err(den(torch.from_numpy(x).cuda(), 0.02), R.denoise(x, y, 0.02)) <= DENOISE_RTOL


def test_auto_prefers_a_gpu_backend(digits_u8):
    ds = optden.Dataset.from_array(digits_u8)
    den = optden.OptimalDenoiser(ds, device="cuda")
    assert den.backend.name in ("triton", "cuda"), den.backend.name
    assert math.isfinite(float(den(torch.zeros(1, ds.d, device="cuda"), 1.0).sum()))


@pytest.mark.parametrize("config", [None, "fixed"])
def test_triton_kernel_against_float64_ref_at_cifar_width(config, rng, monkeypatch):
    """Raw kernel outputs (poisoned first) vs the float64 reference, autotuned and fixed config."""
    from optden.kernels import dense as K
    from optden.engine.bounds import fp32_pass_delta

    monkeypatch.setenv("OPTDEN_TRITON_AUTOTUNE", "1")

    B, d, N, rps = 4099, 3072, 37, 1024
    x = torch.randint(0, 256, (B, d), dtype=torch.uint8, device="cuda")
    center = x.double().mean(0).round()
    csq = ((x.double() - center) ** 2).sum(1)
    v = x[:N].double() - center + 3.0 * torch.randn(N, d, dtype=torch.float64, device="cuda")
    coef = torch.logspace(-6, 1, N, dtype=torch.float64, device="cuda")
    hi, lo, resid = K.split_query_tf32(v)
    S = math.ceil(B / rps)
    out = tuple(torch.full(s, math.nan, device="cuda") for s in [(N, B), (S, N), (S, N), (S, N, d)])
    K.launch(x, center.float(), csq.float(), hi, lo, coef.float(), rps, out, centered=True, tf32=True,
             config=None if config is None else K.GPU_CONFIG)
    logits, m, s, acc = (t.double() for t in out)
    assert not any(torch.isnan(t).any() for t in (logits, m, s, acc))
    rl, rm, rs, racc = K.dense_partial_ref(x, center, csq, v, coef, rps, centered=True)
    qn = float(csq.max().sqrt())
    delta = fp32_pass_delta(v, resid, coef, d=d, pieces=2, x_norm=qn, q_norm=qn,
                            tiles_per_split=math.ceil(rps / K.BLOCK_M_MIN), block_m_max=K.BLOCK_M_MAX,
                            top=rl.abs().max(1).values)
    assert ((logits - rl).abs() <= delta[:, None]).all()
    assert ((m - rm).abs() <= delta[None, :]).all()
    assert ((s.log() - rs.log()).abs() <= 3 * delta[None, :]).all()
