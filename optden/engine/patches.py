"""Patches of training images as the rows of a pass: window geometry and patch row sources.

The local denoisers (``optden.local``) are softmax-weighted empirical denoisers over
patches (docs/design.md, section 9; issue 21). This module holds what they share with
the engine:

* :class:`PatchGeometry`: the k x k windows of (C, H, W) images, circular or zero
  padding: which pixel each window offset reads, the center columns of a patch, which
  positions compete in the equivariant denoiser (same in-image window shape), and how
  many windows cover each pixel (the composite's normaliser). Positions are flat
  ``p = py * W + px``; a patch is the vector (C, k, k) flattened, offset index
  ``(oy + r) * k + (ox + r)`` with ``r = k // 2``.
* :class:`PatchSource`: the patches of a set of images at a set of positions, served in
  the row-source protocol of ``optden.engine.rows.RowSource`` (``M``, ``d``, ``center``,
  ``max_cnorm``, ``blocks``, ``gather``, ``global_index``), so that the engine's own
  passes run over patches unchanged: the torch backend's ``partial``, ``certify``'s
  exact re-score and ``exact_pass``. The local denoisers use it where their fast passes
  cannot certify a query.

Out-of-image pixels of a zero-padded window hold the source's center (0 once centered),
so that two windows with the same in-image shape compare exactly their in-image pixels.
"""
from __future__ import annotations

import math
import numbers
import weakref
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

from ..errors import DtypeError, InputError

__all__ = ["PADDINGS", "PatchGeometry", "PatchSource", "check_patch_size", "patch_center", "max_deviation"]

#: How a window treats the image border: wrap around, or cut (compare in-image pixels only).
PADDINGS = ("circular", "zero")


def check_patch_size(k, image_hw: tuple, padding: str, name: str = "patch_size") -> int:
    """An odd positive window size valid for images of size image_hw = (H, W) under padding."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise DtypeError(f"{name}: expected an odd positive integer, got {k!r}")
    k = int(k)
    if k < 1 or k % 2 == 0:
        raise InputError(f"{name}: expected an odd positive integer (a window centred on a pixel), got {k}")
    H, W = image_hw
    if padding == "circular" and (k > H or k > W):
        raise InputError(f"{name}: {k} is larger than the {H} x {W} image; a circular window wider than the image "
                         f"would count pixels twice (use k <= {min(H, W)}, or padding='zero')")
    return k


@dataclass(frozen=True)
class PatchGeometry:
    """The k x k windows of images (C, H, W) under ``padding`` ("circular" or "zero")."""

    image_shape: tuple
    k: int
    padding: str

    def __post_init__(self):
        if self.padding not in PADDINGS:
            raise InputError(f"padding: expected one of {PADDINGS}, got {self.padding!r}")
        shape = tuple(int(s) for s in self.image_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise InputError(f"image_shape: expected (C, H, W) images, got {self.image_shape}")
        object.__setattr__(self, "image_shape", shape)
        object.__setattr__(self, "k", check_patch_size(self.k, shape[1:], self.padding))

    @property
    def C(self) -> int:
        return self.image_shape[0]

    @property
    def H(self) -> int:
        return self.image_shape[1]

    @property
    def W(self) -> int:
        return self.image_shape[2]

    @property
    def HW(self) -> int:
        return self.H * self.W

    @property
    def r(self) -> int:
        return self.k // 2

    @property
    def d(self) -> int:
        """Values per patch, C k^2."""
        return self.C * self.k * self.k

    @cached_property
    def pixels(self) -> np.ndarray:
        """(HW, k^2) int64: the flat pixel each window offset reads, -1 outside the image (zero padding)."""
        r, H, W = self.r, self.H, self.W
        py, px = np.divmod(np.arange(self.HW), W)
        oy, ox = np.divmod(np.arange(self.k * self.k), self.k)
        yy = py[:, None] + oy[None, :] - r
        xx = px[:, None] + ox[None, :] - r
        if self.padding == "circular":
            return (yy % H) * W + (xx % W)
        inside = (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
        return np.where(inside, yy * W + xx, -1)

    @cached_property
    def columns(self) -> np.ndarray:
        """(HW, C k^2) int64: the index in a flattened image (C * HW) of each patch value, -1 outside."""
        pix = self.pixels
        cols = np.concatenate([np.where(pix >= 0, c * self.HW + pix, -1) for c in range(self.C)], axis=1)
        return cols

    @property
    def center_columns(self) -> np.ndarray:
        """(C,) the patch columns of the window's center pixel, one per channel."""
        kk = self.k * self.k
        return np.arange(self.C) * kk + kk // 2

    @cached_property
    def classes(self) -> np.ndarray:
        """(HW,) int64: the competition class of each position in the equivariant denoiser.

        Positions compete when their windows have the same in-image shape: one class under
        circular padding; under zero padding the interior is one class and the border
        positions form classes by their distance to each edge (capped at r).
        """
        if self.padding == "circular":
            return np.zeros(self.HW, dtype=np.int64)
        _, inv = np.unique(self.pixels >= 0, axis=0, return_inverse=True)
        return inv.reshape(-1).astype(np.int64)

    @cached_property
    def covers(self) -> np.ndarray:
        """(HW,) float64: how many windows cover each pixel (the composite's normaliser)."""
        pix = self.pixels
        return np.bincount(pix[pix >= 0], minlength=self.HW).astype(np.float64)


