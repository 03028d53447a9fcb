"""Mean shift converges to modes and reports it (iterations, flags, nearest row)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import optden
from optden.errors import DtypeError, InputError


def two_points():
    return optden.Dataset.from_array(np.array([[-1.0], [1.0]], dtype=np.float32))


def test_two_points_modes_closed_form():
    """Data {-1, +1}: D*(x; sigma) = tanh(x / sigma^2). For sigma > 1 the smoothed density
    is unimodal (mode 0); for sigma = 0.5 its modes solve x = tanh(4 x)."""
    den = optden.OptimalDenoiser(two_points())
    res = optden.mean_shift(den, torch.tensor([[0.7], [-0.2]], dtype=torch.float64), 2.0, max_iter=500, tol=1e-12)
    assert bool(res.converged.all())
    torch.testing.assert_close(res.modes, torch.zeros(2, 1, dtype=torch.float64), rtol=0, atol=1e-10)
    root = 1.0
    for _ in range(200):
        root = np.tanh(4 * root)
    res = optden.mean_shift(den, torch.tensor([[0.3], [-0.05]], dtype=torch.float64), 0.5, max_iter=200, tol=1e-13)
    assert bool(res.converged.all())
    np.testing.assert_allclose(res.modes[:, 0].numpy(), [root, -root], rtol=1e-10)
    assert res.nearest_index.tolist() == [1, 0]
    np.testing.assert_allclose(res.nearest_distance.numpy(), [1 - root, 1 - root], rtol=1e-6)
    assert bool((res.last_step < 1e-13).all()) and bool((res.iterations >= 2).all())


def test_noisy_training_images_climb_back(digits_u8, rng):
    ds = optden.Dataset.from_array(digits_u8[:400].reshape(-1, 1, 8, 8))
    den = optden.OptimalDenoiser(ds)
    rows = rng.choice(ds.M, size=12, replace=False)
    x0 = ds.images(rows) + 0.2 * torch.from_numpy(rng.standard_normal((12, 1, 8, 8)))
    x0_before = x0.clone()
    res = optden.mean_shift(den, x0, 0.2, max_iter=100, tol=1e-8, record=True)
    assert torch.equal(x0, x0_before)  # the caller's points are not modified in place
    assert res.modes.shape == (12, 1, 8, 8)
    assert bool(res.converged.all()) and res.n_converged == 12
    assert res.nearest_index.tolist() == rows.tolist()
    assert float(res.nearest_distance.max()) < 1e-6
    # the recorded trajectory replays the iterations
    T = res.step_norms.shape[0]
    assert T == int(res.iterations.max()) and res.trajectory.shape == (T + 1, 12, 1, 8, 8)
    torch.testing.assert_close(res.trajectory[0], x0.to(torch.float64))
    finished = res.iterations == T
    torch.testing.assert_close(res.trajectory[-1][finished], res.modes[finished])
    # a point that stopped is frozen: NaN step norms afterwards
    for j in range(12):
        it = int(res.iterations[j])
        assert not torch.isnan(res.step_norms[:it, j]).any() and torch.isnan(res.step_norms[it:, j]).all()


def test_max_iter_reports_not_converged(rng):
    ds = optden.Dataset.from_array(rng.standard_normal((30, 5)).astype(np.float32))
    den = optden.OptimalDenoiser(ds)
    x0 = torch.from_numpy(rng.standard_normal((4, 5)))
    res = optden.mean_shift(den, x0, 3.0, max_iter=1, tol=1e-12)
    assert res.iterations.tolist() == [1, 1, 1, 1]
    assert not bool(res.converged.any())
    # per-point bandwidths
    res2 = optden.mean_shift(den, x0, torch.tensor([0.1, 0.2, 0.3, 0.4]), max_iter=50)
    assert res2.sigmas.shape == (4,)


def test_annealed_mean_shift(rng):
    ds = optden.Dataset.from_array(rng.standard_normal((25, 4)).astype(np.float32))
    den = optden.OptimalDenoiser(ds)
    x0 = 5.0 * torch.from_numpy(rng.standard_normal((6, 4)))
    sched = optden.get_schedule("edm", 8, sigma_min=0.01, sigma_max=5.0)
    res = optden.annealed_mean_shift(den, x0, sched, iters_per_sigma=50, tol=1e-10, record=True)
    assert res.sigmas.shape == (8,) and res.trajectory.shape == (9, 6, 4)
    assert res.step_norms.shape == (8 * 50, 6)
    assert bool(res.converged.all())
    # at sigma = 0.01 the modes are training rows
    assert float(res.nearest_distance.max()) < 1e-6
    # one iteration per level is the ODE-jump at every level
    one = optden.annealed_mean_shift(den, x0, [5.0, 1.0, 0.1])
    u = x0
    for s in (5.0, 1.0, 0.1):
        u = optden.ode_jump(den, u, s)
    torch.testing.assert_close(one.modes, u, rtol=1e-12, atol=1e-12)
    assert one.iterations.tolist() == [3] * 6


def test_errors_name_the_argument(rng):
    den = optden.OptimalDenoiser(two_points())
    x = torch.zeros(2, 1, dtype=torch.float64)
    with pytest.raises(InputError, match="tol"):
        optden.mean_shift(den, x, 1.0, tol=0)
    with pytest.raises(InputError, match="max_iter"):
        optden.mean_shift(den, x, 1.0, max_iter=0)
    with pytest.raises(InputError, match="sigma"):
        optden.mean_shift(den, x, -1.0)
    with pytest.raises(DtypeError, match="sigma"):
        optden.mean_shift(den, x, "big")
    with pytest.raises(InputError, match="x"):
        optden.mean_shift(den, torch.zeros(2, 3), 1.0)
    with pytest.raises(InputError, match="sigmas"):
        optden.annealed_mean_shift(den, x, "edm")
    with pytest.raises(InputError, match="decreasing"):
        optden.annealed_mean_shift(den, x, [0.1, 1.0])
