"""Geometry of sampling trajectories (Chen et al. 2023, section 3; docs/design.md, "The math").

For each sample, with ``x_T`` the start of the sampling trajectory and ``x_0`` its end
(the generated sample), ``u = (x_0 - x_T) / ||x_0 - x_T||`` is the direction of the
chord. For every point ``p`` (a sampling point ``x_t`` or a denoising output ``D(x_t)``):

- deviation from the chord: ``||(x_0 - p) - <x_0 - p, u> u||`` (distance of p to the
  line through x_T and x_0);
- magnitude ``||p||``;
- distance to the end point ``||p - x_0||``.

And for each step t (sigma_t > 0) the angle, in degrees, between the ODE's direction
``d_t = (x_t - D(x_t)) / sigma_t`` (which points away from the data, towards higher
noise) and ``x_t - x_0``: near 0 when the trajectory is straight; and the angle between
the actual step ``x_t - x_{t+1}`` and ``x_t - x_0``.

All computed in float64 on flattened samples, in the coordinate the trajectory is
recorded in (``u = x / s``; for VE schedules that is x itself).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import InputError
from .validate import as_tensor

__all__ = ["TrajectoryGeometry", "trajectory_geometry"]


@dataclass
class TrajectoryGeometry:
    """Result of ``trajectory_geometry`` (CPU float64 tensors; K steps, n samples).

    sigmas:                (K + 1,) the grid of the sampling trajectory (ends with 0).
    eval_sigmas:           (K,) the sigma of each denoising output.
    deviation:             (K + 1, n) chord deviation of the sampling points x_t.
    denoised_deviation:    (K, n) chord deviation of the denoising outputs D(x_t).
    magnitude:             (K + 1, n) ``||x_t||``.
    denoised_magnitude:    (K, n) ``||D(x_t)||``.
    distance_to_end:       (K + 1, n) ``||x_t - x_0||``.
    denoised_distance_to_end: (K, n) ``||D(x_t) - x_0||``.
    tangent_angle:         (K, n) degrees between ``x_t - D(x_t)`` and ``x_t - x_0``.
    step_angle:            (K, n) degrees between ``x_t - x_{t+1}`` and ``x_t - x_0``.
    chord_length:          (n,) ``||x_0 - x_T||``.
    Angles are NaN where a vector is zero.
    """

    sigmas: torch.Tensor
    eval_sigmas: torch.Tensor
    deviation: torch.Tensor
    denoised_deviation: torch.Tensor
    magnitude: torch.Tensor
    denoised_magnitude: torch.Tensor
    distance_to_end: torch.Tensor
    denoised_distance_to_end: torch.Tensor
    tangent_angle: torch.Tensor
    step_angle: torch.Tensor
    chord_length: torch.Tensor

    _CURVES = ("deviation", "denoised_deviation", "magnitude", "denoised_magnitude", "distance_to_end",
               "denoised_distance_to_end", "tangent_angle", "step_angle")

    def mean(self, name: str) -> torch.Tensor:
        """Mean over samples (NaN ignored) of one curve: (K + 1,) or (K,)."""
        if name not in self._CURVES:
            raise InputError(f"name: expected one of {', '.join(self._CURVES)}, got {name!r}")
        return torch.nanmean(getattr(self, name), dim=1)

    def to_dict(self) -> dict:
        """Per-sigma means of every curve (JSON-ready lists)."""
        out = {"sigmas": self.sigmas.tolist(), "eval_sigmas": self.eval_sigmas.tolist(),
               "mean_chord_length": float(self.chord_length.mean())}
        for name in self._CURVES:
            out[f"mean_{name}"] = [None if math.isnan(v) else v for v in self.mean(name).tolist()]
        return out

    def __repr__(self) -> str:
        K, n = self.denoised_deviation.shape
        return (f"TrajectoryGeometry(steps={K}, n={n}, max mean deviation={float(self.mean('deviation').max()):.4g}, "
                f"mean chord={float(self.chord_length.mean()):.4g})")


def _angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Angle in degrees between rows of a and b (..., d); NaN where either is zero."""
    na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    ua, ub = a / na, b / nb
    # Kahan's 2 atan2(|ua - ub|, |ua + ub|): accurate near 0 and 180 degrees, unlike acos
    ang = torch.rad2deg(2.0 * torch.atan2((ua - ub).norm(dim=-1), (ua + ub).norm(dim=-1)))
    na, nb = na[..., 0], nb[..., 0]
    return torch.where((na > 0) & (nb > 0), ang, torch.full_like(ang, math.nan))


