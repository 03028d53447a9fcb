"""Memorization of generated samples: nearest and second-nearest training image.

A sample is *memorized* when ``NN1 / NN2 < 1/3`` (docs/design.md, "The math"): its nearest
training row is at least three times closer than the second nearest. Distances are the
exact Euclidean distances in model space from ``OptimalDenoiser.nearest``.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from .data.dataset import Dataset
from .denoiser import OptimalDenoiser
from .calling import as_labels
from .errors import DtypeError, InputError
from .sampling import SampleRun
from .validate import as_tensor, check_positive_int

__all__ = ["Memorization", "memorization", "MEMORIZED_RATIO"]

#: The criterion of memorization studies: NN1 / NN2 below this, the sample is a copy of
#: its nearest training image.
MEMORIZED_RATIO = 1.0 / 3.0


@dataclass
class Memorization:
    """Result of ``memorization`` (CPU tensors).

    nn1_distance, nn2_distance: (n,) float64 distances to the nearest and second-nearest rows.
    nn1_index, nn2_index:       (n,) int64 their dataset row indices.
    ratio:                      (n,) float64 ``nn1 / nn2`` (0 when both are 0: duplicates).
    memorized:                  (n,) bool ``ratio < threshold``.
    threshold:                  the criterion (default 1/3).
    """

    nn1_distance: torch.Tensor
    nn2_distance: torch.Tensor
    nn1_index: torch.Tensor
    nn2_index: torch.Tensor
    ratio: torch.Tensor
    memorized: torch.Tensor
    threshold: float

    @property
    def fraction(self) -> float:
        """Fraction of the samples that are memorized."""
        return float(self.memorized.to(torch.float64).mean())

    @property
    def n(self) -> int:
        return int(self.ratio.numel())

    def to_dict(self) -> dict:
        return {
            "n": self.n,
            "threshold": self.threshold,
            "fraction_memorized": self.fraction,
            "median_ratio": float(self.ratio.median()),
            "median_nn1_distance": float(self.nn1_distance.median()),
        }

    def __repr__(self) -> str:
        return f"Memorization(n={self.n}, fraction={self.fraction:.4g}, threshold={self.threshold:.4g})"


def memorization(samples, ds_or_den, threshold: float = MEMORIZED_RATIO, labels=None, batch_size: int = 4096,
                 device=None, class_labels=None) -> Memorization:
    """Nearest and second-nearest training rows of each sample, and the memorized flags.

    samples: (n, *shape) in model space, or a ``SampleRun`` (its ``samples``).
    ds_or_den: a ``Dataset`` (an exact ``OptimalDenoiser`` is built on ``device``, default
        CPU) or an ``OptimalDenoiser`` (anything with ``nearest(x, k) -> (dist, idx)``).
    threshold: memorized when ``nn1 / nn2 < threshold`` (in (0, 1]).
    labels: per-sample class labels (or EDM's name, ``class_labels``; one-hot vectors
        accepted): search only the rows of the sample's class.
    batch_size: samples per ``nearest`` call.
    """
    if isinstance(samples, SampleRun):
        samples = samples.samples
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0 < float(threshold) <= 1:
        raise InputError(f"threshold: expected a number in (0, 1], got {threshold!r}")
    batch_size = check_positive_int(batch_size, "batch_size")
    if isinstance(ds_or_den, Dataset):
        den = OptimalDenoiser(ds_or_den, device="cpu" if device is None else device)
    elif callable(getattr(ds_or_den, "nearest", None)):
        den = ds_or_den
    else:
        raise DtypeError(
            f"ds_or_den: expected an optden.Dataset or an OptimalDenoiser, got {type(ds_or_den).__name__}"
        )
    M = getattr(den, "M", None)
    if M is not None and M < 2:
        raise InputError("ds_or_den: the NN1/NN2 criterion needs at least 2 training rows, the data set has 1")
    x = as_tensor(samples, "samples")
    if x.dim() < 2 or x.shape[0] == 0:
        raise InputError(f"samples: expected a non-empty batch (n, *shape), got shape {tuple(x.shape)}")
    n = x.shape[0]
    lab = as_labels(labels, n, class_labels)
    d1 = torch.empty(n, dtype=torch.float64)
    d2 = torch.empty(n, dtype=torch.float64)
    i1 = torch.empty(n, dtype=torch.int64)
    i2 = torch.empty(n, dtype=torch.int64)
    for a in range(0, n, batch_size):
        b = min(n, a + batch_size)
        kw = {} if lab is None else {"labels": lab[a:b]}
        dist, idx = den.nearest(x[a:b], k=2, **kw)
        dist, idx = torch.as_tensor(dist).cpu().to(torch.float64), torch.as_tensor(idx).cpu().to(torch.int64)
        d1[a:b], d2[a:b], i1[a:b], i2[a:b] = dist[:, 0], dist[:, 1], idx[:, 0], idx[:, 1]
    ratio = torch.where(d2 > 0, d1 / torch.where(d2 > 0, d2, torch.ones_like(d2)), torch.zeros_like(d1))
    return Memorization(d1, d2, i1, i2, ratio, ratio < float(threshold), float(threshold))
