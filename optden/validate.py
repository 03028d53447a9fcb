"""Argument checks shared by the public API: clear errors that name the argument."""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from .errors import DtypeError, InputError

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def as_tensor(x, name: str) -> torch.Tensor:
    """Turn a numpy array, list or tensor into a tensor, refusing complex/object/bool data."""
    if isinstance(x, torch.Tensor):
        t = x
    else:
        arr = np.asarray(x)
        if arr.dtype == object or arr.dtype.kind in "OUSV":
            raise DtypeError(f"{name}: expected a numeric array, got dtype {arr.dtype}")
        if arr.dtype.kind == "c":
            raise DtypeError(f"{name}: complex data is not supported (got {arr.dtype})")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.is_complex():
        raise DtypeError(f"{name}: complex data is not supported (got {t.dtype})")
    if t.dtype == torch.bool:
        raise DtypeError(f"{name}: boolean data is not supported")
    return t


def check_queries(x, d: int, name: str = "x") -> torch.Tensor:
    """Validate queries of any image shape (N, ...) whose trailing size is d.

    Returns a floating tensor (integer input is converted to float64). Raises InputError
    on a size mismatch, an empty batch, or NaN/inf values.
    """
    t = as_tensor(x, name)
    if not t.is_floating_point():
        t = t.to(torch.float64)
    if t.dtype not in _FLOAT_DTYPES:
        raise DtypeError(f"{name}: unsupported dtype {t.dtype}")
    if t.dim() < 1 or t.shape[0] == 0:
        raise InputError(f"{name}: expected a non-empty batch (N, ...) of queries, got shape {tuple(t.shape)}")
    per_item = int(np.prod(t.shape[1:])) if t.dim() > 1 else 1
    if per_item != d:
        raise InputError(
            f"{name}: each query must have {d} values to match the data set, got shape "
            f"{tuple(t.shape)} ({per_item} per query)"
        )
    if not _all_finite(t):
        raise InputError(f"{name}: contains NaN or inf")
    return t


def _all_finite(t: torch.Tensor) -> bool:
    """Whether a floating tensor holds no NaN or inf (one numpy pass for CPU float32/64,
    which costs a fraction of torch.isfinite's several dispatched ops at small sizes)."""
    if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and not t.requires_grad:
        return bool(np.isfinite(t.numpy()).all())
    return bool(torch.isfinite(t).all())


def check_sigma(sigma, n: int, name: str = "sigma", allow_zero: bool = False, allow_inf: bool = True) -> torch.Tensor:
    """Validate a noise level: a positive scalar or one value per query.

    ``+inf`` is a noise level (pure noise: D(x; inf) is the data mean) unless
    ``allow_inf`` is False; NaN and -inf never are. Returns a float64 CPU tensor of shape (n,).
    """
    if isinstance(sigma, bool) or sigma is None:
        raise DtypeError(f"{name}: expected a positive number or a tensor of shape ({n},), got {sigma!r}")
    if isinstance(sigma, numbers.Real):
        v = float(sigma)
        if math.isnan(v) or v == -math.inf or (v == math.inf and not allow_inf):
            raise InputError(f"{name}: contains NaN or inf")
        if v < 0 or (v == 0 and not allow_zero):
            raise InputError(f"{name}: must be {'>=' if allow_zero else '>'} 0, got min {v}")
        return torch.full((n,), v, dtype=torch.float64)
    else:
        if isinstance(sigma, str):
            raise DtypeError(f"{name}: expected a positive number, got the string {sigma!r}")
        t = as_tensor(sigma, name).detach().to("cpu", torch.float64)
        if t.numel() == 1:
            s = t.reshape(1).expand(n).clone()
        elif t.dim() >= 1 and t.numel() == n:
            s = t.reshape(n)
        else:
            raise InputError(
                f"{name}: expected a scalar or one value per query (shape ({n},)), got shape {tuple(t.shape)}"
            )
    if not bool((torch.isfinite(s) | ((s == math.inf) & allow_inf)).all()):
        raise InputError(f"{name}: contains NaN or inf")
    if allow_zero:
        if bool((s < 0).any()):
            raise InputError(f"{name}: must be >= 0, got min {float(s.min())}")
    elif bool((s <= 0).any()):
        raise InputError(f"{name}: must be > 0, got min {float(s.min())}")
    return s


def check_real(value, name: str, nonzero: bool = False, magnitude: tuple[float, float] | None = None,
               why: str = "") -> float:
    """A finite real number (bool refused); nonzero if asked; with ``magnitude=(lo, hi)``,
    lo <= |value| <= hi (``why`` says what breaks outside)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise DtypeError(f"{name}: expected a real number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise InputError(f"{name}: must be finite, got {v}")
    if nonzero and v == 0.0:
        raise InputError(f"{name}: must be nonzero")
    if magnitude is not None and not magnitude[0] <= abs(v) <= magnitude[1]:
        raise InputError(f"{name}: {v:g} is outside {magnitude[0]:g}..{magnitude[1]:g} in magnitude{why}")
    return v


def check_positive_int(value, name: str, low: int = 1, high: int | None = None) -> int:
    """An integer in [low, high]; bool and floats are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise DtypeError(f"{name}: expected an integer, got {value!r}")
    v = int(value)
    if v < low or (high is not None and v > high):
        rng = f"{low}..{high}" if high is not None else f">= {low}"
        raise InputError(f"{name}: expected an integer in {rng}, got {v}")
    return v


def check_device(device, name: str = "device") -> torch.device:
    """A torch device this build can use: InputError for a malformed name, a CUDA device
    where torch has no CUDA (or no such GPU), instead of torch's AssertionError later."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"{name}: not a torch device: {device!r} (expected e.g. 'cpu', 'cuda', 'cuda:1')") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"{name}: {device!r} requested, but this torch build has no usable CUDA "
                             "(torch.cuda.is_available() is False); use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"{name}: {device!r} requested, but there are {torch.cuda.device_count()} CUDA device(s)")
    return dev
