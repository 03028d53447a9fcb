"""Where training rows come from, besides image folders and zips (``images.py``): the
CIFAR-10/100 python pickles, Hugging Face ``datasets`` folders and parquet files, any
indexable torch ``Dataset``, and which of these (or a ``.npy`` / ``.npz`` file, a saved
optden dataset directory) a path is.

Each reader returns :class:`Rows`: images as an (M, C, H, W) array in a storage dtype
(uint8 for 8-bit images, float32 otherwise), labels and class names; ``Dataset.open``
turns them into a ``Dataset``. Nothing is downloaded and nothing is written to disk.

* CIFAR (``read_cifar``): the layout of ``cifar-10-python.tar.gz`` /
  ``cifar-100-python.tar.gz`` (what torchvision downloads): the archive itself, its
  folder ``cifar-10-batches-py`` / ``cifar-100-python``, or the folder holding that one.
  Each batch file is a Python 2 pickle of a dict with ``data`` (N, 3072) uint8 (the 1024
  red values of a 32 x 32 image row by row, then green, then blue: NCHW already) and
  ``labels`` (CIFAR-10) or ``fine_labels`` / ``coarse_labels`` (CIFAR-100). The pickles
  are read by an unpickler that builds numpy arrays and nothing else.
* Hugging Face (``read_hf``, needs ``pip install optden[hf]``): a folder written by
  ``datasets.Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, a ``.parquet`` file,
  or a folder of parquet shards (``train-00000-of-00002.parquet``, ...), with an
  ``Image`` column and optionally a ``ClassLabel`` (or integer ``label``) column.
* torch (``read_torch``): ``len(ds)`` items ``ds[i]`` = ``(image, label)``, ``image``, or
  a dict with an image and a label; images as PIL images, (C, H, W) or (H, W, C) tensors
  or arrays (the layout is detected, see ``image_layout``), uint8 or float.
"""
from __future__ import annotations

import io
import numbers
import pickle
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DatasetError, DatasetNotFoundError, InputError
from .images import IMAGE_EXTENSIONS, decode_image, image_array, list_some
from .storage import bf16_bits_to_f32

__all__ = ["Rows", "SOURCE_KINDS", "kind_of", "image_layout", "read_cifar", "read_hf", "read_torch", "CIFAR",
           "ModelSpaceWarning", "value_bounds", "tell_unit_range"]

#: What ``kind_of`` can say a path is.
SOURCE_KINDS = ("dataset", "npy", "cifar", "hf", "images")

@dataclass
class Rows:
    """Rows read from a source. x: (M, C, H, W) (or (M, d)) uint8 or float32; labels: int64
    (M,) or None; num_classes; class_names (list of str) or None; source: a description."""

    x: np.ndarray
    labels: np.ndarray | None
    num_classes: int | None
    source: str
    class_names: list | None = None


# ----------------------------------------------------------------------------- layouts


def image_layout(shape, channels_last=None, name: str = "x") -> bool:
    """Whether a 4-D array (N, a, b, c) holds channels-last images (N, H, W, C).

    ``channels_last`` True / False is taken as given. Otherwise two clues vote: square
    images (``a != b == c``: NCHW, ``a == b != c``: NHWC) and a channel-sized axis (at most
    4 values, latents included) at one end only (``a <= 4 < c``: NCHW, ``c <= 4 < a``:
    NHWC); when both are silent, grayscale or RGB at one end only decides (``a`` in {1, 3}
    and ``c`` not: NCHW; the reverse: NHWC). A contradiction, or no clue, is an InputError
    asking for ``channels_last``, so NHWC data is never read as NCHW by accident.
    """
    if channels_last is not None:
        return bool(channels_last)
    if len(shape) != 4:
        return False
    _, a, b, c = (int(v) for v in shape)
    votes = set()
    if a != b == c:
        votes.add(False)
    if a == b != c:
        votes.add(True)
    if a <= 4 < c:
        votes.add(False)
    if c <= 4 < a:
        votes.add(True)
    if not votes and (a in (1, 3)) != (c in (1, 3)):
        votes.add(c in (1, 3))
    if len(votes) != 1:
        raise InputError(
            f"{name}: cannot tell whether images of shape {tuple(shape)} are (N, C, H, W) or (N, H, W, C); "
            "pass channels_last=True or False (CLI: --layout nhwc or nchw)"
        )
    return votes.pop()


