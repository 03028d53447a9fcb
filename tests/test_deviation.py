"""Trajectory geometry (hand-computed), memorization, and the score deviation with a
closed-form linear model and with a small torch module."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import optden
from optden import reference as R
from optden.errors import InputError
from optden.gaussian import GaussianDenoiser


def test_geometry_hand_computed():
    """x_T = (4, 0), x_1 = (2, 1), x_0 = (0, 0); D(x_T; 2) = (0, 2), D(x_1; 1) = (0, 0)."""
    traj = torch.tensor([[[4.0, 0.0]], [[2.0, 1.0]], [[0.0, 0.0]]], dtype=torch.float64)
    den = torch.tensor([[[0.0, 2.0]], [[0.0, 0.0]]], dtype=torch.float64)
    g = optden.trajectory_geometry(trajectory=traj, denoised=den, sigmas=[2.0, 1.0, 0.0])
    s5 = math.sqrt(5.0)
    np.testing.assert_allclose(g.deviation[:, 0].numpy(), [0.0, 1.0, 0.0], atol=1e-15)
    np.testing.assert_allclose(g.denoised_deviation[:, 0].numpy(), [2.0, 0.0], atol=1e-15)
    np.testing.assert_allclose(g.magnitude[:, 0].numpy(), [4.0, s5, 0.0], rtol=1e-15)
    np.testing.assert_allclose(g.denoised_magnitude[:, 0].numpy(), [2.0, 0.0], rtol=1e-15)
    np.testing.assert_allclose(g.distance_to_end[:, 0].numpy(), [4.0, s5, 0.0], rtol=1e-15)
    np.testing.assert_allclose(g.denoised_distance_to_end[:, 0].numpy(), [2.0, 0.0], rtol=1e-15)
    a = math.degrees(math.atan(0.5))  # tangent (2, -1) and step (2, -1) against (4, 0)
    np.testing.assert_allclose(g.tangent_angle[:, 0].numpy(), [a, 0.0], atol=1e-6)
    np.testing.assert_allclose(g.step_angle[:, 0].numpy(), [a, 0.0], atol=1e-6)
    assert float(g.chord_length[0]) == 4.0
    assert g.to_dict()["mean_deviation"] == pytest.approx([0.0, 1.0, 0.0])


def test_geometry_of_a_recorded_run(rng):
    A = torch.from_numpy(rng.standard_normal((5, 5)))
    g = GaussianDenoiser(torch.zeros(5, dtype=torch.float64), A @ A.T / 5 + 0.1 * torch.eye(5, dtype=torch.float64))
    run = optden.sample(g, n=7, steps=9, seed=1, record=True)
    geo = optden.trajectory_geometry(run)
    assert geo.deviation.shape == (10, 7) and geo.tangent_angle.shape == (9, 7)
    assert float(geo.deviation[0].abs().max()) < 1e-9 and float(geo.deviation[-1].abs().max()) < 1e-9
    # Heun's last step is the ODE-jump x_0 = D(x_{K-1}): the last tangent points exactly at x_0
    assert float(geo.tangent_angle[-1].max()) < 1e-4
    # brute force for one point against the formula
    x0, xT, xt = run.samples[3], run.x_T[3], run.trajectory[4, 3]
    u = (x0 - xT) / (x0 - xT).norm()
    r = x0 - xt
    assert float(geo.deviation[4, 3]) == pytest.approx(float((r - (r @ u) * u).norm()), rel=1e-12)
    with pytest.raises(InputError, match="record"):
        optden.trajectory_geometry(optden.sample(g, n=2, steps=3))


def test_memorization_exact(digits_u8, rng):
    ds = optden.Dataset.from_array(digits_u8[:500])
    y = ds.model_rows(np.arange(ds.M))
    rows = rng.choice(ds.M, size=6, replace=False)
    mem = optden.memorization(y[rows], ds)
    assert mem.fraction == 1.0 and mem.nn1_index.tolist() == rows.tolist()
    assert float(mem.nn1_distance.max()) < 1e-9
    # random queries against the float64 oracle; midpoints between two rows are not memorized
    q = torch.from_numpy(rng.standard_normal((5, 64)))
    mem = optden.memorization(q, optden.OptimalDenoiser(ds))
    d_ref, i_ref = R.nearest(q.numpy(), y.numpy(), 2)
    np.testing.assert_allclose(mem.nn1_distance.numpy(), d_ref[:, 0], rtol=1e-9)
    np.testing.assert_allclose(mem.ratio.numpy(), d_ref[:, 0] / d_ref[:, 1], rtol=1e-9)
    assert mem.memorized.tolist() == (d_ref[:, 0] / d_ref[:, 1] < 1 / 3).tolist()
    mid = 0.5 * (y[rows[:3]] + y[rows[3:]])
    assert optden.memorization(mid, ds).fraction == 0.0
    with pytest.raises(InputError, match="threshold"):
        optden.memorization(mid, ds, threshold=2.0)
    with pytest.raises(InputError, match="2 training rows"):
        optden.memorization(mid, ds.subset([0]))


@pytest.fixture(scope="module")
def small_digits(digits_u8):
    ds = optden.Dataset.from_array(digits_u8[:200].reshape(-1, 1, 8, 8))
    return ds, optden.OptimalDenoiser(ds)


def test_score_deviation_linear_model(small_digits):
    ds, den = small_digits
    g = GaussianDenoiser.fit(ds)
    res = optden.score_deviation(g, den, n=5, steps=6, seed=4)
    y = ds.model_rows(np.arange(ds.M)).numpy()
    opt, mod = res.optimal_run, res.model_run
    torch.testing.assert_close(opt.x_T, mod.x_T)
    for k, s in enumerate(res.sigmas.tolist()):
        xo, xm = opt.trajectory[k].reshape(5, -1), mod.trajectory[k].reshape(5, -1)
        d_opt = np.linalg.norm(g(xo, s).numpy() - R.denoise(xo.numpy(), y, s), axis=1)
        d_mod = np.linalg.norm(g(xm, s).numpy() - R.denoise(xm.numpy(), y, s), axis=1)
        d_pair = np.linalg.norm(g(xm, s).numpy() - R.denoise(xo.numpy(), y, s), axis=1)
        for got, ref in ((res.optimal.norms[k], d_opt), (res.model.norms[k], d_mod), (res.paired.norms[k], d_pair)):
            np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-10)
        np.testing.assert_allclose(res.optimal.score_norms[k].numpy(), d_opt / s**2, rtol=1e-5, atol=1e-10)
    st = res.optimal
    torch.testing.assert_close(st.mean, st.norms.mean(1))
    torch.testing.assert_close(st.mean_sq, (st.norms**2).mean(1))
    torch.testing.assert_close(st.quantiles[:, 2], st.norms.median(1).values)  # n = 5: the middle value
    assert st.quantiles.shape == (6, 5) and bool((st.quantiles[:, :-1] <= st.quantiles[:, 1:]).all())
    d = res.to_dict()
    assert set(d) >= {"sigmas", "model", "optimal", "paired"} and len(d["optimal"]["mean"]) == 6


def test_score_deviation_of_the_optimal_denoiser_is_zero(small_digits):
    ds, den = small_digits
    res = optden.score_deviation(den, den, n=3, steps=4)
    for kind in ("model", "optimal", "paired"):
        assert float(res.kind(kind).norms.abs().max()) < 1e-12  # rounding only


class TinyNet(torch.nn.Module):
    def __init__(self, d=64):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(d + 1, 32), torch.nn.Tanh(), torch.nn.Linear(32, d))

    def forward(self, x, sigma):
        b = x.shape[0]
        h = torch.cat([x.reshape(b, -1), torch.log(sigma)[:, None]], 1)
        return (x.reshape(b, -1) / (1 + sigma[:, None] ** 2) + self.net(h)).reshape(x.shape)


def test_score_deviation_torch_module(small_digits):
    ds, den = small_digits
    net = TinyNet()
    res = optden.score_deviation(net, den, sigmas=[10.0, 1.0, 0.1], n=4, solver="euler", quantiles=(0.1, 0.9))
    assert res.sigmas.tolist() == [10.0, 1.0, 0.1] and res.quantile_levels.tolist() == [0.1, 0.9]
    y = ds.model_rows(np.arange(ds.M)).numpy()
    x = res.optimal_run.trajectory[1]
    with torch.no_grad():
        out = net(x.float(), torch.full((4,), 1.0)).double()
    ref = np.linalg.norm((out - torch.from_numpy(R.denoise(x.reshape(4, -1).numpy(), y, 1.0)).reshape(x.shape))
                         .reshape(4, -1).numpy(), axis=1)
    np.testing.assert_allclose(res.optimal.norms[1].numpy(), ref, rtol=1e-6)
    assert bool(torch.isfinite(res.model.mean).all()) and float(res.model.mean.min()) > 0


def test_score_deviation_errors(small_digits):
    ds, den = small_digits
    g = GaussianDenoiser.fit(ds)
    with pytest.raises(InputError, match="solver"):
        optden.score_deviation(g, den, solver="edm_stochastic")
    with pytest.raises(InputError, match="model"):
        optden.score_deviation(3, den)
    with pytest.raises(InputError, match="quantiles"):
        optden.score_deviation(g, den, quantiles=(0.5, 2.0))
    with pytest.raises(InputError, match="n"):
        optden.score_deviation(g, den, n=0)
