"""OptimalDenoiser (default backend) against the float64 oracle, limits, API and errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import optden
from optden import reference as R
from tolerances import DENOISE_RTOL, FLOAT64_RTOL, LOG_DENSITY_RTOL, SIGMAS, model_rows, rel_err


def queries(y: np.ndarray, sigma: float, rng, n: int = 6) -> dict:
    """The contract's three kinds of query: y_i + sigma n, between two close rows, pure noise."""
    i = rng.integers(0, len(y), n)
    near = y[i] + sigma * rng.standard_normal((n, y.shape[1]))
    # the closest distinct pair among a random subset, queried at its midpoint
    sub = rng.choice(len(y), size=min(len(y), 200), replace=False)
    d2 = ((y[sub, None, :] - y[None, sub, :]) ** 2).sum(-1)
    d2[d2 == 0] = np.inf
    a, b = np.unravel_index(np.argmin(d2), d2.shape)
    mid = 0.5 * (y[sub[a]] + y[sub[b]]) + 1e-4 * rng.standard_normal((n, y.shape[1]))
    noise = max(sigma, 1.0) * rng.standard_normal((n, y.shape[1]))
    return {"near": near, "between": mid, "noise": noise}


@pytest.mark.parametrize("data", ["digits_u8", "faces_u8"])
@pytest.mark.parametrize("sigma", SIGMAS)
def test_contract_real_images(data, sigma, request, rng):
    ds = optden.Dataset.from_array(request.getfixturevalue(data))
    den = optden.OptimalDenoiser(ds, backend="torch", block_rows=257)  # 257 divides no M here
    y = model_rows(ds)
    for kind, x in queries(y, sigma, rng).items():
        ev = den.denoise_certified(torch.from_numpy(x), sigma)
        assert not torch.isnan(ev.denoised).any()
        assert rel_err(ev.denoised, R.denoise(x, y, sigma)) <= DENOISE_RTOL, kind
        ld = den.log_density(torch.from_numpy(x), sigma).numpy()
        ldr = R.log_density(x, y, sigma)
        assert np.max(np.abs(ld - ldr) / np.abs(ldr)) <= LOG_DENSITY_RTOL, kind


def test_naive_float32_expansion_fails_where_contract_holds(faces_u8):
    """What most public code does (fp32 expansion) is far off at small sigma; optden is not.

    The query sits between the two closest textured patches (flat black patches would make
    every method exact), the hard case of docs/design.md, "The precision contract".
    """
    ds = optden.Dataset.from_array(faces_u8)
    y = model_rows(ds)
    sigma = 1e-3
    textured = np.flatnonzero(y.std(axis=1) > 0.15)
    d2 = ((y[textured, None, :] - y[None, textured, :]) ** 2).sum(-1)
    d2[d2 == 0] = np.inf
    a, b = np.unravel_index(np.argmin(d2), d2.shape)
    mid = 0.5 * (y[textured[a]] + y[textured[b]])
    # a fixed hard case: some random offsets push every query to one row, where fp32 is exact too
    x = mid + 1e-4 * np.random.default_rng(0).standard_normal((8, y.shape[1]))
    ref = R.denoise(x, y, sigma)
    xt, yt = torch.from_numpy(x).float(), torch.from_numpy(y).float()
    lg = -((xt * xt).sum(1, keepdim=True) - 2 * xt @ yt.T + (yt * yt).sum(1)) / (2 * sigma**2)
    naive = torch.softmax(lg, dim=1) @ yt
    assert rel_err(naive.double(), ref) > 100 * DENOISE_RTOL
    den = optden.OptimalDenoiser(ds, backend="torch")
    assert rel_err(den(torch.from_numpy(x), sigma), ref) <= DENOISE_RTOL


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_float_data(dtype, rng):
    y = rng.standard_normal((97, 37)).astype(np.float32)
    t = torch.from_numpy(y).to(getattr(torch, dtype))
    ds = optden.Dataset.from_array(t)
    den = optden.OptimalDenoiser(ds, backend="torch", block_rows=10)
    yref = t.double().numpy()
    for sigma in (1e-3, 0.1, 1.0, 100.0):
        for x in queries(yref, sigma, rng, n=4).values():
            assert rel_err(den(torch.from_numpy(x), sigma), R.denoise(x, yref, sigma)) <= DENOISE_RTOL


