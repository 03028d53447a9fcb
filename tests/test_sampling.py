"""Samplers against closed forms: one training point, two points, a Gaussian (linear
optimal denoiser, exact ODE solution); determinism, batching, ODE-jump, memorization."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import optden
from optden import reference as R
from optden.errors import DtypeError, InputError
from optden.gaussian import GaussianDenoiser
from optden.sampling import SOLVERS

ODE_SOLVERS = ("euler", "heun", "dpmpp2m")
ALL_SCHEDULES = ("edm", "loguniform", "vp", "flow")


def float_dataset(y: np.ndarray) -> optden.Dataset:
    return optden.Dataset.from_array(y.astype(np.float32))


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("schedule", ALL_SCHEDULES)
def test_one_training_point_lands_exactly(solver, schedule, rng):
    """M = 1: D* = y for every x and sigma, so every solver ends exactly on y."""
    y = rng.integers(0, 256, size=(1, 7), dtype=np.uint8)  # d = 7, not a power of two
    ds = optden.Dataset.from_array(y)
    den = optden.OptimalDenoiser(ds)
    kw = {"S_churn": 10.0} if solver == "edm_stochastic" else {}
    run = optden.sample(den, n=3, steps=6, solver=solver, schedule=schedule, seed=1, record=True, **kw)
    target = ds.model_rows([0]).reshape(1, 7)
    assert run.samples.dtype == torch.float64
    torch.testing.assert_close(run.samples, target.expand(3, 7), rtol=0, atol=1e-12)
    # the denoising trajectory is y at every step
    torch.testing.assert_close(run.denoised, target.expand(6, 3, 7), rtol=0, atol=1e-12)


def two_point_denoiser(y1: torch.Tensor, y2: torch.Tensor):
    """Closed form D* for two points: w1 = sigmoid((||x - y2||^2 - ||x - y1||^2) / (2 sigma^2))."""

    def D(x, sigma):
        x = x.reshape(x.shape[0], -1).to(torch.float64)
        s2 = sigma.reshape(-1, 1).to(torch.float64) ** 2
        a = ((x - y2) ** 2).sum(1, keepdim=True) - ((x - y1) ** 2).sum(1, keepdim=True)
        w1 = torch.sigmoid(a / (2 * s2))
        return w1 * y1 + (1 - w1) * y2

    return D


@pytest.mark.parametrize("solver", ODE_SOLVERS)
def test_two_points_side_of_the_bisector(solver, rng):
    """Two points: the PF-ODE never crosses the bisecting hyperplane (x = mid is invariant
    by symmetry), so each sample lands on the training point on x_T's side."""
    y = rng.standard_normal((2, 5)) * 0.5
    ds = float_dataset(y)
    yt = ds.model_rows([0, 1])
    den = optden.OptimalDenoiser(ds)
    run = optden.sample(den, n=24, steps=40, solver=solver, seed=3, record=True)
    mid, v = 0.5 * (yt[0] + yt[1]), yt[0] - yt[1]
    side = ((run.x_T - mid) @ v) > 0
    expected = torch.where(side[:, None], yt[0], yt[1])
    torch.testing.assert_close(run.samples, expected, rtol=0, atol=1e-8)
    # the user callable with the closed form gives the same trajectory
    run2 = optden.sample(two_point_denoiser(yt[0], yt[1]), n=24, steps=40, solver=solver, seed=3, record=True,
                         shape=(5,))
    torch.testing.assert_close(run2.trajectory, run.trajectory, rtol=1e-9, atol=1e-9)


def random_gaussian(rng, d=6) -> GaussianDenoiser:
    A = torch.from_numpy(rng.standard_normal((d, d)))
    S = A @ A.T / d + 0.05 * torch.eye(d, dtype=torch.float64)
    return GaussianDenoiser(torch.from_numpy(rng.standard_normal(d)), S)


