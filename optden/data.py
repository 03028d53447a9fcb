"""Training sets: raw storage (uint8 / fp16 / bf16 / fp32 rows), the affine map to model
space, float64 row statistics, loaders, and an atomic on-disk format.

A :class:`Dataset` holds ``M`` rows of dimension ``d``. Rows are stored "raw" in a numpy
array or a read-only ``np.memmap`` of shape ``(M, d)``; the model sees
``model = raw * scale + offset`` (uint8 images default to ``[-1, 1]``). Large sets stay on
disk: every pass over the data is made in blocks of about 64 MB.

On-disk layout written by :meth:`Dataset.save` (``meta.json`` is written last and acts as
the commit marker, so a crash mid-save never leaves a directory that loads)::

    dir/data.npy     (M, d) raw rows (bfloat16 stored as its uint16 bit pattern)
    dir/labels.npy   (M,) int64 class labels, only when the set has labels
    dir/norms.npz    center (d,), centered_sqnorms (M,), sqnorms (M,), all float64
    dir/meta.json    format version, shapes, dtype, affine map, sha256 of each file
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import numbers
import os
import uuid
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from .fileio import fsync_dir, sha256_file, write_synced
from .errors import ChecksumError, DatasetError, DatasetNotFoundError, DtypeError, InputError
from .validate import as_tensor, check_positive_int

__all__ = ["Dataset", "patches_dataset", "PATCH_SOURCES", "FORMAT_VERSION", "BLOCK_BYTES"]

FORMAT_VERSION = 1
"""Version of the directory format written by :meth:`Dataset.save`."""

BLOCK_BYTES = 64 << 20
"""Working-set size of one block in the streaming passes (float64 bytes per block)."""

_DTYPE_NAMES = ("uint8", "float16", "bfloat16", "float32")
_NUMPY_STORAGE = {"uint8": np.dtype(np.uint8), "float16": np.dtype(np.float16),
                  "bfloat16": np.dtype(np.uint16), "float32": np.dtype(np.float32)}
_TORCH_DTYPE = {"uint8": torch.uint8, "float16": torch.float16,
                "bfloat16": torch.bfloat16, "float32": torch.float32}
_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")

# Natural RGB photographs bundled inside the installed scikit-image / scikit-learn
# packages (no download). A patch's label is the index of its source in this tuple.
PATCH_SOURCES = (
    ("astronaut", "skimage", "astronaut.png"),
    ("chelsea", "skimage", "chelsea.png"),
    ("coffee", "skimage", "coffee.png"),
    ("hubble_deep_field", "skimage", "hubble_deep_field.jpg"),
    ("immunohistochemistry", "skimage", "ihc.png"),
    ("motorcycle_left", "skimage", "motorcycle_left.png"),
    ("retina", "skimage", "retina.jpg"),
    ("rocket", "skimage", "rocket.jpg"),
    ("china", "sklearn", "china.jpg"),
    ("flower", "sklearn", "flower.jpg"),
)


# ---------------------------------------------------------------------------- helpers


def _bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16, any shape) -> float32 values, same shape."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _block_rows(d: int, bytes_per_value: int = 8) -> int:
    """Rows per block so that one block of float64 working data is about BLOCK_BYTES."""
    return max(1, BLOCK_BYTES // max(1, d * bytes_per_value))


def _to_float64(block: np.ndarray, dtype: str) -> np.ndarray:
    """A raw block (k, d) in storage dtype -> float64 (k, d) raw values."""
    if dtype == "bfloat16":
        return _bf16_bits_to_f32(block).astype(np.float64)
    return block.astype(np.float64)


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


def _check_real(value, name: str, nonzero: bool = False) -> float:
    """A finite real number (bool refused); nonzero if asked."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise DtypeError(f"{name}: expected a real number, got {value!r}")
    v = float(value)
    if not np.isfinite(v):
        raise InputError(f"{name}: must be finite, got {v}")
    if nonzero and v == 0.0:
        raise InputError(f"{name}: must be nonzero")
    return v


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


