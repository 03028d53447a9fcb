"""A differentiable D* (issue 20): torch.autograd, torch.autograd.functional and torch.func
through the custom Functions of ``optden.autograd``, against the float64 oracle's exact
derivatives and its finite differences; a plain call takes the old path."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import optden
from optden import autograd as AG
from optden import reference as R
from tolerances import JACOBIAN_RTOL, model_rows, scaled_norm

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit")  # torch.func imports TorchScript (deprecated)


@pytest.fixture(scope="module")
def setup(digits_u8):
    ds = optden.Dataset.from_array(digits_u8.reshape(-1, 1, 8, 8))
    return ds, optden.OptimalDenoiser(ds), model_rows(ds)


def rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def fd_jvp(y, x, v, sigma, h):
    """Central finite difference of the float64 oracle D* along v: (D(x + h v) - D(x - h v)) / 2h."""
    return (R.denoise(x + h * v, y, sigma) - R.denoise(x - h * v, y, sigma)) / (2 * h)


@pytest.mark.parametrize("sigma", [0.1, 0.5, 2.0, 20.0])
def test_vjp_and_dsigma_against_oracle_and_finite_differences(setup, sigma, rng):
    ds, den, y = setup
    x0 = y[rng.integers(0, ds.M, 3)] + sigma * rng.standard_normal((3, ds.d))
    x = torch.from_numpy(x0).reshape(3, 1, 8, 8).requires_grad_(True)
    sig = torch.tensor(sigma, dtype=torch.float64, requires_grad=True)
    out = den(x, sig)
    assert out.shape == x.shape and out.dtype == x.dtype
    g = rng.standard_normal((3, ds.d))
    gx, gs = torch.autograd.grad(out, (x, sig), torch.from_numpy(g).reshape(x.shape))
    J = R.denoiser_jacobian(x0, y, sigma)
    ref = np.einsum("nij,nj->ni", J, g)  # J symmetric: J^T g = J g
    assert rel(gx.reshape(3, -1), ref) <= JACOBIAN_RTOL
    assert rel(gs, (R.denoiser_dsigma(x0, y, sigma) * g).sum()) <= JACOBIAN_RTOL
    # finite differences of the oracle (step small against sigma; their own error ~ h^2), where
    # the derivatives are large enough for them to resolve (a concentrated posterior: ~1e-80)
    h = 1e-4 * sigma
    if np.linalg.norm(ref) > 1e-6 * np.linalg.norm(g):
        fd = np.stack([fd_jvp(y, x0[i:i + 1], g[i:i + 1], sigma, h)[0] for i in range(3)])
        assert rel(gx.reshape(3, -1), fd) <= 1e-4
        fd_s = (R.denoise(x0, y, sigma + h) - R.denoise(x0, y, sigma - h)) / (2 * h)
        assert rel(gs, (fd_s * g).sum()) <= 1e-4


@pytest.mark.parametrize("data", ["digits_u8", "faces_u8"])
def test_vjp_contract_across_sigmas(data, request, rng):
    """The backward of D* on real images (digits, photo patches) over the contract's sigma
    range, on the queries the precision tests use (near rows, between two rows, noise, far):
    J g and g . dD*/dsigma within JACOBIAN_RTOL of the oracle, relative to ||J|| ||g||, wherever
    float64 holds the covariance (it underflows to 0 on a posterior on one row)."""
    from test_precision import queries
    from tolerances import SIGMAS

    ds = optden.Dataset.from_array(request.getfixturevalue(data))
    den = optden.OptimalDenoiser(ds)
    y = model_rows(ds)
    for sigma in SIGMAS[::2]:
        x0 = queries(y, sigma, rng, n=1)
        x = torch.from_numpy(x0).requires_grad_(True)
        sig = torch.full((len(x0),), sigma, dtype=torch.float64, requires_grad=True)
        g = rng.standard_normal(x0.shape)
        gx, gs = torch.autograd.grad(den(x, sig), (x, sig), torch.from_numpy(g))
        C = R.posterior_cov(x0, y, sigma)
        norm = np.linalg.norm(C, ord=2, axis=(1, 2)) / sigma**2  # ||J||_2
        err = scaled_norm(gx.numpy() - np.einsum("nij,nj->ni", C, g) / sigma**2)
        gn = scaled_norm(g)
        big = norm > 1e-250 / sigma**2
        assert (err[big] <= JACOBIAN_RTOL * norm[big] * gn[big]).all(), (sigma, err / (norm * gn))
        assert (err[~big] <= 1e-250 / sigma**2 * gn[~big]).all(), sigma  # below the underflow: absolute
        # d/dsigma, normwise: |g . (dD*/dsigma)' - g . dD*/dsigma| against ||dD*/dsigma|| ||g||
        ds_ref = R.denoiser_dsigma(x0, y, sigma)
        err_s = np.abs(gs.numpy() - (ds_ref * g).sum(1))
        dn = scaled_norm(ds_ref)
        assert (err_s[big] <= JACOBIAN_RTOL * dn[big] * gn[big]).all(), (sigma, err_s / (dn * gn))


def test_functional_jacobian_and_jvp(setup, rng):
    ds, den, y = setup
    sigma = 0.7
    x0 = y[rng.integers(0, ds.M, 1)] + sigma * rng.standard_normal((1, ds.d))
    x = torch.from_numpy(x0)
    J = R.denoiser_jacobian(x0, y, sigma)[0]
    jac = torch.autograd.functional.jacobian(lambda t: den(t, sigma), x)
    assert rel(jac.reshape(ds.d, ds.d), J) <= JACOBIAN_RTOL
    assert rel(jac.reshape(ds.d, ds.d), jac.reshape(ds.d, ds.d).T) <= 1e-12  # symmetric
    v = torch.from_numpy(rng.standard_normal((1, ds.d)))
    _, jv = torch.autograd.functional.jvp(lambda t: den(t, sigma), x, v)
    assert rel(jv[0], J @ v[0].numpy()) <= JACOBIAN_RTOL
    _, vj = torch.autograd.functional.vjp(lambda t: den(t, sigma), x, v)
    assert rel(vj[0], J @ v[0].numpy()) <= JACOBIAN_RTOL
    # forward mode
    from torch.autograd import forward_ad as fwAD
    with fwAD.dual_level():
        out = den(fwAD.make_dual(x, v), sigma)
        assert rel(fwAD.unpack_dual(out).tangent[0], J @ v[0].numpy()) <= JACOBIAN_RTOL


def test_torch_func_transforms(setup, rng):
    ds, den, y = setup
    sigma = 0.7
    x0 = y[rng.integers(0, ds.M, 2)] + sigma * rng.standard_normal((2, ds.d))
    x = torch.from_numpy(x0)
    J = R.denoiser_jacobian(x0, y, sigma)
    f = lambda t: den(t, sigma)  # noqa: E731
    for jac_fn in (torch.func.jacrev, torch.func.jacfwd):
        Jt = jac_fn(f)(x[:1])
        assert rel(Jt.reshape(ds.d, ds.d), J[0]) <= JACOBIAN_RTOL
    gr = torch.func.grad(lambda t: den(t, sigma).sum())(x)
    assert rel(gr, J.sum(1)) <= JACOBIAN_RTOL
    v = torch.from_numpy(rng.standard_normal(x.shape))
    _, t = torch.func.jvp(f, (x,), (v,))
    assert rel(t, np.einsum("nij,nj->ni", J, v.numpy())) <= JACOBIAN_RTOL
    out, fn = torch.func.vjp(f, x)
    assert rel(fn(v)[0], np.einsum("nij,nj->ni", J, v.numpy())) <= JACOBIAN_RTOL
    vm = torch.func.vmap(f)(x[:, None, :])
    assert rel(vm[:, 0], R.denoise(x0, y, sigma)) <= 1e-5
    # per-sample sigma under vmap, and its derivative
    sig = torch.tensor([0.5, 2.0], dtype=torch.float64)
    ds_ = torch.func.jacrev(lambda s: den(x, s))(sig)  # (2, d, 2): dD_n / dsigma_m
    for n, s in enumerate((0.5, 2.0)):
        assert rel(ds_[n, :, n], R.denoiser_dsigma(x0[n:n + 1], y, s)[0]) <= JACOBIAN_RTOL


def test_score_and_log_density(setup, rng):
    ds, den, y = setup
    sigma = 0.6
    x0 = y[rng.integers(0, ds.M, 2)] + sigma * rng.standard_normal((2, ds.d))
    x = torch.from_numpy(x0).requires_grad_(True)
    lp = den.log_density(x, sigma)
    assert rel(lp.detach(), R.log_density(x0, y, sigma)) <= 1e-9
    (g,) = torch.autograd.grad(lp.sum(), x)
    assert rel(g, R.score(x0, y, sigma)) <= JACOBIAN_RTOL
    sig = torch.tensor(sigma, dtype=torch.float64, requires_grad=True)
    (gs,) = torch.autograd.grad(den.log_density(x.detach(), sig).sum(), sig)
    assert rel(gs, R.log_density_dsigma(x0, y, sigma).sum()) <= JACOBIAN_RTOL
    H = torch.autograd.functional.hessian(lambda t: den.log_density(t, sigma).sum(), x[:1].detach())
    assert rel(H.reshape(ds.d, ds.d), R.score_jacobian(x0[:1], y, sigma)[0]) <= JACOBIAN_RTOL
    sc = den.score(x, sigma)
    v = rng.standard_normal((2, ds.d))
    (gv,) = torch.autograd.grad(sc, x, torch.from_numpy(v))
    assert rel(gv, np.einsum("nij,nj->ni", R.score_jacobian(x0, y, sigma), v)) <= JACOBIAN_RTOL
    gl = torch.func.grad(lambda t: den.log_density(t, sigma).sum())(x.detach())
    assert rel(gl, R.score(x0, y, sigma)) <= JACOBIAN_RTOL


def test_scaling_and_labels(digits_u8, rng):
    from sklearn.datasets import load_digits

    labels = load_digits().target
    ds = optden.Dataset.from_array(digits_u8, labels=labels, num_classes=10)
    den = optden.OptimalDenoiser(ds)
    y = model_rows(ds)
    sigma, s = 0.5, 0.8
    u0 = y[:2] + sigma * rng.standard_normal((2, ds.d))
    x = torch.from_numpy(u0 * s).requires_grad_(True)
    lab = torch.from_numpy(labels[:2])
    out = den(x, sigma, lab, s=s)
    g = rng.standard_normal((2, ds.d))
    (gx,) = torch.autograd.grad(out, x, torch.from_numpy(g))
    for j in range(2):
        rows = y[labels == labels[j]]
        ref = R.denoiser_jacobian(u0[j:j + 1], rows, sigma)[0] @ g[j] / s  # D*(x / s): chain rule
        assert rel(gx[j], ref) <= JACOBIAN_RTOL


def test_second_derivatives_of_D_are_nan(setup, rng):
    ds, den, y = setup
    x = torch.from_numpy(y[:1] + 0.5 * rng.standard_normal((1, ds.d)))
    H = torch.autograd.functional.hessian(lambda t: den(t, 0.5).sum(), x)
    assert torch.isnan(H).all()


def test_plain_calls_take_the_old_path(setup, rng, monkeypatch):
    ds, den, y = setup
    x = torch.from_numpy(y[:3] + 0.5 * rng.standard_normal((3, ds.d)))
    before = den(x, 0.5)

    def refuse(*a, **k):
        raise AssertionError("autograd path taken")

    monkeypatch.setattr(AG, "denoise", refuse)
    monkeypatch.setattr(AG, "log_density", refuse)
    assert torch.equal(den(x, 0.5), before)
    den.score(x, 0.5)
    den.log_density(x, 0.5)
    with torch.no_grad():  # requires_grad under no_grad: no graph, the old path
        den(x.clone().requires_grad_(True), 0.5)
    assert not AG.needs_autograd(x, 0.5, 1.0)
    assert AG.needs_autograd(x.clone().requires_grad_(True))


def test_bad_input(setup):
    ds, den, y = setup
    x = torch.full((1, ds.d), float("nan"), dtype=torch.float64, requires_grad=True)
    with pytest.raises(optden.InputError, match="x:"):
        den(x, 0.5)
    with pytest.raises(optden.InputError, match="x:"):
        den(torch.zeros(1, 63, dtype=torch.float64, requires_grad=True), 0.5)
    with pytest.raises(optden.InputError, match="sigma"):
        den(torch.zeros(1, ds.d, dtype=torch.float64, requires_grad=True), -1.0)
    x = torch.zeros(1, ds.d, dtype=torch.float64, requires_grad=True)
    with pytest.raises(optden.InputError, match="sigma: got inf"):  # D* (the mean) runs; its derivatives refuse
        torch.autograd.grad(den(x, float("inf")).sum(), x)