def gaussian_error(den: GaussianDenoiser, solver: str, schedule: str, steps: int) -> float:
    run = optden.sample(den, n=6, steps=steps, solver=solver, schedule=schedule, seed=7)
    exact = den.ode_solution(run.x_T / run.scales[0], float(run.sigmas[0]), 0.0)
    return float((run.samples - exact).norm(dim=1).max() / exact.norm(dim=1).max())


def test_gaussian_linear_denoiser_matches_the_reference(rng):
    """The closed-form linear denoiser against a direct solve of S (S + sigma^2 I)^-1."""
    den = random_gaussian(rng)
    x = torch.from_numpy(rng.standard_normal((4, 6)))
    for sigma in (1e-3, 0.3, 10.0):
        ref = den.mean + torch.linalg.solve(den.cov + sigma**2 * torch.eye(6, dtype=torch.float64),
                                            (x - den.mean).T).T @ den.cov
        torch.testing.assert_close(den(x, sigma), ref, rtol=1e-9, atol=1e-10)


# Convergence seen over many random Gaussians (measured minimum ratio err(16) / err(64),
# largest err(64)): first order ~4x, second order ~19x, except DPM-Solver++(2M) on the
# VP and flow grids, whose very unequal log-sigma steps at 16 steps are not yet asymptotic.
_MIN_RATIO = {"euler": 3.0, "heun": 8.0, "dpmpp2m": 8.0, ("vp", "dpmpp2m"): 4.0, ("flow", "dpmpp2m"): 2.5}
_MAX_ERR64 = {"euler": 8e-2, "heun": 1.5e-2, "dpmpp2m": 1e-2, ("vp", "dpmpp2m"): 4e-2}


@pytest.mark.parametrize("solver", ODE_SOLVERS)
@pytest.mark.parametrize("schedule", ALL_SCHEDULES)
def test_gaussian_exact_ode_solution(solver, schedule, rng):
    """A Gaussian's optimal denoiser is linear and the ODE has the exact solution
    x_0 = mu + S^(1/2) (S + sigma_T^2 I)^(-1/2) (x_T - mu): the error shrinks with steps
    at the solver's order."""
    den = random_gaussian(rng)
    e16, e64 = gaussian_error(den, solver, schedule, 16), gaussian_error(den, solver, schedule, 64)
    assert e64 < _MAX_ERR64.get((schedule, solver), _MAX_ERR64[solver])
    assert e16 / e64 > _MIN_RATIO.get((schedule, solver), _MIN_RATIO[solver])


