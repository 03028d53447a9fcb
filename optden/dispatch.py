"""Backend registry: every backend declares what it can run and says why it cannot.

A backend computes one *coarse pass* over a row source for a batch of queries (see
``Backend.partial``); the precision mechanism in ``optden.precision`` turns that into a
certified result. ``backend="auto"`` takes the highest-priority backend that can run
the input; forcing one that cannot raises ``BackendUnavailableError`` listing reasons.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import BackendUnavailableError, InputError


@dataclass
class Partial:
    """Result of one coarse pass over rows (all float64, on the query device).

    Logits are ``l_i = -coef * ||v - q_i||^2`` with ``v`` the centered raw query and
    ``q_i`` the centered raw row; the pass keeps an online softmax and the top-k logits.

    m:        (N,) running max of the coarse logits.
    s:        (N,) sum_i exp(l_i - m).
    acc:      (N, d) sum_i exp(l_i - m) q_i (centered raw space). A backend may leave a
              query's row NaN when its delta is >= 0.25 (never DENSE for tol < 1, so
              ``certify`` never reads it): the triton backend's GEMM pass does.
    top_val:  (N, K) the K largest coarse logits, descending.
    top_idx:  (N, K) their positions in the row source (int64; ``source.global_index``
              maps them to dataset rows).
    delta:    (N,) bound on |coarse logit - exact logit| over every row.
    """

    m: torch.Tensor
    s: torch.Tensor
    acc: torch.Tensor
    top_val: torch.Tensor
    top_idx: torch.Tensor
    delta: torch.Tensor


class Backend(abc.ABC):
    """Base class. Subclasses set ``name`` and ``priority`` and implement the hooks."""

    name: str = "?"
    priority: int = 0  # higher runs first under "auto"
    description: str = ""

    def availability(self) -> list[str]:
        """Reasons this backend cannot run at all on this installation ([] if it can)."""
        return []

    def not_supported_reasons(self, device: torch.device, dtype: str, d: int) -> list[str]:
        """Reasons it cannot run data of storage ``dtype`` and width ``d`` on ``device``."""
        return []

    def delta_target(self) -> float | None:
        """The logit error bound this backend's pass reaches on a query when it can, or None.

        When it is below the denoiser's DENSE threshold (tol / 4), a caller that wants no
        top weights runs the pass with k = 1 and repeats, with the full k, only the queries
        whose bound came out above the threshold (the top k serve the certificate only
        when the bound is loose).
        """
        return None

    @abc.abstractmethod
    def partial(self, v: torch.Tensor, coef: torch.Tensor, source, k: int) -> Partial:
        """One coarse pass over every block of ``source`` (an ``optden.rows.RowSource``).

        v: (N, d) float64 centered raw queries on ``source.device``; coef: (N,) float64.
        k: number of top logits to keep (1 <= k <= source.M).
        """


_REGISTRY: dict[str, Callable[[], Backend]] = {}
_INSTANCES: dict[str, Backend] = {}


def register(name: str, factory: Callable[[], Backend]) -> None:
    """Add a backend under ``name``; the factory is called lazily on first use."""
    _REGISTRY[name] = factory


def get(name: str) -> Backend:
    if name not in _REGISTRY:
        raise InputError(f"backend: unknown backend {name!r}; known: {sorted(_REGISTRY)} or 'auto'")
    if name not in _INSTANCES:
        _INSTANCES[name] = _REGISTRY[name]()
    return _INSTANCES[name]


def names() -> list[str]:
    return sorted(_REGISTRY, key=lambda n: -get(n).priority)


def reasons(name: str, device: torch.device, dtype: str, d: int) -> list[str]:
    b = get(name)
    return b.availability() or b.not_supported_reasons(device, dtype, d)


def select(name: str, device: torch.device, dtype: str, d: int) -> Backend:
    """The backend to run: the named one (checked) or the best usable under "auto"."""
    if name != "auto":
        why = reasons(name, device, dtype, d)
        if why:
            raise BackendUnavailableError(
                f"backend {name!r} cannot run {dtype} data of width {d} on {device}: " + "; ".join(why)
            )
        return get(name)
    for candidate in names():
        if not reasons(candidate, device, dtype, d):
            return get(candidate)
    raise BackendUnavailableError(f"no backend can run {dtype} data on {device}")  # torch always can


def info() -> dict:
    """Which backends and devices are usable here, and why not.

    Returns ``{"backends": {name: {"available": bool, "priority": int, "reasons": [...],
    "description": str}}, "devices": [...], "torch": version, "extension": ...}``.
    """
    from . import _ext

    devices = ["cpu"]
    if torch.cuda.is_available():  # only called on demand, never at import
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    out = {}
    for n in names():
        b = get(n)
        why = b.availability()
        out[n] = {"available": not why, "priority": b.priority, "reasons": why, "description": b.description}
    return {
        "torch": torch.__version__,
        "devices": devices,
        "extension": {"loaded": _ext.C is not None, "error": _ext.error, "features": _ext.features()},
        "backends": out,
    }
