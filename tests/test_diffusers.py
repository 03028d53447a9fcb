"""diffusers both ways (issue 18 items 1-2): its schedulers and pipelines drive D* and
reproduce ``optden.sample``; its models become ``D(x, sigma)`` by each scheduler family's
own conventions; a tiny UNet trained here on digits is measured by ``optden deviation``.
diffusers runs on CPU torch without torchvision (never install torchvision: the
registry's build of it breaks ``import diffusers``)."""
from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch

import optden
from optden.integrations.diffusers import OptimalDiffusersModel, as_denoiser, load_denoiser

diffusers = pytest.importorskip("diffusers", reason="the diffusers extra (pip install optden[diffusers]) is missing")
# diffusers' schedulers call np.array on tensors in a way numpy 2 deprecates (not ours to fix)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

RTOL = 1e-5  # the bound; the scheduler loops run in float32 as diffusers does


def rel(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def den(digits_u8):
    from sklearn.datasets import load_digits

    ds = optden.Dataset.from_array(digits_u8.reshape(-1, 1, 8, 8), labels=load_digits().target)
    return optden.OptimalDenoiser(ds)


def scheduler_loop(model, scheduler, latents, steps, labels=None):
    """The loop every diffusers pipeline runs: scale the noise, then model -> step."""
    scheduler.set_timesteps(steps)
    x = latents * getattr(scheduler, "init_noise_sigma", 1.0)
    x_T = x.clone()
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        x = scheduler.step(model(x_in, t, class_labels=labels).sample, t, x).prev_sample
    return x_T, x


def vp_schedule(sigmas):
    """optden's grid of a VP scheduler's VE sigmas: s = 1 / sqrt(1 + sigma^2)."""
    s = sigmas.to(torch.float64)
    return optden.Schedule(sigmas=s, scales=1.0 / torch.sqrt(1.0 + s**2))


CASES = {
    # scheduler, optden solver, the grid it steps (from the scheduler's own tables, float32 values)
    "EDMEulerScheduler": (lambda: diffusers.EDMEulerScheduler(), "euler",
                          lambda s: optden.Schedule(sigmas=s.sigmas.double())),
    "EulerDiscreteScheduler": (lambda: diffusers.EulerDiscreteScheduler(beta_schedule="linear", prediction_type="epsilon"),
                               "euler", lambda s: optden.Schedule(sigmas=s.sigmas.double())),
    "DDIMScheduler": (lambda: diffusers.DDIMScheduler(), "euler",
                      lambda s: vp_schedule(torch.cat([((1 - s.alphas_cumprod[s.timesteps].double())
                                                        / s.alphas_cumprod[s.timesteps].double()).sqrt(),
                                                       torch.zeros(1, dtype=torch.float64)]))),
    "DPMSolverMultistepScheduler": (lambda: diffusers.DPMSolverMultistepScheduler(), "dpmpp2m",
                                    lambda s: vp_schedule(s.sigmas)),
    "FlowMatchEulerDiscreteScheduler": (lambda: diffusers.FlowMatchEulerDiscreteScheduler(), "euler",
                                        lambda s: optden.Schedule(sigmas=s.sigmas.double() / (1 - s.sigmas.double()),
                                                                  scales=1 - s.sigmas.double())),
}


@pytest.mark.parametrize("name", list(CASES))
def test_their_schedulers_drive_the_optimal_denoiser(den, name):
    make, solver, grid = CASES[name]
    scheduler = make()
    model = OptimalDiffusersModel(den, scheduler)
    latents = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    classes = torch.tensor([0, 3, 3, 5, 8, 9])
    for labels in (None, classes):
        x_T, out = scheduler_loop(model, scheduler, latents, 20, labels)
        assert out.dtype == torch.float32
        run = optden.sample(den, solver=solver, schedule=grid(scheduler), x_T=x_T.double(), labels=labels)
        assert rel(out, run.samples) <= RTOL, name
    if name == "FlowMatchEulerDiscreteScheduler":  # starts at t = 1: sigma = inf, D* = the (class) mean
        assert math.isinf(float(grid(scheduler).sigmas[0]))
        x = torch.randn(2, 1, 8, 8)
        v = model(x, scheduler.timesteps[0]).sample.double()
        mean = den.dataset.model_rows(np.arange(den.M)).mean(0).reshape(1, 8, 8)
        assert rel(x.double() - v, mean.expand(2, 1, 8, 8)) <= 1e-6  # x0 = x_1 - v at t = 1


def test_a_pipeline_takes_it_as_its_unet(den):
    scheduler = diffusers.DDIMScheduler()
    pipe = diffusers.DDIMPipeline(unet=OptimalDiffusersModel(den, scheduler), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=3, generator=torch.Generator().manual_seed(2), num_inference_steps=20, eta=0.0,
                  output_type="np").images
    latents = torch.randn((3, 1, 8, 8), generator=torch.Generator().manual_seed(2))  # randn_tensor's draw
    run = optden.sample(den, solver="euler", schedule=CASES["DDIMScheduler"][2](pipe.scheduler), x_T=latents.double())
    want = (run.samples / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert rel(images, want) <= RTOL


def test_prediction_types_and_timesteps(den):
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    for pred in ("epsilon", "v_prediction", "sample"):
        s = diffusers.DDPMScheduler(prediction_type=pred)
        s.set_timesteps(10)
        t = s.timesteps[3]
        out = OptimalDiffusersModel(den, s, dtype=torch.float64)(x, t).sample
        # the scheduler's own step turns it back into D*: its pred_original_sample
        x0 = s.step(out, t, x, generator=torch.Generator().manual_seed(0)).pred_original_sample
        ab = s.alphas_cumprod[int(t)].double()
        sigma = math.sqrt((1 - ab) / ab)
        assert rel(x0, den(x / ab.sqrt(), sigma)) <= 1e-6, pred
    with pytest.raises(optden.InputError, match="set_timesteps"):
        e = diffusers.EDMEulerScheduler()
        e.set_timesteps(5)
        OptimalDiffusersModel(den, e)(x, 0.123)


# ------------------------------------------------------------------ their models as D(x, sigma)

class StandIn(torch.nn.Module):
    """A 'UNet' whose prediction is exact for the fitted Gaussian, written from the
    definitions of each family (not from optden's adapter): DDPM's x_t = sqrt(ab) x0 +
    sqrt(1 - ab) eps at the continuous timestep (log-sigma interpolation of the training
    table), EDM's preconditioning, flow matching's x_t = (1 - t) x0 + t n."""

    def __init__(self, gauss, family, pred, scheduler):
        super().__init__()
        self.gauss, self.family, self.pred, self.s = gauss, family, pred, scheduler

    def forward(self, x_in, timestep, class_labels=None):
        b = x_in.shape[0]
        t = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1).expand(b).reshape(b, 1, 1, 1)
        if self.family == "vp":
            ab = self.s.alphas_cumprod.double()
            log_sig = torch.log(((1 - ab) / ab).sqrt())
            lo = t.floor().clamp(0, len(ab) - 2).long()
            sig = torch.exp(log_sig[lo] + (t - lo) * (log_sig[lo + 1] - log_sig[lo]))
            a, st = 1 / (1 + sig**2).sqrt(), sig / (1 + sig**2).sqrt()
            x0 = self.gauss(x_in / a, sig.reshape(-1))
            eps = (x_in - a * x0) / st
            out = {"epsilon": eps, "v_prediction": a * eps - st * x0, "sample": x0}[self.pred]
        elif self.family == "edm":
            sig, sd = torch.exp(4 * t), 0.5
            c_in, c_skip = 1 / (sig**2 + sd**2).sqrt(), sd**2 / (sig**2 + sd**2)
            c_out = sig * sd / (sig**2 + sd**2).sqrt()
            u = x_in / c_in
            out = (self.gauss(u, sig.reshape(-1)) - c_skip * u) / c_out
        else:
            tt = t / 1000.0
            out = (x_in - self.gauss(x_in / (1 - tt), (tt / (1 - tt)).reshape(-1))) / tt
        from diffusers.models.unets.unet_2d import UNet2DOutput

        return UNet2DOutput(sample=out)


@pytest.mark.parametrize("family, pred, make", [
    ("vp", "epsilon", lambda: diffusers.DDPMScheduler()),
    ("vp", "v_prediction", lambda: diffusers.DDIMScheduler(prediction_type="v_prediction")),
    ("vp", "sample", lambda: diffusers.DDPMScheduler(prediction_type="sample")),
    ("edm", "epsilon", lambda: diffusers.EDMEulerScheduler()),
    ("flow", "flow", lambda: diffusers.FlowMatchEulerDiscreteScheduler()),
])
def test_their_models_become_denoisers(digits_u8, family, pred, make):
    gauss = optden.GaussianDenoiser.fit(optden.Dataset.from_array(digits_u8.reshape(-1, 1, 8, 8)))
    scheduler = make()
    model = as_denoiser(StandIn(gauss, family, pred, scheduler), scheduler.config, batch_size=3)
    assert model.family == family
    x = torch.randn(7, 1, 8, 8, dtype=torch.float64) * 2
    for sigma in (0.02, 0.3, 2.0, 40.0):
        tol = 1e-5 if family == "vp" else 1e-10  # vp: diffusers maps sigma to t in float32
        assert rel(model(x, torch.full((7,), sigma, dtype=torch.float64)), gauss(x, sigma)) <= tol, (family, pred, sigma)


def test_bad_outputs_name_the_model(digits_u8, one_thread):
    class Broken(torch.nn.Module):
        def __init__(self, what):
            super().__init__()
            self.what = what

        def forward(self, x, t):
            return {"none": None, "tuple": (x, x), "shape": x[:, :, :4]}[self.what]

    for what, match in (("none", "Broken returned None"), ("tuple", "Broken returned a tuple"),
                        ("shape", "Broken returned shape")):
        with pytest.raises(optden.InputError, match=match):
            as_denoiser(Broken(what), diffusers.DDPMScheduler())(torch.zeros(2, 1, 8, 8), torch.ones(2))
    # a diffusers model handed to optden without the adapter: a clear error, not "Could not infer dtype"
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=8, down_block_types=("DownBlock2D",) * 2,
                                 up_block_types=("UpBlock2D",) * 2)
    den = optden.OptimalDenoiser(optden.Dataset.from_array(digits_u8[:50].reshape(-1, 1, 8, 8)))
    with pytest.raises(optden.InputError, match="as_denoiser"):
        optden.score_deviation(unet, den, n=2, steps=2)


