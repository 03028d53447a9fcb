"""EDM networks and saved modules as optden denoisers (issue 18 item 2), EDM's class_labels
everywhere (item 3), and sigma = inf, pure noise, everywhere (item 1)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import optden
from optden.integrations import require
from optden.integrations.edm import as_denoiser
from optden.integrations.export import StaticBatch, load_module

from tolerances import DENOISE_RTOL, rel_err


def rel(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def den(digits_u8):
    from sklearn.datasets import load_digits

    return optden.OptimalDenoiser(optden.Dataset.from_array(digits_u8.reshape(-1, 1, 8, 8),
                                                            labels=load_digits().target))


class EDMStyleNet(torch.nn.Module):
    """An EDM ``EDMPrecond``-shaped network: float32 parameters, ``net(x, sigma,
    class_labels)`` with class_labels one-hot (B, label_dim) reshaped as EDM does, returning
    float32 D(x; sigma); here D is the optimal denoiser, so the adapter's result is known."""

    def __init__(self, den):
        super().__init__()
        self.den = den
        self.label_dim, self.img_channels, self.img_resolution = den.label_dim, 1, 8
        self.sigma_min, self.sigma_max = 0.002, 80.0
        self.unused = torch.nn.Parameter(torch.zeros(1))  # float32 like EDM's networks
        self.calls = []

    def forward(self, x, sigma, class_labels=None, force_fp32=False):
        self.calls.append(x.shape[0])
        assert x.dtype == torch.float32
        labels = None if class_labels is None else class_labels.to(torch.float32).reshape(-1, self.label_dim)
        return self.den(x.double(), sigma.double().reshape(-1), labels).to(torch.float32)


def test_edm_network_as_denoiser(den):
    net = EDMStyleNet(den)
    model = as_denoiser(net, batch_size=4)
    assert model.image_shape == (1, 8, 8) and model.sigma_max == 80.0
    x = torch.randn(10, 1, 8, 8, dtype=torch.float64)
    classes = torch.arange(10) % 10
    got = optden.ode_jump(model, x, 0.5, class_labels=classes)  # float32 network, chunks of 4
    assert net.calls == [4, 4, 2]
    assert rel(got, den(x, 0.5, classes)) <= 1e-6
    run = optden.sample(model, n=6, steps=8, seed=1, labels=torch.tensor([1, 2, 3, 4, 5, 6]))
    ref = optden.sample(den, n=6, steps=8, seed=1, labels=torch.tensor([1, 2, 3, 4, 5, 6]))
    assert rel(run.samples, ref.samples) <= 1e-5  # float32 net against float64 D*
    dev = optden.score_deviation(model, den, n=4, steps=4, class_labels=torch.tensor([0, 1, 2, 3]))
    assert float(dev.optimal.mean.max()) < 1e-4 * float(dev.optimal_run.samples.reshape(4, -1).norm(dim=1).mean())
    with pytest.raises(optden.InputError, match="classes in 0..9"):
        model(x[:2].float(), torch.ones(2), torch.tensor([3, 12]))

    class Bad(torch.nn.Module):
        label_dim = 0

        def forward(self, x, sigma, class_labels=None):
            return None

    with pytest.raises(optden.InputError, match="Bad returned None"):
        as_denoiser(Bad())(x, torch.ones(10))


def test_class_labels_wherever_labels_are(den):
    classes = torch.tensor([4, 4, 7, 1])
    one_hot = torch.eye(10)[classes]
    a = optden.sample(den, n=4, steps=6, seed=2, labels=classes)
    for kw in ({"class_labels": classes}, {"class_labels": one_hot}, {"labels": one_hot}):
        assert torch.equal(optden.sample(den, n=4, steps=6, seed=2, **kw).samples, a.samples)
    x = den.dataset.images([0, 1, 2, 3]) + 0.3 * torch.randn(4, 1, 8, 8, dtype=torch.float64)
    m = optden.mean_shift(den, x, 0.3, labels=classes)
    assert torch.equal(optden.mean_shift(den, x, 0.3, class_labels=one_hot).modes, m.modes)
    assert torch.equal(optden.annealed_mean_shift(den, x, [1.0, 0.3], class_labels=classes).modes,
                       optden.annealed_mean_shift(den, x, [1.0, 0.3], labels=classes).modes)
    dev = optden.score_deviation(lambda x, s, c: den(x, 1.5 * s, c), den, n=4, steps=4, class_labels=classes)
    _, idx = den.nearest(dev.optimal_run.samples, k=1)
    assert torch.equal(torch.from_numpy(den.dataset.labels[idx[:, 0].numpy()]), classes)
    with pytest.raises(optden.InputError, match="alias"):
        optden.sample(den, n=4, steps=2, labels=classes, class_labels=classes)
    with pytest.raises(optden.InputError, match="one-hot"):
        optden.sample(den, n=4, steps=2, class_labels=torch.full((4, 10), 0.1))


# ------------------------------------------------------------------ sigma = inf

