"""Noise schedules: the (s, sigma) grids that samplers step along.

EDM's general form writes a noisy sample as ``x = s(t) * (x0 + sigma(t) * n)``
(docs/design.md, "The math"). A schedule is the decreasing grid of ``sigma_i`` a sampler visits,
ending with ``sigma_N = 0``, together with the scale ``s_i`` at each point:

- VE schedules (``"edm"``, ``"polynomial"``, ``"loguniform"``, a user list): ``s = 1``.
- ``"vp"``: EDM's variance-preserving DDPM schedule with a linear beta,
  ``sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)``, ``s(t) = 1 / sqrt(1 + sigma^2)``,
  on the time grid ``t_i = 1 + i / (N - 1) (eps_s - 1)`` followed by ``t = 0``.
- ``"flow"`` (flow matching / rectified flow, ``x_t = (1 - t) x0 + t n``):
  ``s = 1 - t``, ``sigma = t / (1 - t)``, on the uniform time grid from ``t = 1 - eps``
  to ``t = 0``.

Samplers integrate in the scaled coordinate ``u = x / s``, where the probability-flow
ODE is exactly the VE one in sigma; the scales only matter to map back to ``x``.

Pure noise. A grid may start at ``sigma = inf`` with ``s = 0`` (flow matching at t = 1,
``flow_schedule(eps=0)``, as diffusers' FlowMatchEulerDiscreteScheduler starts; VP with a
zero terminal SNR): there ``x = n`` is standard noise and D(x; inf) is the data mean.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch

from .errors import DtypeError, InputError
from .validate import as_tensor, check_positive_int

__all__ = [
    "Schedule",
    "get_schedule",
    "edm_sigmas",
    "polynomial_sigmas",
    "loguniform_sigmas",
    "vp_schedule",
    "flow_schedule",
    "vp_sigma",
    "SCHEDULES",
]


@dataclass(frozen=True)
class Schedule:
    """A sampling grid in EDM's general form ``x = s * (x0 + sigma * n)``.

    sigmas: (steps + 1,) float64, strictly decreasing positive values then a final 0; the
            first may be ``inf`` (pure noise) where its scale is 0.
    scales: (steps + 1,) float64 positive ``s_i`` (all ones for VE schedules); 0 only at
            ``sigma = inf``, where ``x = n`` is pure standard noise.
    times:  (steps + 1,) float64 diffusion times ``t_i`` of VP / flow schedules, else None
            (for VE schedules ``t = sigma``).
    name:   the schedule's name (``"custom"`` for user lists).
    """

    sigmas: torch.Tensor
    scales: torch.Tensor = None
    times: torch.Tensor | None = None
    name: str = "custom"
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        sig = check_sigma_list(self.sigmas, "sigmas")
        object.__setattr__(self, "sigmas", sig)
        if self.scales is None:
            sc = torch.ones_like(sig)
        else:
            sc = _as_float64_vector(self.scales, "scales")
            if sc.shape != sig.shape:
                raise InputError(
                    f"scales: expected one scale per sigma ({sig.numel()} values), got {sc.numel()}"
                )
            pure = torch.isinf(sig)
            if not bool(torch.isfinite(sc).all()) or bool((sc[~pure] <= 0).any()):
                raise InputError("scales: every scale s must be finite and > 0 (0 only at sigma = inf)")
        if bool((sc[torch.isinf(sig)] != 0).any()):
            raise InputError("sigmas: inf (pure noise) needs a schedule whose scale is 0 there (flow matching at "
                             "t = 1: get_schedule('flow', steps, eps=0)); a VE grid cannot start from infinite noise")
        object.__setattr__(self, "scales", sc)
        if self.times is not None:
            t = _as_float64_vector(self.times, "times")
            if t.shape != sig.shape:
                raise InputError(f"times: expected {sig.numel()} values, got {t.numel()}")
            object.__setattr__(self, "times", t)

    @property
    def steps(self) -> int:
        """Number of solver steps (intervals of the grid)."""
        return self.sigmas.numel() - 1

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_min(self) -> float:
        """The smallest positive sigma of the grid (the last before the final 0)."""
        return float(self.sigmas[-2])

    def __len__(self) -> int:
        return self.sigmas.numel()

    def to_dict(self) -> dict:
        """Plain Python lists (JSON-ready)."""
        out = {"name": self.name, "sigmas": self.sigmas.tolist(), "scales": self.scales.tolist()}
        if self.times is not None:
            out["times"] = self.times.tolist()
        out["options"] = dict(self.options)
        return out

    def __repr__(self) -> str:
        return (
            f"Schedule(name={self.name!r}, steps={self.steps}, sigma_max={self.sigma_max:.4g}, "
            f"sigma_min={self.sigma_min:.4g})"
        )


# ---------------------------------------------------------------------------------------
# Argument checks.


def _as_float64_vector(values, name: str) -> torch.Tensor:
    if isinstance(values, (str, bytes)):
        raise DtypeError(f"{name}: expected a sequence of numbers, got the string {values!r}")
    t = as_tensor(values, name).detach().to("cpu", torch.float64)
    if t.dim() == 0:
        t = t.reshape(1)
    if t.dim() != 1:
        raise InputError(f"{name}: expected a 1-D sequence, got shape {tuple(t.shape)}")
    return t.clone()


def check_sigma_list(values, name: str) -> torch.Tensor:
    """Validate a user sigma grid; returns (K + 1,) float64 ending with 0.

    Accepts positive, strictly decreasing values, optionally ending with a single 0
    (appended when missing); the first may be inf (pure noise, see ``Schedule``).
    """
    s = _as_float64_vector(values, name)
    if s.numel() == 0:
        raise InputError(f"{name}: expected at least one positive sigma, got an empty list")
    if not bool(torch.isfinite(s[1:]).all()) or bool(torch.isnan(s[:1]).any()) or float(s[0]) == -math.inf:
        raise InputError(f"{name}: contains NaN or inf (only the first sigma may be inf: pure noise)")
    if float(s[-1]) != 0.0:
        s = torch.cat([s, s.new_zeros(1)])
    pos = s[:-1]
    if pos.numel() == 0:
        raise InputError(f"{name}: expected at least one positive sigma before the final 0")
    if bool((pos <= 0).any()):
        bad = float(pos[pos <= 0][0])
        raise InputError(
            f"{name}: every sigma but a final 0 must be > 0, got {bad} "
            f"(a 0 may only appear once, at the end)"
        )
    if pos.numel() > 1:
        diffs = pos[1:] - pos[:-1]
        if bool((diffs >= 0).any()):
            i = int(torch.nonzero(diffs >= 0)[0])
            raise InputError(
                f"{name}: sigmas must be strictly decreasing, got {float(pos[i])} then "
                f"{float(pos[i + 1])} at positions {i}, {i + 1}"
            )
    return s


def _positive(value, name: str, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise DtypeError(f"{name}: expected a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise InputError(f"{name}: must be finite and {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return v


def _open_unit(value, name: str) -> float:
    v = _positive(value, name)
    if not v < 1.0:
        raise InputError(f"{name}: must lie in (0, 1), got {value!r}")
    return v


def _sigma_range(sigma_min, sigma_max) -> tuple[float, float]:
    lo = _positive(sigma_min, "sigma_min")
    hi = _positive(sigma_max, "sigma_max")
    if not lo < hi:
        raise InputError(f"sigma_min must be < sigma_max, got sigma_min={lo}, sigma_max={hi}")
    return lo, hi


def _append_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_zeros(1)])


# ---------------------------------------------------------------------------------------
# VE schedules (s = 1).


def polynomial_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """EDM's polynomial grid, (steps + 1,) float64 ending with 0.

    ``sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``
    for i = 0..N-1, then ``sigma_N = 0``. With N = 1 the grid is ``[sigma_max, 0]``.
    """
    steps = check_positive_int(steps, "steps")
    lo, hi = _sigma_range(sigma_min, sigma_max)
    rho = _positive(rho, "rho")
    if steps == 1:
        return torch.tensor([hi, 0.0], dtype=torch.float64)
    i = torch.arange(steps, dtype=torch.float64)
    a, b = hi ** (1.0 / rho), lo ** (1.0 / rho)
    sig = (a + i / (steps - 1) * (b - a)) ** rho
    sig[0], sig[-1] = hi, lo  # exact end points despite the power round trip
    return _append_zero(sig)


def edm_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """EDM (Karras et al. 2022) default: the polynomial grid with rho = 7, sigma in [0.002, 80]."""
    return polynomial_sigmas(steps, sigma_min, sigma_max, rho)


def loguniform_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0) -> torch.Tensor:
    """Geometric grid from sigma_max to sigma_min (Song et al.'s VE), then 0: (steps + 1,)."""
    steps = check_positive_int(steps, "steps")
    lo, hi = _sigma_range(sigma_min, sigma_max)
    if steps == 1:
        return torch.tensor([hi, 0.0], dtype=torch.float64)
    sig = torch.exp(torch.linspace(math.log(hi), math.log(lo), steps, dtype=torch.float64))
    sig[0], sig[-1] = hi, lo
    return _append_zero(sig)


# ---------------------------------------------------------------------------------------
# Scaled schedules.


def vp_sigma(t, beta_d: float = 19.9, beta_min: float = 0.1) -> torch.Tensor:
    """EDM's VP noise level ``sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)`` (float64)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return torch.sqrt(torch.expm1(0.5 * beta_d * t**2 + beta_min * t))


def vp_schedule(steps: int, beta_d: float = 19.9, beta_min: float = 0.1, eps_s: float = 1e-3) -> Schedule:
    """EDM's VP (DDPM, linear beta) schedule.

    1. time grid ``t_i = 1 + i / (N - 1) (eps_s - 1)`` for i = 0..N-1 (t_0 = 1, t_{N-1} = eps_s),
       then ``t_N = 0``;
    2. ``sigma_i = sigma(t_i)`` (``vp_sigma``), ``s_i = 1 / sqrt(1 + sigma_i^2)``; at t = 0,
       sigma = 0 and s = 1.
    """
    steps = check_positive_int(steps, "steps")
    beta_d = _positive(beta_d, "beta_d")
    beta_min = _positive(beta_min, "beta_min", allow_zero=True)
    eps_s = _open_unit(eps_s, "eps_s")
    if steps == 1:
        t = torch.tensor([1.0], dtype=torch.float64)
    else:
        i = torch.arange(steps, dtype=torch.float64)
        t = 1.0 + i / (steps - 1) * (eps_s - 1.0)
    t = _append_zero(t)
    sig = vp_sigma(t, beta_d, beta_min)
    sig[-1] = 0.0
    scales = 1.0 / torch.sqrt(1.0 + sig**2)
    return Schedule(
        sigmas=sig, scales=scales, times=t, name="vp",
        options=dict(beta_d=beta_d, beta_min=beta_min, eps_s=eps_s),
    )


def flow_schedule(steps: int, eps: float = 1e-3, shift: float = 1.0) -> Schedule:
    """Flow matching / rectified flow ``x_t = (1 - t) x0 + t n``.

    1. uniform time grid ``t_i = (1 - eps) (1 - i / N)``, i = 0..N (from 1 - eps down to 0;
       ``eps = 0`` starts at t = 1: pure noise, sigma = inf, as diffusers' flow matching does);
    2. optional time shift (as in Stable Diffusion 3): ``t <- shift t / (1 + (shift - 1) t)``;
    3. ``s_i = 1 - t_i``, ``sigma_i = t_i / (1 - t_i)``.
    """
    steps = check_positive_int(steps, "steps")
    eps = 0.0 if isinstance(eps, numbers.Real) and not isinstance(eps, bool) and eps == 0 else _open_unit(eps, "eps")
    shift = _positive(shift, "shift")
    i = torch.arange(steps + 1, dtype=torch.float64)
    t = (1.0 - eps) * (1.0 - i / steps)
    if shift != 1.0:
        t = shift * t / (1.0 + (shift - 1.0) * t)
    t[-1] = 0.0
    sig = t / (1.0 - t)  # inf at t = 1 (eps = 0)
    return Schedule(sigmas=sig, scales=1.0 - t, times=t, name="flow", options=dict(eps=eps, shift=shift))


# ---------------------------------------------------------------------------------------
# Registry.

_VE = {
    "edm": (edm_sigmas, ("sigma_min", "sigma_max", "rho")),
    "polynomial": (polynomial_sigmas, ("sigma_min", "sigma_max", "rho")),
    "loguniform": (loguniform_sigmas, ("sigma_min", "sigma_max")),
}
_SCALED = {
    "vp": (vp_schedule, ("beta_d", "beta_min", "eps_s")),
    "flow": (flow_schedule, ("eps", "shift")),
}
_ALIASES = {
    "karras": "edm",
    "log_uniform": "loguniform",
    "geometric": "loguniform",
    "ve": "loguniform",
    "ddpm": "vp",
    "rectified_flow": "flow",
    "flow_matching": "flow",
    "rf": "flow",
}

#: The schedule names ``get_schedule`` accepts (aliases: see ``_ALIASES``).
SCHEDULES = tuple(_VE) + tuple(_SCALED)


def _canonical(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in _VE and key not in _SCALED:
        raise InputError(
            f"schedule: unknown schedule {name!r}; expected one of {', '.join(SCHEDULES)} "
            f"or a list of sigmas"
        )
    return key


def get_schedule(name_or_list, steps: int | None = None, **kw) -> Schedule:
    """Build a sampling grid.

    name_or_list: a name in ``SCHEDULES`` (``"edm"``, ``"polynomial"``, ``"loguniform"``,
        ``"vp"``, ``"flow"``), a ``Schedule`` (returned as is), or a sequence / array /
        tensor of sigmas: finite, positive, strictly decreasing, optionally ending with 0
        (appended when absent). User lists are VE (s = 1).
    steps: number of solver steps N (>= 1) for a named schedule; for a list it may be
        omitted, and when given must equal the list's number of steps.
    kw: options of the named schedule: ``sigma_min``, ``sigma_max`` (edm, polynomial,
        loguniform), ``rho`` (edm, polynomial), ``beta_d``, ``beta_min``, ``eps_s`` (vp),
        ``eps``, ``shift`` (flow).

    Returns a ``Schedule`` with ``sigmas`` and ``scales`` of shape (N + 1,), float64.
    """
    if isinstance(name_or_list, Schedule):
        if kw:
            raise InputError(f"schedule options {sorted(kw)} cannot be applied to a ready Schedule")
        if steps is not None and check_positive_int(steps, "steps") != name_or_list.steps:
            raise InputError(f"steps: the schedule has {name_or_list.steps} steps, got steps={steps}")
        return name_or_list
    if isinstance(name_or_list, str):
        key = _canonical(name_or_list)
        if steps is None:
            raise InputError(f"steps: required for the named schedule {name_or_list!r}")
        steps = check_positive_int(steps, "steps")
        fn, accepted = _VE[key] if key in _VE else _SCALED[key]
        unknown = sorted(set(kw) - set(accepted))
        if unknown:
            raise InputError(
                f"unknown option(s) {', '.join(unknown)} for schedule {key!r}; accepted: {', '.join(accepted)}"
            )
        if key in _VE:
            return Schedule(sigmas=fn(steps, **kw), name=key, options=dict(kw))
        return fn(steps, **kw)
    if kw:
        raise InputError(f"schedule options {sorted(kw)} only apply to named schedules, not to a list of sigmas")
    if name_or_list is None:
        raise InputError("schedule: expected a schedule name or a list of sigmas, got None")
    sched = Schedule(sigmas=name_or_list, name="custom")
    if steps is not None and check_positive_int(steps, "steps") != sched.steps:
        raise InputError(
            f"steps: the list of sigmas defines {sched.steps} steps (a final 0 included), got steps={steps}"
        )
    return sched
