"""optden and diffusers, both ways (``pip install optden[diffusers]``; this module imports
without diffusers, its functions need it).

* ``OptimalDiffusersModel(den, scheduler)``: the optimal denoiser D* as a diffusers
  ``UNet2DModel``: ``model(sample, timestep, class_labels=None).sample`` is what the
  scheduler's config expects (epsilon, v, sample, flow velocity, EDM's F), so any
  scheduler loop, and a ``DiffusionPipeline`` that takes a ``unet``, samples with D*.
* ``as_denoiser(unet, scheduler)``: a diffusers model as optden's ``D(x, sigma)`` for
  ``score_deviation`` and the samplers; ``load_denoiser(folder)`` reads a
  ``save_pretrained`` folder (a pipeline's, or a UNet's with its scheduler config).

Conventions. optden's ``D(u; sigma)`` takes the VE point ``u = x0 + sigma n`` (EDM's
sigma). Each diffusers scheduler family feeds its model ``x_in = alpha x0 + sigma_t n``
at a noise level it keeps in its own tables; the adapters read sigma from those tables
(``scheduler.sigmas`` at the index of the timestep in ``scheduler.timesteps``, else
``alphas_cumprod[t]``) and convert with the scheduler's own functions where it has them:

* ``"edm"`` (schedulers with ``precondition_inputs`` / ``precondition_outputs``, e.g.
  EDMEulerScheduler): ``x_in = c_in u``, timestep ``precondition_noise(sigma)``, output F
  with ``D = precondition_outputs(u, F, sigma)`` (epsilon or v_prediction folded in).
* ``"flow"`` (FlowMatchEulerDiscreteScheduler, or ``prediction_type="flow_prediction"``):
  the table holds t, ``x_in = (1 - t) x0 + t n``, sigma = t / (1 - t) (inf at t = 1: pure
  noise, where D* is the mean), output the velocity ``n - x0 = (x_in - D) / t``.
* ``"vp"`` (everything with ``alphas_cumprod``: DDPM, DDIM, Euler, DPM-Solver, ...): the
  table holds the VE sigma (or ``alphas_cumprod[t]`` gives ``sigma = sqrt((1 - a) / a)``),
  ``alpha = 1 / sqrt(1 + sigma^2)`` (``scheduler._sigma_to_alpha_sigma_t`` where it
  exists), ``sigma_t = alpha sigma``; output epsilon ``(x_in - alpha D) / sigma_t``,
  v_prediction ``alpha eps - sigma_t D``, or sample ``D``.

Traps. A pipeline scales the initial noise by ``scheduler.init_noise_sigma``, which for
EDMEulerScheduler is ``sqrt(sigma_max^2 + 1)``, not sigma_max: the loop then starts from
noise a little wider than its first sigma (harmless for D*, which the tests drive the
same way). FlowMatchEulerDiscreteScheduler starts at t = 1, sigma = inf: D* answers with
the data (class) mean there. DPMSolverMultistepScheduler with ``lower_order_final`` and
fewer than 15 steps takes first-order last steps (optden's ``dpmpp2m`` does not).
"""
from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import torch

from ..calling import call_in_chunks, output_tensor
from ..errors import InputError
from . import require

__all__ = ["OptimalDiffusersModel", "as_denoiser", "load_denoiser", "DiffusersDenoiser", "scheduler_family",
           "noise_level"]

EXTRA = "diffusers"


def _diffusers():
    return require("diffusers", EXTRA)


def scheduler_family(scheduler) -> str:
    """``"edm"``, ``"flow"`` or ``"vp"`` (see the module docstring); InputError otherwise."""
    cfg = getattr(scheduler, "config", {})
    if hasattr(scheduler, "precondition_outputs") and hasattr(scheduler, "precondition_inputs"):
        return "edm"
    if "FlowMatch" in type(scheduler).__name__ or cfg.get("prediction_type") == "flow_prediction":
        return "flow"
    if hasattr(scheduler, "alphas_cumprod"):
        return "vp"
    raise InputError(f"scheduler: {type(scheduler).__name__} is none of the families optden maps "
                     "(EDM preconditioning, flow matching, or alphas_cumprod); see optden.integrations.diffusers")


