"""Probability-flow ODE samplers (and EDM's stochastic sampler) for any denoiser.

Every solver takes a denoiser with the EDM / k-diffusion signature ``D(x, sigma)``
(x: (B, *shape), sigma: a float or a (B,) tensor; returns a tensor like x). The optimal
denoiser ``optden.OptimalDenoiser`` is one; a trained network wrapped to that signature
is another.

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
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .errors import DtypeError, InputError
from .schedules import get_schedule
from .validate import as_tensor, check_positive_int, check_queries, check_sigma

__all__ = [
    "SampleRun",
    "sample",
    "ode_jump",
    "euler_step",
    "heun_step",
    "dpmpp2m_step",
    "edm_stochastic_step",
    "SOLVERS",
]

#: Solver names accepted by ``sample``.
SOLVERS = ("euler", "heun", "dpmpp2m", "edm_stochastic")
_SOLVER_ALIASES = {
    "dpmpp_2m": "dpmpp2m",
    "dpm++2m": "dpmpp2m",
    "dpm_solver++2m": "dpmpp2m",
    "stochastic": "edm_stochastic",
    "edm_sde": "edm_stochastic",
}
_SOLVER_OPTIONS = {
    "euler": {},
    "heun": {},
    "dpmpp2m": {},
    "edm_stochastic": {"S_churn": 0.0, "S_min": 0.0, "S_max": math.inf, "S_noise": 1.0},
}

# Samples per block of churn noise: noise of sample j at step i comes from a generator
# seeded by (base seed, i, j // _NOISE_CHUNK), whatever the batch size.
_NOISE_CHUNK = 16

Denoise = Callable[[torch.Tensor, float], torch.Tensor]


# ---------------------------------------------------------------------------------------
# Single steps. ``D`` is any callable D(x, sigma) with sigma a Python float; x is the
# state in the scaled coordinate. Each returns ``(x_next, denoised)`` where ``denoised``
# is D at the step's starting point (for the stochastic step: at the churned point).


def _denoise(D, x: torch.Tensor, sigma: float) -> torch.Tensor:
    return torch.as_tensor(D(x, sigma)).to(device=x.device, dtype=x.dtype).reshape(x.shape)


def euler_step(D: Denoise, x: torch.Tensor, sigma: float, sigma_next: float):
    """One Euler step of the PF-ODE from sigma to sigma_next (1 NFE).

    ``x' = x + (sigma_next - sigma) (x - D) / sigma = D + (sigma_next / sigma) (x - D)``;
    with sigma_next = 0 this is the ODE-jump and returns D exactly.
    x: (B, *shape). Returns ``(x_next, D(x; sigma))``, both like x.
    """
    denoised = _denoise(D, x, sigma)
    if sigma_next == 0:
        return denoised.clone(), denoised
    d = (x - denoised) / sigma
    return x + (sigma_next - sigma) * d, denoised


def heun_step(D: Denoise, x: torch.Tensor, sigma: float, sigma_next: float):
    """One step of EDM's Algorithm 1 (Heun's 2nd-order method; 2 NFE, 1 when sigma_next = 0).

    1. ``d = (x - D(x; sigma)) / sigma``; Euler ``x' = x + (sigma_next - sigma) d``.
    2. If sigma_next != 0: ``d' = (x' - D(x'; sigma_next)) / sigma_next`` and
       ``x' = x + (sigma_next - sigma) (d + d') / 2``; if sigma_next = 0 the Euler step
       is kept, and returned exactly as ``D`` (the ODE-jump).
    Returns ``(x_next, D(x; sigma))``.
    """
    denoised = _denoise(D, x, sigma)
    if sigma_next == 0:
        return denoised.clone(), denoised
    d = (x - denoised) / sigma
    x_next = x + (sigma_next - sigma) * d
    d_prime = (x_next - _denoise(D, x_next, sigma_next)) / sigma_next
    return x + (sigma_next - sigma) * (0.5 * d + 0.5 * d_prime), denoised


def dpmpp2m_step(
    D: Denoise,
    x: torch.Tensor,
    sigma: float,
    sigma_next: float,
    old_denoised: torch.Tensor | None = None,
    sigma_prev: float | None = None,
):
    """One step of DPM-Solver++(2M) in k-diffusion's sigma / log-sigma parametrization (1 NFE).

    With ``t = -log sigma`` and ``h = t_next - t``:
    1. first order (no history, or sigma_next = 0):
       ``x' = (sigma_next / sigma) x - expm1(-h) D`` (= D when sigma_next = 0);
    2. otherwise, with ``r = (t - t_prev) / h``,
       ``D_d = (1 + 1 / (2r)) D - (1 / (2r)) D_prev`` and
       ``x' = (sigma_next / sigma) x - expm1(-h) D_d``.
    old_denoised / sigma_prev: D and sigma of the previous step (None on the first step).
    Returns ``(x_next, D(x; sigma))``; pass ``denoised`` as ``old_denoised`` next time.
    """
    denoised = _denoise(D, x, sigma)
    if sigma_next == 0:
        return denoised.clone(), denoised
    h = math.log(sigma) - math.log(sigma_next)
    coef = -math.expm1(-h)  # = 1 - sigma_next / sigma
    if old_denoised is None or sigma_prev is None:
        d_used = denoised
    else:
        h_last = math.log(sigma_prev) - math.log(sigma)
        r = h_last / h
        d_used = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
    return (sigma_next / sigma) * x + coef * d_used, denoised


def edm_stochastic_step(
    D: Denoise,
    x: torch.Tensor,
    sigma: float,
    sigma_next: float,
    gamma: float = 0.0,
    noise: torch.Tensor | None = None,
    S_noise: float = 1.0,
):
    """One step of EDM's Algorithm 2 (stochastic sampler).

    1. Churn: ``sigma_hat = (1 + gamma) sigma``,
       ``x_hat = x + sqrt(sigma_hat^2 - sigma^2) S_noise eps`` (eps = ``noise``, like x).
    2. Euler from sigma_hat to sigma_next: ``d = (x_hat - D(x_hat; sigma_hat)) / sigma_hat``.
    3. Second-order correction as in Heun when sigma_next != 0.
    With gamma = 0 this is exactly ``heun_step``. Returns ``(x_next, D(x_hat; sigma_hat))``.
    """
    sigma_hat = sigma * (1.0 + gamma)
    x_hat = x
    if gamma > 0:
        if noise is None:
            raise InputError("noise: required when gamma > 0")
        x_hat = x + math.sqrt(sigma_hat**2 - sigma**2) * S_noise * noise.to(device=x.device, dtype=x.dtype)
    denoised = _denoise(D, x_hat, sigma_hat)
    if sigma_next == 0:
        return denoised.clone(), denoised
    d = (x_hat - denoised) / sigma_hat
    x_next = x_hat + (sigma_next - sigma_hat) * d
    d_prime = (x_next - _denoise(D, x_next, sigma_next)) / sigma_next
    return x_hat + (sigma_next - sigma_hat) * (0.5 * d + 0.5 * d_prime), denoised


def churn_gamma(sigma: float, steps: int, S_churn: float, S_min: float, S_max: float) -> float:
    """EDM's ``gamma_i = min(S_churn / N, sqrt(2) - 1)`` if S_min <= sigma <= S_max, else 0."""
    if S_churn > 0 and S_min <= sigma <= S_max:
        return min(S_churn / steps, math.sqrt(2.0) - 1.0)
    return 0.0


