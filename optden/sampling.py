"""Probability-flow ODE samplers (and EDM's stochastic sampler) for any denoiser.

Every solver takes a denoiser with the EDM / k-diffusion signature ``D(x, sigma)``
(``optden.calling``: x (B, *shape), sigma a (B,) tensor; returns a tensor like x). The
optimal denoiser ``optden.OptimalDenoiser`` is one; a trained network is another.

Solvers. ``SOLVERS`` maps each name to a :class:`Solver`: its step function (one step
from sigma to sigma_next, written as EDM writes its algorithms: numbered steps, float64
state), the options it takes, and whether it first adds EDM's churn noise. One driver,
:func:`sample`, runs any of them over a schedule, batch by batch, and calls an optional
``callback`` after every step with k-diffusion's dict (``x``, ``i``, ``sigma``,
``sigma_hat``, ``denoised``).

Coordinates. Schedules are in EDM's general form ``x = s * (x0 + sigma * n)``
(``optden.schedules``). The samplers integrate in the *scaled* coordinate
``u = x / s``, where the probability-flow ODE is exactly the VE one,

    du / dsigma = (u - D(u; sigma)) / sigma,

so one code path serves VE, VP and flow-matching schedules. ``SampleRun.trajectory``
holds ``u`` (what the denoiser sees, identical to ``x`` for VE schedules);
``SampleRun.trajectory_x`` maps it back to ``x = s * u``. The final sample is at
sigma = 0, where s = 1 for every schedule, so ``samples`` needs no conversion. A
user-given ``x_T`` is in the original coordinate ``x`` (it is divided by ``s_0``).

Precision. The state (x_T, every trajectory point, the samples) is float64 whatever the
denoiser returns; inputs are cast to the denoiser's dtype only when it needs another one
(an ``nn.Module`` with float32 parameters, or ``dtype=`` given). Noise is drawn on the
CPU in float64 from a seeded ``torch.Generator`` and then moved to the device, so a seed
gives the same numbers on every device and for every ``batch_size``.
"""
from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .calling import Denoise, DenoiserCall, as_labels, check_points, image_shape_of, progress_enabled
from .errors import DtypeError, InputError
from .schedules import get_schedule
from .validate import check_positive_int, check_sigma

__all__ = [
    "SampleRun",
    "sample",
    "ode_jump",
    "Solver",
    "SOLVERS",
    "get_solver",
    "euler_step",
    "heun_step",
    "dpmpp2m_step",
    "churn",
    "churn_gamma",
    "draw_x_T",
    "evaluation_steps",
]

# Samples per block of churn noise: noise of sample j at step i comes from a generator
# seeded by (base seed, i, j // _NOISE_CHUNK), whatever the batch size.
_NOISE_CHUNK = 16


# ---------------------------------------------------------------------------------------
# Steps. ``D`` is any callable D(x, sigma) with sigma a Python float; x is the state in
# the scaled coordinate. Every step has the signature ``step(D, x, sigma, sigma_next,
# prev)`` with ``prev`` None on the first step, else ``(sigma_prev, denoised_prev)`` of
# the step before, and returns ``(x_next, D(x; sigma))``. With sigma_next = 0 every step
# returns D exactly (the ODE-jump).


def _denoise(D, x: torch.Tensor, sigma: float) -> torch.Tensor:
    return torch.as_tensor(D(x, sigma)).to(device=x.device, dtype=x.dtype).reshape(x.shape)


def euler_step(D: Denoise, x: torch.Tensor, sigma: float, sigma_next: float, prev=None):
    """One Euler step of the PF-ODE from sigma to sigma_next (1 NFE).

    1. ``denoised = D(x; sigma)``; if sigma_next = 0, return it (the ODE-jump).
    2. ``d = (x - denoised) / sigma`` and ``x' = x + (sigma_next - sigma) d``.
    """
    denoised = _denoise(D, x, sigma)
    if sigma_next == 0:
        return denoised.clone(), denoised
    d = (x - denoised) / sigma
    return x + (sigma_next - sigma) * d, denoised