def _table_value(scheduler, family: str, t: float) -> float:
    """The scheduler's own noise level at timestep t: ``scheduler.sigmas`` at t's index in
    ``scheduler.timesteps`` (the index the scheduler is at, among equal timesteps), else
    ``alphas_cumprod[t]`` (as VE sigma) for an integer t, else t / num_train_timesteps (flow)."""
    ts, table = getattr(scheduler, "timesteps", None), getattr(scheduler, "sigmas", None)
    if isinstance(ts, torch.Tensor) and isinstance(table, torch.Tensor) and table.numel() >= ts.numel() > 0:
        tsd = ts.detach().to("cpu", torch.float64)
        hits = (tsd == t).nonzero().flatten().tolist() or \
            torch.isclose(tsd, torch.tensor(t, dtype=torch.float64), rtol=1e-6, atol=0).nonzero().flatten().tolist()
        if hits:
            at = getattr(scheduler, "step_index", None)
            return float(table[at if at in hits else hits[0]])
    cfg = scheduler.config
    if family == "vp" and float(t).is_integer() and 0 <= t < len(scheduler.alphas_cumprod):
        ab = float(scheduler.alphas_cumprod[int(t)])
        return math.sqrt((1.0 - ab) / ab) if ab > 0 else math.inf
    if family == "flow":
        return float(t) / float(cfg.get("num_train_timesteps", 1000))
    raise InputError(f"timestep: {t:g} is not one of scheduler.timesteps; call scheduler.set_timesteps(...) "
                     "first and give this model the scheduler that steps")


def noise_level(scheduler, family: str, value: torch.Tensor):
    """(ve_sigma, alpha, sigma_t), each like ``value`` (float64), from the scheduler's own
    noise level ``value`` (VE sigma for "vp" and "edm", t for "flow")."""
    v = value.to(torch.float64)
    if family == "edm":
        ones = torch.ones_like(v)
        c_in = torch.as_tensor(scheduler.precondition_inputs(ones, v), dtype=torch.float64)
        return v, c_in, c_in * v
    if hasattr(scheduler, "_sigma_to_alpha_sigma_t"):  # private: DPM-Solver, UniPC, ...: their formula (VP or flow)
        alpha, sigma_t = scheduler._sigma_to_alpha_sigma_t(v)  # private: diffusers' own conversion
        alpha, sigma_t = torch.as_tensor(alpha, dtype=torch.float64), torch.as_tensor(sigma_t, dtype=torch.float64)
    elif family == "flow":
        alpha, sigma_t = 1.0 - v, v
    else:  # Euler-type: scale_model_input divides by sqrt(sigma^2 + 1)
        alpha = 1.0 / torch.sqrt(v * v + 1.0)
        alpha = torch.where(torch.isinf(v), torch.zeros_like(v), alpha)
        sigma_t = torch.where(torch.isinf(v), torch.ones_like(v), v * alpha)
    ve = torch.where(alpha == 0, torch.full_like(v, math.inf), sigma_t / alpha)
    return ve, alpha, sigma_t


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (x.dim() - 1)))


class OptimalDiffusersModel(torch.nn.Module):
    """The optimal denoiser ``den`` as a diffusers ``UNet2DModel`` for ``scheduler``.

    ``model(sample, timestep, class_labels=None, return_dict=True)``: sample (B, C, H, W)
    as the scheduler feeds its model, timestep a number or (B,) from
    ``scheduler.timesteps``; returns ``UNet2DOutput(sample=...)`` (or a 1-tuple) holding
    what the scheduler expects for its family and ``prediction_type`` (module docstring),
    in ``sample``'s dtype. D* is computed in float64. Pipelines read ``config``
    (``sample_size``, ``in_channels``), ``dtype`` (of their latents, default float32) and
    ``device`` (the denoiser's). class_labels: classes or one-hot vectors (class-conditional D*).
    """

    def __init__(self, den, scheduler, dtype: torch.dtype = torch.float32):
        super().__init__()
        frozen = require("diffusers.configuration_utils", EXTRA).FrozenDict
        self.den = den
        self.scheduler = scheduler
        self.family = scheduler_family(scheduler)
        if self.family != "edm" and scheduler.config.get("prediction_type", "epsilon") not in \
                ("epsilon", "v_prediction", "sample", "flow_prediction"):
            raise InputError(f"scheduler: prediction_type {scheduler.config.get('prediction_type')!r} is not "
                             "epsilon, v_prediction, sample or flow_prediction")
        shape = tuple(getattr(den, "image_shape", ()))
        if len(shape) != 3:
            raise InputError(f"den: a UNet stand-in needs images (C, H, W); the denoiser's image_shape is {shape}")
        c, h, w = shape
        self._dtype = dtype
        self._output = require("diffusers.models.unets.unet_2d", EXTRA).UNet2DOutput
        self.config = frozen(sample_size=h if h == w else (h, w), in_channels=c, out_channels=c,
                             num_class_embeds=getattr(den, "label_dim", 0) or None)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return torch.device(getattr(self.den, "device", "cpu"))

    def forward(self, sample: torch.Tensor, timestep, class_labels=None, return_dict: bool = True):
        b = sample.shape[0]
        t = torch.as_tensor(timestep, dtype=torch.float64).detach().cpu().reshape(-1)
        if t.numel() not in (1, b):
            raise InputError(f"timestep: expected a number or one per sample ({b}), got {t.numel()} values")
        steps = t.expand(b).tolist()
        table = {v: _table_value(self.scheduler, self.family, v) for v in set(steps)}
        level = torch.tensor([table[v] for v in steps], dtype=torch.float64)
        ve, alpha, sigma_t = noise_level(self.scheduler, self.family, level)
        x = sample.detach().to("cpu", torch.float64)
        a, st = _bcast(alpha, x), _bcast(sigma_t, x)
        u = torch.where(a == 0, x, x / torch.where(a == 0, torch.ones_like(a), a))  # at sigma = inf any point will do
        d = torch.as_tensor(self.den(u, ve, class_labels), dtype=torch.float64).cpu().reshape(x.shape)
        out = self._prediction(x, u, d, a, st, _bcast(level, x))
        out = out.to(device=sample.device, dtype=sample.dtype)
        return self._output(sample=out) if return_dict else (out,)

    def _prediction(self, x, u, d, a, st, level):
        """What the scheduler reads back: from D (float64, like x) at x_in = x."""
        if self.family == "edm":
            c_skip = self.scheduler.precondition_outputs(torch.ones_like(u), torch.zeros_like(u), level)
            c_out = self.scheduler.precondition_outputs(torch.zeros_like(u), torch.ones_like(u), level)
            return (d - c_skip * u) / c_out
        eps = (x - a * d) / st
        kind = "flow_prediction" if self.family == "flow" else self.scheduler.config.get("prediction_type", "epsilon")
        return {"epsilon": lambda: eps, "v_prediction": lambda: a * eps - st * d, "sample": lambda: d,
                "flow_prediction": lambda: eps - d}[kind]()