# ---------------------------------------------------------------------------------------
# Calling a user denoiser: device, dtype, labels, shape checks, NFE count.


def _infer_device(den) -> torch.device:
    dev = getattr(den, "device", None)
    if isinstance(dev, (torch.device, str)):
        return torch.device(dev)
    if isinstance(den, torch.nn.Module):
        for p in den.parameters():
            return p.device
        for b in den.buffers():
            return b.device
    return torch.device("cpu")


def _infer_dtype(den) -> torch.dtype:
    if isinstance(den, torch.nn.Module):
        for p in den.parameters():
            if p.is_floating_point():
                return p.dtype
    return torch.float64


class _DenoiserCall:
    """Calls ``den(x, sigma[, labels=...])`` on float64 state and returns float64.

    x: (B, *shape) float64 on ``device``; sigma: a float or a (B,) tensor. The denoiser
    receives x cast to ``dtype`` and sigma as a (B,) tensor of that dtype on ``device``;
    ``labels`` (B,) are passed as a keyword only when given. ``calls`` counts batched
    evaluations.
    """

    def __init__(self, den, device=None, dtype=None):
        if not callable(den):
            raise DtypeError(f"den: expected a callable denoiser D(x, sigma), got {type(den).__name__}")
        self.den = den
        self.device = torch.device(device) if device is not None else _infer_device(den)
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise DtypeError(f"dtype: expected a floating torch dtype, got {dtype!r}")
        self.dtype = dtype if dtype is not None else _infer_dtype(den)
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma, labels: torch.Tensor | None = None) -> torch.Tensor:
        b = x.shape[0]
        if isinstance(sigma, torch.Tensor):
            s = sigma.to(device=self.device, dtype=self.dtype).reshape(-1).expand(b) if sigma.numel() == 1 \
                else sigma.to(device=self.device, dtype=self.dtype).reshape(b)
        else:
            s = torch.full((b,), float(sigma), device=self.device, dtype=self.dtype)
        xin = x.to(device=self.device, dtype=self.dtype)
        with torch.no_grad():
            out = self.den(xin, s) if labels is None else self.den(xin, s, labels=labels)
        self.calls += 1
        out = torch.as_tensor(out)
        if out.numel() != x.numel():
            raise InputError(
                f"den: returned a tensor of shape {tuple(out.shape)} for an input of shape {tuple(x.shape)}"
            )
        return out.to(device=x.device, dtype=torch.float64).reshape(x.shape)

    def bind(self, labels: torch.Tensor | None) -> Denoise:
        """D(x, sigma) with this batch's labels attached."""
        return lambda x, sigma: self(x, sigma, labels)


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
    """Initial noise in the original coordinate: ``x_T = s_0 sigma_0 n``, (n, *shape) float64 CPU.

    The standard normal ``n`` is ``torch.randn((n, *shape), generator, float64)`` from a CPU
    generator seeded with ``seed``: the same on every device and for every batch size.
    """
    g = _generator(seed)
    z = torch.randn((n, *shape), generator=g, dtype=torch.float64)
    return z * (sigma_max * scale)


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
                ``u = x / s`` at the grid sigmas, x_T / s_0 first, the samples last;
                None unless ``record``. K = steps, or the ODE-jump step count.
    denoised:   (K, n, *shape) the denoising trajectory: D at each step's starting point
                (for the stochastic sampler: at the churned point, sigma = ``eval_sigmas``);
                with ``sigma_stop`` the last entry is the ODE-jump output (= samples).
    sigmas:     (K + 1,) the grid actually used (truncated and ended with 0 by ``sigma_stop``).
    scales:     (K + 1,) s at those sigmas.
    eval_sigmas:(K,) the sigma at which each ``denoised`` entry was evaluated.
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

    @property
    def steps(self) -> int:
        return self.sigmas.numel() - 1

    @property
    def trajectory_x(self) -> torch.Tensor | None:
        """The sampling trajectory in the original coordinate ``x = s u``: (K + 1, n, *shape)."""
        if self.trajectory is None:
            return None
        return self.trajectory * self.scales.reshape(-1, *([1] * (self.trajectory.dim() - 1)))

    def __repr__(self) -> str:
        return (
            f"SampleRun(n={self.samples.shape[0]}, shape={tuple(self.samples.shape[1:])}, "
            f"solver={self.solver!r}, schedule={self.schedule!r}, steps={self.steps}, nfe={self.nfe}, "
            f"recorded={self.trajectory is not None}, seconds={self.seconds:.3g})"
        )


