"""Training sets: raw storage (uint8 / fp16 / bf16 / fp32 rows), the affine map to model
space, float64 row statistics, loaders, and one content fingerprint.

A :class:`Dataset` holds ``M`` rows of dimension ``d``. Rows are stored "raw" in a numpy
array or a read-only ``np.memmap`` of shape ``(M, d)``; the model sees
``model = raw * scale + offset`` (uint8 images default to ``[-1, 1]``). Large sets stay on
disk: every pass over the data is made in blocks of about 64 MB. The storage dtypes are
``optden.data.storage``'s table; the directory format is ``optden.data.format``; image
decoding is ``optden.data.images``; the bundled demo arrays are ``optden.data.demo``.
"""
from __future__ import annotations

import hashlib
import json
import numbers
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..errors import DatasetError, DatasetNotFoundError, DtypeError, InputError
from ..validate import as_tensor, check_real
from . import demo, format as fmt
from . import sources
from .images import ImageSource, check_resolution, decode_all, labels_from_dataset_json
from .sources import ModelSpaceWarning, image_layout, tell_unit_range, value_bounds  # noqa: F401
from .storage import (DTYPE_NAMES, FLOAT_DTYPE_NAMES, STORAGE_DTYPES, bf16_bits_to_f32, by_numpy, storage_dtype,
                      to_float64, to_torch)

__all__ = ["Dataset", "patches_dataset", "BLOCK_BYTES", "ModelSpaceWarning"]

BLOCK_BYTES = 64 << 20
"""Working-set size of one block in the streaming passes (float64 bytes per block)."""


# ---------------------------------------------------------------------------- helpers