def heun_step(D: Denoise, x: torch.Tensor, sigma: float, sigma_next: float, prev=None):
    """One step of EDM's Algorithm 1 (Heun's 2nd-order method; 2 NFE, 1 when sigma_next = 0).

    1. ``denoised = D(x; sigma)``; if sigma_next = 0, return it (the Euler step would be
       the same point up to rounding; the ODE-jump returns it exactly).
    2. Euler: ``d = (x - denoised) / sigma``, ``x' = x + (sigma_next - sigma) d``.
    3. Correction: ``d' = (x' - D(x'; sigma_next)) / sigma_next`` and
       ``x' = x + (sigma_next - sigma) (d + d') / 2``.
    """
    denoised = _denoise(D, x, sigma)
    if sigma_next == 0:
        return denoised.clone(), denoised
    d = (x - denoised) / sigma
    x_next = x + (sigma_next - sigma) * d
    d_prime = (x_next - _denoise(D, x_next, sigma_next)) / sigma_next
    return x + (sigma_next - sigma) * (0.5 * d + 0.5 * d_prime), denoised


def dpmpp2m_step(D: Denoise, x: torch.Tensor, sigma: float, sigma_next: float, prev=None):
    """One step of DPM-Solver++(2M) in k-diffusion's sigma / log-sigma parametrization (1 NFE).

    With ``t = -log sigma`` and ``h = t_next - t``:
    1. ``denoised = D(x; sigma)``; if sigma_next = 0, return it.
    2. First order (the first step, ``prev`` None):
       ``x' = (sigma_next / sigma) x - expm1(-h) denoised``.
    3. Otherwise, with ``(sigma_prev, denoised_prev) = prev`` and ``r = (t - t_prev) / h``:
       ``D_d = (1 + 1 / (2r)) denoised - (1 / (2r)) denoised_prev`` and
       ``x' = (sigma_next / sigma) x - expm1(-h) D_d``.
    """
    denoised = _denoise(D, x, sigma)
    if sigma_next == 0:
        return denoised.clone(), denoised
    h = math.log(sigma) - math.log(sigma_next)
    coef = -math.expm1(-h)  # = 1 - sigma_next / sigma
    if prev is None:
        d_used = denoised
    else:
        sigma_prev, old_denoised = prev
        r = (math.log(sigma_prev) - math.log(sigma)) / h
        d_used = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
    return (sigma_next / sigma) * x + coef * d_used, denoised


def churn(x: torch.Tensor, sigma: float, gamma: float, noise: torch.Tensor | None, S_noise: float = 1.0):
    """Step 1 of EDM's Algorithm 2: raise the noise level from sigma to ``sigma_hat = (1 + gamma) sigma``.

    ``x_hat = x + sqrt(sigma_hat^2 - sigma^2) S_noise eps`` (eps = ``noise``, like x;
    needed when gamma > 0). Returns ``(x_hat, sigma_hat)``; the step from sigma_hat to
    sigma_next is then Heun's (steps 2-3 of Algorithm 2 are Algorithm 1's).
    """
    sigma_hat = sigma * (1.0 + gamma)
    if gamma <= 0:
        return x, sigma_hat
    if noise is None:
        raise InputError("noise: required when gamma > 0")
    return x + math.sqrt(sigma_hat**2 - sigma**2) * S_noise * noise.to(device=x.device, dtype=x.dtype), sigma_hat


def churn_gamma(sigma: float, steps: int, S_churn: float, S_min: float, S_max: float) -> float:
    """EDM's ``gamma_i = min(S_churn / N, sqrt(2) - 1)`` if S_min <= sigma <= S_max, else 0
    (0 at sigma = inf: pure noise needs no more)."""
    if S_churn > 0 and S_min <= sigma <= S_max and sigma < math.inf:
        return min(S_churn / steps, math.sqrt(2.0) - 1.0)
    return 0.0


# ---------------------------------------------------------------------------------------
# The table of solvers.


@dataclass(frozen=True)
class Solver:
    """One entry of ``SOLVERS``.

    step: ``step(D, x, sigma, sigma_next, prev) -> (x_next, denoised)`` (see the steps above).
    options: the keyword options ``sample`` accepts for it, with their defaults.
    churns: add EDM's churn noise (``churn``) before each step (options S_churn, S_min,
        S_max, S_noise).
    description: one line for ``--help`` texts.
    """

    step: Callable
    options: dict = field(default_factory=dict)
    churns: bool = False
    description: str = ""


