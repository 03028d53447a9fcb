"""Image files: folders and zips of PNG/JPEG, decoding to uint8, EDM's dataset.json labels.

Used by ``Dataset.from_images`` (everything decoded at once) and by
``optden.data.ingest`` (resumable, chunk by chunk). The order of the images is the
sorted order of their relative paths ("/"-separated), as in EDM's ImageFolderDataset.
"""
from __future__ import annotations

import concurrent.futures
import io
import json
import numbers
import os
import zipfile
from pathlib import Path

import numpy as np

from ..errors import DatasetError, InputError

__all__ = ["IMAGE_EXTENSIONS", "ImageSource", "check_resolution", "image_array", "decode_image", "decode_all",
           "labels_from_dataset_json", "list_some"]

#: File extensions read as images (case-insensitive).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


class ImageSource:
    """The sorted image names of a folder (searched recursively) or a zip file, a reader
    for each, and the bytes of its root ``dataset.json`` (``meta``, None when absent).

    name: the argument the path came from, for error messages. Use as a context manager
    (or call ``close``) so that a zip file is closed.
    """

    def __init__(self, path, name: str = "path"):
        self.path = Path(path)
        self._zip = None
        if self.path.is_dir():
            self.names = sorted(p.relative_to(self.path).as_posix() for p in self.path.rglob("*")
                                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            meta = self.path / "dataset.json"
            self.meta = meta.read_bytes() if meta.is_file() else None
        else:
            try:
                self._zip = zipfile.ZipFile(self.path)
            except (zipfile.BadZipFile, OSError) as e:
                raise DatasetError(f"{name}: {self.path} is neither a folder nor a readable zip file ({e})") from None
            all_names = set(self._zip.namelist())
            self.names = sorted(n for n in all_names if not n.endswith("/") and not n.startswith("__MACOSX/")
                                and os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS)
            self.meta = self._zip.read("dataset.json") if "dataset.json" in all_names else None

    def read(self, name: str) -> bytes:
        """The encoded bytes of image ``name`` (a relative path from ``names``)."""
        if self._zip is None:
            return (self.path / name).read_bytes()
        return self._zip.read(name)

    def stamp(self, name: str) -> list:
        """What identifies the current content of image ``name`` without reading it: [size,
        mtime in ns] of a file, [size, CRC-32] of a zip member (a resumed build compares them)."""
        if self._zip is None:
            st = (self.path / name).stat()
            return [st.st_size, st.st_mtime_ns]
        info = self._zip.getinfo(name)
        return [info.file_size, info.CRC]

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()

    def __enter__(self) -> "ImageSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def list_some(items, k: int = 20) -> str:
    """The first ``k`` items joined by commas, and how many more there are."""
    shown = ", ".join(str(i) for i in items[:k])
    return shown + (f", ... ({len(items) - k} more)" if len(items) > k else "")


def check_resolution(resolution):
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


def labels_from_dataset_json(text: bytes, names: list[str], path: Path):
    """EDM dataset.json -> int64 labels in the order of ``names``, or None if it has no labels."""
    try:
        meta = json.loads(text)
    except ValueError as e:
        raise DatasetError(f"{path}: dataset.json is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise DatasetError(f"{path}: dataset.json holds a {type(meta).__name__}; expected EDM's object "
                           '{"labels": [[filename, label], ...]} (or "labels": null)')
    entries = meta.get("labels")
    if entries is None:
        return None
    try:
        table = {str(fname).replace("\\", "/"): lab for fname, lab in entries}
    except (TypeError, ValueError):
        raise DatasetError(f"{path}: dataset.json 'labels' must be a list of [filename, label] pairs") from None
    missing = [n for n in names if n not in table]
    if missing:
        raise DatasetError(f"{path}: dataset.json has no label for {len(missing)} image(s): {list_some(missing)}")
    out = []
    for n in names:
        lab = table[n]
        if isinstance(lab, bool) or not isinstance(lab, numbers.Integral):
            raise DatasetError(f"{path}: dataset.json label of {n} is {lab!r}; expected an integer class")
        out.append(int(lab))
    return np.asarray(out, dtype=np.int64)


def image_array(im, resolution=None) -> np.ndarray:
    """A PIL image -> uint8 (H, W, C) with C in {1, 3}; raises ValueError with a reason.

    Grayscale gives C = 1, anything else RGB (alpha dropped, palettes expanded);
    ``resolution`` (H, W) resizes (Lanczos) when the size differs.
    """
    from PIL import Image

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
    return a[:, :, None] if a.ndim == 2 else a


def decode_image(data: bytes, resolution):
    """Encoded PNG/JPEG bytes -> uint8 (H, W, C) with C in {1, 3} (``image_array``); raises
    ValueError with a reason."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return image_array(im, resolution)
    except UnidentifiedImageError:
        raise ValueError("not a readable image") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"unreadable ({e})") from None


def decode_all(source: ImageSource, resolution, workers: int | None = None):
    """Decode every image of ``source`` into one uint8 (M, C*H*W) array (channel-major rows).

    Returns ``(raw, (C, H, W))``; one DatasetError lists every file that cannot be read
    or whose size or channel count differs from the first image's.
    """
    names = source.names
    workers = workers or min(8, os.cpu_count() or 1)
    raw = None
    ish = None
    bad = []

    def job(item):
        name, data = item
        if isinstance(data, str):
            return data
        try:
            return decode_image(data, resolution)
        except ValueError as e:
            return str(e)

    def fetch(name):
        try:
            return name, source.read(name)
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
        raise DatasetError(f"{source.path}: {len(bad)} image(s) cannot be used{hint}: {list_some(bad)}")
    return raw, ish
