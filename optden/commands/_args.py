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


DATA_HELP = ("a dataset directory (optden dataset build / Dataset.save), a .npy / .npz file, the CIFAR-10/100 "
             "python pickles (.tar.gz or folder), a Hugging Face datasets folder or .parquet file(s), or a "
             f"bundled demo: {', '.join(DEMO_NAMES)} (or demo:NAME); a folder of images: run optden dataset "
             "build first")


def add_data_argument(p: argparse.ArgumentParser, labels: bool = True) -> None:
    """The data set positional and its options (every analysis command takes the same)."""
    p.add_argument("data", help=DATA_HELP)
    p.add_argument("--max-rows", type=positive_int, default=None,
                   help="use a random subset of this many rows (demo 'patches': a random subset)")
    p.add_argument("--split", default=None, help="CIFAR / Hugging Face split: train (default), test; CIFAR: all")
    p.add_argument("--layout", choices=("auto", "nchw", "nhwc"), default="auto",
                   help="image layout of a 4-D .npy / .npz array (default auto: detected, ambiguous shapes refused)")
    if labels:
        p.add_argument("--label", "--class-label", dest="label", type=int, default=None,
                       help="class-conditional: use the rows of this class (EDM's class_labels)")


def add_common_arguments(p: argparse.ArgumentParser, out_default: str) -> None:
    p.add_argument("--n", type=positive_int, default=64, help="number of samples / points (default 64)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="random seed (default 0)")
    p.add_argument("--out", default=out_default, help=f"output folder (default {out_default})")
    p.add_argument("--device", default="cpu", help="torch device of the optimal denoiser (default cpu)")
    p.add_argument("--backend", default="auto", help="denoiser backend (default auto; see optden info)")


def open_dataset(spec: str, max_rows: int | None = None, seed: int = 0, split: str | None = None,
                 layout: str = "auto"):
    """A Dataset from anything ``Dataset.open`` reads (not an image folder: that is built
    once with ``optden dataset build``); ``max_rows`` keeps a seeded random subset."""
    import numpy as np

    from ..data import Dataset
    from ..data.sources import kind_of

    path = Path(spec)
    name = spec[5:] if spec.startswith("demo:") else spec
    if spec.startswith("demo:") or (spec in DEMO_NAMES and not path.exists()):
        if name not in DEMO_NAMES:
            raise InputError(f"data: unknown demo {spec!r}; expected one of {', '.join('demo:' + d for d in DEMO_NAMES)}")
        ds = Dataset.demo(name, max_rows=max_rows if name == "patches" else None)
    elif not path.exists():
        raise InputError(f"data: {spec!r} is not a dataset directory or data file (it does not exist), nor a "
                         f"demo name ({', '.join(DEMO_NAMES)})")
    else:
        if kind_of(path) == "images":
            raise InputError(f"data: {spec!r} holds image files, not a data set; decode them once with "
                             f"`optden dataset build {spec} DIR` (resumable), then pass DIR")
        ds = Dataset.open(path, split=split, channels_last={"auto": None, "nchw": False, "nhwc": True}[layout])
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
    """--model, its --batch-size, the deterministic sampler it runs (--steps, --solver,
    --schedule) and the figure --format (``optden deviation``, ``optden compare``)."""
    from ..sampling import SOLVERS
    from ..schedules import SCHEDULES

    p.add_argument("--model", default="gaussian",
                   help="'gaussian' (linear denoiser of the fitted Gaussian), a diffusers save_pretrained folder "
                        "(pipeline, or UNet + scheduler_config.json), or a module D(x, sigma) saved with "
                        "torch.export.save (.pt2; a static batch is chunked) or torch.jit.save")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="most samples per model call (default: all at once)")
    p.add_argument("--format", choices=("png", "svg", "pdf"), default="png", help="figure format (default png)")
    p.add_argument("--steps", type=positive_int, default=steps, help=f"solver steps (default {steps})")
    p.add_argument("--solver", choices=[s for s in SOLVERS if s != "edm_stochastic"], default="heun",
                   help="ODE solver (default heun)")
    p.add_argument("--schedule", choices=SCHEDULES, default="edm", help="noise schedule (default edm)")