def _raw_to_torch(arr: np.ndarray, dtype: str) -> torch.Tensor:
    """A raw numpy block (uint16 bits for bf16) -> torch tensor in the storage dtype, sharing memory."""
    if dtype == "bfloat16":
        arr = arr.view(np.int16)
    with warnings.catch_warnings():
        # Blocks of a read-only memmap are shared, not copied; callers must not write into them.
        warnings.filterwarnings("ignore", message=".*not writable.*")
        t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


class _HashingWriter(io.RawIOBase):
    """A write-only file wrapper that hashes every byte written (so save() needs no re-read)."""

    def __init__(self, f):
        self._f = f
        self.sha = hashlib.sha256()

    def writable(self):
        return True

    def write(self, b):
        self.sha.update(b)
        return self._f.write(b)


def _read_npy_header(path: Path):
    """(shape, fortran_order, dtype, data_offset) of a .npy file; DatasetError if malformed or truncated."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                shape, fortran, dtype = np.lib.format._read_array_header(f, version)
            offset = f.tell()
    except FileNotFoundError:
        raise DatasetNotFoundError(f"{path}: no such file") from None
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as e:
        raise DatasetError(f"{path}: not a valid .npy file ({e})") from None
    if dtype.hasobject:
        raise DatasetError(f"{path}: holds Python objects; only numeric arrays are supported")
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    size = os.path.getsize(path)
    if size < expected:
        raise DatasetError(
            f"{path}: truncated: the header describes shape {shape} {dtype} ({expected} bytes) "
            f"but the file has {size} bytes"
        )
    if size > expected:
        raise DatasetError(f"{path}: {size - expected} unexpected bytes after the array data")
    return tuple(shape), fortran, dtype, offset


def _open_npy(path: Path) -> np.ndarray:
    """Memory-map a checked .npy file read-only."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DatasetError(f"{path}: cannot be memory-mapped ({e})") from None


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
    for n, sdt in (("uint8", np.uint8), ("float16", np.float16), ("float32", np.float32)):
        if dt == np.dtype(sdt):
            return n
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
        if dtype not in _DTYPE_NAMES:
            raise DtypeError(f"dtype: expected one of {_DTYPE_NAMES}, got {dtype!r}")
        if not isinstance(raw, np.ndarray) or raw.ndim != 2:
            raise InputError(f"raw: expected a 2-D numpy array (M, d), got {type(raw).__name__} "
                             f"{getattr(raw, 'shape', '')}")
        if raw.dtype != _NUMPY_STORAGE[dtype]:
            raise DtypeError(f"raw: dtype {dtype!r} is stored as {_NUMPY_STORAGE[dtype]}, got {raw.dtype}")
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
        self._scale = _check_real(scale, "scale", nonzero=True)
        self._offset = _check_real(offset, "offset")
        self.labels, self.num_classes = _check_labels(labels, M, num_classes)
        self.path = Path(path) if path is not None else None
        self._source = source
        self._mmap_file = Path(_mmap_file) if _mmap_file is not None else None
        self._stats = None  # (center, centered_sqnorms, sqnorms), computed lazily
        self._label_rows: dict[int, np.ndarray] = {}

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
        return _TORCH_DTYPE[self.dtype]

    @property
    def is_memmap(self) -> bool:
        """True when the rows are memory-mapped from a file rather than held in memory."""
        return isinstance(self._raw, np.memmap)

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
            arr = _open_npy(self._mmap_file)
            if self.dtype == "bfloat16":
                arr = arr.view(np.uint16)
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
                x = _to_float64(np.asarray(raw[s:s + step]), self.dtype)
                colsum += x.sum(axis=0)
                x *= self._scale
                x += self._offset
                sqnorms[s:s + step] = np.einsum("ij,ij->i", x, x)
            center = colsum / M
            for s in range(0, M, step):
                x = _to_float64(np.asarray(raw[s:s + step]), self.dtype)
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
        return _raw_to_torch(self._raw[start:stop], self.dtype)

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
        return _raw_to_torch(np.ascontiguousarray(self._raw[idx]), self.dtype)

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
                   num_classes=None, dtype: str | None = None, channels_last: bool = False) -> "Dataset":
        """A dataset from a numpy array or torch tensor.

        ``x``: rows (M, d), grayscale images (M, H, W) or images (M, C, H, W)
        (``channels_last=True`` for (M, H, W, C), which is transposed, copying).
        Dtypes: uint8, float16, bfloat16 (torch, or numpy uint16 bits with
        ``dtype="bfloat16"``), float32. float64 is converted to float32 (a copy); other
        integer types, bool, complex and object arrays are refused (DtypeError).
        ``dtype`` converts float input to "float16", "bfloat16" or "float32" storage.
        C-contiguous input in the storage dtype is kept without a copy: do not modify it.
        ``labels``: integer (M,) or None. ``scale``/``offset`` default to 2/255 and -1
        for uint8 (model space [-1, 1]) and to 1 and 0 for float data.
        """
        if dtype is not None and dtype not in _DTYPE_NAMES:
            raise DtypeError(f"dtype: expected one of {_DTYPE_NAMES} or None, got {dtype!r}")
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
        ish = _infer_image_shape(arr.shape, None if channels_last else image_shape, "x")
        if channels_last and arr.ndim == 4:
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
        return cls(raw, target, ish, scale, offset, labels, num_classes, source="array")

    @classmethod
    def from_npy(cls, path, labels=None, scale=None, offset=None, image_shape=None, *,
                 num_classes=None, dtype: str | None = None, key: str | None = None,
                 check_finite: bool = True) -> "Dataset":
        """A dataset from a ``.npy`` file (memory-mapped read-only, never read whole) or ``.npz``.

        The file holds (M, d), (M, H, W) or (M, C, H, W) rows of uint8, float16, float32
        or (with ``dtype="bfloat16"``) uint16 bfloat16 bit patterns. float64 (and
        non-native byte order) is converted block by block into an in-memory float32
        array. ``.npz`` archives are loaded (they cannot be mapped): the array ``key``, or
        the only array, or the first of "x", "data", "images", "arr_0"; labels default to
        the archive's "labels" or "y" array. ``labels`` may also be the path of a
        ``.npy`` file. ``check_finite`` streams the file once to refuse NaN/inf.
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
        if dtype is not None and dtype not in _DTYPE_NAMES:
            raise DtypeError(f"dtype: expected one of {_DTYPE_NAMES} or None, got {dtype!r}")
        if path.suffix.lower() == ".npz" or zipfile.is_zipfile(path):
            return cls._from_npz(path, labels, scale, offset, image_shape, num_classes, dtype, key)
        shape, fortran, ndt, _ = _read_npy_header(path)
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
        mm = _open_npy(path)
        target = dtype or name or "float32"
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
        return cls(raw, target, ish, scale, offset, labels, num_classes, source=str(path), _mmap_file=mmap_file)

    @classmethod
    def _from_npz(cls, path, labels, scale, offset, image_shape, num_classes, dtype, key):
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
        ds = cls.from_array(x, labels, scale, offset, image_shape, num_classes=num_classes, dtype=dtype)
        ds._source = str(path)
        return ds

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
        resolution = _check_resolution(resolution)
        zf = None
        if path.is_dir():
            names = sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                           if p.is_file() and p.suffix.lower() in _IMAGE_EXTENSIONS)
            meta_file = path / "dataset.json"
            meta_text = meta_file.read_bytes() if meta_file.is_file() else None

            def read(name):
                return (path / name).read_bytes()
        else:
            try:
                zf = zipfile.ZipFile(path)
            except (zipfile.BadZipFile, OSError) as e:
                raise DatasetError(f"path: {path} is neither a folder nor a readable zip file ({e})") from None
            all_names = set(zf.namelist())
            names = sorted(n for n in all_names if not n.endswith("/") and not n.startswith("__MACOSX/")
                           and os.path.splitext(n)[1].lower() in _IMAGE_EXTENSIONS)
            meta_text = zf.read("dataset.json") if "dataset.json" in all_names else None

            def read(name):
                return zf.read(name)
        try:
            if not names:
                raise DatasetError(f"path: {path} holds no PNG/JPEG images")
            if isinstance(labels, str) and labels == "auto":
                labels = _labels_from_dataset_json(meta_text, names, path) if meta_text is not None else None
            raw, ish = _decode_all(names, read, resolution, path, workers)
        finally:
            if zf is not None:
                zf.close()
        return cls(raw, "uint8", ish, scale, offset, labels, num_classes, source=str(path))

    @classmethod
    def load(cls, dir, verify: bool = True) -> "Dataset":
        """Load a directory written by :meth:`save`; ``data.npy`` is memory-mapped.

        Raises DatasetNotFoundError if the directory or a file is missing, DatasetError if
        ``data.npy`` is truncated or disagrees with ``meta.json``, ChecksumError (when
        ``verify``) if a file's sha256 differs from the one recorded. ``verify=False``
        skips the checksums (a full read) but still checks sizes, shapes and dtypes.
        """
        dir = Path(dir)
        if not dir.is_dir():
            raise DatasetNotFoundError(f"dir: {dir} is not a directory")
        meta_path = dir / "meta.json"
        if not meta_path.is_file():
            raise DatasetNotFoundError(f"dir: {dir} has no meta.json (not a saved dataset, or the save did not finish)")
        try:
            meta = json.loads(meta_path.read_text())
            version = int(meta["version"])
            M, d = int(meta["M"]), int(meta["d"])
            image_shape = tuple(int(s) for s in meta["image_shape"])
            dtype = meta["dtype"]
            scale, offset = float(meta["scale"]), float(meta["offset"])
            num_classes = meta["num_classes"]
            checksums = dict(meta["sha256"])
        except (ValueError, KeyError, TypeError) as e:
            raise DatasetError(f"{meta_path}: malformed ({type(e).__name__}: {e})") from None
        if meta.get("format") != "optden.dataset" or version > FORMAT_VERSION:
            raise DatasetError(f"{meta_path}: format {meta.get('format')!r} version {version} is not supported "
                               f"(this optden reads optden.dataset up to version {FORMAT_VERSION})")
        if dtype not in _DTYPE_NAMES:
            raise DatasetError(f"{meta_path}: unknown dtype {dtype!r}")
        files = {"data.npy": dir / "data.npy", "norms.npz": dir / "norms.npz"}
        if num_classes is not None:
            files["labels.npy"] = dir / "labels.npy"
        for name, p in files.items():
            if not p.is_file():
                raise DatasetNotFoundError(f"dir: {dir} is missing {name}")
        shape, fortran, ndt, _ = _read_npy_header(files["data.npy"])
        if shape != (M, d) or fortran or ndt != _NUMPY_STORAGE[dtype]:
            raise DatasetError(
                f"{files['data.npy']}: holds {shape} {ndt}{' (Fortran order)' if fortran else ''} but meta.json "
                f"says ({M}, {d}) {dtype} (stored as {_NUMPY_STORAGE[dtype]})"
            )
        if verify:
            for name, p in files.items():
                want = checksums.get(name)
                if want is None:
                    raise DatasetError(f"{meta_path}: no checksum recorded for {name}")
                got = sha256_file(p)
                if got != want:
                    raise ChecksumError(f"{p}: sha256 {got} differs from {want} recorded in meta.json; the file is corrupt")
        labels = None
        if num_classes is not None:
            _read_npy_header(files["labels.npy"])
            labels = np.load(files["labels.npy"], allow_pickle=False)
            if labels.shape != (M,):
                raise DatasetError(f"{files['labels.npy']}: shape {labels.shape}, expected ({M},)")
        try:
            with np.load(files["norms.npz"], allow_pickle=False) as z:
                stats = (z["center"], z["centered_sqnorms"], z["sqnorms"])
        except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as e:
            raise DatasetError(f"{files['norms.npz']}: unreadable ({e})") from None
        if (stats[0].shape != (d,) or stats[1].shape != (M,) or stats[2].shape != (M,)
                or any(s.dtype != np.float64 for s in stats)):
            raise DatasetError(f"{files['norms.npz']}: arrays do not match ({M}, {d})")
        raw = _open_npy(files["data.npy"])
        try:
            ds = cls(raw, dtype, image_shape, scale, offset, labels, num_classes, path=dir,
                     source=str(dir), _mmap_file=files["data.npy"])
        except (InputError, DtypeError) as e:
            raise DatasetError(f"{dir}: inconsistent dataset files ({e})") from None
        for s in stats:
            s.setflags(write=False)
        ds._stats = stats
        return ds

    @classmethod
    def demo(cls, name: str, max_rows: int | None = None) -> "Dataset":
        """A bundled real dataset (nothing is downloaded).

        "digits": scikit-learn's 1797 handwritten digits, uint8 (1797, 64),
        image_shape (1, 8, 8), pixel = round(v * 255 / 16), labels 0..9.
        "patches": :func:`patches_dataset` with its defaults (8x8 RGB patches, stride 4).
        ``max_rows`` keeps the first rows (digits) or a random subset (patches).
        """
        if max_rows is not None:
            if isinstance(max_rows, bool) or not isinstance(max_rows, numbers.Integral) or max_rows < 1:
                raise InputError(f"max_rows: expected a positive integer or None, got {max_rows!r}")
        if name == "digits":
            from sklearn.datasets import load_digits

            digits = load_digits()
            x = np.rint(digits.data * (255.0 / 16.0)).astype(np.uint8)
            y = digits.target.astype(np.int64)
            if max_rows is not None:
                x, y = x[:max_rows], y[:max_rows]
            ds = cls(np.ascontiguousarray(x), "uint8", (1, 8, 8), labels=y, num_classes=10, source="demo:digits")
            return ds
        if name == "patches":
            return patches_dataset(max_rows=max_rows)
        raise InputError(f"name: unknown demo dataset {name!r}; expected 'digits' or 'patches'")

    # ----------------------------------------------------------------- saving

    def save(self, dir) -> Path:
        """Write the dataset to ``dir`` (created if needed) atomically; returns the directory.

        Files are written under temporary names and moved into place with os.replace;
        an existing meta.json is removed first and the new one written last, so an
        interrupted save leaves a directory that :meth:`load` refuses. Other files in
        ``dir`` (e.g. an index) are left alone. Computes the norms if not cached yet.
        """
        dir = Path(dir)
        if dir.exists() and not dir.is_dir():
            raise DatasetError(f"dir: {dir} exists and is not a directory")
        dir.mkdir(parents=True, exist_ok=True)
        center, centered, sqnorms = self._get_stats()
        tag = f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp = {}
        checksums = {}
        try:
            tmp["data.npy"] = dir / ("data.npy" + tag)
            with open(tmp["data.npy"], "wb") as f:
                w = _HashingWriter(f)
                np.lib.format.write_array(w, self._raw, allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
            checksums["data.npy"] = w.sha.hexdigest()
            if self.labels is not None:
                tmp["labels.npy"] = dir / ("labels.npy" + tag)
                write_synced(tmp["labels.npy"], lambda f: np.save(f, np.asarray(self.labels, dtype=np.int64)))
                checksums["labels.npy"] = sha256_file(tmp["labels.npy"])
            tmp["norms.npz"] = dir / ("norms.npz" + tag)
            write_synced(tmp["norms.npz"], lambda f: np.savez(f, center=center, centered_sqnorms=centered,
                                                              sqnorms=sqnorms))
            checksums["norms.npz"] = sha256_file(tmp["norms.npz"])
            meta = {
                "format": "optden.dataset",
                "version": FORMAT_VERSION,
                "M": self.M,
                "d": self.d,
                "image_shape": list(self.image_shape),
                "dtype": self.dtype,
                "storage_dtype": _NUMPY_STORAGE[self.dtype].str,
                "scale": self._scale,
                "offset": self._offset,
                "num_classes": self.num_classes,
                "sha256": checksums,
            }
            tmp["meta.json"] = dir / ("meta.json" + tag)
            write_synced(tmp["meta.json"], lambda f: f.write(json.dumps(meta, indent=1).encode()))
            # Commit: invalidate the old set, move the payload in, then the marker.
            (dir / "meta.json").unlink(missing_ok=True)
            # pop only after a successful move, so an interrupted move still cleans up its temporary
            for name in ("data.npy", "labels.npy", "norms.npz"):
                if name in tmp:
                    os.replace(tmp[name], dir / name)
                    del tmp[name]
            if self.labels is None:
                (dir / "labels.npy").unlink(missing_ok=True)
            os.replace(tmp["meta.json"], dir / "meta.json")
            del tmp["meta.json"]
            fsync_dir(dir)
        finally:
            for p in tmp.values():
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass
        if self.path is None:
            self.path = dir
        return dir


# ---------------------------------------------------------------------------- module helpers


def _convert_float_rows(rows: np.ndarray, src: str, target: str, name: str) -> np.ndarray:
    """Convert float rows (M, d) of any float dtype to a new in-memory array in ``target`` storage, in blocks."""
    if target not in ("float16", "bfloat16", "float32"):
        raise DtypeError(f"dtype: cannot convert {src} data to {target}")
    M, d = rows.shape
    out = np.empty((M, d), dtype=_NUMPY_STORAGE[target])
    step = _block_rows(d)
    for s in range(0, M, step):
        blk = np.asarray(rows[s:s + step])
        if src == "bfloat16":
            blk = _bf16_bits_to_f32(blk)
        if target == "bfloat16":
            t = torch.from_numpy(np.ascontiguousarray(blk, dtype=blk.dtype.newbyteorder("=")))
            out[s:s + step] = t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        else:
            with np.errstate(over="ignore", invalid="ignore"):
                out[s:s + step] = blk.astype(out.dtype)
    return out


def _labels_from_dataset_json(text: bytes, names: list[str], path: Path):
    """EDM dataset.json -> int64 labels in the order of ``names``, or None if it has no labels."""
    try:
        meta = json.loads(text)
        entries = meta.get("labels") if isinstance(meta, dict) else None
    except ValueError as e:
        raise DatasetError(f"{path}: dataset.json is not valid JSON ({e})") from None
    if entries is None:
        return None
    try:
        table = {str(fname).replace("\\", "/"): lab for fname, lab in entries}
    except (TypeError, ValueError):
        raise DatasetError(f"{path}: dataset.json 'labels' must be a list of [filename, label] pairs") from None
    missing = [n for n in names if n not in table]
    if missing:
        raise DatasetError(f"{path}: dataset.json has no label for {len(missing)} image(s): {_list_some(missing)}")
    out = []
    for n in names:
        lab = table[n]
        if isinstance(lab, bool) or not isinstance(lab, numbers.Integral):
            raise DatasetError(f"{path}: dataset.json label of {n} is {lab!r}; expected an integer class")
        out.append(int(lab))
    return np.asarray(out, dtype=np.int64)


def _check_resolution(resolution):
    """None, an int, or (H, W) -> None or a (H, W) tuple of positive ints."""
    if resolution is None:
        return None
    if isinstance(resolution, numbers.Integral) and not isinstance(resolution, bool):
        hw = (int(resolution), int(resolution))
    else:
        try:
            hw = tuple(int(r) for r in resolution)
        except (TypeError, ValueError):
            hw = ()
        if len(hw) != 2:
            raise InputError(f"resolution: expected an int or (H, W), got {resolution!r}")
    if min(hw) < 1:
        raise InputError(f"resolution: expected positive sizes, got {resolution!r}")
    return hw


def _list_some(items, k: int = 20) -> str:
    shown = ", ".join(str(i) for i in items[:k])
    return shown + (f", ... ({len(items) - k} more)" if len(items) > k else "")


def _decode_image(data: bytes, resolution):
    """Encoded PNG/JPEG bytes -> uint8 (H, W, C) with C in {1, 3}; raises ValueError with a reason."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            mode = im.mode
            if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
                raise ValueError(f"{mode} (16-bit or float) images are not supported; convert to 8-bit")
            if mode in ("L", "LA", "1", "La"):
                im = im.convert("L")
            elif mode != "RGB":
                im = im.convert("RGB")
            if resolution is not None and im.size != (resolution[1], resolution[0]):
                im = im.resize((resolution[1], resolution[0]), Image.Resampling.LANCZOS)
            a = np.asarray(im, dtype=np.uint8)
    except UnidentifiedImageError:
        raise ValueError("not a readable image") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"unreadable ({e})") from None
    return a[:, :, None] if a.ndim == 2 else a