def _as_chw(img: np.ndarray, what: str) -> np.ndarray:
    """One image array (H, W), (C, H, W) or (H, W, C) -> (C, H, W)."""
    if img.ndim == 2:
        return img[None]
    if img.ndim != 3:
        raise DatasetError(f"{what}: expected an image (H, W), (C, H, W) or (H, W, C), got shape {img.shape}")
    return img.transpose(2, 0, 1) if image_layout((1, *img.shape), name=what) else img


# ----------------------------------------------------------------------------- model space


class ModelSpaceWarning(UserWarning):
    """Float data in [0, 1] kept as model space [0, 1]; diffusion models mostly use [-1, 1]."""


def value_bounds(raw: np.ndarray, dtype: str):
    """(min, max) of float raw rows (M, d), in blocks; None for uint8 storage."""
    if dtype == "uint8":
        return None
    lo, hi = np.inf, -np.inf
    step = max(1, (64 << 20) // max(1, 8 * raw.shape[1]))
    for start in range(0, raw.shape[0], step):
        blk = np.asarray(raw[start:start + step])
        blk = bf16_bits_to_f32(blk) if dtype == "bfloat16" else blk
        lo, hi = min(lo, float(blk.min())), max(hi, float(blk.max()))
    return lo, hi


def tell_unit_range(raw: np.ndarray, dtype: str, scale, offset, name: str) -> None:
    """Say so (ModelSpaceWarning) when float rows in [0, 1] become model space [0, 1] by default."""
    if scale is not None or offset is not None:
        return
    bounds = value_bounds(raw, dtype)
    if bounds is not None and 0.0 <= bounds[0] and bounds[1] <= 1.0:
        warnings.warn(f"{name}: float values in [0, 1] are used as model space [0, 1] (scale=1, offset=0); "
                      "a model trained on [-1, 1] needs scale=2, offset=-1 (Dataset.open maps them so)",
                      ModelSpaceWarning, stacklevel=3)


# ----------------------------------------------------------------------------- what a path is


def kind_of(path) -> str:
    """One of ``SOURCE_KINDS`` for a file or folder, or a DatasetError saying what was found."""
    p = Path(path)
    if not p.exists():
        raise DatasetNotFoundError(f"data: {p} does not exist")
    if p.is_dir():
        names = {c.name for c in p.iterdir()}
        if "meta.json" in names or "data.npy" in names:
            return "dataset"
        if names & {"dataset_dict.json", "dataset_info.json", "state.json"}:
            return "hf"
        if _cifar_folder(p) is not None:
            return "cifar"
        if any(p.glob("*.parquet")) or any(p.glob("*/*.parquet")):
            return "hf"
        if any(f.suffix.lower() in IMAGE_EXTENSIONS for f in p.rglob("*") if f.is_file()):
            return "images"
        raise DatasetError(f"data: {p} is a folder with no data optden reads (a saved dataset, a CIFAR or "
                           "Hugging Face folder, parquet files, or PNG/JPEG images)")
    suffix = "".join(p.suffixes[-2:]).lower()
    if p.suffix.lower() in (".npy", ".npz"):
        return "npy"
    if p.suffix.lower() == ".parquet":
        return "hf"
    if suffix in (".tar.gz", ".tgz") or p.suffix.lower() == ".tar" or tarfile.is_tarfile(p):
        return "cifar"
    if p.suffix.lower() == ".zip":
        return "images"
    raise DatasetError(f"data: {p} is not a file optden reads (.npy, .npz, .parquet, a CIFAR .tar.gz, a zip of images)")


# ----------------------------------------------------------------------------- CIFAR


@dataclass(frozen=True)
class _CifarLayout:
    folder: str
    train: tuple
    test: tuple
    meta: str
    names: str
    classes: int


#: The two archives' layouts (fine labels for CIFAR-100, as torchvision reads them).
CIFAR = {
    "cifar10": _CifarLayout("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
                            "batches.meta", "label_names", 10),
    "cifar100": _CifarLayout("cifar-100-python", ("train",), ("test",), "meta", "fine_label_names", 100),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Builds dicts, lists, strings, numbers and numpy arrays; any other class is refused
    (a pickle can run code: a file that asks for more is not a CIFAR batch)."""

    _NUMPY = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
              ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
              ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self._NUMPY:
            raise pickle.UnpicklingError(f"refused to build {module}.{name}")
        if module == "numpy.core.multiarray":  # the Python 2 / numpy 1 name of numpy._core.multiarray
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module  # private: numpy 2 moved it
        return super().find_class(module, name)


def _unpickle(data: bytes, what: str) -> dict:
    try:
        # latin1: the Python 2 byte strings of the array data stay byte for byte (numpy's advice)
        obj = _ArrayUnpickler(io.BytesIO(data), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as e:
        raise DatasetError(f"{what}: not a CIFAR python batch ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{what}: not a CIFAR python batch (a pickled {type(obj).__name__}, not a dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_folder(p: Path):
    """(layout name, folder) when ``p`` is a CIFAR batches folder or holds one, else None."""
    for name, lay in CIFAR.items():
        for cand in (p, p / lay.folder):
            if (cand / lay.meta).is_file() and all((cand / f).is_file() for f in lay.test):
                return name, cand
    return None


def read_cifar(path, split: str = "train") -> Rows:
    """CIFAR-10 or CIFAR-100 from the python pickles (see the module docstring).

    split: "train" (50000 images), "test" (10000) or "all" (train then test).
    Returns uint8 (M, 3, 32, 32) rows with their labels (fine labels for CIFAR-100).
    """
    if split not in ("train", "test", "all"):
        raise InputError(f"split: expected 'train', 'test' or 'all' for CIFAR, got {split!r}")
    p = Path(path)
    if not p.exists():
        raise DatasetNotFoundError(f"data: {p} does not exist")
    if p.is_dir():
        found = _cifar_folder(p)
        if found is None:
            raise DatasetError(f"data: {p} holds no CIFAR batches (expected {' or '.join(v.folder for v in CIFAR.values())})")
        name, folder = found
        read = lambda f: (folder / f).read_bytes()  # noqa: E731
    else:
        try:
            tar = tarfile.open(p)
            members = {m.name.lstrip("./"): m for m in tar.getmembers() if m.isfile()}
        except (tarfile.TarError, OSError) as e:
            raise DatasetError(f"data: {p} is not a readable tar archive ({e})") from None
        name = next((n for n, lay in CIFAR.items() if f"{lay.folder}/{lay.meta}" in members), None)
        if name is None:
            raise DatasetError(f"data: {p} is a tar archive without CIFAR batches "
                               f"({' or '.join(v.folder + '/' for v in CIFAR.values())})")
        folder = CIFAR[name].folder

        def read(f, tar=tar, members=members, folder=folder):
            m = members.get(f"{folder}/{f}")
            if m is None:
                raise DatasetError(f"data: {p} has no {folder}/{f}")
            return tar.extractfile(m).read()

    lay = CIFAR[name]
    files = {"train": lay.train, "test": lay.test, "all": lay.train + lay.test}[split]
    label_key = "labels" if name == "cifar10" else "fine_labels"
    xs, ys = [], []
    for f in files:
        batch = _unpickle(read(f), f"{p}: {f}")
        if "data" not in batch or label_key not in batch:
            raise DatasetError(f"{p}: {f} has no '{label_key}' or 'data' (keys: {sorted(batch)})")
        data = np.asarray(batch["data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DatasetError(f"{p}: {f}: 'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
        xs.append(data)
        ys.append(np.asarray(batch[label_key], dtype=np.int64))
        if len(ys[-1]) != len(data):
            raise DatasetError(f"{p}: {f}: {len(data)} images but {len(ys[-1])} labels")
    meta = _unpickle(read(lay.meta), f"{p}: {lay.meta}")
    x = np.concatenate(xs).reshape(-1, 3, 32, 32)
    return Rows(x, np.concatenate(ys), lay.classes, f"{p} ({name}, {split})", list(meta.get(lay.names, [])) or None)


# ----------------------------------------------------------------------------- Hugging Face


def _datasets():
    try:
        import datasets
    except ImportError:
        raise ImportError("reading Hugging Face datasets needs the datasets package: pip install optden[hf]") from None
    return datasets


def _hf_dataset(p: Path, split: str | None):
    """The ``datasets.Dataset`` of a saved folder, a parquet file or a folder of parquet shards."""
    datasets = _datasets()
    import pyarrow.parquet as pq
    from datasets.table import InMemoryTable

    if p.is_dir() and not any(p.glob("*.parquet")) and not any(p.glob("*/*.parquet")):
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            splits = list(ds)
            key = split or ("train" if "train" in ds else splits[0] if len(splits) == 1 else None)
            if key not in ds:
                raise InputError(f"split: {p} holds the splits {splits}; choose one (got {split!r})")
            ds = ds[key]
        elif split is not None and ds.split is not None and str(ds.split) != split:
            raise InputError(f"split: {p} holds the split {ds.split!r}, not {split!r}")
        return ds
    files = [p] if p.is_file() else sorted(p.glob("*.parquet")) + sorted(p.glob("*/*.parquet"))
    if p.is_dir():
        want = split or "train"
        chosen = [f for f in files if f.name.startswith(f"{want}-") or f.parent.name == want]
        if chosen or split is not None:
            files = chosen
        if not files:
            raise InputError(f"split: {p} has no parquet files of split {want!r}")
    import pyarrow as pa

    table = pa.concat_tables([pq.read_table(f) for f in files])
    return datasets.Dataset(InMemoryTable(table))


def read_hf(path, split: str | None = None, image_column: str | None = None, label_column: str | None = None,
            resolution=None) -> Rows:
    """A Hugging Face dataset (see the module docstring) -> uint8 (M, C, H, W) rows.

    image_column: default the one ``Image`` column; label_column: default the one
    ``ClassLabel`` column, else a column named ``label`` or ``labels`` (none: no labels).
    resolution: resize every image to (H, W) (images must otherwise share one size).
    """
    datasets = _datasets()
    p = Path(path)
    if not p.exists():
        raise DatasetNotFoundError(f"data: {p} does not exist")
    ds = _hf_dataset(p, split)
    feats = ds.features
    if image_column is None:
        found = [k for k, f in feats.items() if isinstance(f, datasets.Image)]
        if len(found) != 1:
            raise InputError(f"image_column: {p} has {len(found)} Image columns among {list(feats)}; name one")
        image_column = found[0]
    if image_column not in feats:
        raise InputError(f"image_column: {image_column!r} is not a column of {p} ({list(feats)})")
    names = None
    if label_column is None:
        found = [k for k, f in feats.items() if isinstance(f, datasets.ClassLabel)]
        found = found or [k for k in ("label", "labels") if k in feats]
        label_column = found[0] if found else None
    elif label_column not in feats:
        raise InputError(f"label_column: {label_column!r} is not a column of {p} ({list(feats)})")
    if label_column is not None and isinstance(feats[label_column], datasets.ClassLabel):
        names = list(feats[label_column].names)
    raw = ds.cast_column(image_column, datasets.Image(decode=False))
    imgs, bad = [], []
    for a in range(0, len(raw), 1024):
        for j, item in enumerate(raw[a:a + 1024][image_column], start=a):
            try:
                data = item["bytes"] if item.get("bytes") is not None else Path(item["path"]).read_bytes()
                imgs.append(decode_image(data, resolution).transpose(2, 0, 1))
            except (ValueError, OSError, TypeError) as e:
                bad.append(f"row {j}: {e}")
    shapes = sorted({im.shape for im in imgs})
    if len(shapes) > 1:
        bad.append(f"images of {len(shapes)} shapes (C, H, W): {list_some(shapes, 5)}; pass resolution= to resize")
    if bad or not imgs:
        raise DatasetError(f"{p}: column {image_column!r} cannot be used: {list_some(bad) or 'no images'}")
    labels = None
    if label_column is not None:
        labels = np.asarray(ds[label_column], dtype=np.int64)
    num = len(names) if names else (int(labels.max()) + 1 if labels is not None else None)
    return Rows(np.stack(imgs), labels, num, f"{p} (Hugging Face, column {image_column!r})", names)


# ----------------------------------------------------------------------------- torch datasets


def _item_parts(item, i: int):
    """(image, label or None) of one dataset item."""
    if isinstance(item, dict):
        img = next((item[k] for k in ("image", "img", "pixel_values", "x") if k in item), None)
        lab = next((item[k] for k in ("label", "labels", "y", "target") if k in item), None)
        if img is None:
            raise DatasetError(f"dataset[{i}]: a dict without an image (keys {sorted(item)}; expected 'image' or 'img')")
        return img, lab
    if isinstance(item, (tuple, list)):
        if len(item) == 0 or len(item) > 2:
            raise DatasetError(f"dataset[{i}]: expected (image, label) or an image, got a {len(item)}-tuple")
        return item[0], (item[1] if len(item) == 2 else None)
    return item, None


def _image_of(img, i: int) -> np.ndarray:
    """One item's image -> (C, H, W) uint8 or float32 array."""
    import torch

    what = f"dataset[{i}]"
    if hasattr(img, "mode") and hasattr(img, "size") and hasattr(img, "convert"):  # a PIL image
        try:
            return image_array(img).transpose(2, 0, 1)
        except ValueError as e:
            raise DatasetError(f"{what}: {e}") from None
    arr = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
    if arr.dtype != np.uint8:
        if arr.dtype.kind not in "f" and not (arr.dtype.kind in "iu" and arr.size and 0 <= arr.min() and arr.max() < 256):
            raise DatasetError(f"{what}: expected uint8 or float images, got dtype {arr.dtype}")
        arr = arr.astype(np.uint8) if arr.dtype.kind in "iu" else arr.astype(np.float32, copy=False)
    return _as_chw(arr, what)


def _label_of(lab, i: int):
    if lab is None:
        return None
    v = lab.item() if hasattr(lab, "item") and getattr(lab, "ndim", 0) == 0 else lab
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise DatasetError(f"dataset[{i}]: the label must be an integer class, got {lab!r}")
    return int(v)


def read_torch(dataset, max_rows: int | None = None) -> Rows:
    """Every item (or the first ``max_rows``) of an indexable torch ``Dataset`` (see the
    module docstring) -> (M, C, H, W) rows, uint8 when every image is 8-bit, else float32."""
    try:
        n = len(dataset)
    except TypeError:
        raise InputError(f"dataset: a {type(dataset).__name__} has no len(); expected an indexable torch Dataset") \
            from None
    n = n if max_rows is None else min(n, int(max_rows))
    if n < 1:
        raise DatasetError("dataset: is empty")
    imgs, labs = [], []
    for i in range(n):
        img, lab = _item_parts(dataset[i], i)
        imgs.append(_image_of(img, i))
        labs.append(_label_of(lab, i))
        if imgs[-1].shape != imgs[0].shape:
            raise DatasetError(f"dataset[{i}]: image shape {imgs[-1].shape} (C, H, W) differs from dataset[0]'s "
                               f"{imgs[0].shape}")
    if any(lb is None for lb in labs) and not all(lb is None for lb in labs):
        raise DatasetError("dataset: some items have a label and others not")
    uint8 = all(im.dtype == np.uint8 for im in imgs)
    x = np.stack([im if uint8 else im.astype(np.float32) for im in imgs])
    labels = None if labs[0] is None else np.asarray(labs, dtype=np.int64)
    return Rows(x, labels, None, f"{type(dataset).__name__} (torch dataset, {n} items)")
