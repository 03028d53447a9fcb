"""Millions of real rows for the pruning tests and benchmarks (issue 22): every distinct
stride-1 patch of the bundled pictures, built once into a cached dataset directory and
memory-mapped from there (the rows come from ``optden.data.demo.patch_rows``)."""
from __future__ import annotations

import json
import numbers
import os
import shutil

from ..errors import InputError
from ..validate import check_positive_int
from . import demo, format as fmt
from .dataset import Dataset

__all__ = ["large_patches_dataset"]


def large_patches_dataset(size: int = 8, stride: int = 1, min_std: float | None = 20.0, cache=None,
                          verify: bool = True) -> Dataset:
    """Millions of real rows: every distinct ``size`` x ``size`` RGB patch at step ``stride``
    of the bundled pictures with standard deviation >= ``min_std`` (0..255 units; None:
    all), built once into a dataset directory under ``optden.data.demo.cache_root(cache)``
    (``cache``, else ``$OPTDEN_CACHE``, else ``~/.cache/optden``) and memory-mapped from there.

    Deterministic (``demo.patch_rows``); ``recipe.json`` beside the data records the
    sources' sha256 and the parameters, and a directory whose recipe differs (other
    pictures, e.g. another scikit-image) is rebuilt. ``verify`` checks data.npy's sha256
    on load (one read of the rows; it is also the dataset's fingerprint). At size 8,
    stride 1: 4.52 million distinct patches, 2.95 million with min_std 20 (d = 192);
    at size 16, d = 768. Building takes a minute or two and writes M * d bytes.
    """
    size = check_positive_int(size, "size", 1, 256)
    stride = check_positive_int(stride, "stride", 1)
    if min_std is not None and not (isinstance(min_std, numbers.Real) and not isinstance(min_std, bool)
                                    and 0 <= min_std < 256):
        raise InputError(f"min_std: expected None or a number in [0, 256), got {min_std!r}")
    recipe = {"kind": "patches", "size": size, "stride": stride,
              "min_std": None if min_std is None else float(min_std), "unique": True,
              "sources": demo.source_digests()}
    tag = "all" if min_std is None else f"std{float(min_std):g}"
    dir = demo.cache_root(cache) / f"patches{size}-stride{stride}-{tag}"
    rpath = dir / "recipe.json"
    if rpath.is_file() and (dir / "meta.json").is_file():
        try:
            same = json.loads(rpath.read_text()) == recipe
        except ValueError:
            same = False
        if same:
            return Dataset.load(dir, verify=verify)
    dir.parent.mkdir(parents=True, exist_ok=True)
    build = dir.parent / f".{dir.name}.build-{os.getpid()}"
    build.mkdir(exist_ok=True)
    try:
        rows_file = build / "rows.npy"
        labels = demo.patch_rows(rows_file, size, stride, min_std)
        raw = fmt.open_npy(rows_file)
        ds = Dataset(raw, "uint8", (3, size, size), labels=labels, num_classes=len(demo.PATCH_SOURCES),
                     source=f"patches(size={size}, stride={stride}, min_std={min_std}, unique=True)")
        ds.save(build)
        del ds, raw
        rows_file.unlink()
        (build / "recipe.json").write_text(json.dumps(recipe, indent=1))
        if dir.exists():  # an older recipe: replace it (another process may have built the same)
            old = dir.parent / f".{dir.name}.old-{os.getpid()}"
            os.replace(dir, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(build, dir)
        except OSError:  # another process put a complete set there in the meantime
            if not (dir / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return Dataset.load(dir, verify=verify)