# ---------------------------------------------------------------------------------------
# Public entry points.


def _solver_name(solver) -> str:
    if not isinstance(solver, str):
        raise DtypeError(f"solver: expected a name, one of {', '.join(SOLVERS)}; got {solver!r}")
    key = solver.strip().lower().replace("-", "_")
    key = _SOLVER_ALIASES.get(key, key)
    if key not in SOLVERS:
        raise InputError(f"solver: unknown solver {solver!r}; expected one of {', '.join(SOLVERS)}")
    return key


def _solver_options(solver: str, kw: dict) -> dict:
    accepted = _SOLVER_OPTIONS[solver]
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
    if solver == "edm_stochastic" and opts["S_min"] > opts["S_max"]:
        raise InputError(f"S_min must be <= S_max, got S_min={opts['S_min']}, S_max={opts['S_max']}")
    return opts


def _image_shape(den, shape) -> tuple:
    if shape is None:
        shape = getattr(den, "image_shape", None)
        if shape is None:
            raise InputError("shape: required when the denoiser has no image_shape attribute")
    if isinstance(shape, numbers.Integral):
        shape = (int(shape),)
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0 or any(s < 1 for s in shape):
        raise InputError(f"shape: expected a non-empty tuple of positive sizes, got {shape}")
    return shape