class DiffusersDenoiser(torch.nn.Module):
    """A diffusers model as ``D(x, sigma, class_labels=None)`` (see ``as_denoiser``)."""

    def __init__(self, unet, scheduler, batch_size: int | None = None):
        super().__init__()
        self.unet = unet
        self.scheduler = scheduler
        self.family = scheduler_family(scheduler)
        self.prediction_type = scheduler.config.get("prediction_type", "epsilon")
        self.batch_size = batch_size
        self._euler = None
        cfg = getattr(unet, "config", {})
        size = cfg.get("sample_size")
        if isinstance(size, int) and cfg.get("in_channels"):
            self.image_shape = (int(cfg["in_channels"]), size, size)

    def _timesteps(self, level: torch.Tensor) -> torch.Tensor:
        """The continuous timestep of each noise level, by the scheduler's own mapping."""
        if self.family == "edm":
            return torch.as_tensor(self.scheduler.precondition_noise(level), dtype=torch.float64).reshape(-1)
        if self.family == "flow":
            return level * float(self.scheduler.config.get("num_train_timesteps", 1000))
        if self._euler is None:  # VP: EulerDiscreteScheduler's log-sigma interpolation of its training table
            euler = _diffusers().EulerDiscreteScheduler
            keep = inspect.signature(euler.__init__).parameters
            self._euler = euler.from_config({k: v for k, v in self.scheduler.config.items() if k in keep})
        uniq = level.unique()
        self._euler.set_timesteps(sigmas=uniq.tolist() + [0.0])
        t = self._euler.timesteps.to(torch.float64)
        return t[torch.searchsorted(uniq, level)]

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels=None) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(x.shape[0]).cpu()
        if not bool(torch.isfinite(sigma).all()):
            raise InputError(f"sigma: {type(self.unet).__name__} cannot be evaluated at sigma = inf")
        rest = (sigma,) if class_labels is None else (sigma, class_labels)
        return call_in_chunks(self._call, x, self.batch_size, *rest)

    def _call(self, x, sigma, class_labels=None):
        u = x.detach().to(torch.float64)
        if self.family == "flow":
            level = sigma / (1.0 + sigma)  # t of the flow: sigma = t / (1 - t)
        else:
            level = sigma
        _, alpha, sigma_t = noise_level(self.scheduler, self.family, level)
        a, st = _bcast(alpha, u).to(u.device), _bcast(sigma_t, u).to(u.device)
        if self.family == "edm":
            x_in = self.scheduler.precondition_inputs(u, _bcast(level, u).to(u.device))
        else:
            x_in = a * u
        p = next(self.unet.parameters(), None)
        dtype, device = (p.dtype, p.device) if p is not None else (x.dtype, x.device)
        t = self._timesteps(level).to(device=device, dtype=dtype)
        kw = {} if class_labels is None else {"class_labels": class_labels.to(device)}
        name = type(self.unet).__name__
        out = self.unet(x_in.to(device=device, dtype=dtype), t, **kw)
        out = getattr(out, "sample", out)
        out = output_tensor(out, self.unet)
        if out.shape != x.shape:
            raise InputError(f"model: {name} returned shape {tuple(out.shape)} for an input of shape {tuple(x.shape)}")
        f = out.to(device=u.device, dtype=torch.float64)
        if self.family == "edm":
            return self.scheduler.precondition_outputs(u, f, _bcast(level, u).to(u.device))
        kind = "flow_prediction" if self.family == "flow" else self.prediction_type
        xin = a * u
        if kind == "epsilon":
            return (xin - st * f) / a
        if kind == "v_prediction":
            return a * xin - st * f  # x0 = alpha x_in - sigma_t v (alpha^2 + sigma_t^2 = 1)
        if kind == "flow_prediction":
            return xin - st * f  # x0 = x_in - t v
        return f


