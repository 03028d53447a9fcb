"""optden: the exact, certified empirical optimal denoiser of diffusion models, at dataset scale.

    import optden
    ds = optden.Dataset.demo("digits")
    den = optden.OptimalDenoiser(ds)
    d = den(x, sigma)              # x (B, ...), sigma scalar or (B,)

See README.md for the tour and docs/design.md for the math, the precision contract and the layout.
"""
from __future__ import annotations

import importlib.util as _ilu
import pathlib as _pathlib
import sys as _sys

__version__ = "0.1.0"


def _alias_kernels() -> None:
    """Make ``optden.kernels`` importable from a source checkout (kernels/ beside optden/).

    Installed wheels (and editable installs) map kernels/ to optden.kernels through
    setup.py's package_dir; a bare checkout on sys.path does not, so register it here.
    Nothing is imported from it (Triton stays unloaded until a kernel is used).
    """
    if "optden.kernels" in _sys.modules or _ilu.find_spec("optden.kernels") is not None:
        return
    init = _pathlib.Path(__file__).resolve().parent.parent / "kernels" / "__init__.py"
    if init.is_file():
        spec = _ilu.spec_from_file_location("optden.kernels", init, submodule_search_locations=[str(init.parent)])
        mod = _ilu.module_from_spec(spec)
        _sys.modules["optden.kernels"] = mod
        spec.loader.exec_module(mod)
        globals()["kernels"] = mod  # what the import system does for a found submodule


_alias_kernels()

from .data import Dataset  # noqa: E402
from .denoiser import Evaluation, OptimalDenoiser  # noqa: E402
from .engine.dispatch import info  # noqa: E402
from .errors import (  # noqa: E402
    BackendUnavailableError,
    ChecksumError,
    DatasetError,
    DatasetNotFoundError,
    DtypeError,
    InputError,
    OptdenError,
    PrecisionError,
)
from . import reference  # noqa: E402
from .agreement import Agreement, AgreementStats, agreement  # noqa: E402
from .deviation import DeviationStats, ScoreDeviation, score_deviation  # noqa: E402
from .gaussian import GaussianDenoiser  # noqa: E402
from .geometry import TrajectoryGeometry, trajectory_geometry  # noqa: E402
from .local import LocalDenoiser, LocalEvaluation  # noqa: E402
from .meanshift import MeanShiftResult, annealed_mean_shift, mean_shift  # noqa: E402
from .memorization import Memorization, memorization  # noqa: E402
from .posterior import CovEig, Diagnostics, PosteriorCov  # noqa: E402
from .sampling import SampleRun, ode_jump, sample  # noqa: E402
from .schedules import Schedule, get_schedule  # noqa: E402

__all__ = [
    "Dataset",
    "OptimalDenoiser",
    "Evaluation",
    "info",
    "reference",
    "OptdenError",
    "InputError",
    "DtypeError",
    "DatasetError",
    "DatasetNotFoundError",
    "ChecksumError",
    "BackendUnavailableError",
    "PrecisionError",
    "sample",
    "ode_jump",
    "SampleRun",
    "get_schedule",
    "Schedule",
    "mean_shift",
    "annealed_mean_shift",
    "MeanShiftResult",
    "score_deviation",
    "ScoreDeviation",
    "DeviationStats",
    "trajectory_geometry",
    "TrajectoryGeometry",
    "memorization",
    "Memorization",
    "GaussianDenoiser",
    "Diagnostics",
    "PosteriorCov",
    "CovEig",
    "LocalDenoiser",
    "LocalEvaluation",
    "agreement",
    "Agreement",
    "AgreementStats",
]