def test_limits(rng):
    q = rng.integers(0, 256, size=(50, 3, 5, 7), dtype=np.uint8)  # d = 105, not a power of two
    ds = optden.Dataset.from_array(q)
    den = optden.OptimalDenoiser(ds, block_rows=7)
    y = model_rows(ds)
    x = torch.from_numpy(rng.standard_normal((4, 3, 5, 7)))
    # sigma -> infinity: the data mean
    out = den(x, 1e7).reshape(4, -1).numpy()
    assert np.abs(out - y.mean(0)).max() < 1e-8
    # sigma -> 0: the nearest training row
    _, nn = R.nearest(x.reshape(4, -1).numpy(), y, 1)
    out = den(x, 1e-4).reshape(4, -1).numpy()
    np.testing.assert_allclose(out, y[nn[:, 0]], rtol=0, atol=1e-12)


def test_duplicated_rows_split_weight(rng):
    q = rng.integers(0, 256, size=(20, 16), dtype=np.uint8)
    q[7] = q[3]
    ds = optden.Dataset.from_array(q)
    den = optden.OptimalDenoiser(ds)
    x = torch.from_numpy(ds.model_rows(np.array([3])).numpy() + 1e-3 * rng.standard_normal((1, 16)))
    w, idx = den.posterior(x, 0.01, k=2)
    assert sorted(idx[0].tolist()) == [3, 7]
    np.testing.assert_allclose(w[0].numpy(), [0.5, 0.5], rtol=1e-12)


def test_permutation_invariance(rng):
    q = rng.integers(0, 256, size=(64, 30), dtype=np.uint8)
    perm = rng.permutation(64)
    a = optden.OptimalDenoiser(optden.Dataset.from_array(q), block_rows=9)
    b = optden.OptimalDenoiser(optden.Dataset.from_array(q[perm]), block_rows=13)
    x = torch.from_numpy(rng.standard_normal((5, 30)))
    for sigma in (1e-3, 0.3, 30.0):
        assert rel_err(a(x, sigma), b(x, sigma).numpy()) <= FLOAT64_RTOL


@pytest.mark.parametrize("m,n", [(1, 1), (1, 3), (5, 1), (3, 7)])
def test_tiny_shapes(m, n, rng):
    q = rng.integers(0, 256, size=(m, 11), dtype=np.uint8)
    ds = optden.Dataset.from_array(q)
    den = optden.OptimalDenoiser(ds, block_rows=2)
    y = model_rows(ds)
    x = rng.standard_normal((n, 11))
    for sigma in SIGMAS:
        assert rel_err(den(torch.from_numpy(x), sigma), R.denoise(x, y, sigma)) <= DENOISE_RTOL
    w, i = den.posterior(torch.from_numpy(x), 0.5, k=m)
    wr, _ = R.posterior(x, y, 0.5, m)
    np.testing.assert_allclose(w.numpy(), wr, rtol=1e-9, atol=1e-300)


def test_per_sample_sigma_scaling_and_shapes(rng):
    q = rng.integers(0, 256, size=(40, 2, 3, 3), dtype=np.uint8)
    ds = optden.Dataset.from_array(q)
    den = optden.OptimalDenoiser(ds)
    y = model_rows(ds)
    x = torch.from_numpy(rng.standard_normal((3, 2, 3, 3)))
    sig = torch.tensor([1e-3, 0.5, 50.0])
    out = den(x, sig)
    assert out.shape == x.shape and out.dtype == torch.float64
    xf = x.reshape(3, -1).numpy()
    ref = np.stack([R.denoise(xf[j : j + 1], y, float(sig[j]))[0] for j in range(3)])
    assert rel_err(out, ref) <= DENOISE_RTOL
    # EDM scaling: D(x; sigma, s) = D*(x / s; sigma)
    s = torch.tensor([0.5, 0.9, 0.1])
    scaled = den(x, sig, s=s)
    assert rel_err(scaled, den(x / s[:, None, None, None], sig).numpy()) <= FLOAT64_RTOL
    # float32 in, float32 out
    assert den(x.float(), 0.3).dtype == torch.float32
    # score and log density
    sc = den.score(x, 0.7).reshape(3, -1).numpy()
    assert rel_err(sc, R.score(xf, y, 0.7)) <= DENOISE_RTOL


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_call_is_evaluate_denoised(backend, faces_u8, rng):
    """``den(x, sigma)`` and ``score`` skip evaluate's top weights, log densities and modes
    where the one-top-row pass certifies every query; their numbers are evaluate's, bit for
    bit, at every sigma of the contract, including the small sigmas where some queries
    repeat the pass with the full top K, and on the class-conditional path."""
    if not optden.info()["backends"][backend]["available"]:
        pytest.skip(f"backend {backend} not available")
    ds = optden.Dataset.from_array(faces_u8, labels=np.arange(len(faces_u8)) % 3)
    den = optden.OptimalDenoiser(ds, backend=backend)
    y = model_rows(ds)
    for sigma in SIGMAS:
        x = np.concatenate([y[rng.integers(0, ds.M, 3)] + sigma * rng.standard_normal((3, ds.d)),
                            max(sigma, 1.0) * rng.standard_normal((2, ds.d))])
        xt = torch.from_numpy(x)
        sig = torch.full((5,), sigma, dtype=torch.float64)
        ref = den.evaluate(xt, sig, need_top=False).denoised
        assert torch.equal(den(xt, sigma), ref), sigma
        assert torch.equal(den.score(xt, sigma), (ref - xt) / sig[:, None] ** 2), sigma
        assert rel_err(ref, R.denoise(x, y, sigma)) <= DENOISE_RTOL, sigma
        lab = torch.tensor([0, 1, 2, 1, 0])
        assert torch.equal(den(xt, sigma, labels=lab), den.evaluate(xt, sig, lab, need_top=False).denoised)
    with pytest.raises(optden.InputError, match="sigma"):
        den(torch.from_numpy(y[:2]), 1e-160)


