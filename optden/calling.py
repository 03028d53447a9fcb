"""How optden calls any denoiser ``D(x, sigma)``: the one adapter of the samplers, mean
shift, the score deviation and sampling jobs.

The convention is EDM's and k-diffusion's: ``D(x, sigma)`` with x (B, *shape) and sigma a
(B,) tensor, returning a tensor with x's values; class labels, when there are any, are
the third positional argument, as EDM's ``net(x, sigma, class_labels)``.
``optden.OptimalDenoiser`` is such a denoiser, and so is a trained network or any
closed form (``optden.GaussianDenoiser``).

:class:`DenoiserCall` keeps the caller's state in float64 whatever the denoiser computes
in: x is cast to the denoiser's dtype (an ``nn.Module``'s parameter dtype, or ``dtype=``)
on its device, the output comes back as float64 in x's shape, and every batched call is
counted (the NFE of a sampler). Every output is checked once, as it comes back: a tensor
(not None, not a tuple), of exactly x's shape (another layout of the same number of
values is an error, never a silent reshape), floating, and finite; a failure raises
naming the model, the evaluation (the NFE count) and sigma.
"""
from __future__ import annotations

import numbers
import sys
from typing import Callable

import numpy as np
import torch

from .errors import DtypeError, InputError
from .validate import as_tensor, check_queries

__all__ = ["Denoise", "DenoiserCall", "infer_device", "infer_dtype", "as_labels", "one_hot_to_index",
           "check_points", "image_shape_of", "progress_enabled", "output_tensor", "call_in_chunks", "model_name"]

#: A denoiser as the samplers' step functions see it: ``D(x, sigma) -> D(x; sigma)``.
Denoise = Callable[[torch.Tensor, float], torch.Tensor]


def infer_device(den) -> torch.device:
    """Where to call ``den``: its ``device`` attribute, a module's first parameter or
    buffer, else the CPU."""
    dev = getattr(den, "device", None)
    if isinstance(dev, (torch.device, str)):
        return torch.device(dev)
    if isinstance(den, torch.nn.Module):
        for p in den.parameters():
            return p.device
        for b in den.buffers():
            return b.device
    return torch.device("cpu")


def infer_dtype(den) -> torch.dtype:
    """The dtype to call ``den`` in: a module's floating parameter dtype, else float64."""
    if isinstance(den, torch.nn.Module):
        for p in den.parameters():
            if p.is_floating_point():
                return p.dtype
    return torch.float64


