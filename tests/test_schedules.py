"""Schedules: closed-form grids, scales of VP / flow matching, user lists and errors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from optden.errors import DtypeError, InputError
from optden.schedules import SCHEDULES, Schedule, get_schedule, vp_sigma
from tolerances import FLOAT64_RTOL


@pytest.mark.parametrize("steps", [1, 2, 7, 18])
def test_edm_grid_closed_form(steps):
    s = get_schedule("edm", steps)
    assert s.sigmas.dtype == torch.float64 and s.sigmas.shape == (steps + 1,)
    assert float(s.sigmas[0]) == 80.0 and float(s.sigmas[-1]) == 0.0
    assert torch.equal(s.scales, torch.ones(steps + 1, dtype=torch.float64))
    if steps > 1:
        assert float(s.sigmas[-2]) == 0.002
        i = np.arange(steps)
        ref = (80 ** (1 / 7) + i / (steps - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
        np.testing.assert_allclose(s.sigmas[:-1].numpy(), ref, rtol=FLOAT64_RTOL)
    assert bool((s.sigmas[1:] < s.sigmas[:-1]).all())


def test_polynomial_and_loguniform():
    p = get_schedule("polynomial", 5, sigma_min=0.01, sigma_max=10.0, rho=1.0)
    np.testing.assert_allclose(p.sigmas.numpy(), np.r_[np.linspace(10, 0.01, 5), 0.0], rtol=FLOAT64_RTOL)
    g = get_schedule("loguniform", 6, sigma_min=0.01, sigma_max=100.0)
    ratios = (g.sigmas[1:-1] / g.sigmas[:-2]).numpy()
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-12)
    assert math.isclose(float(g.sigmas[-2]), 0.01) and float(g.sigmas[-1]) == 0.0


def test_vp_closed_form():
    s = get_schedule("vp", 10)
    t = 1.0 + np.arange(10) / 9 * (1e-3 - 1.0)
    ref = np.sqrt(np.exp(0.5 * 19.9 * t**2 + 0.1 * t) - 1.0)
    np.testing.assert_allclose(s.sigmas[:-1].numpy(), ref, rtol=1e-12)
    np.testing.assert_allclose(s.scales.numpy(), 1.0 / np.sqrt(1.0 + s.sigmas.numpy() ** 2), rtol=1e-14)
    assert float(s.sigmas[-1]) == 0.0 and float(s.scales[-1]) == 1.0 and float(s.times[-1]) == 0.0
    assert float(vp_sigma(0.0)) == 0.0


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_closed_form(shift):
    s = get_schedule("flow", 8, eps=1e-2, shift=shift)
    t = (1 - 1e-2) * (1 - np.arange(9) / 8)
    t = shift * t / (1 + (shift - 1) * t)
    np.testing.assert_allclose(s.times.numpy(), t, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(s.scales.numpy(), 1 - t, rtol=1e-14)
    np.testing.assert_allclose(s.sigmas.numpy(), t / (1 - t), rtol=1e-13)


def test_user_list_and_schedule_passthrough():
    s = get_schedule([5.0, 1.0, 0.1])
    assert s.name == "custom" and s.steps == 3 and s.sigmas.tolist() == [5.0, 1.0, 0.1, 0.0]
    s2 = get_schedule(np.array([5.0, 1.0, 0.0]))
    assert s2.steps == 2
    assert get_schedule(s) is s
    assert set(SCHEDULES) == {"edm", "polynomial", "loguniform", "vp", "flow"}
    assert get_schedule("karras", 4).name == "edm"  # alias
    assert isinstance(s.to_dict()["sigmas"], list)


@pytest.mark.parametrize(
    "args, kw, match",
    [
        (("cosine", 10), {}, "schedule"),
        (("edm", 0), {}, "steps"),
        (("edm",), {}, "steps"),
        (("edm", 5), {"sigma_min": 1.0, "sigma_max": 0.5}, "sigma_min"),
        (("edm", 5), {"beta_d": 1.0}, "beta_d"),
        (("vp", 5), {"eps_s": 1.5}, "eps_s"),
        (([1.0, 2.0],), {}, "decreasing"),
        (([1.0, -1.0],), {}, "sigma"),
        (([1.0, float("nan")],), {}, "NaN"),
        (([],), {}, "sigmas"),
        (([3.0, 1.0], 5), {}, "steps"),
        (([3.0, 1.0],), {"rho": 3}, "named"),
    ],
)
def test_errors_name_the_argument(args, kw, match):
    with pytest.raises(InputError, match=match):
        get_schedule(*args, **kw)


def test_type_errors():
    with pytest.raises(DtypeError, match="steps"):
        get_schedule("edm", 2.5)
    with pytest.raises(InputError, match="scales"):
        Schedule(sigmas=[2.0, 1.0, 0.0], scales=[1.0, 1.0])