def test_deterministic_seed_and_batch_invariance(rng):
    # (50, 3, 3, 3) could be NCHW or NHWC: Dataset.from_array asks (issue 18: never guessed)
    ds = optden.Dataset.from_array(rng.integers(0, 256, size=(50, 3, 3, 3), dtype=np.uint8), channels_last=False)
    den = optden.OptimalDenoiser(ds)
    for solver, kw in (("heun", {}), ("edm_stochastic", {"S_churn": 20.0, "S_min": 0.05, "S_max": 50.0})):
        a = optden.sample(den, n=37, steps=5, solver=solver, seed=11, record=True, **kw)
        b = optden.sample(den, n=37, steps=5, solver=solver, seed=11, record=True, batch_size=8, **kw)
        c = optden.sample(den, n=37, steps=5, solver=solver, seed=12, **kw)
        again = optden.sample(den, n=37, steps=5, solver=solver, seed=11, record=True, **kw)
        assert a.samples.shape == (37, 3, 3, 3)
        assert torch.equal(a.trajectory, again.trajectory)  # same seed, same batches: bit for bit
        # Another batch size draws the same noise; the denoiser may sum in another order (the
        # cpu backend picks its kernel by batch size), so equal to well within the contract.
        torch.testing.assert_close(a.trajectory, b.trajectory, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(a.samples, b.samples, rtol=1e-9, atol=1e-9)
        assert not torch.equal(a.x_T, c.x_T)
        assert a.nfe == b.nfe == 9  # 2 per step, 1 for the last (to sigma = 0)


def test_record_layout_and_nfe(rng):
    den = random_gaussian(rng, d=4)
    run = optden.sample(den, n=5, steps=7, solver="heun", schedule="vp", seed=0, record=True)
    assert run.trajectory.shape == (8, 5, 4) and run.denoised.shape == (7, 5, 4)
    assert run.sigmas.shape == (8,) and run.eval_sigmas.shape == (7,)
    torch.testing.assert_close(run.trajectory[0], run.x_T / run.scales[0])
    torch.testing.assert_close(run.trajectory[-1], run.samples)
    torch.testing.assert_close(run.trajectory_x[0], run.x_T)
    assert run.nfe == 2 * 7 - 1  # Heun skips the correction at sigma = 0
    assert optden.sample(den, n=5, steps=7, solver="euler", seed=0).nfe == 7
    assert optden.sample(den, n=5, steps=7, solver="heun", seed=0).trajectory is None


def test_ode_jump(rng):
    ds = float_dataset(rng.standard_normal((40, 6)))
    den = optden.OptimalDenoiser(ds)
    full = optden.sample(den, n=6, steps=10, seed=5, record=True)
    jump = optden.sample(den, n=6, steps=10, seed=5, record=True, sigma_stop=0.5)
    k = int(torch.nonzero(full.sigmas <= 0.5)[0])
    assert jump.steps == k + 1 and float(jump.sigmas[-1]) == 0.0
    torch.testing.assert_close(jump.trajectory[: k + 1], full.trajectory[: k + 1], rtol=0, atol=0)
    y = ds.model_rows(np.arange(40)).numpy()
    ref = R.denoise(full.trajectory[k].numpy(), y, float(full.sigmas[k]))
    np.testing.assert_allclose(jump.samples.numpy(), ref, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(jump.denoised[-1], jump.samples)
    np.testing.assert_allclose(optden.ode_jump(den, full.trajectory[k], float(full.sigmas[k])).numpy(), ref,
                               rtol=1e-5, atol=1e-9)


def test_heun_with_optimal_denoiser_memorizes(digits_u8):
    ds = optden.Dataset.from_array(digits_u8[:300].reshape(-1, 1, 8, 8))
    den = optden.OptimalDenoiser(ds)
    run = optden.sample(den, n=16, steps=18, solver="heun", seed=0)
    mem = optden.memorization(run.samples, den)
    assert mem.fraction >= 0.9
    assert float(mem.nn1_distance.median()) < 1e-6  # the samples are training images


class LinearModule(torch.nn.Module):
    """A user's float32 network: the Gaussian's linear denoiser as an nn.Module."""

    def __init__(self, g: GaussianDenoiser):
        super().__init__()
        self.register_buffer("mu", g.mean.float())
        self.register_buffer("lam", g.eigvals.float())
        self.weight = torch.nn.Parameter(g.eigvecs.float())

    def forward(self, x, sigma):
        c = (x - self.mu) @ self.weight
        return self.mu + (self.lam / (self.lam + sigma[:, None] ** 2) * c) @ self.weight.T


def test_torch_module_denoiser(rng):
    g = random_gaussian(rng, d=5)
    mod = LinearModule(g)
    a = optden.sample(mod, n=4, steps=12, seed=2, shape=(5,))
    b = optden.sample(g, n=4, steps=12, seed=2)
    assert a.samples.dtype == torch.float64
    torch.testing.assert_close(a.samples, b.samples, rtol=1e-4, atol=1e-4)


def test_errors_name_the_argument(rng):
    den = random_gaussian(rng, d=3)
    with pytest.raises(InputError, match="solver"):
        optden.sample(den, solver="rk4")
    with pytest.raises(InputError, match="n"):
        optden.sample(den, n=0)
    with pytest.raises(InputError, match="S_churn"):
        optden.sample(den, solver="heun", S_churn=1.0)
    with pytest.raises(InputError, match="sigma_stop"):
        optden.sample(den, sigma_stop=-1.0)
    with pytest.raises(DtypeError, match="den"):
        optden.sample(42, shape=(3,))
    with pytest.raises(InputError, match="x_T"):
        optden.sample(den, x_T=torch.zeros(2, 4))
    with pytest.raises(DtypeError, match="seed"):
        optden.sample(den, seed=1.5)
    with pytest.raises(InputError, match="shape"):
        optden.sample(lambda x, s: x, n=2)
    with pytest.raises(InputError, match="den"):
        optden.sample(lambda x, s: x[:, :1], n=2, shape=(3,))


def test_class_conditional_sampling(digits_u8):
    from sklearn.datasets import load_digits

    labels = load_digits().target[:300]
    ds = optden.Dataset.from_array(digits_u8[:300].reshape(-1, 1, 8, 8), labels=labels, num_classes=10)
    den = optden.OptimalDenoiser(ds)
    lab = torch.tensor([3, 3, 7, 0, 9, 7])
    run = optden.sample(den, n=6, steps=12, seed=4, labels=lab, batch_size=4)
    mem = optden.memorization(run.samples, den)
    assert float(mem.nn1_distance.max()) < 1e-6  # training images ...
    assert labels[mem.nn1_index.numpy()].tolist() == lab.tolist()  # ... of the requested classes


def test_gaussian_fit_matches_numpy(digits_u8):
    ds = optden.Dataset.from_array(digits_u8[:100])
    y = ds.model_rows(np.arange(100)).numpy()
    g = GaussianDenoiser.fit(ds)
    np.testing.assert_allclose(g.mean.numpy(), y.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(g.cov.numpy(), np.cov(y.T, bias=True), rtol=1e-8, atol=1e-10)
    g2 = GaussianDenoiser.fit(torch.from_numpy(y))
    x = torch.from_numpy(y[:3]) + 0.1
    torch.testing.assert_close(g(x, 0.5), g2(x, 0.5), rtol=1e-9, atol=1e-9)
    with pytest.raises(InputError, match="cov"):
        GaussianDenoiser(torch.zeros(3), torch.zeros(2, 2))


def test_callback_sees_every_step_of_every_batch(rng):
    """k-diffusion's callback dict after every step: with EDM's churn, x is the churned point and
    sigma_hat > sigma where gamma > 0; the recorded denoising trajectory is what it reports."""
    y = rng.standard_normal((9, 6))
    den = optden.OptimalDenoiser(float_dataset(y))
    seen = []
    run = optden.sample(den, n=5, steps=5, solver="edm_stochastic", seed=2, record=True, batch_size=3,
                        callback=seen.append, S_churn=2.0, S_min=0.05, S_max=10.0)
    assert [d["i"] for d in seen] == list(range(5)) * 2  # two batches, five steps each
    for d in seen:
        rows = slice(0, 3) if d["x"].shape[0] == 3 else slice(3, 5)
        i = d["i"]
        assert d["sigma"] == float(run.sigmas[i]) and d["sigma_hat"] == float(run.eval_sigmas[i])
        assert torch.equal(d["denoised"], run.denoised[i, rows])
        churned = 0.05 <= d["sigma"] <= 10.0
        assert (d["sigma_hat"] > d["sigma"]) == churned
        assert torch.equal(d["x"], run.trajectory[i, rows]) != churned  # x_hat differs from x_i when churned
    # sigma_stop: the ODE-jump is the last report, at the stop sigma
    jumped = []
    run = optden.sample(den, n=2, steps=8, seed=1, sigma_stop=0.5, callback=jumped.append)
    assert jumped[-1]["i"] == run.sigmas.numel() - 2 and torch.equal(jumped[-1]["denoised"], run.samples)
    with pytest.raises(DtypeError, match="callback"):
        optden.sample(den, n=2, steps=3, callback="print")
