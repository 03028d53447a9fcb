"""Mean shift with the optimal denoiser: ``x <- D*(x; sigma)``.

With the empirical optimal denoiser, ``D*(x; sigma)`` is the Gaussian-kernel weighted
mean of the training rows around x (bandwidth sigma), so iterating it at a fixed sigma
is the classic mean-shift (mode-seeking) algorithm on the Gaussian-smoothed empirical
distribution; every fixed point is a stationary point of ``log p_sigma`` (docs/design.md,
"The math"; Chen et al. 2023, section 5). Annealing sigma along a decreasing schedule
ties it to ODE sampling: one mean-shift iteration per sigma is the ODE-jump applied at
every step.

Any denoiser ``D(x, sigma)`` works; with one that has ``nearest`` (``OptimalDenoiser``),
the nearest training row of each mode is reported too.
"""
from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass

import torch

from .errors import DtypeError, InputError
from .calling import DenoiserCall, as_labels, check_points, progress_enabled
from .schedules import Schedule, check_sigma_list
from .validate import check_positive_int, check_sigma

__all__ = ["MeanShiftResult", "mean_shift", "annealed_mean_shift"]


@dataclass
class MeanShiftResult:
    """Result of ``mean_shift`` / ``annealed_mean_shift`` (CPU tensors).

    modes:            (n, *shape) float64 the final points.
    iterations:       (n,) int64 denoiser evaluations spent on each point.
    converged:        (n,) bool the last update was shorter than ``tol``.
    last_step:        (n,) float64 norm of each point's last update.
    sigmas:           (L,) float64 the bandwidth(s): (1,) for a fixed scalar sigma,
                      (n,) for per-point sigmas, the levels for the annealed version.
    step_norms:       (T, n) float64 ``||x_new - x||`` of every iteration (NaN once a point
                      stopped; annealed: T = levels * iters_per_sigma), or None.
    trajectory:       (T + 1, n, *shape) float64 the points after every iteration
                      (annealed: after every level, T = levels), or None.
    nearest_index:    (n,) int64 nearest training row of each mode (model space), or None
                      when the denoiser has no ``nearest``.
    nearest_distance: (n,) float64 its Euclidean distance, or None.
    seconds:          wall time.
    """

    modes: torch.Tensor
    iterations: torch.Tensor
    converged: torch.Tensor
    last_step: torch.Tensor
    sigmas: torch.Tensor
    step_norms: torch.Tensor | None = None
    trajectory: torch.Tensor | None = None
    nearest_index: torch.Tensor | None = None
    nearest_distance: torch.Tensor | None = None
    seconds: float = 0.0

    @property
    def n_converged(self) -> int:
        return int(self.converged.sum())

    def __repr__(self) -> str:
        n = self.modes.shape[0]
        return (
            f"MeanShiftResult(n={n}, converged={self.n_converged}/{n}, "
            f"iterations={int(self.iterations.min())}..{int(self.iterations.max())}, "
            f"seconds={self.seconds:.3g})"
        )


def _check_tol(tol) -> float:
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real):
        raise DtypeError(f"tol: expected a positive number, got {tol!r}")
    v = float(tol)
    if not math.isfinite(v) or v <= 0:
        raise InputError(f"tol: must be finite and > 0, got {tol!r}")
    return v


def _nearest(den, modes: torch.Tensor, device, labels=None):
    """Nearest training row of each mode through ``den.nearest`` (None, None without it)."""
    fn = getattr(den, "nearest", None)
    if not callable(fn):
        return None, None
    x = modes.to(device)
    dist, idx = fn(x, k=1) if labels is None else fn(x, k=1, labels=labels)
    dist = torch.as_tensor(dist).reshape(modes.shape[0], -1)[:, 0]
    idx = torch.as_tensor(idx).reshape(modes.shape[0], -1)[:, 0]
    return idx.to("cpu", torch.int64), dist.to("cpu", torch.float64)