def _decode_all(names, read, resolution, path, workers):
    """Decode every file into one uint8 (M, C*H*W) array; one DatasetError lists all bad files."""
    workers = workers or min(8, os.cpu_count() or 1)
    raw = None
    ish = None
    bad = []

    def job(item):
        name, data = item
        if isinstance(data, str):
            return data
        try:
            return _decode_image(data, resolution)
        except ValueError as e:
            return str(e)

    def fetch(name):
        try:
            return name, read(name)
        except (OSError, zipfile.BadZipFile, RuntimeError) as e:
            return name, f"unreadable ({e})"

    chunk = 256  # files read (serially) and decoded (in threads) per round: bounds memory
    first = None
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as ex:
        for c0 in range(0, len(names), chunk):
            items = [fetch(n) for n in names[c0:c0 + chunk]]
            for i, ((name, _), res) in enumerate(zip(items, ex.map(job, items)), start=c0):
                if isinstance(res, str):
                    bad.append(f"{name}: {res}")
                    continue
                h, w, c = res.shape
                if raw is None:
                    ish = (c, h, w)
                    raw = np.empty((len(names), c * h * w), dtype=np.uint8)
                    first = name
                if (c, h, w) != ish:
                    bad.append(f"{name}: size {w}x{h} with {c} channel(s), expected "
                               f"{ish[2]}x{ish[1]} with {ish[0]} channel(s) like {first}")
                    continue
                raw[i] = res.transpose(2, 0, 1).reshape(-1)
    if bad:
        hint = "" if resolution is not None else " (pass resolution= to resize)"
        raise DatasetError(f"{path}: {len(bad)} image(s) cannot be used{hint}: {_list_some(bad)}")
    return raw, ish


