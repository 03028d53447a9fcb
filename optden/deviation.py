"""Empirical score deviation of a user's denoiser from the optimal one (Chen et al. 2023, Fig. 4).

For a model ``D_theta`` (any callable ``D_theta(x, sigma)``: a trained network, a closed
form, ...) and the empirical optimal denoiser ``D*``, both started from the same noise
``x_T`` and run with the same solver and grid, the deviation

    ||D_theta(x; sigma) - D*(x; sigma)||      and in score units   ||D_theta - D*|| / sigma^2

is measured at each grid sigma in three ways (docs/design.md, "The math"):

- ``"model"``:   at the points of the model's own sampling trajectory ``x^theta_t``;
- ``"optimal"``: at the points of the optimal sampling trajectory ``x*_t`` (the model
  evaluated on the optimal trajectory);
- ``"paired"``:  each denoiser along its own trajectory, ``||D_theta(x^theta_t) - D*(x*_t)||``:
  how far the two denoising trajectories from one x_T are apart.

Per sigma the mean, std, mean square and quantiles over the samples are reported.
Trajectory geometry and memorization live in ``optden.geometry`` and
``optden.memorization`` and are re-exported here.
"""
from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field

import torch

from .errors import InputError
from .geometry import TrajectoryGeometry, trajectory_geometry
from .memorization import Memorization, memorization
from .calling import DenoiserCall, as_labels
from .sampling import SampleRun, get_solver, sample
from .schedules import get_schedule

__all__ = [
    "DeviationStats",
    "ScoreDeviation",
    "score_deviation",
    "TrajectoryGeometry",
    "trajectory_geometry",
    "Memorization",
    "memorization",
    "DEVIATION_KINDS",
]

#: The three ways the deviation is measured (see the module docstring).
DEVIATION_KINDS = ("model", "optimal", "paired")
_DEFAULT_Q = (0.05, 0.25, 0.5, 0.75, 0.95)


@dataclass
class DeviationStats:
    """Per-sigma statistics of one deviation (CPU float64; K sigmas, n samples, Q quantiles).

    norms:       (K, n) ``||D_theta - D*||`` per sample.
    mean, std, mean_sq: (K,) over samples (std with divisor n).
    quantiles:   (K, Q) at the levels of ``ScoreDeviation.quantile_levels``.
    score_*:     the same for ``||D_theta - D*|| / sigma^2`` (score space).
    """

    norms: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    mean_sq: torch.Tensor
    quantiles: torch.Tensor
    score_norms: torch.Tensor
    score_mean: torch.Tensor
    score_std: torch.Tensor
    score_mean_sq: torch.Tensor
    score_quantiles: torch.Tensor

    @classmethod
    def from_norms(cls, norms: torch.Tensor, sigmas: torch.Tensor, levels: torch.Tensor) -> "DeviationStats":
        score = norms / sigmas[:, None] ** 2

        def stats(v):
            return (v.mean(1), v.std(1, unbiased=False), (v**2).mean(1), torch.quantile(v, levels, dim=1).T.contiguous())

        m, s, ms, q = stats(norms)
        sm, ss, sms, sq = stats(score)
        return cls(norms, m, s, ms, q, score, sm, ss, sms, sq)

    def to_dict(self) -> dict:
        return {
            "mean": self.mean.tolist(), "std": self.std.tolist(), "mean_sq": self.mean_sq.tolist(),
            "quantiles": self.quantiles.tolist(),
            "score_mean": self.score_mean.tolist(), "score_std": self.score_std.tolist(),
            "score_mean_sq": self.score_mean_sq.tolist(), "score_quantiles": self.score_quantiles.tolist(),
        }


@dataclass
class ScoreDeviation:
    """Result of ``score_deviation``.

    sigmas:          (K,) float64 the grid sigmas where the deviation is measured.
    quantile_levels: (Q,) float64.
    model, optimal, paired: ``DeviationStats`` (see the module docstring).
    model_run, optimal_run: the recorded ``SampleRun`` of the model and of D*.
    seconds:         wall time.
    """

    sigmas: torch.Tensor
    quantile_levels: torch.Tensor
    model: DeviationStats
    optimal: DeviationStats
    paired: DeviationStats
    model_run: SampleRun
    optimal_run: SampleRun
    seconds: float = 0.0
    info: dict = field(default_factory=dict)

    def kind(self, name: str) -> DeviationStats:
        if name not in DEVIATION_KINDS:
            raise InputError(f"name: expected one of {', '.join(DEVIATION_KINDS)}, got {name!r}")
        return getattr(self, name)

    def to_dict(self) -> dict:
        return {
            "sigmas": self.sigmas.tolist(),
            "quantile_levels": self.quantile_levels.tolist(),
            **{k: self.kind(k).to_dict() for k in DEVIATION_KINDS},
            "seconds": self.seconds,
            **self.info,
        }

    def __repr__(self) -> str:
        return (f"ScoreDeviation(steps={self.sigmas.numel()}, n={self.model.norms.shape[1]}, "
                f"mean deviation on the optimal trajectory {float(self.optimal.mean.min()):.3g}.."
                f"{float(self.optimal.mean.max()):.3g})")