class DenoiserCall:
    """Calls ``den(x, sigma[, class_labels])`` on float64 state and returns float64.

    x: (B, *shape) float64 on ``device``; sigma: a float or a (B,) tensor. The denoiser
    receives x cast to ``dtype`` and sigma as a (B,) tensor of that dtype on ``device``;
    class labels (B,) are passed as the third positional argument, only when given.
    ``calls`` counts batched evaluations.
    """

    def __init__(self, den, device=None, dtype=None):
        if not callable(den):
            raise DtypeError(f"den: expected a callable denoiser D(x, sigma), got {type(den).__name__}")
        self.den = den
        self.device = torch.device(device) if device is not None else infer_device(den)
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise DtypeError(f"dtype: expected a floating torch dtype, got {dtype!r}")
        self.dtype = dtype if dtype is not None else infer_dtype(den)
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
            out = self.den(xin, s) if labels is None else self.den(xin, s, labels)
        self.calls += 1
        return self._checked(out, x, s).to(device=x.device, dtype=torch.float64)

    def _checked(self, out, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """The model's output as a tensor, after the checks of the module docstring."""
        sig = f"{float(s[0]):g}" if bool((s == s[0]).all()) else f"{float(s.min()):g}..{float(s.max()):g}"
        where = f"den ({model_name(self.den)}) at evaluation {self.calls} (sigma = {sig})"
        try:
            out = output_tensor(out, self.den)  # None, a tuple, a model-output object: a clear error
        except InputError as e:
            raise InputError(f"{where}: {str(e).removeprefix('den: ')}") from None
        if tuple(out.shape) != tuple(x.shape):
            raise InputError(f"{where}: returned shape {tuple(out.shape)} for an input of shape {tuple(x.shape)}; a "
                             "denoiser returns D(x) in x's shape (optden does not guess another layout)")
        if not out.is_floating_point():
            raise DtypeError(f"{where}: returned dtype {out.dtype}; expected a floating tensor")
        if not bool(torch.isfinite(out).all()):
            bad = int((~torch.isfinite(out)).sum())
            raise InputError(f"{where}: returned {bad} NaN or inf value(s) of {out.numel()}; the model's output "
                             "must be finite")
        return out

    def bind(self, labels: torch.Tensor | None) -> Denoise:
        """D(x, sigma) with this batch's labels attached."""
        return lambda x, sigma: self(x, sigma, labels)


def model_name(den) -> str:
    """A short name of a denoiser for messages: a function's name, else its class name."""
    name = getattr(den, "__name__", None)
    return name if isinstance(name, str) else type(den).__name__


def one_hot_to_index(lab: torch.Tensor, name: str, classes: int | None = None) -> torch.Tensor:
    """EDM's one-hot class vectors (n, C) -> class indices (n,) int64; InputError unless each
    row holds one 1 and zeros (``classes``: the C expected, when known)."""
    c = lab.shape[1]
    if classes is not None and c != classes:
        raise InputError(f"{name}: expected (n, {classes}) one-hot class vectors, got shape {tuple(lab.shape)}")
    if not bool((((lab == 1).sum(1) == 1) & ((lab == 0).sum(1) == c - 1)).all()):
        raise InputError(f"{name}: (n, {c}) class vectors must be one-hot (one 1, zeros elsewhere); "
                         "pass None for the unconditional denoiser")
    return lab.argmax(1)


def as_labels(labels, n: int, class_labels=None) -> torch.Tensor | None:
    """Class labels for n points -> int64 (n,) CPU, or None.

    labels, or EDM's name for it, ``class_labels`` (pass one of them): None, one int for
    all, (n,) integers, or EDM's one-hot class vectors (n, C).
    """
    if class_labels is not None:
        if labels is not None:
            raise InputError("class_labels: given together with its alias labels; pass one of them")
        labels, name = class_labels, "class_labels"
    else:
        name = "labels"
    if labels is None:
        return None
    if isinstance(labels, numbers.Integral) and not isinstance(labels, bool):
        return torch.full((n,), int(labels), dtype=torch.int64)
    t = as_tensor(labels, name)
    if t.dim() == 2 and t.shape[1] > 1:
        t = one_hot_to_index(t, name)
    if t.is_floating_point():
        raise DtypeError(f"{name}: expected integer class labels, got dtype {t.dtype}")
    t = t.reshape(-1).to(torch.int64)
    if t.numel() != n:
        raise InputError(f"{name}: expected one label per sample ({n}), got {t.numel()}")
    return t


def check_points(den, x, name: str) -> torch.Tensor:
    """Validate a batch (n, *shape) of points: finite, non-empty, ``den.d`` values each
    when the denoiser declares ``d``. Returns a float64 CPU tensor."""
    t = as_tensor(x, name)
    if t.dim() < 2:
        raise InputError(f"{name}: expected a batch of shape (n, *shape), got shape {tuple(t.shape)}")
    d = getattr(den, "d", None)
    d = d if isinstance(d, numbers.Integral) else int(np.prod(t.shape[1:]))
    return check_queries(t, int(d), name).detach().to("cpu", torch.float64)


def image_shape_of(den, shape=None) -> tuple:
    """The per-sample shape: ``shape`` when given, else ``den.image_shape``."""
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


def progress_enabled(progress) -> bool:
    """Whether to show a progress bar: ``progress`` when given, else when stderr is a terminal."""
    if progress is None:
        try:
            return sys.stderr.isatty()
        except (AttributeError, ValueError):
            return False
    return bool(progress)


def output_tensor(out, den) -> torch.Tensor:
    """What a denoiser returned, as a tensor; a clear error naming ``den`` for None, a tuple,
    or a model-output object (a diffusers ``UNet2DOutput``: wrap the model with
    ``optden.integrations.diffusers.as_denoiser``)."""
    if isinstance(out, torch.Tensor):
        return out
    what = type(den).__name__
    if out is None:
        raise InputError(f"den: {what} returned None; expected a tensor D(x; sigma) shaped like x")
    if isinstance(out, (tuple, list)) or hasattr(out, "sample"):
        hint = (" (a diffusers model: wrap it with optden.integrations.diffusers.as_denoiser(model, "
                "scheduler_config), which turns its prediction into D(x; sigma))")
        raise InputError(f"den: {what} returned a {type(out).__name__}, not a tensor D(x; sigma) shaped like x{hint}")
    try:
        return torch.as_tensor(out)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"den: {what} returned a {type(out).__name__}; expected a tensor D(x; sigma) shaped like x") \
            from None


def call_in_chunks(fn: Callable, x: torch.Tensor, batch: int | None, *rest, pad: bool = False) -> torch.Tensor:
    """``fn(x[a:b], *(r[a:b] for r in rest))`` over chunks of ``batch`` rows, concatenated.

    x: (B, ...); rest: tensors with B rows (sigma, labels), None passed as is. ``pad``: a
    model exported with a static batch dimension gets exactly ``batch`` rows each call
    (the last chunk repeats its last row; those outputs are dropped). batch None: one call.
    """
    b = x.shape[0]
    if batch is None or (b == batch if pad else b <= batch):
        return fn(x, *rest)
    outs = []
    for a in range(0, b, batch):
        e = min(b, a + batch)
        take = [x[a:e]] + [r if r is None else r[a:e] for r in rest]
        if pad and e - a < batch:
            fill = batch - (e - a)
            take = [t if t is None else torch.cat([t, t[-1:].expand(fill, *t.shape[1:])]) for t in take]
        outs.append(fn(*take)[: e - a])
    return torch.cat(outs)