def _load_patch_sources():
    """[(label, uint8 (H, W, 3))] for every bundled source image that is present."""
    import skimage.data
    import sklearn.datasets
    from PIL import Image

    roots = {"skimage": Path(skimage.data.data_dir),
             "sklearn": Path(sklearn.datasets.__file__).parent / "images"}
    out = []
    for label, (_, pkg, fname) in enumerate(PATCH_SOURCES):
        p = roots[pkg] / fname
        if p.is_file():
            with Image.open(p) as im:
                out.append((label, np.asarray(im.convert("RGB"), dtype=np.uint8)))
    if not out:
        raise DatasetNotFoundError("patches: none of the bundled scikit-image / scikit-learn sample images was found")
    return out


def patches_dataset(size: int = 8, stride: int = 4, max_rows: int | None = None, seed: int = 0,
                    unique: bool = True) -> Dataset:
    """RGB patches cut from the sample photographs bundled with scikit-image and scikit-learn.

    ``size`` x ``size`` patches on a regular grid with step ``stride`` over each image of
    :data:`PATCH_SOURCES` (label = source index, num_classes = len(PATCH_SOURCES)).
    ``unique`` drops exact duplicate patches (flat borders), keeping the first.
    ``max_rows`` keeps a random subset (``seed``), in grid order. Returns a uint8 Dataset
    (M, 3*size*size), image_shape (3, size, size). At size 8 this gives about 284,000
    unique patches at stride 4 and 1.13 million at stride 2. Nothing is downloaded.
    """
    size = check_positive_int(size, "size", 1, 256)
    stride = check_positive_int(stride, "stride", 1)
    if max_rows is not None:
        max_rows = check_positive_int(max_rows, "max_rows")
    parts, labs = [], []
    for label, im in _load_patch_sources():
        if im.shape[0] < size or im.shape[1] < size:
            continue
        win = np.lib.stride_tricks.sliding_window_view(im, (size, size), axis=(0, 1))[::stride, ::stride]
        parts.append(win.reshape(-1, 3 * size * size))  # (nh*nw, 3*size*size), channel-major per patch
        labs.append(np.full(parts[-1].shape[0], label, dtype=np.int64))
    if not parts:
        raise DatasetError(f"size: {size} is larger than every source image")
    x = np.concatenate(parts)
    y = np.concatenate(labs)
    if unique:
        keys = x.view(np.dtype((np.void, x.shape[1]))).ravel()
        _, first = np.unique(keys, return_index=True)
        keep = np.sort(first)
        x, y = x[keep], y[keep]
    if max_rows is not None and max_rows < x.shape[0]:
        keep = np.sort(np.random.default_rng(seed).choice(x.shape[0], size=max_rows, replace=False))
        x, y = x[keep], y[keep]
    return Dataset(np.ascontiguousarray(x), "uint8", (3, size, size), labels=y, num_classes=len(PATCH_SOURCES),
                   source=f"patches(size={size}, stride={stride}, unique={unique})")