def patch_center(dataset) -> float:
    """The scalar center of patch rows and local passes: the rounded mean of the data set's
    center for uint8 rows (an integer, so centered uint8 values stay exact), its mean otherwise."""
    c = float(np.mean(dataset.center))
    return float(np.clip(np.floor(c + 0.5), 0, 255)) if dataset.dtype == "uint8" else c


def max_deviation(dataset, c0: float) -> float:
    """An upper bound on |raw - c0| over every value of the data set (raw units)."""
    lo, hi = _value_range(dataset)
    return max(abs(hi - c0), abs(lo - c0)) * (1.0 + 1e-12)


@dataclass
class PatchSource:
    """The patches at ``positions`` (flat, (P,)) of the images of ``rows`` (a RowSource of
    whole images: all of a data set, or one class) as rows of dimension C k^2.

    Local row j is image ``j // P`` of ``rows`` at position ``positions[j % P]``;
    ``global_index`` maps it to ``dataset row * HW + position``. Raw patches are uint8 for
    uint8 data (exact) and float64 otherwise; ``center`` is one scalar for every column.
    """

    rows: object
    geometry: PatchGeometry
    positions: np.ndarray
    block_rows: int = 4096
    _pos: torch.Tensor = field(default=None, repr=False)
    _cols: torch.Tensor = field(default=None, repr=False)

    def __post_init__(self):
        ds = self.rows.dataset
        if tuple(ds.image_shape) != self.geometry.image_shape:
            raise InputError(f"geometry: for images {self.geometry.image_shape}, the data set holds {ds.image_shape}")
        self.positions = np.asarray(self.positions, dtype=np.int64).reshape(-1)
        if self.positions.size == 0:
            raise InputError("positions: expected at least one position")
        self.device = self.rows.device
        c0 = patch_center(ds)
        self.pad = c0
        self.center = torch.full((self.d,), c0, dtype=torch.float64, device=self.device)
        self.max_cnorm = math.sqrt(self.d) * max_deviation(ds, c0)
        self._pos = torch.from_numpy(self.positions).to(self.device)
        cols = self.geometry.columns[self.positions]  # (P, d), -1 outside
        cols = np.where(cols >= 0, cols, ds.d)  # the pad column appended to each image
        self._cols = torch.from_numpy(cols).to(self.device)

    @property
    def P(self) -> int:
        return int(self.positions.shape[0])

    @property
    def M(self) -> int:
        return self.rows.M * self.P

    @property
    def d(self) -> int:
        return self.geometry.d

    @property
    def dtype(self) -> str:
        return "uint8" if self.rows.dataset.dtype == "uint8" else "float64"

    def _patches(self, images: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Raw patches (n, d) of images (n, C*HW) (raw storage) at position slots (n,)."""
        if self.dtype == "uint8":
            ext = torch.cat([images, torch.full((images.shape[0], 1), int(self.pad), dtype=torch.uint8,
                                                device=images.device)], dim=1)
        else:
            imgs = images.to(torch.float64)
            ext = torch.cat([imgs, torch.full((imgs.shape[0], 1), self.pad, dtype=torch.float64,
                                              device=imgs.device)], dim=1)
        # index_select and gather, not advanced indexing: that costs ~10 ms a call here
        return ext.gather(1, self._cols.index_select(0, slots))

    def blocks(self, start: int = 0, stop: int | None = None, rows: int | None = None):
        """Yield ``(offset, raw patches (B, d), centered squared norms (B,))`` over local rows [start, stop)."""
        stop = self.M if stop is None else stop
        step = max(self.P, (self.block_rows if rows is None else int(rows)) // self.P * self.P)
        for a in range(start, stop, step):
            b = min(stop, a + step)
            local = torch.arange(a, b, device=self.device)
            raw = self.gather(local)
            q = raw.to(torch.float64) - self.center
            yield a, raw, (q * q).sum(1)

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """Raw patches (K, d) at local positions ``local`` (any shape, flattened)."""
        flat = local.reshape(-1).to(self.device)
        img, slot = torch.div(flat, self.P, rounding_mode="floor"), flat % self.P
        uniq, inv = torch.unique(img, return_inverse=True)
        images = self.rows.gather(uniq).to(self.device)
        return self._patches(images.index_select(0, inv), slot)

    def global_index(self, local: torch.Tensor) -> torch.Tensor:
        """Data set patch indices ``row * HW + position`` of local rows."""
        img = torch.div(local, self.P, rounding_mode="floor")
        pos = self._pos.to(local.device).index_select(0, (local % self.P).reshape(-1)).reshape(local.shape)
        return self.rows.global_index(img) * self.geometry.HW + pos


_VALUE_RANGES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _value_range(dataset) -> tuple[float, float]:
    """(min, max) of the raw values of a data set: (0, 255) for uint8, else one blocked pass
    (cached per data set)."""
    if dataset.dtype == "uint8":
        return 0.0, 255.0
    if dataset not in _VALUE_RANGES:
        lo, hi = math.inf, -math.inf
        for _, _, blk in dataset.iter_blocks():
            v = blk.to(torch.float64)
            lo, hi = min(lo, float(v.min())), max(hi, float(v.max()))
        _VALUE_RANGES[dataset] = (lo, hi)
    return _VALUE_RANGES[dataset]
