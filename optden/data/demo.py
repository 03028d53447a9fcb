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
