"""Training data: the Dataset and where its rows come from.

* ``dataset``: :class:`Dataset` (raw rows, the affine map to model space, float64 row
  statistics, loaders, the content fingerprint), :func:`patches_dataset`.
* ``large_patches``: :func:`large_patches_dataset` (millions of stride-1 patches, built once into a cache).
* ``storage``: the storage-dtype table (uint8 / float16 / bfloat16 / float32).
* ``format``: the dataset directory on disk (data.npy, norms, labels, meta.json with checksums).
* ``images``: folders and zips of PNG/JPEG, decoding, EDM's dataset.json labels.
* ``sources``: CIFAR-10/100 pickles, Hugging Face folders / parquet, torch datasets, image
  layouts (NCHW / NHWC), what a path is (``Dataset.open`` reads them all).
* ``demo``: bundled real arrays (scikit-learn digits, scikit-image / scikit-learn photo patches).
* ``ingest``: resumable ``optden dataset build`` of large image sets.
"""
from __future__ import annotations

from .dataset import BLOCK_BYTES, Dataset, patches_dataset
from .demo import PATCH_SOURCES
from .format import FORMAT_VERSION
from .ingest import BuildReport, build_dataset, list_images
from .large_patches import large_patches_dataset
from .sources import ModelSpaceWarning
from .storage import DTYPE_NAMES, STORAGE_DTYPES

__all__ = ["Dataset", "patches_dataset", "large_patches_dataset", "PATCH_SOURCES", "FORMAT_VERSION", "BLOCK_BYTES",
           "DTYPE_NAMES", "STORAGE_DTYPES", "build_dataset", "BuildReport", "list_images", "ModelSpaceWarning"]