def test_class_conditional(digits_u8, rng):
    from sklearn.datasets import load_digits

    labels = load_digits().target
    ds = optden.Dataset.from_array(digits_u8, labels=labels)
    den = optden.OptimalDenoiser(ds, block_rows=100)
    y = model_rows(ds)
    lab = np.array([0, 3, 3, 9])
    x = y[rng.integers(0, len(y), 4)] + 0.3 * rng.standard_normal((4, 64))
    out = den(torch.from_numpy(x), 0.3, labels=torch.from_numpy(lab)).numpy()
    for j, c in enumerate(lab):
        ref = R.denoise(x[j : j + 1], y[labels == c], 0.3)
        assert rel_err(out[j : j + 1], ref) <= DENOISE_RTOL
    w, idx = den.posterior(torch.from_numpy(x), 0.3, k=3, labels=torch.from_numpy(lab))
    assert all(labels[i] == c for row, c in zip(idx.numpy(), lab) for i in row)
    ld = den.log_density(torch.from_numpy(x[:1]), 0.3, labels=0).numpy()
    assert abs(ld[0] - R.log_density(x[:1], y[labels == 0], 0.3)[0]) <= LOG_DENSITY_RTOL * abs(ld[0])


def test_posterior_and_nearest(digits_u8, rng):
    ds = optden.Dataset.from_array(digits_u8)
    den = optden.OptimalDenoiser(ds, block_rows=333)
    y = model_rows(ds)
    x = y[rng.integers(0, len(y), 5)] + 0.05 * rng.standard_normal((5, 64))
    for sigma in (0.05, 0.5, 5.0):
        w, idx = den.posterior(torch.from_numpy(x), sigma, k=8)
        wr, _ = R.posterior(x, y, sigma, 8)
        np.testing.assert_allclose(w.numpy(), wr, rtol=1e-6, atol=1e-12)
        # the returned weights are the weights of the returned rows
        wall = R.weights(x, y, sigma)
        np.testing.assert_allclose(w.numpy(), np.take_along_axis(wall, idx.numpy(), 1), rtol=1e-6, atol=1e-12)
    dist, idx = den.nearest(torch.from_numpy(x), k=3)
    dr, ir = R.nearest(x, y, 3)
    np.testing.assert_allclose(dist.numpy(), dr, rtol=1e-10)
    np.testing.assert_array_equal(idx.numpy()[:, 0], ir[:, 0])


def test_numpy_input_and_info():
    ds = optden.Dataset.from_array(np.arange(48, dtype=np.uint8).reshape(3, 16))
    den = optden.OptimalDenoiser(ds)
    out = den(np.zeros((2, 16)), 1.0)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 16)
    inf = optden.info()
    assert inf["backends"]["torch"]["available"]
    assert "reasons" in inf["backends"]["torch"]