def test_importable_without_diffusers(monkeypatch, den):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    monkeypatch.setitem(sys.modules, "diffusers.configuration_utils", None)
    import importlib

    import optden.integrations.diffusers as mod

    importlib.reload(mod)  # the module itself imports without diffusers
    with pytest.raises(ImportError, match=r"pip install optden\[diffusers\]"):
        mod.OptimalDiffusersModel(den, object())
    with pytest.raises(ImportError, match=r"pip install optden\[diffusers\]"):
        mod.load_denoiser("nowhere")


# ------------------------------------------------------------------ a tiny trained UNet, measured end to end

@pytest.fixture
def one_thread():
    """torch on one thread for the test: a 40k-parameter UNet's ops are too small to share,
    and on a busy 2-core machine OpenMP's hand-offs made its calls ~70x slower (measured:
    a score deviation of 8 samples took 30 s on 2 threads, 0.4 s on 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_tiny_unet(digits_u8, steps=300, seed=0):
    """A 40k-parameter UNet2DModel trained with DDPM's epsilon loss on digits in [-1, 1]."""
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=8, down_block_types=("DownBlock2D",) * 2,
                                 up_block_types=("UpBlock2D",) * 2)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000)
    x = torch.from_numpy(digits_u8.astype(np.float32) / 127.5 - 1).reshape(-1, 1, 8, 8)
    opt = torch.optim.AdamW(unet.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        y = x[torch.randint(0, len(x), (32,), generator=g)]
        n = torch.randn(y.shape, generator=g)
        t = torch.randint(0, 1000, (32,), generator=g)
        loss = ((unet(scheduler.add_noise(y, n, t), t).sample - n) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return unet.eval(), scheduler


def test_tiny_unet_measured_by_optden_deviation(tmp_path, digits_u8, capsys, one_thread):
    from optden.cli import main

    unet, scheduler = train_tiny_unet(digits_u8)
    folder = tmp_path / "pipeline"
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(folder))
    out = tmp_path / "dev"
    args = ["deviation", "digits", "--model", str(folder), "--n", "8", "--steps", "6", "--seed", "3",
            "--batch-size", "5", "--out", str(out), "--format", "svg"]
    assert main(args) == 0
    assert "wrote" in capsys.readouterr().out and (out / "deviation.svg").read_text().lstrip().startswith("<")
    got = json.loads((out / "deviation.json").read_text())
    # the same numbers from the Python API on the loaded folder
    den = optden.OptimalDenoiser(optden.Dataset.demo("digits"))
    res = optden.score_deviation(load_denoiser(folder, batch_size=5), den, n=8, steps=6, seed=3)
    np.testing.assert_allclose(got["optimal"]["mean"], res.optimal.mean.numpy(), rtol=1e-5)
    # trained: far closer to D* where the data mean dominates (sigma >= 10) than the untrained net
    fresh = diffusers.UNet2DModel.from_config(unet.config).eval()
    res0 = optden.score_deviation(as_denoiser(fresh, scheduler), den, n=8, steps=6, seed=3)
    big = res.sigmas >= 10
    assert bool((res.optimal.mean[big] < 0.5 * res0.optimal.mean[big]).all())
    assert np.isfinite(got["model"]["mean"]).all() and len(got["sigmas"]) == 6