def _labels(labels, n: int) -> torch.Tensor | None:
    if labels is None:
        return None
    if isinstance(labels, numbers.Integral) and not isinstance(labels, bool):
        return torch.full((n,), int(labels), dtype=torch.int64)
    t = as_tensor(labels, "labels")
    if t.is_floating_point():
        raise DtypeError(f"labels: expected integer class labels, got dtype {t.dtype}")
    t = t.reshape(-1).to(torch.int64)
    if t.numel() != n:
        raise InputError(f"labels: expected one label per sample ({n}), got {t.numel()}")
    return t


def _progress_enabled(progress) -> bool:
    if progress is None:
        try:
            return sys.stderr.isatty()
        except (AttributeError, ValueError):
            return False
    return bool(progress)


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


def _check_points(den, x, name: str) -> torch.Tensor:
    """Validate a batch (n, *shape) of points: finite, non-empty, ``den.d`` values each
    when the denoiser declares ``d``. Returns a float64 CPU tensor."""
    t = as_tensor(x, name)
    if t.dim() < 2:
        raise InputError(f"{name}: expected a batch of shape (n, *shape), got shape {tuple(t.shape)}")
    d = getattr(den, "d", None)
    d = d if isinstance(d, numbers.Integral) else int(np.prod(t.shape[1:]))
    return check_queries(t, int(d), name).detach().to("cpu", torch.float64)