def trajectory_geometry(run=None, *, trajectory=None, denoised=None, sigmas=None, eval_sigmas=None) -> TrajectoryGeometry:
    """Geometry of recorded sampling and denoising trajectories.

    run: a ``SampleRun`` recorded with ``record=True``; or pass the arrays directly:
    trajectory: (K + 1, n, *shape) the sampling trajectory, x_T first, the sample last.
    denoised: (K, n, *shape) ``D(x_t)`` at the first K points.
    sigmas: (K + 1,) the grid; eval_sigmas: (K,) sigma of each ``denoised`` entry
        (default ``sigmas[:-1]``).
    Returns a ``TrajectoryGeometry``.
    """
    if run is not None:
        if trajectory is not None or denoised is not None:
            raise InputError("run: pass either a SampleRun or trajectory= and denoised=, not both")
        if getattr(run, "trajectory", None) is None or getattr(run, "denoised", None) is None:
            raise InputError("run: the SampleRun holds no trajectory; sample with record=True")
        trajectory, denoised = run.trajectory, run.denoised
        sigmas, eval_sigmas = run.sigmas, run.eval_sigmas
    if trajectory is None or denoised is None:
        raise InputError("trajectory / denoised: both are required (or pass a recorded SampleRun)")
    X = as_tensor(trajectory, "trajectory").detach().to("cpu", torch.float64)
    Dn = as_tensor(denoised, "denoised").detach().to("cpu", torch.float64)
    if X.dim() < 3 or X.shape[0] < 2:
        raise InputError(f"trajectory: expected (K + 1, n, *shape) with K >= 1, got shape {tuple(X.shape)}")
    K, n = X.shape[0] - 1, X.shape[1]
    X = X.reshape(K + 1, n, -1)
    if Dn.dim() < 3 or Dn.shape[0] != K or Dn.shape[1] != n or Dn[0].numel() != X[0].numel():
        raise InputError(f"denoised: expected shape ({K}, {n}, ...) to match the trajectory, got {tuple(Dn.shape)}")
    Dn = Dn.reshape(K, n, -1)
    if sigmas is None:
        raise InputError("sigmas: required with trajectory= (the (K + 1,) grid)")
    sig = as_tensor(sigmas, "sigmas").detach().to("cpu", torch.float64).reshape(-1)
    if sig.numel() != K + 1:
        raise InputError(f"sigmas: expected {K + 1} values to match the trajectory, got {sig.numel()}")
    ev = sig[:-1].clone() if eval_sigmas is None else \
        as_tensor(eval_sigmas, "eval_sigmas").detach().to("cpu", torch.float64).reshape(-1)
    if ev.numel() != K:
        raise InputError(f"eval_sigmas: expected {K} values, got {ev.numel()}")
    if bool((ev <= 0).any()):
        raise InputError("eval_sigmas: every denoising sigma must be > 0")

    x0, xT = X[-1], X[0]  # (n, d)
    chord = x0 - xT
    length = chord.norm(dim=-1)  # (n,)
    unit = chord / torch.where(length > 0, length, torch.ones_like(length))[:, None]

    def dev(P):  # P (L, n, d): distance to the line through x0 with direction unit
        r = x0 - P
        along = (r * unit).sum(-1, keepdim=True)
        return (r - along * unit).norm(dim=-1)

    tangent = (X[:-1] - Dn) / ev[:, None, None]
    return TrajectoryGeometry(
        sigmas=sig,
        eval_sigmas=ev,
        deviation=dev(X),
        denoised_deviation=dev(Dn),
        magnitude=X.norm(dim=-1),
        denoised_magnitude=Dn.norm(dim=-1),
        distance_to_end=(X - x0).norm(dim=-1),
        denoised_distance_to_end=(Dn - x0).norm(dim=-1),
        tangent_angle=_angle(tangent, X[:-1] - x0),
        step_angle=_angle(X[:-1] - X[1:], X[:-1] - x0),
        chord_length=length,
    )