def _levels(quantiles) -> torch.Tensor:
    try:
        q = torch.as_tensor(quantiles, dtype=torch.float64).reshape(-1)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"quantiles: expected a sequence of numbers in [0, 1], got {quantiles!r}") from None
    if q.numel() == 0 or not bool(((q >= 0) & (q <= 1)).all()):
        raise InputError(f"quantiles: expected numbers in [0, 1], got {quantiles!r}")
    return q


def _eval_on(call: DenoiserCall, run: SampleRun, batch_size: int, labels=None) -> torch.Tensor:
    """The denoiser at every trajectory point x_t of ``run`` (t < K): (K, n, *shape) float64 CPU.
    labels: None or (n,) int64 class labels, passed as ``D(x, sigma, labels)``."""
    K, n = run.steps, run.samples.shape[0]
    out = torch.empty((K, *run.samples.shape), dtype=torch.float64)
    for k in range(K):
        s = float(run.eval_sigmas[k])
        for a in range(0, n, batch_size):
            x = run.trajectory[k, a: a + batch_size].to(call.device)
            lab = None if labels is None else labels[a: a + batch_size].to(call.device)
            out[k, a: a + batch_size] = call(x, s, lab).cpu()
    return out


def _norms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(K, n, *shape) pair -> (K, n) Euclidean norms of a - b."""
    return (a - b).reshape(a.shape[0], a.shape[1], -1).norm(dim=-1)


def score_deviation(
    model,
    den,
    sigmas=None,
    n: int = 64,
    steps: int = 18,
    solver: str = "heun",
    schedule="edm",
    seed=0,
    x_T=None,
    quantiles=_DEFAULT_Q,
    batch_size: int | None = None,
    progress: bool | None = None,
    model_device=None,
    model_dtype: torch.dtype | None = None,
    labels=None,
    class_labels=None,
) -> ScoreDeviation:
    """Empirical score deviation of ``model`` from the optimal denoiser ``den``.

    model: any callable ``D_theta(x, sigma)`` (x (B, *shape), sigma (B,)); a torch module
        is called on its parameters' device and dtype unless ``model_device`` /
        ``model_dtype`` say otherwise.
    den: the optimal denoiser (``OptimalDenoiser``; any ``D(x, sigma)`` with ``image_shape``).
    sigmas: the grid (a list of decreasing sigmas or a ``Schedule``); default the named
        ``schedule`` with ``steps`` steps. Deviations are measured at its positive sigmas.
    n, seed, x_T: the shared starting noise (``x_T`` (n, *shape) overrides n and seed).
    solver: an ODE solver, ``"euler"``, ``"heun"`` or ``"dpmpp2m"``.
    quantiles: levels in [0, 1] of the reported quantiles.
    labels: class labels (one int, or one per sample), or EDM's name ``class_labels``:
        class-conditional deviation, ``D(x, sigma, labels)`` for both denoisers.
    Returns a ``ScoreDeviation`` with the three kinds ``model``, ``optimal``, ``paired``.
    """
    t0 = time.perf_counter()
    solver = get_solver(solver)
    if solver not in ("euler", "heun", "dpmpp2m"):
        raise InputError(f"solver: the score deviation needs a deterministic ODE solver (euler, heun, dpmpp2m), got {solver!r}")
    if not callable(model):
        raise InputError(f"model: expected a callable D(x, sigma), got {type(model).__name__}")
    levels = _levels(quantiles)
    sched = get_schedule(sigmas) if sigmas is not None else get_schedule(schedule, steps)
    common = dict(solver=solver, schedule=sched, seed=seed, record=True, progress=progress,
                  shape=getattr(den, "image_shape", None))
    if x_T is None:
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise InputError(f"n: expected a positive integer, got {n!r}")
        common["n"] = int(n)
    else:
        common["x_T"] = x_T
    n_samples = int(n) if x_T is None else int(torch.as_tensor(x_T).shape[0])
    lab = as_labels(labels, n_samples, class_labels)
    common["labels"] = lab
    opt_run = sample(den, batch_size=batch_size, **common)
    x_start = opt_run.x_T  # the same noise for the model
    common.pop("n", None)
    common["x_T"] = x_start
    mod_run = sample(model, batch_size=batch_size, device=model_device, dtype=model_dtype, **common)
    bs = x_start.shape[0] if batch_size is None else batch_size

    den_call = DenoiserCall(den)
    model_call = DenoiserCall(model, model_device, model_dtype)
    dstar_on_model = _eval_on(den_call, mod_run, bs, lab)  # D* at x^theta_t
    model_on_opt = _eval_on(model_call, opt_run, bs, lab)  # D_theta at x*_t
    sig = opt_run.eval_sigmas
    result = ScoreDeviation(
        sigmas=sig.clone(),
        quantile_levels=levels,
        model=DeviationStats.from_norms(_norms(mod_run.denoised, dstar_on_model), sig, levels),
        optimal=DeviationStats.from_norms(_norms(model_on_opt, opt_run.denoised), sig, levels),
        paired=DeviationStats.from_norms(_norms(mod_run.denoised, opt_run.denoised), sig, levels),
        model_run=mod_run,
        optimal_run=opt_run,
        info={"solver": solver, "schedule": sched.name, "n": int(x_start.shape[0]), "steps": sched.steps},
    )
    result.seconds = time.perf_counter() - t0
    if not math.isfinite(float(result.optimal.mean.sum())):
        raise InputError("model: returned NaN or inf on the optimal trajectory")
    return result
