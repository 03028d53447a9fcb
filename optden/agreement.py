"""How well closed-form denoisers explain a trained model: r^2 and MSE per sigma.

The field's protocol (Kamb & Ganguli 2025; Niedoba et al. 2025): run the model's own
sampler from noise, and at every step compare the model's denoiser output ``D_theta(x_t)``
with each candidate's ``D_c(x_t)`` at the same point: per sample

    r^2 = 1 - ||D_theta - D_c||^2 / ||D_theta - mean(D_theta)||^2     (mean over its pixels)
    MSE = ||D_theta - D_c||^2 / d

and, per sigma, the median and mean r^2 over the samples and the mean MSE. Candidates are
any ``D(x, sigma)``: ``OptimalDenoiser`` (D*), ``LocalDenoiser`` (LS, ELS, composite),
``GaussianDenoiser``. ``trajectory="model"`` compares on the model's trajectory (the
protocol), ``"candidate"`` on each candidate's own trajectory from the same noise (the
model evaluated there), ``"both"`` does both.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from .calling import DenoiserCall, as_labels
from .deviation import _eval_on  # private: the one evaluation of a denoiser along a recorded run
from .errors import InputError
from .sampling import get_solver, sample
from .schedules import get_schedule

__all__ = ["AgreementStats", "Agreement", "agreement", "TRAJECTORIES", "r2_scores"]

#: Where the denoisers are compared (see the module docstring).
TRAJECTORIES = ("model", "candidate")


def r2_scores(target: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """r^2 of pred against target for each sample: (K, n, *shape) pair -> (K, n).
    A target constant over its pixels (no variance) gives NaN."""
    t = target.reshape(target.shape[0], target.shape[1], -1)
    p = pred.reshape(t.shape)
    res = ((t - p) ** 2).sum(-1)
    tot = ((t - t.mean(-1, keepdim=True)) ** 2).sum(-1)
    return torch.where(tot > 0, 1.0 - res / tot.clamp_min(torch.finfo(t.dtype).tiny), torch.full_like(res, math.nan))


@dataclass
class AgreementStats:
    """One candidate on one trajectory (K sigmas, n samples; CPU float64).

    r2: (K, n) per sample; r2_median, r2_mean: (K,) over the samples (NaN-aware);
    mse: (K,) mean squared difference per value.
    """

    r2: torch.Tensor
    r2_median: torch.Tensor
    r2_mean: torch.Tensor
    mse: torch.Tensor

    @classmethod
    def from_outputs(cls, model_out: torch.Tensor, cand_out: torch.Tensor) -> "AgreementStats":
        r2 = r2_scores(model_out, cand_out)
        mse = ((model_out - cand_out) ** 2).reshape(r2.shape[0], -1).mean(1)
        return cls(r2, r2.nanmedian(1).values, r2.nanmean(1), mse)

    def to_dict(self) -> dict:
        return {"r2_median": self.r2_median.tolist(), "r2_mean": self.r2_mean.tolist(), "mse": self.mse.tolist()}


@dataclass
class Agreement:
    """Result of ``agreement``.

    sigmas: (K,) the sigmas of the comparisons (the model's evaluation sigmas).
    stats: {trajectory: {candidate name: AgreementStats}}.
    model_run: the model's recorded ``SampleRun``; candidate_runs: {name: SampleRun} (only
    for trajectory "candidate").
    """

    sigmas: torch.Tensor
    stats: dict
    model_run: object
    candidate_runs: dict = field(default_factory=dict)
    seconds: float = 0.0
    info: dict = field(default_factory=dict)

    @property
    def candidates(self) -> list:
        return list(next(iter(self.stats.values())))

    def to_dict(self) -> dict:
        return {"sigmas": self.sigmas.tolist(),
                **{traj: {name: s.to_dict() for name, s in per.items()} for traj, per in self.stats.items()},
                "seconds": self.seconds, **self.info}

    def __repr__(self) -> str:
        best = {t: max(per, key=lambda c: float(per[c].r2_median.nan_to_num(-math.inf).mean()))
                for t, per in self.stats.items()}
        return f"Agreement(steps={self.sigmas.numel()}, candidates={self.candidates}, best by mean median r2: {best})"


def _candidates(candidates) -> dict:
    if isinstance(candidates, dict):
        named = dict(candidates)
    elif isinstance(candidates, (list, tuple)):
        named = {}
        for c in candidates:
            name = getattr(c, "kind", None) or type(c).__name__
            named[name if name not in named else f"{name}_{len(named)}"] = c
    else:
        named = {getattr(candidates, "kind", None) or type(candidates).__name__: candidates}
    if not named:
        raise InputError("candidates: expected at least one candidate denoiser")
    for name, c in named.items():
        if not callable(c):
            raise InputError(f"candidates: {name!r} is not a callable D(x, sigma), got {type(c).__name__}")
    return named


def agreement(model, candidates, sigmas=None, n: int = 16, trajectory: str = "model", steps: int = 18,
              solver: str = "heun", schedule="edm", seed=0, x_T=None, shape=None, labels=None,
              batch_size: int | None = None, progress: bool | None = None, model_device=None,
              model_dtype: torch.dtype | None = None) -> Agreement:
    """r^2 and MSE per sigma between ``model`` and each candidate denoiser (module docstring).

    model: any ``D(x, sigma)`` (a trained network: called on its parameters' device and
        dtype unless ``model_device`` / ``model_dtype`` say otherwise).
    candidates: a dict {name: denoiser}, a list (named by their ``kind`` or class), or one.
    sigmas: the sampling grid (a list of decreasing sigmas or a ``Schedule``); default the
        named ``schedule`` with ``steps`` steps.
    n, seed, x_T: the starting noise shared by every run (``x_T`` (n, *shape) overrides).
    trajectory: "model" (the protocol), "candidate" (each on its own trajectory) or "both".
    solver: a deterministic ODE solver ("euler", "heun", "dpmpp2m").
    shape: per-sample shape (default: a candidate's or the model's ``image_shape``).
    labels: class labels for class-conditional models and candidates (one int or (n,)).
    """
    t0 = time.perf_counter()
    if trajectory not in TRAJECTORIES + ("both",):
        raise InputError(f"trajectory: expected 'model', 'candidate' or 'both', got {trajectory!r}")
    if not callable(model):
        raise InputError(f"model: expected a callable D(x, sigma), got {type(model).__name__}")
    named = _candidates(candidates)
    solver = get_solver(solver)
    if solver not in ("euler", "heun", "dpmpp2m"):
        raise InputError(f"solver: agreement needs a deterministic ODE solver (euler, heun, dpmpp2m), got {solver!r}")
    sched = get_schedule(sigmas) if sigmas is not None else get_schedule(schedule, steps)
    if shape is None:
        shape = next((getattr(c, "image_shape", None) for c in named.values() if hasattr(c, "image_shape")),
                     getattr(model, "image_shape", None))
    common = dict(solver=solver, schedule=sched, seed=seed, record=True, progress=progress, shape=shape,
                  labels=labels, batch_size=batch_size)
    mod_run = sample(model, n=n, x_T=x_T, device=model_device, dtype=model_dtype, **common)  # checks n, x_T
    common["x_T"] = mod_run.x_T  # the same noise for every candidate
    bs = mod_run.x_T.shape[0] if batch_size is None else batch_size
    lab = as_labels(labels, mod_run.x_T.shape[0])
    stats, runs = {}, {}
    if trajectory in ("model", "both"):
        stats["model"] = {name: AgreementStats.from_outputs(mod_run.denoised, _eval_on(DenoiserCall(c), mod_run, bs,
                                                                                       lab))
                          for name, c in named.items()}
    if trajectory in ("candidate", "both"):
        model_call = DenoiserCall(model, model_device, model_dtype)
        per = {}
        for name, c in named.items():
            runs[name] = sample(c, **common)
            per[name] = AgreementStats.from_outputs(_eval_on(model_call, runs[name], bs, lab), runs[name].denoised)
        stats["candidate"] = per
    out = Agreement(sigmas=mod_run.eval_sigmas.clone(), stats=stats, model_run=mod_run, candidate_runs=runs,
                    info={"solver": solver, "schedule": sched.name, "n": int(mod_run.x_T.shape[0]),
                          "steps": sched.steps})
    out.seconds = time.perf_counter() - t0
    return out