def ode_jump(den, x, sigma, labels=None, device=None, dtype=None) -> torch.Tensor:
    """The ODE-jump: one Euler step from sigma straight to 0, i.e. ``D(x; sigma)``.

    x: (n, *shape) in the scaled coordinate; sigma: a positive float or (n,).
    Returns (n, *shape) float64 on the CPU.
    """
    t = _check_points(den, x, "x")
    s = check_sigma(sigma, t.shape[0], "sigma")
    call = _DenoiserCall(den, device, dtype)
    lab = _labels(labels, t.shape[0])
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
    **solver_kwargs,
) -> SampleRun:
    """Sample with any denoiser ``D(x, sigma)`` by a PF-ODE solver (or EDM's SDE sampler).

    den: the denoiser (``OptimalDenoiser`` or any callable with the EDM signature).
    n: number of samples (ignored when ``x_T`` is given: its batch size is used).
    steps: solver steps N for a named schedule (a list / ``Schedule`` defines its own).
    solver: ``"euler"``, ``"heun"`` (EDM Algorithm 1), ``"dpmpp2m"`` (DPM-Solver++(2M)),
        ``"edm_stochastic"`` (EDM Algorithm 2; options S_churn=0, S_min=0, S_max=inf,
        S_noise=1 through ``solver_kwargs``).
    schedule: a name (``"edm"``, ``"polynomial"``, ``"loguniform"``, ``"vp"``, ``"flow"``), a
        list of sigmas, or a ``Schedule`` from ``get_schedule`` (to set its options).
    seed: int or CPU ``torch.Generator``: x_T = s_0 sigma_0 randn((n, *shape), float64).
    record: keep the sampling and denoising trajectories.
    shape: per-sample shape; defaults to ``den.image_shape``.
    x_T: (n, *shape) initial points in the original coordinate x (replaces the noise).
    sigma_stop: ODE-jump: integrate down to the first grid sigma <= sigma_stop, then
        return ``D(x; sigma)`` there as the sample.
    labels: per-sample class labels (n,) (or one int), passed as ``D(x, sigma, labels=...)``.
    batch_size: samples per batch (default: all n at once).
    progress: tqdm bar (default: only when stderr is a terminal).
    device / dtype: where and in which dtype D is called (default: ``den.device`` or the
        module's parameter device; float64, or a module's parameter dtype).

    Returns a ``SampleRun`` (see its docstring for shapes and coordinates).
    """
    t_start = time.perf_counter()
    # 1. Arguments.
    solver = _solver_name(solver)
    opts = _solver_options(solver, solver_kwargs)
    sched = get_schedule(schedule, steps if isinstance(schedule, str) else None)
    sigmas, scales = sched.sigmas, sched.scales
    N = sched.steps
    call = _DenoiserCall(den, device, dtype)
    if x_T is not None:
        xT = _check_points(den, x_T, "x_T").clone()
        shp = tuple(xT.shape[1:])
        if shape is not None and _image_shape(den, shape) != shp:
            raise InputError(f"x_T: shape {tuple(xT.shape)} does not match shape={tuple(shape)}")
        n = xT.shape[0]
        gen = _generator(seed)
    else:
        n = check_positive_int(n, "n")
        shp = _image_shape(den, shape)
        gen = _generator(seed)
        xT = draw_x_T(n, shp, float(sigmas[0]), float(scales[0]), gen)
    lab = _labels(labels, n)
    bs = n if batch_size is None else check_positive_int(batch_size, "batch_size")
    k_stop = _stop_index(sigmas, sigma_stop)
    K = N if k_stop is None else k_stop + 1  # entries of the recorded denoising trajectory
    churn = None
    if solver == "edm_stochastic" and opts["S_churn"] > 0:
        base = int(torch.randint(0, 2**62, (1,), generator=gen))
        churn = _ChurnNoise(base, n, shp)
    sig = [float(s) for s in sigmas]
    gammas = [
        churn_gamma(sig[i], N, opts["S_churn"], opts["S_min"], opts["S_max"]) if solver == "edm_stochastic" else 0.0
        for i in range(N)
    ]

    # 2. Outputs (CPU, float64).
    samples = torch.empty((n, *shp), dtype=torch.float64)
    traj = torch.empty((K + 1, n, *shp), dtype=torch.float64) if record else None
    dens = torch.empty((K, n, *shp), dtype=torch.float64) if record else None

    # 3. Batches: state u = x / s in float64 on the denoiser's device.
    from tqdm.auto import tqdm

    n_batches = (n + bs - 1) // bs
    bar = tqdm(total=n_batches * K, desc=f"sample[{solver}]", unit="step", disable=not _progress_enabled(progress))
    nfe = 0
    try:
        for b0 in range(0, n, bs):
            b1 = min(n, b0 + bs)
            D = call.bind(None if lab is None else lab[b0:b1].to(call.device))
            calls_before = call.calls
            u = (xT[b0:b1] / float(scales[0])).to(call.device)
            if record:
                traj[0, b0:b1] = u.cpu()
            old_den = None
            for i in range(K if k_stop is None else k_stop):
                s_cur, s_next = sig[i], sig[i + 1]
                if solver == "euler":
                    u, den_i = euler_step(D, u, s_cur, s_next)
                elif solver == "heun":
                    u, den_i = heun_step(D, u, s_cur, s_next)
                elif solver == "dpmpp2m":
                    u, den_i = dpmpp2m_step(D, u, s_cur, s_next, old_den, sig[i - 1] if i > 0 else None)
                    old_den = den_i
                else:
                    noise = churn(i, b0, b1) if gammas[i] > 0 else None
                    u, den_i = edm_stochastic_step(D, u, s_cur, s_next, gammas[i], noise, opts["S_noise"])
                if record:
                    traj[i + 1, b0:b1] = u.cpu()
                    dens[i, b0:b1] = den_i.cpu()
                bar.update(1)
            if k_stop is not None:
                # ODE-jump from the first grid sigma <= sigma_stop straight to 0.
                u = D(u, sig[k_stop])
                if record:
                    traj[K, b0:b1] = u.cpu()
                    dens[K - 1, b0:b1] = u.cpu()
                bar.update(1)
            samples[b0:b1] = u.cpu()
            nfe = call.calls - calls_before
    finally:
        bar.close()

    # 4. The grid actually used.
    if k_stop is None:
        used_sig, used_sc = sigmas.clone(), scales.clone()
        eval_sig = torch.tensor([sig[i] * (1.0 + gammas[i]) for i in range(N)], dtype=torch.float64)
    else:
        used_sig = torch.cat([sigmas[: k_stop + 1], sigmas.new_zeros(1)])
        used_sc = torch.cat([scales[: k_stop + 1], scales.new_ones(1)])
        eval_sig = torch.tensor(
            [sig[i] * (1.0 + gammas[i]) for i in range(k_stop)] + [sig[k_stop]], dtype=torch.float64
        )
    return SampleRun(
        samples=samples,
        trajectory=traj,
        denoised=dens,
        sigmas=used_sig,
        scales=used_sc,
        eval_sigmas=eval_sig,
        x_T=xT,
        nfe=nfe,
        seconds=time.perf_counter() - t_start,
        solver=solver,
        schedule=sched.name,
        sigma_stop=None if sigma_stop is None else float(sigma_stop),
        solver_options=opts,
    )
