"""Adapters between optden and the diffusion libraries researchers already use.

Importing this package (or any module in it) needs only optden's own dependencies; an
adapter that needs an optional package imports it when used and, if it is missing,
raises an ImportError that names the extra to install (``pip install optden[diffusers]``).

* ``optden.integrations.diffusers``: the optimal denoiser as a diffusers UNet that any
  scheduler loop or ``DiffusionPipeline`` drives (``OptimalDiffusersModel``), and a
  diffusers UNet as optden's ``D(x, sigma)`` (``as_denoiser``, ``load_denoiser``).
* ``optden.integrations.edm``: an EDM network ``net(x, sigma, class_labels)`` as
  ``D(x, sigma)`` (one-hot labels, chunked batches: ``as_denoiser``).
* ``optden.integrations.export``: a saved module (``torch.export`` archive, static batch
  handled by chunking, or TorchScript) as ``D(x, sigma)`` (``load_module``).

k-diffusion needs no adapter: its samplers call ``model(x, sigma, **extra_args)``,
which ``OptimalDenoiser`` is (tests/test_conventions.py runs them), and its wrapped
models (``k_diffusion.external``) are such denoisers for ``optden.score_deviation``.
"""
from __future__ import annotations

import importlib

__all__ = ["require"]


def require(module: str, extra: str):
    """``import module``, or an ImportError that says ``pip install optden[extra]``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"this needs the {module} package, which is not installed ({exc}); "
                          f"install it with: pip install optden[{extra}]") from None
