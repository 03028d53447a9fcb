"""Backend registry: every backend declares what it can run and says why it cannot.

A backend computes one *coarse pass* over a row source for a batch of queries (see
``Backend.partial``): a ``Partial`` (``optden.engine.partial``) with a rigorous bound
``delta``; ``optden.engine.precision.certify`` turns that into a certified result.

Limits are data, as xformers' attention ops declare theirs: ``devices`` (device types),
``dtypes`` (storage dtypes of ``optden.data.storage``) and ``max_d``; the base class turns
them into ``not_supported_reasons``. ``availability`` says why a backend cannot run at
all on this installation (no extension, no Triton, no GPU). ``backend="auto"`` takes the
highest-priority backend that can run the input; forcing one that cannot raises
``BackendUnavailableError`` listing the reasons.
"""
from __future__ import annotations

import abc
from typing import Callable

import torch

from .. import _ext
from ..data.storage import DTYPE_NAMES
from ..errors import BackendUnavailableError, InputError
from .partial import STATS, Partial


_DEVICE_NAMES = {"cpu": "CPU", "cuda": "CUDA"}


class Backend(abc.ABC):
    """Base class. Subclasses set ``name``, ``priority`` and their limits and implement ``partial``.

    devices: device types it runs on ("cpu", "cuda"; None: any torch device),
    ``devices_note`` a hint for the others; dtypes: storage dtypes it reads;
    max_d: the widest rows it can run (None: no limit), ``max_d_why`` says why.
    """

    name: str = "?"
    priority: int = 0  # higher runs first under "auto"
    description: str = ""
    devices: tuple[str, ...] | None = None  # None: any torch device
    dtypes: tuple[str, ...] = DTYPE_NAMES
    devices_note: str = ""
    max_d: int | None = None
    max_d_why: str = ""
    #: The pass statistics (``partial.STATS``) its ``partial(..., stats=True)`` accumulates
    #: in the same sweep; () for a backend that cannot (``statistics_backend`` then runs
    #: the float64 torch pass for them).
    statistics: tuple[str, ...] = ()

    def availability(self) -> list[str]:
        """Reasons this backend cannot run at all on this installation ([] if it can)."""
        return []

    def not_supported_reasons(self, device: torch.device, dtype: str, d: int) -> list[str]:
        """Reasons it cannot run data of storage ``dtype`` and width ``d`` on ``device``
        (from the declared ``devices``, ``dtypes`` and ``max_d``)."""
        device = torch.device(device)
        why = []
        if self.devices is not None and device.type not in self.devices:
            names = " and ".join(_DEVICE_NAMES.get(t, t) for t in self.devices)
            why.append(f"runs on {names} tensors only, not on {device}" + (f" ({self.devices_note})" if self.devices_note else ""))
        if dtype not in self.dtypes:
            why.append(f"storage dtype {dtype!r} is not one of {self.dtypes}")
        if self.max_d is not None and d > self.max_d:
            why.append(f"d = {d} exceeds the {self.max_d} columns {self.max_d_why or 'it supports'}")
        return why

    def delta_target(self) -> float | None:
        """The logit error bound this backend's pass reaches on a query when it can, or None.

        When it is below the denoiser's DENSE threshold (``bounds.dense_threshold``), a
        caller that wants no top weights runs the pass with k = 1 and repeats, with the
        full k, only the queries whose bound came out above the threshold (the top k serve
        the certificate only when the bound is loose).
        """
        return None

    @abc.abstractmethod
    def partial(self, v: torch.Tensor, coef: torch.Tensor, source, k: int) -> Partial:
        """One coarse pass over every block of ``source`` (an ``optden.engine.rows.RowSource``).

        v: (N, d) float64 centered raw queries on ``source.device``; coef: (N,) float64.
        k: number of top logits to keep (1 <= k <= source.M).
        A backend that declares ``statistics`` takes ``stats=True`` as well and returns
        them in the Partial (``s2``, ``e1``, ``left_out``).
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


def statistics_backend(backend: Backend) -> Backend:
    """The backend to run a pass with statistics (``partial.STATS``): ``backend`` when it
    declares them all, else the float64 torch pass (on any device)."""
    return backend if set(STATS) <= set(backend.statistics) else get("torch")


def info() -> dict:
    """Which backends and devices are usable here, and why not.

    Returns ``{"backends": {name: {"available": bool, "priority": int, "reasons": [...],
    "description": str}}, "devices": [...], "torch": version, "extension": ...}``.
    """
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