#: Solver names accepted by ``sample`` and what each runs.
SOLVERS: dict[str, Solver] = {
    "euler": Solver(euler_step, description="Euler (1 NFE per step)"),
    "heun": Solver(heun_step, description="EDM Algorithm 1: Heun's 2nd-order method (2 NFE per step)"),
    "dpmpp2m": Solver(dpmpp2m_step, description="DPM-Solver++(2M) (1 NFE per step)"),
    "edm_stochastic": Solver(
        heun_step, {"S_churn": 0.0, "S_min": 0.0, "S_max": math.inf, "S_noise": 1.0}, churns=True,
        description="EDM Algorithm 2: churn noise, then a Heun step (S_churn = 0: Heun)",
    ),
}
_SOLVER_ALIASES = {
    "dpmpp_2m": "dpmpp2m",
    "dpm++2m": "dpmpp2m",
    "dpm_solver++2m": "dpmpp2m",
    "stochastic": "edm_stochastic",
    "edm_sde": "edm_stochastic",
}


def get_solver(solver) -> str:
    """The canonical name of a solver (aliases such as "dpmpp_2m" accepted); InputError otherwise."""
    if not isinstance(solver, str):
        raise DtypeError(f"solver: expected a name, one of {', '.join(SOLVERS)}; got {solver!r}")
    key = solver.strip().lower().replace("-", "_")
    key = _SOLVER_ALIASES.get(key, key)
    if key not in SOLVERS:
        raise InputError(f"solver: unknown solver {solver!r}; expected one of {', '.join(SOLVERS)}")
    return key


def solver_options(solver: str, kw: dict) -> dict:
    """The options of ``solver`` (a canonical name): its defaults updated with ``kw``, checked."""
    accepted = SOLVERS[solver].options
    unknown = sorted(set(kw) - set(accepted))
    if unknown:
        hint = f"accepted: {', '.join(accepted)}" if accepted else "it takes no options"
        raise InputError(f"unknown option(s) {', '.join(unknown)} for solver {solver!r}; {hint}")
    opts = dict(accepted)
    for k, v in kw.items():
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or math.isnan(float(v)):
            raise InputError(f"{k}: expected a number, got {v!r}")
        opts[k] = float(v)
    if opts.get("S_churn", 0.0) < 0 or opts.get("S_noise", 1.0) < 0:
        raise InputError("S_churn and S_noise must be >= 0")
    if opts.get("S_min", 0.0) > opts.get("S_max", math.inf):
        raise InputError(f"S_min must be <= S_max, got S_min={opts['S_min']}, S_max={opts['S_max']}")
    return opts


# ---------------------------------------------------------------------------------------
# Noise.


def _generator(seed) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        if seed.device.type != "cpu":
            raise InputError(f"seed: the generator must be a CPU generator, got one on {seed.device}")
        return seed
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise DtypeError(f"seed: expected an integer or a CPU torch.Generator, got {seed!r}")
    return torch.Generator(device="cpu").manual_seed(int(seed) % (1 << 63))


def draw_x_T(n: int, shape: tuple, sigma_max: float, scale: float = 1.0, seed=0) -> torch.Tensor:
    """Initial noise in the original coordinate: ``x_T = s_0 sigma_0 n``, (n, *shape) float64 CPU
    (``x_T = n`` at sigma_0 = inf, s_0 = 0: pure noise, see ``optden.schedules``).

    The standard normal ``n`` is ``torch.randn((n, *shape), generator, float64)`` from a CPU
    generator seeded with ``seed``: the same on every device and for every batch size.
    """
    g = _generator(seed)
    z = torch.randn((n, *shape), generator=g, dtype=torch.float64)
    return z if math.isinf(sigma_max) else z * (sigma_max * scale)