@pytest.mark.parametrize("backend", ["cpu", "torch"])  # the fused passes refuse coef = 0: the cpu case shows
def test_sigma_inf_is_the_class_mean(den, backend, faces_u8):  # that sigma = inf never reaches them
    for ds in (den.dataset, optden.Dataset.from_array(faces_u8[:300].astype(np.float32) / 127.5 - 1)):
        d = optden.OptimalDenoiser(ds, backend=backend)
        rows = ds.model_rows(np.arange(ds.M)).numpy()
        q = torch.randn(5, *ds.image_shape, dtype=torch.float64) * 3
        sig = torch.tensor([math.inf, 0.5, math.inf, 2.0, math.inf], dtype=torch.float64)  # mixed in one call
        got = d(q, sig).reshape(5, -1).numpy()
        want = optden.reference.denoise(q.reshape(5, -1).numpy()[[1, 3]], rows, np.array([0.5, 2.0]))
        assert rel_err(got[[0, 2, 4]], np.tile(rows.mean(0), (3, 1))) <= 1e-12
        assert rel_err(got[[1, 3]], want) <= DENOISE_RTOL
        ev = d.denoise_certified(q, math.inf)
        assert ev.mode == ["dense"] * 5 and torch.allclose(ev.top_w, torch.full_like(ev.top_w, 1 / ds.M))
        assert bool((d.log_density(q, math.inf) == -math.inf).all()) and float(d.score(q, math.inf).abs().max()) == 0
        if ds.labels is not None:
            cls = torch.tensor([0, 3, 3, 9, 5])
            got_c = d(q, math.inf, cls).reshape(5, -1).numpy()
            want_c = np.stack([rows[ds.labels == c].mean(0) for c in cls.tolist()])
            assert rel_err(got_c, want_c) <= 1e-12


def test_sampling_from_pure_noise(den):
    """Flow matching from t = 1 (sigma = inf, s = 0): x_T is pure noise, the first step lands on
    mean + sigma_1 n for every solver, and Euler equals its t-parametrized form."""
    sched = optden.get_schedule("flow", 10, eps=0)
    assert math.isinf(sched.sigma_max) and float(sched.scales[0]) == 0
    x_T = torch.randn(5, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    mean = den.dataset.model_rows(np.arange(den.M)).mean(0).reshape(1, 1, 8, 8)
    t = sched.times
    for solver in ("euler", "heun", "dpmpp2m", "edm_stochastic"):
        churn = {"S_churn": 5.0} if solver == "edm_stochastic" else {}
        run = optden.sample(den, solver=solver, schedule=sched, x_T=x_T, record=True, **churn)
        assert bool(torch.isfinite(run.samples).all()), solver
        assert rel(run.trajectory[1], mean + float(sched.sigmas[1]) * x_T) <= 1e-12, solver
        assert torch.equal(run.trajectory_x[0], x_T)
    # Euler in flow time: x <- x + (t' - t) (x - D) / t, with x in the flow's own coordinate
    x = x_T.clone()
    for i in range(10):
        u = x if i == 0 else x / (1 - t[i])
        d = den(u, float(sched.sigmas[i]))
        x = x + (t[i + 1] - t[i]) * (x - d) / t[i]
    assert rel(optden.sample(den, solver="euler", schedule=sched, x_T=x_T).samples, x) <= 1e-10
    with pytest.raises(optden.InputError, match="scale is 0"):
        optden.get_schedule([math.inf, 1.0])
    assert optden.sample(den, schedule=sched, n=3, seed=0).x_T.std() < 2  # drawn as standard noise


# ------------------------------------------------------------------ saved modules

class Shrink(torch.nn.Module):
    """D(x, sigma) = mean + (x - mean) / (1 + sigma^2): a closed form to export."""

    def __init__(self, mean):
        super().__init__()
        self.register_buffer("mean", mean)

    def forward(self, x, sigma):
        return self.mean + (x - self.mean) / (1 + sigma.reshape(-1, 1, 1, 1) ** 2)


def test_static_batch_export_is_chunked(tmp_path, den):
    mean = den.dataset.model_rows(np.arange(den.M)).mean(0).reshape(1, 1, 8, 8).float()
    m = Shrink(mean)
    program = torch.export.export(m, (torch.randn(4, 1, 8, 8), torch.rand(4)))  # batch 4, static
    torch.export.save(program, str(tmp_path / "static.pt2"))
    loaded = load_module(tmp_path / "static.pt2")
    assert isinstance(loaded, StaticBatch) and loaded.batch == 4
    x = torch.randn(7, 1, 8, 8)
    assert torch.allclose(loaded(x, torch.full((7,), 0.5)), m(x, torch.full((7,), 0.5)))
    from optden.cli import main

    out = tmp_path / "dev"
    assert main(["deviation", "digits", "--model", str(tmp_path / "static.pt2"), "--n", "6", "--steps", "4",
                 "--out", str(out)]) == 0
    got = json.loads((out / "deviation.json").read_text())
    ref = optden.score_deviation(m, den, n=6, steps=4)
    np.testing.assert_allclose(got["optimal"]["mean"], ref.optimal.mean.numpy(), rtol=1e-6)


def test_require_names_the_extra():
    with pytest.raises(ImportError, match=r"pip install optden\[diffusers\]"):
        require("no_such_module_optden", "diffusers")
