"""OptimalDenoiser in the calling conventions of EDM and k-diffusion, run by their own samplers.

EDM's ``edm_sampler`` (generate.py) is written out below step by step as EDM writes it,
calling ``net(x, t, class_labels).to(torch.float64)`` with EDMPrecond's attributes;
k-diffusion's samplers are its released ``k_diffusion/sampling.py``, loaded by file path.
Both must run ``optden.OptimalDenoiser`` unchanged and reproduce ``optden.sample``.
"""
from __future__ import annotations

import importlib.util
import math
import sys
import types

import numpy as np
import pytest
import torch

import optden

RTOL = 1e-9  # the same arithmetic up to the rounding of the grid and of the last Euler step


def rel(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def den(digits_u8):
    labels = np.arange(digits_u8.shape[0]) % 10
    ds = optden.Dataset.from_array(digits_u8.reshape(-1, 1, 8, 8), labels=labels)
    return optden.OptimalDenoiser(ds)


def edm_sampler(net, latents, class_labels=None, randn_like=torch.randn_like, num_steps=18, sigma_min=0.002,
                sigma_max=80, rho=7, S_churn=0, S_min=0, S_max=float("inf"), S_noise=1):
    """EDM's Algorithm 2 as EDM's generate.py runs it (float64 state, numbered steps)."""
    # Adjust the noise levels to what the network supports.
    sigma_min = max(sigma_min, net.sigma_min)
    sigma_max = min(sigma_max, net.sigma_max)
    # Time step discretization (t_N = 0).
    step_indices = torch.arange(num_steps, dtype=torch.float64, device=latents.device)
    t_steps = (sigma_max ** (1 / rho) + step_indices / (num_steps - 1)
               * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t_steps = torch.cat([net.round_sigma(t_steps), torch.zeros_like(t_steps[:1])])
    # Main loop over i = 0, ..., N - 1.
    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        # 1. Increase the noise temporarily.
        gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = net.round_sigma(t_cur + gamma * t_cur)
        x_hat = x_cur + (t_hat**2 - t_cur**2).sqrt() * S_noise * randn_like(x_cur)
        # 2. Euler step.
        denoised = net(x_hat, t_hat, class_labels).to(torch.float64)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        # 3. Second-order correction.
        if i < num_steps - 1:
            denoised = net(x_next, t_next, class_labels).to(torch.float64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def test_edm_face(den):
    assert (den.img_channels, den.img_resolution, den.label_dim) == (1, 8, 10)
    assert den.sigma_min == 0 and den.sigma_max == math.inf
    t = den.round_sigma(torch.tensor([0.5, 2.0], dtype=torch.float64))
    assert torch.equal(t, torch.tensor([0.5, 2.0], dtype=torch.float64))
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    classes = torch.tensor([3, 1, 4, 1])
    want = den(x, 0.4, labels=classes)
    assert torch.equal(den(x, 0.4, classes), want)  # EDM's positional class_labels
    assert torch.equal(den(x, 0.4, class_labels=classes), want)  # diff-analyzer's keyword
    assert torch.equal(den(x, 0.4, torch.eye(10)[classes]), want)  # EDM's one-hot vectors
    assert torch.equal(den(x, torch.tensor(0.4, dtype=torch.float64), None), den(x, 0.4))  # a 0-d sigma
    with pytest.raises(optden.InputError, match="one-hot"):
        den(x, 0.4, torch.full((4, 10), 0.1))
    with pytest.raises(optden.InputError, match="one-hot"):
        den(x, 0.4, torch.zeros(4, 10))  # EDM's 'no class' vector: pass None instead
    with pytest.raises(optden.InputError, match="alias"):
        den(x, 0.4, classes, labels=classes)
    plain = optden.OptimalDenoiser(optden.Dataset.from_array(np.zeros((3, 12), np.uint8)))
    assert (plain.label_dim, plain.img_channels, plain.img_resolution) == (0, None, None)


@pytest.mark.parametrize("conditional", [False, True])
def test_edm_sampler_runs_the_optimal_denoiser(den, conditional):
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(6, 1, 8, 8, generator=g)
    classes = torch.tensor([0, 7, 2, 2, 9, 5])
    one_hot = torch.eye(den.label_dim)[classes] if conditional else None
    edm = edm_sampler(den, latents, one_hot)
    run = optden.sample(den, steps=18, solver="heun", schedule="edm", x_T=latents.double() * 80.0,
                        labels=classes if conditional else None)
    assert rel(run.samples, edm) <= RTOL
    if conditional:  # each sample is drawn to a training image of its own class
        _, idx = den.nearest(run.samples, k=1)
        assert torch.equal(torch.from_numpy(den.dataset.labels[idx[:, 0].numpy()]), classes)


def _k_diffusion_sampling(monkeypatch):
    """k-diffusion's released sampling.py, loaded by file path (its package __init__ imports
    ~50 packages, torchvision among them). Its one helper from k_diffusion.utils,
    ``append_dims``, is supplied by a stand-in package module (utils itself imports torchvision)."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("k-diffusion is not installed (make setup installs it: pip install --no-deps "
                    "k-diffusion==0.1.1.post1 torchdiffeq torchsde trampoline)")
    path = f"{spec.submodule_search_locations[0]}/sampling.py"
    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = []
    utils = types.ModuleType("k_diffusion.utils")
    utils.append_dims = lambda x, n: x.reshape(x.shape + (1,) * (n - x.dim()))  # sigma (B,) against x (B, ...)
    pkg.utils = utils
    monkeypatch.setitem(sys.modules, "k_diffusion", pkg)
    monkeypatch.setitem(sys.modules, "k_diffusion.utils", utils)
    mod_spec = importlib.util.spec_from_file_location("k_diffusion.sampling", path)
    mod = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(mod)
    except ModuleNotFoundError as exc:
        pytest.skip(f"k_diffusion/sampling.py needs {exc.name} (make setup installs it)")
    return mod


@pytest.mark.parametrize("kd_name, solver", [("sample_heun", "heun"), ("sample_euler", "euler"),
                                             ("sample_dpmpp_2m", "dpmpp2m")])
def test_k_diffusion_samplers_run_the_optimal_denoiser(den, monkeypatch, kd_name, solver):
    K = _k_diffusion_sampling(monkeypatch)
    sigmas = K.get_sigmas_karras(18, 0.002, 80.0, rho=7.0).double()  # k-diffusion's grid, in float64
    edm_grid = optden.get_schedule("edm", 18).sigmas
    assert rel(sigmas, edm_grid) <= 1e-6  # EDM's grid, up to k-diffusion's float32 ramp
    g = torch.Generator().manual_seed(5)
    x_T = torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64) * sigmas[0]
    classes = torch.tensor([1, 1, 3, 0, 8, 6])
    seen = []
    kd = getattr(K, kd_name)(den, x_T.clone(), sigmas, extra_args={"class_labels": classes}, disable=True,
                             callback=seen.append)
    ours = []
    run = optden.sample(den, solver=solver, schedule=sigmas.tolist(), x_T=x_T, labels=classes, callback=ours.append)
    assert rel(run.samples, kd) <= RTOL
    # the callback: k-diffusion's keys, one call per step, the same points and denoised values
    assert len(ours) == len(seen) == 18
    for a, b in zip(ours, seen):
        assert set(a) == set(b) == {"x", "i", "sigma", "sigma_hat", "denoised"}
        assert a["i"] == b["i"] and a["sigma"] == pytest.approx(float(b["sigma"]), rel=1e-15)
        assert a["sigma_hat"] == pytest.approx(float(b["sigma_hat"]), rel=1e-15)
        assert rel(a["x"], b["x"]) <= RTOL and rel(a["denoised"], b["denoised"]) <= RTOL