class _ChurnNoise:
    """Per-step noise of EDM's stochastic sampler, independent of the batching.

    Sample j at step i gets rows of a block drawn from a generator seeded by
    (base, i, j // _NOISE_CHUNK); a batch draws the blocks it overlaps and slices them.
    """

    def __init__(self, base: int, n: int, shape: tuple):
        self.base, self.n, self.shape = base, n, tuple(shape)

    def __call__(self, step: int, start: int, stop: int) -> torch.Tensor:
        c = _NOISE_CHUNK
        blocks = []
        for j in range(start // c, (stop - 1) // c + 1):
            state = np.random.SeedSequence([self.base, step, j]).generate_state(2, dtype=np.uint32)
            g = torch.Generator(device="cpu").manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)
            rows = min(c, self.n - j * c)
            blocks.append(torch.randn((rows, *self.shape), generator=g, dtype=torch.float64))
        z = torch.cat(blocks)
        off = (start // c) * c
        return z[start - off: stop - off]


# ---------------------------------------------------------------------------------------
# Results.


@dataclass
class SampleRun:
    """Result of ``sample``; all tensors are float64 on the CPU.

    samples:    (n, *shape) the generated samples (sigma = 0, where s = 1).
    trajectory: (K + 1, n, *shape) the sampling trajectory in the scaled coordinate
                ``u = x / s`` at the grid sigmas, x_T / s_0 first (x_T itself when s_0 = 0,
                sigma_0 = inf), the samples last; None unless ``record``. K = steps, or
                the ODE-jump step count.
    denoised:   (K, n, *shape) the denoising trajectory: D at each step's starting point
                (for the stochastic sampler: at the churned point, sigma = ``eval_sigmas``);
                with ``sigma_stop`` the last entry is the ODE-jump output (= samples).
    sigmas:     (K + 1,) the grid actually used (truncated and ended with 0 by ``sigma_stop``).
    scales:     (K + 1,) s at those sigmas.
    eval_sigmas:(K,) the sigma at which each ``denoised`` entry was evaluated.
    diagnostics:``optden.posterior.Diagnostics`` with (K, n) fields, the certified posterior
                diagnostics (ESS, entropy, top weights, log p, ...) at each ``denoised`` entry
                (the same pass); None unless ``record`` and the denoiser has ``diagnostics``.
    x_T:        (n, *shape) the initial point in the original coordinate x.
    nfe:        denoiser evaluations per sample (a batched call counts once; independent of
                ``batch_size``).
    seconds:    wall time of the whole run.
    """

    samples: torch.Tensor
    trajectory: torch.Tensor | None
    denoised: torch.Tensor | None
    sigmas: torch.Tensor
    scales: torch.Tensor
    eval_sigmas: torch.Tensor
    x_T: torch.Tensor
    nfe: int
    seconds: float
    solver: str = "heun"
    schedule: str = "edm"
    sigma_stop: float | None = None
    solver_options: dict = field(default_factory=dict)
    diagnostics: object | None = None

    @property
    def steps(self) -> int:
        return self.sigmas.numel() - 1

    @property
    def trajectory_x(self) -> torch.Tensor | None:
        """The sampling trajectory in the original coordinate ``x = s u``: (K + 1, n, *shape)."""
        if self.trajectory is None:
            return None
        sc = self.scales.reshape(-1, *([1] * (self.trajectory.dim() - 1)))
        return torch.where(sc == 0, self.trajectory, self.trajectory * sc)  # s = 0: x_T is held as is

    def __repr__(self) -> str:
        return (
            f"SampleRun(n={self.samples.shape[0]}, shape={tuple(self.samples.shape[1:])}, "
            f"solver={self.solver!r}, schedule={self.schedule!r}, steps={self.steps}, nfe={self.nfe}, "
            f"recorded={self.trajectory is not None}, seconds={self.seconds:.3g})"
        )


# ---------------------------------------------------------------------------------------
# The driver.


@dataclass
class _Plan:
    """The grid of one run. sig: the schedule's sigmas (floats, ending with 0); gammas:
    churn per step; steps: N; k_stop: the ODE-jump index (None: integrate to 0);
    K: the denoising-trajectory entries (N, or k_stop + 1)."""

    sig: list
    gammas: list
    steps: int
    k_stop: int | None

    @property
    def K(self) -> int:
        return self.steps if self.k_stop is None else self.k_stop + 1

    @property
    def integrated(self) -> int:
        """Solver steps before the ODE-jump (all N without one)."""
        return self.steps if self.k_stop is None else self.k_stop

    def sigma_hat(self, i: int) -> float:
        return self.sig[i] * (1.0 + self.gammas[i])


class _DiagnosticsRecorder:
    """Stands in for a denoiser with ``diagnostics`` (``OptimalDenoiser``) while ``sample``
    records: each call runs ``den.diagnostics`` (D* and the diagnostics from one pass) and
    returns D*; ``step_done`` keeps the step's first evaluation (the ``denoised`` entry)."""

    def __init__(self, den):
        self.den = den
        self.device = getattr(den, "device", None)
        self.d = getattr(den, "d", None)
        self.pending: list = []
        self.steps: list = []

    def __call__(self, x, sigma, labels=None):
        diag = self.den.diagnostics(x, sigma, labels)
        self.pending.append(diag)
        return diag.denoised.reshape(x.shape)

    def step_done(self, info=None) -> None:
        self.steps.append(self.pending[0])
        self.pending = []

    def take(self) -> list:
        steps, self.steps = self.steps, []
        return steps


def _records_diagnostics(den, record: bool, diagnostics) -> bool:
    """Whether ``sample`` records the diagnostics (see its ``diagnostics`` argument)."""
    if diagnostics is not None and not isinstance(diagnostics, bool):
        raise DtypeError(f"diagnostics: expected None, True or False, got {diagnostics!r}")
    has = callable(getattr(den, "diagnostics", None))
    if diagnostics is True and not has:
        raise InputError("diagnostics: this denoiser has no diagnostics method (an optden.OptimalDenoiser has)")
    if not record or diagnostics is False or not has:
        return False
    pruner = getattr(den, "pruner", None)
    return diagnostics is True or not (callable(pruner) and pruner() is not None)


def _stop_index(sigmas: torch.Tensor, sigma_stop) -> int | None:
    """Index k of the first grid sigma <= sigma_stop (None when that is the final 0)."""
    if sigma_stop is None:
        return None
    if isinstance(sigma_stop, bool) or not isinstance(sigma_stop, numbers.Real):
        raise DtypeError(f"sigma_stop: expected a positive number, got {sigma_stop!r}")
    v = float(sigma_stop)
    if not math.isfinite(v) or v <= 0:
        raise InputError(f"sigma_stop: must be finite and > 0, got {sigma_stop!r}")
    k = int(torch.nonzero(sigmas <= v)[0])
    return None if k == sigmas.numel() - 1 else k


def evaluation_steps(schedule, steps: int | None = None, sigma_stop: float | None = None) -> int:
    """How many steps (denoiser evaluations of a batch, callback calls, progress-bar ticks)
    ``sample`` makes on this grid: its steps, or up to the ODE-jump with ``sigma_stop``."""
    sched = get_schedule(schedule, steps if isinstance(schedule, str) else None)
    k = _stop_index(sched.sigmas, sigma_stop)
    return sched.steps if k is None else k + 1


def _run_batch(D: Denoise, u: torch.Tensor, plan: _Plan, solver: Solver, opts: dict, noise, rows: slice,
               traj, dens, callback, bar) -> torch.Tensor:
    """Integrate one batch (rows of the run) from u = x_T / s_0 and return its samples.

    noise(i): this batch's churn noise at step i (None for solvers without churn).
    traj / dens: the run's recorded trajectories (None unless ``record``), filled at ``rows``.
    """
    if traj is not None:
        traj[0, rows] = u.cpu()
    prev = None
    for i in range(plan.integrated):
        sigma, sigma_next = plan.sig[i], plan.sig[i + 1]
        # 1. EDM's churn (Algorithm 2, step 1): x_hat at sigma_hat (x, sigma when gamma = 0)
        x_hat, sigma_hat = u, plan.sigma_hat(i)
        if solver.churns and plan.gammas[i] > 0:
            x_hat, sigma_hat = churn(u, sigma, plan.gammas[i], noise(i), opts["S_noise"])
        # 2. the solver's step from sigma_hat to sigma_next; from pure noise (sigma = inf, u
        #    holds x_T = n) every step has one limit, u' = D(.; inf) + sigma_next n
        if math.isinf(sigma_hat):
            den_i = _denoise(D, x_hat, sigma_hat)
            u = den_i + sigma_next * x_hat if sigma_next > 0 else den_i.clone()
        else:
            u, den_i = solver.step(D, x_hat, sigma_hat, sigma_next, prev)
        prev = (sigma, den_i)
        # 3. record and report
        if traj is not None:
            traj[i + 1, rows] = u.cpu()
            dens[i, rows] = den_i.cpu()
        if callback is not None:
            callback({"x": x_hat, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": den_i})
        bar.update(1)
    if plan.k_stop is not None:
        # 4. ODE-jump from the first grid sigma <= sigma_stop straight to 0.
        sigma = plan.sig[plan.k_stop]
        x_hat, u = u, D(u, sigma)
        if traj is not None:
            traj[plan.K, rows] = u.cpu()
            dens[plan.K - 1, rows] = u.cpu()
        if callback is not None:
            callback({"x": x_hat, "i": plan.k_stop, "sigma": sigma, "sigma_hat": sigma, "denoised": u})
        bar.update(1)
    return u


def ode_jump(den, x, sigma, labels=None, device=None, dtype=None, class_labels=None) -> torch.Tensor:
    """The ODE-jump: one Euler step from sigma straight to 0, i.e. ``D(x; sigma)``.

    x: (n, *shape) in the scaled coordinate; sigma: a positive float or (n,).
    Returns (n, *shape) float64 on the CPU.
    """
    t = check_points(den, x, "x")
    s = check_sigma(sigma, t.shape[0], "sigma")
    call = DenoiserCall(den, device, dtype)
    lab = as_labels(labels, t.shape[0], class_labels)
    u = t.to(device=call.device, dtype=torch.float64)
    return call(u, s, None if lab is None else lab.to(call.device)).cpu()


def sample(
    den,
    n: int = 64,
    steps: int = 18,
    solver: str = "heun",
    schedule="edm",
    seed=0,
    record: bool = False,
    shape=None,
    x_T=None,
    sigma_stop: float | None = None,
    labels=None,
    batch_size: int | None = None,
    progress: bool | None = None,
    device=None,
    dtype: torch.dtype | None = None,
    callback: Callable[[dict], None] | None = None,
    class_labels=None,
    diagnostics: bool | None = None,
    **solver_kwargs,
) -> SampleRun:
    """Sample with any denoiser ``D(x, sigma)`` by a PF-ODE solver (or EDM's SDE sampler).

    den: the denoiser (``OptimalDenoiser`` or any callable with the EDM signature).
    n: number of samples (ignored when ``x_T`` is given: its batch size is used).
    steps: solver steps N for a named schedule (a list / ``Schedule`` defines its own).
    solver: a name of ``SOLVERS``: ``"euler"``, ``"heun"`` (EDM Algorithm 1),
        ``"dpmpp2m"`` (DPM-Solver++(2M)), ``"edm_stochastic"`` (EDM Algorithm 2; options
        S_churn=0, S_min=0, S_max=inf, S_noise=1 through ``solver_kwargs``).
    schedule: a name (``"edm"``, ``"polynomial"``, ``"loguniform"``, ``"vp"``, ``"flow"``), a
        list of sigmas, or a ``Schedule`` from ``get_schedule`` (to set its options).
    seed: int or CPU ``torch.Generator``: x_T = s_0 sigma_0 randn((n, *shape), float64).
    record: keep the sampling and denoising trajectories (and the diagnostics, below).
    diagnostics: with ``record``, also keep the certified posterior diagnostics at every
        ``denoised`` entry (``SampleRun.diagnostics``: ESS, entropy, top weights, log p;
        from the pass that computes D*), for a denoiser with a ``diagnostics`` method
        (``OptimalDenoiser``). Default (None): yes when it has one and does not prune
        (the diagnostics run dense passes; True asks for them from a pruning one too).
    shape: per-sample shape; defaults to ``den.image_shape``.
    x_T: (n, *shape) initial points in the original coordinate x (replaces the noise).
    sigma_stop: ODE-jump: integrate down to the first grid sigma <= sigma_stop, then
        return ``D(x; sigma)`` there as the sample.
    labels: per-sample class labels (n,) (or one int), passed as ``D(x, sigma, labels)``;
        ``class_labels`` is EDM's name for it (pass one of them; one-hot vectors accepted).
    batch_size: samples per batch (default: all n at once).
    progress: tqdm bar (default: only when stderr is a terminal).
    device / dtype: where and in which dtype D is called (default: ``den.device`` or the
        module's parameter device; float64, or a module's parameter dtype).
    callback: called after every step of every batch with k-diffusion's dict ``{"x": the
        point D was evaluated at (after EDM's churn), "i": the step, "sigma": sigma_i,
        "sigma_hat": the sigma D was evaluated at, "denoised": D there}`` (scaled
        coordinate; a batch's rows; batches run one after another).

    Returns a ``SampleRun`` (see its docstring for shapes and coordinates).
    """
    t_start = time.perf_counter()
    # 1. Arguments: solver, schedule, denoiser, starting noise, labels, batches.
    name = get_solver(solver)
    slv = SOLVERS[name]
    opts = solver_options(name, solver_kwargs)
    sched = get_schedule(schedule, steps if isinstance(schedule, str) else None)
    sigmas, scales = sched.sigmas, sched.scales
    N = sched.steps
    recorder = _DiagnosticsRecorder(den) if _records_diagnostics(den, record, diagnostics) else None
    call = DenoiserCall(den if recorder is None else recorder, device, dtype)
    gen = _generator(seed)
    if x_T is not None:
        xT = check_points(den, x_T, "x_T").clone()
        shp = tuple(xT.shape[1:])
        if shape is not None and image_shape_of(den, shape) != shp:
            raise InputError(f"x_T: shape {tuple(xT.shape)} does not match shape={tuple(shape)}")
        n = xT.shape[0]
    else:
        n = check_positive_int(n, "n")
        shp = image_shape_of(den, shape)
        xT = draw_x_T(n, shp, float(sigmas[0]), float(scales[0]), gen)
    lab = as_labels(labels, n, class_labels)
    bs = n if batch_size is None else check_positive_int(batch_size, "batch_size")
    if callback is not None and not callable(callback):
        raise DtypeError(f"callback: expected a callable taking a dict, got {type(callback).__name__}")

    # 2. The grid: sigmas, EDM's churn per step, the ODE-jump.
    sig = [float(s) for s in sigmas]
    gammas = [churn_gamma(sig[i], N, opts["S_churn"], opts["S_min"], opts["S_max"]) if slv.churns else 0.0
              for i in range(N)]
    plan = _Plan(sig, gammas, N, _stop_index(sigmas, sigma_stop))
    churn_noise = None
    if slv.churns and opts["S_churn"] > 0:
        churn_noise = _ChurnNoise(int(torch.randint(0, 2**62, (1,), generator=gen)), n, shp)

    # 3. Outputs (CPU, float64), then the batches: state u = x / s in float64 on the denoiser's device.
    samples = torch.empty((n, *shp), dtype=torch.float64)
    traj = torch.empty((plan.K + 1, n, *shp), dtype=torch.float64) if record else None
    dens = torch.empty((plan.K, n, *shp), dtype=torch.float64) if record else None
    from tqdm.auto import tqdm

    n_batches = (n + bs - 1) // bs
    bar = tqdm(total=n_batches * plan.K, desc=f"sample[{name}]", unit="step", disable=not progress_enabled(progress))
    nfe = 0
    per_batch = []
    steps_cb = callback
    if recorder is not None:
        def steps_cb(info):
            recorder.step_done()
            if callback is not None:
                callback(info)
    try:
        for b0 in range(0, n, bs):
            b1 = min(n, b0 + bs)
            D = call.bind(None if lab is None else lab[b0:b1].to(call.device))
            noise = None if churn_noise is None else (lambda i, b0=b0, b1=b1: churn_noise(i, b0, b1))
            calls_before = call.calls
            u = (xT[b0:b1] if float(scales[0]) == 0 else xT[b0:b1] / float(scales[0])).to(call.device)
            u = _run_batch(D, u, plan, slv, opts, noise, slice(b0, b1), traj, dens, steps_cb, bar)
            samples[b0:b1] = u.cpu()
            if recorder is not None:
                per_batch.append(recorder.take())
            nfe = call.calls - calls_before
    finally:
        bar.close()

    # 4. The grid actually used.
    if plan.k_stop is None:
        used_sig, used_sc = sigmas.clone(), scales.clone()
        eval_sig = torch.tensor([plan.sigma_hat(i) for i in range(N)], dtype=torch.float64)
    else:
        k = plan.k_stop
        used_sig = torch.cat([sigmas[: k + 1], sigmas.new_zeros(1)])
        used_sc = torch.cat([scales[: k + 1], scales.new_ones(1)])
        eval_sig = torch.tensor([plan.sigma_hat(i) for i in range(k)] + [sig[k]], dtype=torch.float64)
    diagnostics = None
    if recorder is not None:
        from .posterior import Diagnostics

        diagnostics = Diagnostics.stack([Diagnostics.cat([b[i] for b in per_batch]) for i in range(plan.K)])
    return SampleRun(
        diagnostics=diagnostics,
        samples=samples,
        trajectory=traj,
        denoised=dens,
        sigmas=used_sig,
        scales=used_sc,
        eval_sigmas=eval_sig,
        x_T=xT,
        nfe=nfe,
        seconds=time.perf_counter() - t_start,
        solver=name,
        schedule=sched.name,
        sigma_stop=None if sigma_stop is None else float(sigma_stop),
        solver_options=opts,
    )