def _scheduler_of(scheduler_config):
    """A scheduler object from a scheduler, its config (its ``_class_name``, or for the
    config of a scheduler made in memory, which has none, the family its keys show: EDM's
    ``sigma_data``, flow matching's ``use_dynamic_shifting``, else DDPM's betas) or a folder
    / ``scheduler_config.json`` file."""
    if hasattr(scheduler_config, "config") and hasattr(scheduler_config, "set_timesteps"):
        return scheduler_config
    diffusers = _diffusers()
    cfg = scheduler_config
    if isinstance(cfg, (str, Path)):
        p = Path(cfg)
        p = p / "scheduler_config.json" if p.is_dir() else p
        if not p.is_file():
            raise InputError(f"scheduler_config: no scheduler_config.json at {cfg}")
        cfg = json.loads(p.read_text())
    if not isinstance(cfg, dict):
        raise InputError("scheduler_config: expected a diffusers scheduler, its config, or a folder holding "
                         f"scheduler_config.json; got {type(scheduler_config).__name__}")
    name = cfg.get("_class_name")
    if name is None:  # an in-memory scheduler's config does not name its class: its keys say the family
        name = "EDMEulerScheduler" if "sigma_data" in cfg else "FlowMatchEulerDiscreteScheduler" \
            if "use_dynamic_shifting" in cfg else "DDPMScheduler" if "beta_start" in cfg else None
    if not hasattr(diffusers, str(name)):
        raise InputError(f"scheduler_config: {name!r} is not a diffusers scheduler; pass the scheduler itself")
    return getattr(diffusers, name).from_config(cfg)


def as_denoiser(unet, scheduler_config, batch_size: int | None = None) -> DiffusersDenoiser:
    """A diffusers UNet (an object, or a ``save_pretrained`` folder) as ``D(x, sigma)``.

    scheduler_config: the scheduler it was trained with (object, config dict, or folder):
    it says the family, the prediction type and the timestep of each sigma (module
    docstring). x (B, C, H, W) in the data's model space at VE noise level sigma (B,);
    the model runs on its parameters' device and dtype, in chunks of ``batch_size``.
    A wrong-shaped, None or tuple output is an InputError naming the model.
    """
    if isinstance(unet, (str, Path)):
        return load_denoiser(unet, batch_size=batch_size, scheduler_config=scheduler_config)
    if not callable(unet):
        raise InputError(f"unet: expected a diffusers model or a folder, got {type(unet).__name__}")
    return DiffusersDenoiser(unet, _scheduler_of(scheduler_config), batch_size)


def load_denoiser(folder, device="cpu", batch_size: int | None = None, scheduler_config=None) -> DiffusersDenoiser:
    """``as_denoiser`` of a ``save_pretrained`` folder: a pipeline's (``model_index.json``,
    with ``unet/`` and ``scheduler/``), or a model's (``config.json``) with its
    ``scheduler_config.json`` beside it (or ``scheduler_config`` given). Nothing is downloaded."""
    diffusers = _diffusers()
    root = Path(folder)
    model_dir, sched = root, scheduler_config
    if (root / "model_index.json").is_file():
        index = json.loads((root / "model_index.json").read_text())
        name = next((k for k in ("unet", "transformer") if k in index), None)
        if name is None:
            raise InputError(f"model: {root} is a pipeline without a unet or transformer")
        model_dir, sched = root / name, sched if sched is not None else root / "scheduler"
    elif sched is None:
        sched = root
    cfg_file = model_dir / "config.json"
    if not cfg_file.is_file():
        raise InputError(f"model: {folder} holds no diffusers model (no model_index.json or config.json)")
    cls_name = json.loads(cfg_file.read_text()).get("_class_name", "")
    if not hasattr(diffusers, cls_name):
        raise InputError(f"model: {cfg_file} names {cls_name!r}, which is not a diffusers model class")
    model = getattr(diffusers, cls_name).from_pretrained(str(model_dir), local_files_only=True).to(device).eval()
    return DiffusersDenoiser(model, _scheduler_of(sched), batch_size)