class _Shifter:
    """Runs mean-shift iterations on the active subset of a batch of points."""

    def __init__(self, den, x: torch.Tensor, labels, batch_size, device, dtype):
        self.call = DenoiserCall(den, device, dtype)
        self.x = x.to(self.call.device, torch.float64, copy=True)  # (n, *shape); never the caller's tensor
        self.n = x.shape[0]
        self.labels = as_labels(labels, self.n)
        self.bs = self.n if batch_size is None else check_positive_int(batch_size, "batch_size")
        self.iterations = torch.zeros(self.n, dtype=torch.int64)
        self.last_step = torch.full((self.n,), math.inf, dtype=torch.float64)

    def iterate(self, active: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """One update ``x <- D(x; sigma)`` of the points ``active`` (int64 CPU indices).

        sigma: (n,) float64 CPU per point. Returns the step norms (len(active),) float64.
        """
        steps = torch.empty(active.numel(), dtype=torch.float64)
        for a in range(0, active.numel(), self.bs):
            idx = active[a: a + self.bs]
            idx_d = idx.to(self.call.device)
            lab = None if self.labels is None else self.labels[idx].to(self.call.device)
            cur = self.x[idx_d]
            new = self.call(cur, sigma[idx], lab)
            steps[a: a + idx.numel()] = (new - cur).reshape(idx.numel(), -1).norm(dim=1).cpu()
            self.x[idx_d] = new
        self.iterations[active] += 1
        self.last_step[active] = steps
        return steps


def mean_shift(
    den,
    x,
    sigma,
    max_iter: int = 100,
    tol: float = 1e-6,
    labels=None,
    record: bool = False,
    batch_size: int | None = None,
    progress: bool | None = None,
    device=None,
    dtype: torch.dtype | None = None,
    class_labels=None,
) -> MeanShiftResult:
    """Mean shift at a fixed bandwidth: iterate ``x <- D(x; sigma)`` until it stops moving.

    den: the denoiser (``OptimalDenoiser`` or any ``D(x, sigma)``).
    x: (n, *shape) starting points (in the scaled coordinate ``u``, i.e. model space).
    sigma: positive float, or (n,) one bandwidth per point.
    max_iter: most iterations per point (>= 1).
    tol: a point has converged when its update ``||D(x) - x||`` (Euclidean, absolute) is
        < tol; from then on it is frozen and no longer sent to the denoiser.
    labels: per-point class labels for class-conditional denoisers (``D(x, sigma, labels)``);
        ``class_labels`` is EDM's name for it (pass one of them; one-hot vectors accepted).
    record: keep ``step_norms`` and the ``trajectory`` of every iteration.
    batch_size: most points per denoiser call.

    Returns a ``MeanShiftResult``; ``nearest_index`` / ``nearest_distance`` come from
    ``den.nearest`` when the denoiser has it.
    """
    t0 = time.perf_counter()
    pts = check_points(den, x, "x")
    n = pts.shape[0]
    sig = check_sigma(sigma, n, "sigma")
    max_iter = check_positive_int(max_iter, "max_iter")
    tol = _check_tol(tol)
    sh = _Shifter(den, pts, as_labels(labels, n, class_labels), batch_size, device, dtype)
    converged = torch.zeros(n, dtype=torch.bool)
    active = torch.arange(n)
    norms, traj = [], [pts.clone()] if record else None
    from tqdm.auto import tqdm

    with tqdm(total=max_iter, desc="mean_shift", unit="it", disable=not progress_enabled(progress)) as bar:
        for _ in range(max_iter):
            steps = sh.iterate(active, sig)
            done = steps < tol
            converged[active[done]] = True
            if record:
                row = torch.full((n,), math.nan, dtype=torch.float64)
                row[active] = steps
                norms.append(row)
                traj.append(sh.x.cpu().clone())
            active = active[~done]
            bar.update(1)
            bar.set_postfix(active=int(active.numel()))
            if active.numel() == 0:
                break
    modes = sh.x.cpu()
    nn_idx, nn_dist = _nearest(den, modes, sh.call.device, None if sh.labels is None else sh.labels)
    return MeanShiftResult(
        modes=modes,
        iterations=sh.iterations,
        converged=converged,
        last_step=sh.last_step,
        sigmas=sig[:1].clone() if bool((sig == sig[0]).all()) else sig.clone(),
        step_norms=torch.stack(norms) if record else None,
        trajectory=torch.stack(traj) if record else None,
        nearest_index=nn_idx,
        nearest_distance=nn_dist,
        seconds=time.perf_counter() - t0,
    )


def _levels(sigmas) -> torch.Tensor:
    """Positive decreasing bandwidths from a Schedule or a list (a final 0 is dropped)."""
    if isinstance(sigmas, Schedule):
        return sigmas.sigmas[:-1].clone()
    if isinstance(sigmas, str):
        raise InputError(
            "sigmas: expected a list of sigmas or a Schedule (build one with "
            f"optden.schedules.get_schedule({sigmas!r}, steps)), got the string {sigmas!r}"
        )
    return check_sigma_list(sigmas, "sigmas")[:-1]


def annealed_mean_shift(
    den,
    x,
    sigmas,
    iters_per_sigma: int = 1,
    tol: float = 1e-6,
    labels=None,
    record: bool = False,
    batch_size: int | None = None,
    progress: bool | None = None,
    device=None,
    dtype: torch.dtype | None = None,
    class_labels=None,
) -> MeanShiftResult:
    """Mean shift along a decreasing bandwidth schedule.

    For each level sigma_l (decreasing), update every point ``x <- D(x; sigma_l)`` up to
    ``iters_per_sigma`` times; a point leaves the level early once its update is < tol.

    sigmas: a ``Schedule`` or a sequence of positive, strictly decreasing sigmas (a final
        0 is ignored).
    Returns a ``MeanShiftResult``: ``converged`` says whether the last update at the last
    level was < tol; ``iterations`` counts all evaluations of each point; with
    ``record``, ``step_norms`` is (levels * iters_per_sigma, n) and ``trajectory`` holds
    the points after each level, (levels + 1, n, *shape).
    """
    t0 = time.perf_counter()
    pts = check_points(den, x, "x")
    n = pts.shape[0]
    levels = _levels(sigmas)
    ips = check_positive_int(iters_per_sigma, "iters_per_sigma")
    tol = _check_tol(tol)
    sh = _Shifter(den, pts, as_labels(labels, n, class_labels), batch_size, device, dtype)
    norms, traj = [], [pts.clone()] if record else None
    converged = torch.zeros(n, dtype=torch.bool)
    from tqdm.auto import tqdm

    with tqdm(total=levels.numel(), desc="annealed_mean_shift", unit="sigma",
              disable=not progress_enabled(progress)) as bar:
        for lvl in levels.tolist():
            sig = torch.full((n,), lvl, dtype=torch.float64)
            active = torch.arange(n)
            converged[:] = False
            for _ in range(ips):
                if record:
                    row = torch.full((n,), math.nan, dtype=torch.float64)
                    norms.append(row)
                if active.numel() == 0:
                    continue
                steps = sh.iterate(active, sig)
                done = steps < tol
                converged[active[done]] = True
                if record:
                    row[active] = steps
                active = active[~done]
            if record:
                traj.append(sh.x.cpu().clone())
            bar.update(1)
    modes = sh.x.cpu()
    nn_idx, nn_dist = _nearest(den, modes, sh.call.device, sh.labels)
    return MeanShiftResult(
        modes=modes,
        iterations=sh.iterations,
        converged=converged,
        last_step=sh.last_step,
        sigmas=levels,
        step_norms=torch.stack(norms) if record else None,
        trajectory=torch.stack(traj) if record else None,
        nearest_index=nn_idx,
        nearest_distance=nn_dist,
        seconds=time.perf_counter() - t0,
    )
