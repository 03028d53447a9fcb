"""Argument types and the data-set argument shared by the analysis subcommands.

argparse turns an ``ArgumentTypeError`` into ``optden CMD: error: argument --n: ...``
and exit code 2; ``open_dataset`` raises ``InputError``, which ``optden.cli.main``
reports the same way.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..errors import InputError

DEMO_NAMES = ("digits", "patches")


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {v}")
    return v


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite positive number, got {text!r}")
    return v


def add_data_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help=f"a dataset directory (optden dataset / Dataset.save) or a bundled demo: "
                                f"{', '.join(DEMO_NAMES)}")
    p.add_argument("--max-rows", type=positive_int, default=None,
                   help="use a random subset of this many rows (demo 'patches': a random subset)")


def add_common_arguments(p: argparse.ArgumentParser, out_default: str) -> None:
    p.add_argument("--n", type=positive_int, default=64, help="number of samples / points (default 64)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="random seed (default 0)")
    p.add_argument("--out", default=out_default, help=f"output folder (default {out_default})")
    p.add_argument("--device", default="cpu", help="torch device of the optimal denoiser (default cpu)")
    p.add_argument("--backend", default="auto", help="denoiser backend (default auto; see optden info)")


def open_dataset(spec: str, max_rows: int | None = None, seed: int = 0):
    """A Dataset from a directory or a demo name; ``max_rows`` keeps a seeded random subset."""
    import numpy as np

    from ..data import Dataset

    path = Path(spec)
    if path.is_dir():
        ds = Dataset.load(path)
    elif spec in DEMO_NAMES:
        ds = Dataset.demo(spec, max_rows=max_rows if spec == "patches" else None)
    elif path.exists():
        raise InputError(f"data: {spec!r} is a file; expected a dataset directory or one of {', '.join(DEMO_NAMES)}")
    else:
        raise InputError(f"data: no dataset directory {spec!r}, and it is not a demo name ({', '.join(DEMO_NAMES)})")
    if max_rows is not None and ds.M > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(ds.M, size=max_rows, replace=False))
        ds = ds.subset(rows)
    return ds


def make_denoiser(ds, device: str, backend: str = "auto"):
    import torch

    from ..denoiser import OptimalDenoiser

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"device: not a torch device: {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device: {device!r} requested but CUDA is not available")
    return OptimalDenoiser(ds, device=dev, backend=backend)


def out_dir(path: str) -> Path:
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise InputError(f"out: {path!r} exists and is not a directory")
    p.mkdir(parents=True, exist_ok=True)
    return p


def add_model_arguments(p: argparse.ArgumentParser, steps: int) -> None:
    """--model and the deterministic sampler it runs (--steps, --solver, --schedule)."""
    from ..sampling import SOLVERS
    from ..schedules import SCHEDULES

    p.add_argument("--model", default="gaussian",
                   help="'gaussian' (linear denoiser of the fitted Gaussian), or a module D(x, sigma) saved "
                        "with torch.export.save (.pt2) or torch.jit.save")
    p.add_argument("--steps", type=positive_int, default=steps, help=f"solver steps (default {steps})")
    p.add_argument("--solver", choices=[s for s in SOLVERS if s != "edm_stochastic"], default="heun",
                   help="ODE solver (default heun)")
    p.add_argument("--schedule", choices=SCHEDULES, default="edm", help="noise schedule (default edm)")

