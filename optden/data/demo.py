"""Bundled real data: arrays made from what scikit-learn and scikit-image ship (nothing is
downloaded). ``Dataset.demo`` and ``patches_dataset`` wrap them into Datasets.

* digits: scikit-learn's 1797 handwritten 8x8 digits, pixel = round(v * 255 / 16), labels 0..9.
* patches: size x size RGB patches on a regular grid over the sample photographs of
  :data:`PATCH_SOURCES` (label = the source's index).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DatasetError, DatasetNotFoundError
from ..fileio import atomic_write_npy
from ..validate import check_positive_int

__all__ = ["PATCH_SOURCES", "digits_arrays", "patch_arrays", "source_pictures"]

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


def digits_arrays(max_rows: int | None = None):
    """scikit-learn's digits: ``(x uint8 (M, 64), labels int64 (M,))``, the first ``max_rows``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = np.rint(digits.data * (255.0 / 16.0)).astype(np.uint8)
    y = digits.target.astype(np.int64)
    if max_rows is not None:
        x, y = x[:max_rows], y[:max_rows]
    return np.ascontiguousarray(x), y


def source_pictures():
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


def patch_arrays(size: int = 8, stride: int = 4, max_rows: int | None = None, seed: int = 0,
                 unique: bool = True):
    """``size`` x ``size`` RGB patches at step ``stride``: ``(x uint8 (M, 3*size*size), labels (M,))``.

    Rows are channel-major per patch. ``unique`` drops exact duplicate patches (flat
    borders), keeping the first; ``max_rows`` keeps a random subset (``seed``), in grid order.
    """
    size = check_positive_int(size, "size", 1, 256)
    stride = check_positive_int(stride, "stride", 1)
    if max_rows is not None:
        max_rows = check_positive_int(max_rows, "max_rows")
    parts, labs = [], []
    for label, im in source_pictures():
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
    return np.ascontiguousarray(x), y


# ----------------------------------------------------------------------------- million-row patch sets

#: Environment variable naming the directory where built patch sets are cached (default:
#: ``$XDG_CACHE_HOME/optden``, else ``~/.cache/optden``).
CACHE_ENV = "OPTDEN_CACHE"

# Patch rows are produced in bands of this many grid rows of one picture at a time, so
# that building a set of several GB holds one band of patches, not the whole set.
_BAND_ROWS = 32


def cache_root(cache=None) -> Path:
    """The directory built data sets are cached in: ``cache`` if given, else the
    environment's ``OPTDEN_CACHE``, else ``$XDG_CACHE_HOME/optden`` or ``~/.cache/optden``."""
    import os

    if cache is not None:
        return Path(cache).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "optden"


def source_digests() -> dict:
    """sha256 of each bundled source picture file that is present: what a built set is made of."""
    import hashlib

    import skimage.data
    import sklearn.datasets

    roots = {"skimage": Path(skimage.data.data_dir),
             "sklearn": Path(sklearn.datasets.__file__).parent / "images"}
    out = {}
    for name, pkg, fname in PATCH_SOURCES:
        p = roots[pkg] / fname
        if p.is_file():
            out[name] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _bands(size: int, stride: int, min_std):
    """Yield ``(label, rows uint8 (n, 3 size^2), keep bool (n,))`` over every picture in bands
    of grid rows, in grid order; keep = the patch's standard deviation (over all its values,
    0..255 units) is at least min_std (all True when min_std is None)."""
    for label, im in source_pictures():
        if im.shape[0] < size or im.shape[1] < size:
            continue
        win = np.lib.stride_tricks.sliding_window_view(im, (size, size), axis=(0, 1))[::stride, ::stride]
        for a in range(0, win.shape[0], _BAND_ROWS):
            rows = np.ascontiguousarray(win[a:a + _BAND_ROWS]).reshape(-1, 3 * size * size)
            if min_std is None:
                keep = np.ones(rows.shape[0], dtype=bool)
            else:
                keep = rows.astype(np.float32).std(axis=1) >= np.float32(min_std)
            yield label, rows, keep