class TestErrors:
    @pytest.fixture
    def den(self):
        q = np.random.default_rng().integers(0, 256, (10, 12), dtype=np.uint8)
        return optden.OptimalDenoiser(optden.Dataset.from_array(q, labels=np.arange(10) % 3))

    def test_bad_queries(self, den):
        with pytest.raises(optden.InputError, match="x: .*NaN"):
            den(torch.full((2, 12), float("nan")), 1.0)
        with pytest.raises(optden.InputError, match="x: .*inf"):
            den(torch.full((2, 12), float("inf")), 1.0)
        with pytest.raises(optden.InputError, match="x: each query must have 12"):
            den(torch.zeros(2, 13), 1.0)
        with pytest.raises(optden.InputError, match="x: expected a non-empty batch"):
            den(torch.zeros(0, 12), 1.0)
        with pytest.raises(optden.DtypeError, match="x: complex"):
            den(torch.zeros(2, 12, dtype=torch.complex64), 1.0)
        with pytest.raises(optden.DtypeError, match="x: expected a numeric array"):
            den(np.array([[object()] * 12]), 1.0)

    def test_bad_sigma(self, den):
        x = torch.zeros(2, 12)
        for bad in (0.0, -1.0):
            with pytest.raises(optden.InputError, match="sigma: must be > 0"):
                den(x, bad)
        # scalars (checked in Python) and tensors (checked by torch) alike; +inf is a noise
        # level (pure noise: the mean, tests/test_integrations.py), -inf and NaN are not
        for bad in (float("nan"), -float("inf"), torch.tensor([1.0, float("nan")]),
                    np.array([-float("inf"), 1.0])):
            with pytest.raises(optden.InputError, match="sigma: contains NaN or inf"):
                den(x, bad)
        with pytest.raises(optden.InputError, match="sigma: must be > 0"):
            den(x, torch.tensor([1.0, -2.0]))
        # queries: numpy checks CPU float32 / float64, torch the rest (bf16, autograd)
        bf16_inf = torch.zeros(2, 12, dtype=torch.bfloat16).index_fill(1, torch.tensor([11]), float("inf"))
        grad_inf = torch.zeros(2, 12, dtype=torch.float64, requires_grad=True) + torch.tensor(float("-inf"))
        for xb in (torch.full((2, 12), float("nan")), bf16_inf, grad_inf):
            with pytest.raises(optden.InputError, match="x: contains NaN or inf"):
                den(xb, 1.0)
        with pytest.raises(optden.DtypeError, match="sigma"):
            den(x, "1.0")
        with pytest.raises(optden.DtypeError, match="sigma"):
            den(x, None)
        with pytest.raises(optden.InputError, match=r"sigma: expected a scalar or one value per query \(shape \(2,\)\)"):
            den(x, torch.ones(3))
        with pytest.raises(optden.InputError, match="s: must be > 0"):
            den(x, 1.0, s=0.0)
        for extreme in (1e-200, 1e200):  # 1 / (2 sigma^2) overflows or underflows float64
            with pytest.raises(optden.InputError, match="sigma: .* outside the range"):
                den(x, extreme)
            with pytest.raises(optden.InputError, match="sigma: .* outside the range"):
                den.log_density(x, extreme)

    def test_bad_k_and_labels(self, den):
        x = torch.zeros(2, 12)
        with pytest.raises(optden.InputError, match=r"k: expected an integer in 1..10"):
            den.posterior(x, 1.0, k=11)
        with pytest.raises(optden.InputError, match="k: "):
            den.posterior(x, 1.0, k=0)
        with pytest.raises(optden.DtypeError, match="k: expected an integer"):
            den.posterior(x, 1.0, k=2.5)
        with pytest.raises(optden.InputError, match=r"labels: expected labels in 0..2"):
            den(x, 1.0, labels=torch.tensor([0, 3]))
        with pytest.raises(optden.InputError, match="labels: expected a scalar or one label per query"):
            den(x, 1.0, labels=torch.tensor([0, 1, 2]))
        plain = optden.OptimalDenoiser(optden.Dataset.from_array(np.zeros((3, 12), np.uint8)))
        with pytest.raises(optden.InputError, match="labels: this dataset has no labels"):
            plain(x, 1.0, labels=0)

    def test_bad_construction(self):
        ds = optden.Dataset.from_array(np.zeros((3, 12), np.uint8))
        with pytest.raises(optden.InputError, match="backend: unknown backend 'nope'"):
            optden.OptimalDenoiser(ds, backend="nope")
        with pytest.raises(optden.InputError, match="tol"):
            optden.OptimalDenoiser(ds, tol=0.0)
        with pytest.raises(optden.DtypeError, match="dataset"):
            optden.OptimalDenoiser(np.zeros((3, 12)))