def _block_rows(d: int, bytes_per_value: int = 8) -> int:
    """Rows per block so that one block of float64 working data is about BLOCK_BYTES."""
    return max(1, BLOCK_BYTES // max(1, d * bytes_per_value))


def _finite_block(block: np.ndarray, dtype: str) -> np.ndarray:
    """Boolean (k,) rows of a raw block (k, d) whose values are all finite."""
    if dtype == "uint8":
        return np.ones(block.shape[0], dtype=bool)
    if dtype == "bfloat16":
        return ~((block & 0x7F80) == 0x7F80).any(axis=1)
    return np.isfinite(block).all(axis=1)


def _check_finite(raw: np.ndarray, dtype: str, name: str) -> None:
    """InputError naming ``name`` if the raw rows (M, d) hold NaN or inf; checked in blocks."""
    if dtype == "uint8":
        return
    step = _block_rows(raw.shape[1], raw.dtype.itemsize)
    for start in range(0, raw.shape[0], step):
        ok = _finite_block(raw[start:start + step], dtype)
        if not ok.all():
            row = start + int(np.flatnonzero(~ok)[0])
            raise InputError(
                f"{name}: contains NaN or inf (first in row {row}); values must be finite "
                f"and within the {dtype} range"
            )


def _check_labels(labels, M: int, num_classes, name: str = "labels"):
    """Validate class labels: returns (labels int64 (M,) or None, num_classes or None)."""
    if labels is None:
        if num_classes is not None:
            raise InputError("num_classes: given without labels")
        return None, None
    if isinstance(labels, torch.Tensor):
        arr = labels.detach().cpu().numpy()
    else:
        arr = np.asarray(labels)
    if arr.dtype == bool or arr.dtype.kind not in "iu":
        raise InputError(f"{name}: expected integer class labels, got dtype {arr.dtype}")
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1 or arr.shape[0] != M:
        raise InputError(f"{name}: expected shape ({M},) (one label per row), got {tuple(arr.shape)}")
    arr = arr.astype(np.int64)
    if M and arr.min() < 0:
        raise InputError(f"{name}: labels must be >= 0, got min {int(arr.min())}")
    top = int(arr.max()) + 1 if M else 0
    if num_classes is None:
        num_classes = top
    else:
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
            raise DtypeError(f"num_classes: expected an integer, got {num_classes!r}")
        num_classes = int(num_classes)
        if num_classes < top:
            raise InputError(f"labels: label {top - 1} is out of range 0..{num_classes - 1} "
                             f"(num_classes={num_classes})")
    arr.setflags(write=False)
    return arr, num_classes


def _infer_image_shape(shape: tuple, image_shape, name: str) -> tuple:
    """The per-row shape (C, H, W) or (d,) for an array of shape (N, ...)."""
    if len(shape) < 2 or len(shape) > 4:
        raise InputError(
            f"{name}: expected rows (N, d), grayscale images (N, H, W) or images (N, C, H, W); "
            f"got shape {tuple(shape)}"
        )
    d = int(np.prod(shape[1:]))
    if image_shape is None:
        if len(shape) == 2:
            return (d,)
        if len(shape) == 3:
            return (1, int(shape[1]), int(shape[2]))
        return tuple(int(s) for s in shape[1:])
    try:
        ish = tuple(int(s) for s in image_shape)
    except TypeError:
        raise InputError(f"image_shape: expected a tuple such as (C, H, W) or (d,), got {image_shape!r}") from None
    if not ish or any(s <= 0 for s in ish) or int(np.prod(ish)) != d:
        raise InputError(f"image_shape: {ish} does not hold the {d} values per row of {name} (shape {tuple(shape)})")
    return ish


def _as_index(index, M: int, name: str = "index") -> np.ndarray:
    """Row indices (any 1-D integer sequence, tensor, array, or a boolean mask of length M) -> int64 (k,)."""
    if isinstance(index, numbers.Integral) and not isinstance(index, bool):
        idx = np.array([int(index)], dtype=np.int64)
    else:
        if isinstance(index, torch.Tensor):
            arr = index.detach().cpu().numpy()
        elif isinstance(index, range):
            arr = np.arange(index.start, index.stop, index.step, dtype=np.int64)
        else:
            arr = np.asarray(index)
        if arr.dtype == bool:
            if arr.shape != (M,):
                raise InputError(f"{name}: a boolean mask must have shape ({M},), got {arr.shape}")
            return np.flatnonzero(arr).astype(np.int64)
        if arr.size == 0:
            return np.zeros(0, dtype=np.int64)
        if arr.dtype.kind not in "iu":
            raise DtypeError(f"{name}: expected integer row indices, got dtype {arr.dtype}")
        if arr.ndim != 1:
            raise InputError(f"{name}: expected a 1-D array of row indices, got shape {arr.shape}")
        idx = arr.astype(np.int64, copy=False)
    if idx.size and (idx.min() < 0 or idx.max() >= M):
        bad = idx[(idx < 0) | (idx >= M)][0]
        raise InputError(f"{name}: row index {int(bad)} is out of range 0..{M - 1}")
    return idx


def _storage_dtype_name(dt: np.dtype, bfloat16: bool, name: str) -> str:
    """Map a numpy dtype to a storage dtype name; DtypeError for anything unsupported."""
    if bfloat16:
        if dt != np.uint16:
            raise DtypeError(f"{name}: dtype='bfloat16' needs uint16 bit patterns, got {dt}")
        return "bfloat16"
    if dt.kind == "c":
        raise DtypeError(f"{name}: complex data is not supported (got {dt})")
    if dt.kind == "b":
        raise DtypeError(f"{name}: boolean data is not supported")
    if dt.kind in "iu" and dt != np.uint8:
        raise DtypeError(
            f"{name}: integer data must be uint8 (images); got {dt}. Convert it to uint8 or to a float type"
        )
    if dt.kind not in "uif":
        raise DtypeError(f"{name}: expected a numeric array, got dtype {dt}")
    if any(dt == e.numpy for e in STORAGE_DTYPES.values()):  # uint16 (bfloat16's bits) was refused above
        return by_numpy(dt).name
    return ""  # float64 or non-native float: converted by the caller


# ---------------------------------------------------------------------------- Dataset


class Dataset:
    """A training set of ``M`` rows of dimension ``d`` with an affine map to model space.

    Build one with :meth:`from_array`, :meth:`from_npy`, :meth:`from_images`,
    :meth:`load` or :meth:`demo`. The raw rows are never modified; blocks returned by
    :meth:`raw_block` share memory with the storage (a read-only mapping for memmapped
    sets) and must be cloned before writing into them.

    Attributes:
        M, d: number of rows and values per row.
        image_shape: per-row shape, ``(C, H, W)`` for images or ``(d,)``.
        dtype: storage dtype name, one of "uint8", "float16", "bfloat16", "float32".
        scale, offset: the affine map ``model = raw * scale + offset``.
        labels: int64 ``(M,)`` class labels (read-only) or None.
        num_classes: number of classes (largest label + 1 unless given) or None.
        path: the dataset directory (for :meth:`load` / :meth:`save`) or None.
        center: float64 ``(d,)`` per-feature mean of the raw rows (rounded to integers for
            uint8, so that ``raw - center`` is exact in float32 and bfloat16).
        centered_sqnorms: float64 ``(M,)``, ``||raw_i - center||^2`` (exact for uint8).
        sqnorms: float64 ``(M,)``, ``||raw_i * scale + offset||^2``.
    """

    def __init__(self, raw: np.ndarray, dtype: str, image_shape=None, scale=None, offset=None,
                 labels=None, num_classes=None, path=None, source: str | None = None,
                 _mmap_file: Path | None = None):
        """Low-level constructor from raw rows ``(M, d)``; prefer the classmethods.

        ``raw`` must already be in storage form: uint8, float16, float32, or uint16 holding
        bfloat16 bit patterns (with ``dtype="bfloat16"``). It is kept, not copied.
        """
        storage_dtype(dtype)
        if not isinstance(raw, np.ndarray) or raw.ndim != 2:
            raise InputError(f"raw: expected a 2-D numpy array (M, d), got {type(raw).__name__} "
                             f"{getattr(raw, 'shape', '')}")
        if raw.dtype != STORAGE_DTYPES[dtype].numpy:
            raise DtypeError(f"raw: dtype {dtype!r} is stored as {STORAGE_DTYPES[dtype].numpy}, got {raw.dtype}")
        M, d = (int(s) for s in raw.shape)
        if M == 0 or d == 0:
            raise DatasetError(f"empty dataset: got {M} rows of dimension {d}; need at least one row and one value")
        if not raw.flags.c_contiguous:
            raise InputError("raw: rows must be C-contiguous")
        self._raw = raw
        self.M, self.d = M, d
        self.dtype = dtype
        self.image_shape = _infer_image_shape((M, d), image_shape, "raw")
        if scale is None:
            scale = 2.0 / 255.0 if dtype == "uint8" else 1.0
        if offset is None:
            offset = -1.0 if dtype == "uint8" else 0.0
        self._scale = check_real(scale, "scale", nonzero=True, magnitude=(1e-150, 1e150), why=" (the logits' "
                                 "scale^2 / (2 sigma^2) would overflow or vanish in float64); rescale the rows instead")
        self._offset = check_real(offset, "offset")
        self.labels, self.num_classes = _check_labels(labels, M, num_classes)
        self.path = Path(path) if path is not None else None
        self._source = source
        self._mmap_file = Path(_mmap_file) if _mmap_file is not None else None
        # the mapped file as it was when opened: every pass checks it (check_unchanged)
        self._mapped = fmt.MappedRows(self._mmap_file) if self._mmap_file is not None else None
        self._stats = None  # (center, centered_sqnorms, sqnorms), computed lazily
        self._label_rows: dict[int, np.ndarray] = {}
        self._rows_sha256: str | None = None  # sha256 of the rows in .npy form (see fingerprint)
        self._fingerprint: str | None = None

    # ----------------------------------------------------------------- basic properties

    @property
    def scale(self) -> float:
        """Multiplier of the affine map ``model = raw * scale + offset`` (read-only)."""
        return self._scale

    @property
    def offset(self) -> float:
        """Offset of the affine map ``model = raw * scale + offset`` (read-only)."""
        return self._offset

    @property
    def raw(self) -> np.ndarray:
        """The raw storage, a numpy array or ``np.memmap`` (M, d); bfloat16 as uint16 bits. Do not modify."""
        return self._raw

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype of :meth:`raw_block` (torch.uint8 / float16 / bfloat16 / float32)."""
        return STORAGE_DTYPES[self.dtype].torch

    @property
    def is_memmap(self) -> bool:
        """True when the rows are memory-mapped from a file rather than held in memory."""
        return isinstance(self._raw, np.memmap)

    def check_unchanged(self) -> None:
        """DatasetError naming the file if the memory-mapped rows' file changed since the
        dataset opened it (``format.MappedRows``); every pass calls it (``engine/rows.py``)."""
        if self._mapped is not None:
            self._mapped.check()

    @property
    def nbytes(self) -> int:
        """Bytes of raw storage, ``M * d * itemsize``."""
        return int(self._raw.nbytes)

    def __len__(self) -> int:
        return self.M

    def __repr__(self) -> str:
        if self.is_memmap:
            storage = f"memmap:{self._mmap_file}"
        else:
            storage = "memory"
        src = f", source={self._source!r}" if self._source else ""
        return (
            f"Dataset(M={self.M}, d={self.d}, image_shape={self.image_shape}, dtype={self.dtype!r}, "
            f"scale={self._scale:.6g}, offset={self._offset:.6g}, num_classes={self.num_classes}, "
            f"storage={storage!r}{src})"
        )

    def __getstate__(self):
        # A memmapped set pickles as its file name (reopened on unpickling), never as its data.
        state = self.__dict__.copy()
        if self.is_memmap and self._mmap_file is not None:
            state["_raw"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self._raw is None:
            arr = fmt.open_npy(self._mmap_file).view(STORAGE_DTYPES[self.dtype].numpy)
            self._raw = arr.reshape(self.M, self.d)

    # ----------------------------------------------------------------- statistics

    def _compute_stats(self) -> None:
        """Center, centered and model-space squared norms in two blocked passes (memory bounded)."""
        M, d, raw = self.M, self.d, self._raw
        step = _block_rows(d)
        sqnorms = np.empty(M, dtype=np.float64)
        centered = np.empty(M, dtype=np.float64)
        if self.dtype == "uint8":
            colsum = np.zeros(d, dtype=np.int64)
            for s in range(0, M, step):
                q = np.asarray(raw[s:s + step])
                colsum += q.sum(axis=0, dtype=np.int64)
                v = q.astype(np.float64)
                v *= self._scale
                v += self._offset
                sqnorms[s:s + step] = np.einsum("ij,ij->i", v, v)
            # Integer mean rounded half-up: floor((2*sum + M) / (2M)), exact in int64.
            center_int = (2 * colsum + M) // (2 * M)
            c32 = center_int.astype(np.int32)
            for s in range(0, M, step):
                diff = np.asarray(raw[s:s + step]).astype(np.int32)
                diff -= c32
                np.multiply(diff, diff, out=diff)
                centered[s:s + step] = diff.sum(axis=1, dtype=np.int64)
            center = center_int.astype(np.float64)
        else:
            colsum = np.zeros(d, dtype=np.float64)
            for s in range(0, M, step):
                x = to_float64(np.asarray(raw[s:s + step]), self.dtype)
                colsum += x.sum(axis=0)
                x *= self._scale
                x += self._offset
                sqnorms[s:s + step] = np.einsum("ij,ij->i", x, x)
            center = colsum / M
            for s in range(0, M, step):
                x = to_float64(np.asarray(raw[s:s + step]), self.dtype)
                x -= center
                centered[s:s + step] = np.einsum("ij,ij->i", x, x)
        for a in (center, centered, sqnorms):
            a.setflags(write=False)
        self._stats = (center, centered, sqnorms)

    def _get_stats(self):
        if self._stats is None:
            self._compute_stats()
        return self._stats

    @property
    def center(self) -> np.ndarray:
        """float64 (d,): per-feature mean of the raw rows (nearest integer for uint8)."""
        return self._get_stats()[0]

    @property
    def centered_sqnorms(self) -> np.ndarray:
        """float64 (M,): ``||raw_i - center||^2``, exact (int64) for uint8."""
        return self._get_stats()[1]

    @property
    def sqnorms(self) -> np.ndarray:
        """float64 (M,): squared norm of each row in model space, ``||raw_i * scale + offset||^2``."""
        return self._get_stats()[2]

    # ----------------------------------------------------------------- row access

    def default_block_rows(self, bytes_per_block: int = BLOCK_BYTES) -> int:
        """Rows per block so that one block of raw storage is about ``bytes_per_block`` bytes."""
        return max(1, min(self.M, bytes_per_block // (self.d * self._raw.dtype.itemsize)))

    def raw_block(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` as a CPU tensor (stop - start, d) in the storage dtype.

        Zero-copy: the tensor shares memory with the storage (read-only for memmapped
        sets; clone before writing). ``0 <= start <= stop <= M``.
        """
        for v, n in ((start, "start"), (stop, "stop")):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise DtypeError(f"{n}: expected an integer row number, got {v!r}")
        start, stop = int(start), int(stop)
        if not 0 <= start <= stop <= self.M:
            raise InputError(f"raw_block: need 0 <= start <= stop <= M={self.M}, got start={start}, stop={stop}")
        return to_torch(self._raw[start:stop], self.dtype)

    def read_rows_into(self, start: int, stop: int, out: np.ndarray) -> None:
        """Copy rows ``start:stop`` into ``out`` ((stop - start, d), the storage dtype); from a
        file with ``pread``, never through the mapping (``format.MappedRows``: no SIGBUS)."""
        if self._mapped is None or not (out.flags.c_contiguous and self._raw.shape == (self.M, self.d)):
            np.copyto(out, self._raw[start:stop])
        else:
            self._mapped.read_into(start, stop, self.d * self._raw.itemsize, out)

    def iter_blocks(self, block_rows: int | None = None):
        """Yield ``(start, stop, raw_block(start, stop))`` over all rows, ``block_rows`` at a time."""
        step = self.default_block_rows() if block_rows is None else int(block_rows)
        if step < 1:
            raise InputError(f"block_rows: expected a positive integer, got {block_rows!r}")
        for s in range(0, self.M, step):
            e = min(self.M, s + step)
            yield s, e, self.raw_block(s, e)

    def raw_rows(self, index) -> torch.Tensor:
        """Gather rows by index (k,) -> CPU tensor (k, d) in the storage dtype (a copy)."""
        idx = _as_index(index, self.M)
        return to_torch(np.ascontiguousarray(self._raw[idx]), self.dtype)

    def to_model(self, raw: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Apply the affine map to raw values (any shape, any device): ``raw * scale + offset`` in ``dtype``."""
        return raw.to(dtype) * self._scale + self._offset

    def model_rows(self, index) -> torch.Tensor:
        """Gather rows by index (k,) -> float64 tensor (k, d) in model space."""
        return self.to_model(self.raw_rows(index))

    def images(self, index) -> torch.Tensor:
        """Gather rows by index (k,) -> float64 tensor (k, *image_shape) in model space."""
        x = self.model_rows(index)
        return x.reshape(x.shape[0], *self.image_shape)

    def to_uint8_images(self, x_model, value_range=None) -> np.ndarray:
        """Model-space images -> uint8 pictures (N, H, W, C) for saving (clipped, rounded).

        ``x_model``: (N, C, H, W), (N, d) or one image (C, H, W), any float dtype.
        For uint8 data the affine map is inverted. For float data pass
        ``value_range=(lo, hi)``: model values ``lo..hi`` map linearly to 0..255.
        Grayscale gives C = 1 (use ``[..., 0]`` for Pillow's mode "L").
        """
        if len(self.image_shape) != 3:
            raise InputError(f"to_uint8_images: the rows of this dataset are not images (image_shape {self.image_shape})")
        t = as_tensor(x_model, "x_model").detach().to("cpu", torch.float64)
        if tuple(t.shape) == self.image_shape:
            t = t.unsqueeze(0)
        if t.dim() < 2 or int(np.prod(t.shape[1:])) != self.d:
            raise InputError(
                f"x_model: expected (N, *{self.image_shape}) or (N, {self.d}), got shape {tuple(t.shape)}"
            )
        x = t.numpy().reshape(t.shape[0], *self.image_shape)
        if np.isnan(x).any():
            raise InputError("x_model: contains NaN")
        if value_range is None:
            if self.dtype != "uint8":
                raise InputError(
                    "value_range: this dataset stores float data; pass value_range=(lo, hi), the model "
                    "values that map to 0 and 255"
                )
            pix = (x - self._offset) / self._scale
        else:
            try:
                lo, hi = (float(v) for v in value_range)
            except (TypeError, ValueError):
                raise InputError(f"value_range: expected (lo, hi), got {value_range!r}") from None
            if not (np.isfinite(lo) and np.isfinite(hi) and hi != lo):
                raise InputError(f"value_range: expected finite lo != hi, got {value_range!r}")
            pix = (x - lo) * (255.0 / (hi - lo))
        pix = np.rint(np.clip(pix, 0.0, 255.0)).astype(np.uint8)
        return np.ascontiguousarray(pix.transpose(0, 2, 3, 1))

    def rows_with_label(self, c) -> np.ndarray:
        """int64 (k,) indices of the rows whose label is ``c`` (sorted; cached per label)."""
        if self.labels is None:
            raise InputError("rows_with_label: this dataset has no labels")
        if isinstance(c, torch.Tensor) and c.numel() == 1:
            c = c.item()
        if isinstance(c, bool) or not isinstance(c, numbers.Integral):
            raise InputError(f"c: expected an integer class label, got {c!r}")
        c = int(c)
        if not 0 <= c < self.num_classes:
            raise InputError(f"c: class label {c} is out of range 0..{self.num_classes - 1}")
        rows = self._label_rows.get(c)
        if rows is None:
            rows = np.flatnonzero(self.labels == c).astype(np.int64)
            rows.setflags(write=False)
            self._label_rows[c] = rows
        return rows

    def subset(self, index) -> "Dataset":
        """A new in-memory Dataset of the rows ``index`` (k,), same map, labels and num_classes."""
        idx = _as_index(index, self.M)
        if idx.size == 0:
            raise DatasetError("subset: the index selects no rows; a dataset needs at least one row")
        raw = np.ascontiguousarray(self._raw[idx])
        labels = None if self.labels is None else self.labels[idx]
        return Dataset(raw, self.dtype, self.image_shape, self._scale, self._offset, labels,
                       self.num_classes, source=f"subset of {self._source or 'dataset'}")

    # ----------------------------------------------------------------- constructors

    @classmethod
    def from_array(cls, x, labels=None, scale=None, offset=None, image_shape=None, *,
                   num_classes=None, dtype: str | None = None, channels_last: bool | None = None) -> "Dataset":
        """A dataset from a numpy array or torch tensor.

        ``x``: rows (M, d), grayscale images (M, H, W) or images (M, C, H, W) or
        (M, H, W, C) (transposed, copying): ``channels_last`` None detects the layout
        (``sources.image_layout``) and refuses a shape it cannot tell; True / False says it.
        Dtypes: uint8, float16, bfloat16 (torch, or numpy uint16 bits with
        ``dtype="bfloat16"``), float32. float64 is converted to float32 (a copy); other
        integer types, bool, complex and object arrays are refused (DtypeError).
        ``dtype`` converts float input to "float16", "bfloat16" or "float32" storage.
        C-contiguous input in the storage dtype is kept without a copy: do not modify it.
        ``labels``: integer (M,) or None. ``scale``/``offset`` default to 2/255 and -1
        for uint8 (model space [-1, 1]) and to 1 and 0 for float data.
        """
        if dtype is not None and dtype not in DTYPE_NAMES:
            raise DtypeError(f"dtype: expected one of {DTYPE_NAMES} or None, got {dtype!r}")
        if isinstance(x, np.ndarray):
            arr = x
            name = _storage_dtype_name(arr.dtype, dtype == "bfloat16" and arr.dtype == np.uint16, "x")
            if arr.dtype == np.uint16 and dtype == "bfloat16":
                dtype = None
        else:
            t = as_tensor(x, "x").detach()
            if t.device.type != "cpu":
                t = t.cpu()
            if t.dtype == torch.bfloat16:
                arr = t.contiguous().view(torch.int16).numpy().view(np.uint16)
                name = "bfloat16"
            elif t.dtype == torch.float64:
                arr = t.numpy()
                name = ""
            else:
                arr = t.numpy()
                name = _storage_dtype_name(arr.dtype, False, "x")
        nhwc = image_shape is None and image_layout(arr.shape, channels_last, "x")
        ish = _infer_image_shape(arr.shape, None if nhwc else image_shape, "x")
        if nhwc and arr.ndim == 4:
            arr = arr.transpose(0, 3, 1, 2)
            ish = _infer_image_shape(arr.shape, image_shape, "x")
        M = arr.shape[0]
        d = int(np.prod(arr.shape[1:]))
        if M == 0 or d == 0:
            raise DatasetError(f"x: empty dataset (shape {tuple(arr.shape)}); need at least one row and one value")
        target = dtype or name or "float32"
        if name == "uint8" and target != "uint8":
            raise DtypeError(f"dtype: uint8 images cannot be stored as {target}; convert them yourself")
        if target == "uint8" and name != "uint8":
            raise DtypeError("dtype: float data cannot be stored as uint8; quantize it yourself")
        if name and name != "bfloat16" and target == name:
            raw = np.ascontiguousarray(arr.reshape(M, d))
        elif name == "bfloat16" and target == "bfloat16":
            raw = np.ascontiguousarray(arr.reshape(M, d))
        else:
            raw = _convert_float_rows(arr.reshape(M, d), name or str(arr.dtype), target, "x")
        _check_finite(raw, target, "x")
        tell_unit_range(raw, target, scale, offset, "x")
        return cls(raw, target, ish, scale, offset, labels, num_classes, source="array")

    @classmethod
    def from_npy(cls, path, labels=None, scale=None, offset=None, image_shape=None, *,
                 num_classes=None, dtype: str | None = None, key: str | None = None,
                 check_finite: bool = True, channels_last: bool | None = None) -> "Dataset":
        """A dataset from a ``.npy`` file (memory-mapped read-only, never read whole) or ``.npz``.

        The file holds (M, d), (M, H, W) or (M, C, H, W) rows of uint8, float16, float32
        or (with ``dtype="bfloat16"``) uint16 bfloat16 bit patterns. float64 (and
        non-native byte order) is converted block by block into an in-memory float32
        array. ``.npz`` archives are loaded (they cannot be mapped): the array ``key``, or
        the only array, or the first of "x", "data", "images", "arr_0"; labels default to
        the archive's "labels" or "y" array. ``labels`` may also be the path of a
        ``.npy`` file. ``check_finite`` streams the file once to refuse NaN/inf.
        (M, H, W, C) images are detected as in :meth:`from_array` and transposed into memory.
        """
        path = Path(path)
        if not path.exists():
            raise DatasetNotFoundError(f"path: {path} does not exist")
        if path.is_dir():
            raise DatasetError(f"path: {path} is a directory; use Dataset.load() for a saved dataset "
                               "or Dataset.from_images() for a folder of images")
        if isinstance(labels, (str, os.PathLike)):
            lp = Path(labels)
            if not lp.exists():
                raise DatasetNotFoundError(f"labels: {lp} does not exist")
            try:
                labels = np.load(lp, allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:
                raise DatasetError(f"labels: {lp} is not a valid .npy file ({e})") from None
        if dtype is not None and dtype not in DTYPE_NAMES:
            raise DtypeError(f"dtype: expected one of {DTYPE_NAMES} or None, got {dtype!r}")
        if path.suffix.lower() == ".npz" or zipfile.is_zipfile(path):
            return cls._from_npz(path, labels, scale, offset, image_shape, num_classes, dtype, key, channels_last)
        shape, fortran, ndt, _ = fmt.read_npy_header(path)
        if fortran and len(shape) > 1:
            raise DatasetError(
                f"path: {path} is Fortran-ordered and cannot be streamed by rows; re-save it with "
                "np.save(path, np.ascontiguousarray(x))"
            )
        name = _storage_dtype_name(ndt, dtype == "bfloat16" and ndt == np.uint16, "path")
        if not ndt.isnative and name:
            name = ""
        ish = _infer_image_shape(shape, image_shape, "path")
        M = int(shape[0])
        d = int(np.prod(shape[1:]))
        if M == 0 or d == 0:
            raise DatasetError(f"path: {path} holds an empty array of shape {shape}")
        mm = fmt.open_npy(path)
        target = dtype or name or "float32"
        if image_shape is None and image_layout(shape, channels_last, f"path ({path.name})"):
            return cls.from_array(np.asarray(mm), labels, scale, offset, num_classes=num_classes, dtype=dtype,
                                  channels_last=True)._sourced(str(path))
        if name and target == name:
            raw = mm.reshape(M, d)
            mmap_file = path
        elif name == "uint8" or target == "uint8":
            raise DtypeError(f"dtype: cannot store {ndt} data as {target}")
        else:
            raw = _convert_float_rows(mm.reshape(M, d), name or ndt.name, target, "path")
            mmap_file = None
        if check_finite:
            _check_finite(raw, target, f"path ({path.name})")
        tell_unit_range(raw, target, scale, offset, f"path ({path.name})")
        return cls(raw, target, ish, scale, offset, labels, num_classes, source=str(path), _mmap_file=mmap_file)

    @classmethod
    def _from_npz(cls, path, labels, scale, offset, image_shape, num_classes, dtype, key, channels_last=None):
        try:
            with np.load(path, allow_pickle=False) as z:
                keys = list(z.keys())
                if key is not None:
                    if key not in keys:
                        raise InputError(f"key: {key!r} is not in {path.name} (arrays: {keys})")
                    data_key = key
                elif len(keys) == 1:
                    data_key = keys[0]
                else:
                    found = [k for k in ("x", "data", "images", "arr_0") if k in keys]
                    if not found:
                        raise DatasetError(f"path: {path.name} holds arrays {keys}; pass key= to choose one")
                    data_key = found[0]
                x = z[data_key]
                if labels is None:
                    for k in ("labels", "y"):
                        if k in keys and k != data_key:
                            labels = z[k]
                            break
        except (InputError, DatasetError):
            raise  # our own message (a bad key), not a broken file
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise DatasetError(f"path: {path} is not a valid .npz file ({e})") from None
        return cls.from_array(x, labels, scale, offset, image_shape, num_classes=num_classes, dtype=dtype,
                              channels_last=channels_last)._sourced(str(path))

    def _sourced(self, source: str) -> "Dataset":
        self._source = source
        return self

    @classmethod
    def from_images(cls, path, resolution=None, labels="auto", *, scale=None, offset=None,
                    num_classes=None, workers: int | None = None) -> "Dataset":
        """A uint8 image dataset from a folder (searched recursively) or a zip of PNG/JPEG files.

        Files are taken in sorted order of their relative path ("/"-separated), the order
        of EDM's ImageFolderDataset. Grayscale gives C = 1, RGB C = 3; alpha is dropped;
        palette images become RGB. All images must have the same size unless
        ``resolution`` (an int or (H, W)) resizes them (Lanczos; aspect not kept).
        ``labels="auto"`` reads EDM's ``dataset.json`` (``{"labels": [[relpath, int], ...]}``)
        at the root when present; None means no labels; an integer array gives them in
        file order. Unreadable, mis-sized or mismatched images raise one DatasetError
        listing every offending file. Result: rows (M, C*H*W), image_shape (C, H, W).
        """
        path = Path(path)
        if not path.exists():
            raise DatasetNotFoundError(f"path: {path} does not exist")
        resolution = check_resolution(resolution)
        with ImageSource(path, "path") as source:
            if not source.names:
                raise DatasetError(f"path: {path} holds no PNG/JPEG images")
            if isinstance(labels, str) and labels == "auto":
                labels = (labels_from_dataset_json(source.meta, source.names, path)
                          if source.meta is not None else None)
            raw, ish = decode_all(source, resolution, workers)
        return cls(raw, "uint8", ish, scale, offset, labels, num_classes, source=str(path))

    @classmethod
    def load(cls, dir, verify: bool = True) -> "Dataset":
        """Load a directory written by :meth:`save`; ``data.npy`` is memory-mapped.

        Raises DatasetNotFoundError if the directory or a file is missing, DatasetError if
        ``data.npy`` is truncated or disagrees with ``meta.json``, ChecksumError (when
        ``verify``) if a file's sha256 differs from the one recorded. ``verify=False``
        skips the checksums (a full read) but still checks sizes, shapes and dtypes.
        The layout is ``optden.data.format``'s.
        """
        st = fmt.read_dataset(dir, verify)
        dir = Path(dir)
        try:
            ds = cls(st.raw, st.dtype, st.image_shape, st.scale, st.offset, st.labels, st.num_classes, path=dir,
                     source=str(dir), _mmap_file=st.data_file)
        except (InputError, DtypeError) as e:
            raise DatasetError(f"{dir}: inconsistent dataset files ({e})") from None
        ds._stats = st.stats
        ds._rows_sha256 = st.data_sha256  # verified: the fingerprint needs no second read
        return ds

    @classmethod
    def open(cls, source, *, split: str | None = None, channels_last: bool | None = None, key: str | None = None,
             image_column: str | None = None, label_column: str | None = None, resolution=None,
             scale=None, offset=None) -> "Dataset":
        """A dataset from whatever ``source`` is (``optden.data.sources``): a saved dataset
        directory, ``demo:NAME`` (or a bare demo name), a ``.npy`` / ``.npz`` file, the
        CIFAR-10/100 python pickles (``.tar.gz`` or folder; ``split`` "train", "test" or
        "all"), a Hugging Face ``datasets`` folder or parquet file(s) (``split``,
        ``image_column``, ``label_column``; ``pip install optden[hf]``), a folder or zip of
        PNG/JPEG images (``resolution``), or an indexable torch ``Dataset`` object.

        Float data whose values all lie in [0, 1] is mapped to model space [-1, 1]
        (scale 2, offset -1; ``source`` says so) unless ``scale`` / ``offset`` are given;
        uint8 images map to [-1, 1] as everywhere.
        """
        if not isinstance(source, (str, os.PathLike)):
            rows = sources.read_torch(source)
        elif str(source).startswith("demo:") or (str(source) in ("digits", "patches") and not Path(source).exists()):
            return cls.demo(str(source).removeprefix("demo:"))
        else:
            kind = sources.kind_of(source)
            if kind == "dataset":
                return cls.load(source)
            if kind == "images":
                return cls.from_images(source, resolution, scale=scale, offset=offset)
            rows = None if kind == "npy" else sources.read_cifar(source, split or "train") if kind == "cifar" else \
                sources.read_hf(source, split, image_column, label_column, resolution)
        with warnings.catch_warnings():  # the map is chosen below, not left at [0, 1]
            warnings.simplefilter("ignore", ModelSpaceWarning)
            if rows is None:
                ds = cls.from_npy(source, key=key, channels_last=channels_last, scale=scale, offset=offset)
            else:
                ds = cls.from_array(rows.x, rows.labels, scale, offset, num_classes=rows.num_classes,
                                    channels_last=False)._sourced(rows.source)
        return _unit_mapped(ds, scale is not None or offset is not None)

    @classmethod
    def demo(cls, name: str, max_rows: int | None = None) -> "Dataset":
        """A bundled real dataset (``optden.data.demo``; nothing is downloaded).

        "digits": scikit-learn's 1797 handwritten digits, uint8 (1797, 64),
        image_shape (1, 8, 8), pixel = round(v * 255 / 16), labels 0..9.
        "patches": :func:`patches_dataset` with its defaults (8x8 RGB patches, stride 4).
        ``max_rows`` keeps the first rows (digits) or a random subset (patches).
        """
        if max_rows is not None:
            if isinstance(max_rows, bool) or not isinstance(max_rows, numbers.Integral) or max_rows < 1:
                raise InputError(f"max_rows: expected a positive integer or None, got {max_rows!r}")
        if name == "digits":
            x, y = demo.digits_arrays(max_rows)
            return cls(x, "uint8", (1, 8, 8), labels=y, num_classes=10, source="demo:digits")
        if name == "patches":
            return patches_dataset(max_rows=max_rows)
        raise InputError(f"name: unknown demo dataset {name!r}; expected 'digits' or 'patches'")

    # ----------------------------------------------------------------- identity

    @property
    def fingerprint(self) -> str:
        """sha256 (hex) of everything that determines results computed from this dataset:
        the rows (their ``.npy`` form, as ``data.npy`` holds them), storage dtype, shapes,
        affine map, labels and number of classes.

        A FAISS index and a sampling job record it and refuse other data. The first call
        reads the rows once (cached; free after a verified :meth:`load`, whose checksum
        of data.npy is that read).
        """
        if self._fingerprint is None:
            if self._rows_sha256 is None:
                self._rows_sha256 = fmt.npy_sha256(self._raw)
            labels = None
            if self.labels is not None:
                labels = hashlib.sha256(np.ascontiguousarray(self.labels, dtype=np.int64).tobytes()).hexdigest()
            content = {"rows_npy_sha256": self._rows_sha256, "dtype": self.dtype, "M": self.M, "d": self.d,
                       "image_shape": list(self.image_shape), "scale": self._scale, "offset": self._offset,
                       "labels_sha256": labels, "num_classes": self.num_classes}
            self._fingerprint = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
        return self._fingerprint

    # ----------------------------------------------------------------- saving

    def save(self, dir) -> Path:
        """Write the dataset to ``dir`` (created if needed) atomically; returns the directory.

        See ``optden.data.format.write_dataset``: an interrupted save leaves a directory
        that :meth:`load` refuses; other files in ``dir`` (e.g. an index) are left alone.
        Computes the norms if not cached yet.
        """
        dir = Path(dir)
        self._rows_sha256 = fmt.write_dataset(dir, self._raw, self.dtype, self.image_shape, self._scale,
                                              self._offset, self.labels, self.num_classes, self._get_stats())
        if self.path is None:
            self.path = dir
        data = dir / "data.npy"
        if self._mmap_file is not None and self._mmap_file.resolve() == data.resolve():
            # saved over the file it maps (a re-save): map the new one, the same rows
            self._raw = fmt.open_npy(data).view(STORAGE_DTYPES[self.dtype].numpy).reshape(self.M, self.d)
            self._mapped = fmt.MappedRows(data)
        return dir


# ---------------------------------------------------------------------------- module helpers


def _unit_mapped(ds: Dataset, given: bool) -> Dataset:
    """``Dataset.open``'s map: float rows in [0, 1] to model space [-1, 1], unless a map was given."""
    bounds = None if given else value_bounds(ds.raw, ds.dtype)
    if bounds is None or not (0.0 <= bounds[0] and bounds[1] <= 1.0):
        return ds
    return Dataset(ds.raw, ds.dtype, ds.image_shape, 2.0, -1.0, ds.labels, ds.num_classes, path=ds.path,
                   source=f"{ds._source}; float values in [0, 1] mapped to model space [-1, 1]",
                   _mmap_file=ds._mmap_file)


def _convert_float_rows(rows: np.ndarray, src: str, target: str, name: str) -> np.ndarray:
    """Convert float rows (M, d) of any float dtype to a new in-memory array in ``target`` storage, in blocks."""
    if target not in FLOAT_DTYPE_NAMES:
        raise DtypeError(f"dtype: cannot convert {src} data to {target}")
    M, d = rows.shape
    out = np.empty((M, d), dtype=STORAGE_DTYPES[target].numpy)
    step = _block_rows(d)
    for s in range(0, M, step):
        blk = np.asarray(rows[s:s + step])
        if src == "bfloat16":
            blk = bf16_bits_to_f32(blk)
        if target == "bfloat16":
            t = torch.from_numpy(np.ascontiguousarray(blk, dtype=blk.dtype.newbyteorder("=")))
            out[s:s + step] = t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        else:
            with np.errstate(over="ignore", invalid="ignore"):
                out[s:s + step] = blk.astype(out.dtype)
    return out


def patches_dataset(size: int = 8, stride: int = 4, max_rows: int | None = None, seed: int = 0,
                    unique: bool = True) -> Dataset:
    """RGB patches cut from the sample photographs bundled with scikit-image and scikit-learn.

    ``size`` x ``size`` patches on a regular grid with step ``stride`` over each image of
    ``optden.data.demo.PATCH_SOURCES`` (label = source index, num_classes = their number).
    ``unique`` drops exact duplicate patches (flat borders), keeping the first.
    ``max_rows`` keeps a random subset (``seed``), in grid order. Returns a uint8 Dataset
    (M, 3*size*size), image_shape (3, size, size). At size 8 this gives about 284,000
    unique patches at stride 4 and 1.13 million at stride 2. Nothing is downloaded.
    """
    x, y = demo.patch_arrays(size, stride, max_rows, seed, unique)
    return Dataset(x, "uint8", (3, size, size), labels=y, num_classes=len(demo.PATCH_SOURCES),
                   source=f"patches(size={size}, stride={stride}, unique={unique})")