def _row_keys(rows: np.ndarray) -> np.ndarray:
    """A 128-bit content key per uint8 row (n, w) as a (n,) 16-byte void array: two
    multiply-xorshift hashes of the row's 64-bit words (random odd multipliers, fixed seed).
    Equal rows have equal keys; rows with equal keys are compared byte for byte before one
    is dropped (``patch_rows``), so a collision could only keep a duplicate, never drop a row."""
    n, w = rows.shape
    pad = (-w) % 8
    if pad:
        rows = np.concatenate([rows, np.zeros((n, pad), dtype=np.uint8)], axis=1)
    words = np.ascontiguousarray(rows).view(np.uint64)  # (n, ceil(w / 8))
    mult = np.random.default_rng(0x0D7DE7).integers(1, 2**63, size=(2, words.shape[1]), dtype=np.uint64) * 2 + 1
    keys = np.empty((n, 2), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(2):
            h = (words * mult[j]).sum(axis=1, dtype=np.uint64)
            h ^= h >> np.uint64(31)
            h *= np.uint64(0x9E3779B97F4A7C15)
            h ^= h >> np.uint64(29)
            keys[:, j] = h
    return keys.view(np.dtype((np.void, 16))).ravel()


def patch_rows(out_npy, size: int = 8, stride: int = 1, min_std: float | None = 20.0):
    """Write every distinct ``size`` x ``size`` RGB patch at step ``stride`` of the bundled
    pictures whose standard deviation is >= ``min_std`` (None: every patch) to the ``.npy``
    file ``out_npy``, written atomically through a file (``fileio.atomic_write_npy``: a full
    disk is an error, never SIGBUS): ``(M, 3 size^2)`` uint8, channel-major per patch, in
    source and grid order (the first of equal patches kept). Deterministic: the same
    pictures give the same bytes. Returns the labels ``(M,)`` int64 (the source's index).

    Two passes over the pictures: content keys of the patches kept by ``min_std`` first,
    then the rows of the first occurrence of each key. Memory: one band of patches, 16
    bytes per patch for the keys, and one row per kept patch that has duplicates.
    """
    size = check_positive_int(size, "size", 1, 256)
    stride = check_positive_int(stride, "stride", 1)
    keys, labels = [], []
    for label, rows, keep in _bands(size, stride, min_std):
        keys.append(_row_keys(rows[keep]))
        labels.append(np.full(int(keep.sum()), label, dtype=np.int64))
    if not keys:
        raise DatasetError(f"size: {size} is larger than every source image")
    keys = np.concatenate(keys)
    labels = np.concatenate(labels)
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    keep_pos = np.zeros(keys.shape[0], dtype=bool)
    keep_pos[first] = True
    dup = np.flatnonzero(~keep_pos)
    representative = first[inverse[dup]]  # position of the kept row with the same key
    M = int(keep_pos.sum())
    if M == 0:
        raise DatasetError(f"min_std: no patch has a standard deviation >= {min_std}")
    width = 3 * size * size
    # a dropped row must equal, byte for byte, the kept row with its key (its first
    # occurrence, so in this band or an earlier one), else the keys collided (probability
    # ~2^-128 per pair) and nothing is dropped silently: those kept rows are held for the check
    need = np.unique(representative)
    held = np.empty((need.size, width), dtype=np.uint8)

    def kept_rows():  # the second pass, band by band, written through a file (no memory map: no SIGBUS)
        pos = 0
        for _, rows, keep in _bands(size, stride, min_std):
            kept = rows[keep]
            n = kept.shape[0]
            a, b = np.searchsorted(need, [pos, pos + n])
            held[a:b] = kept[need[a:b] - pos]
            lo, hi = np.searchsorted(dup, [pos, pos + n])
            if hi > lo:
                same = (kept[dup[lo:hi] - pos] == held[np.searchsorted(need, representative[lo:hi])]).all(axis=1)
                if not same.all():
                    p = int(dup[lo:hi][~same][0])
                    raise DatasetError(f"patch_rows: content-key collision at patch {p}; report it")
            yield kept[keep_pos[pos:pos + n]]
            pos += n

    atomic_write_npy(out_npy, np.uint8, (M, width), kept_rows())
    return labels[keep_pos]
