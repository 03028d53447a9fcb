"""The on-disk format of a dataset directory, and checked reading of ``.npy`` files.

Layout written by :func:`write_dataset` (``meta.json`` is written last and acts as the
commit marker, so a crash mid-save never leaves a directory that loads)::

    dir/data.npy     (M, d) raw rows (bfloat16 stored as its uint16 bit pattern)
    dir/labels.npy   (M,) int64 class labels, only when the set has labels
    dir/norms.npz    center (d,), centered_sqnorms (M,), sqnorms (M,), all float64
    dir/meta.json    format version, shapes, dtype, affine map, sha256 of each file, and
                     meta_sha256: the sha256 of every other field (format version 2)

The sha256 of ``data.npy`` is the sha256 of the rows in ``.npy`` form
(:func:`npy_sha256`): the part of ``Dataset.fingerprint`` that costs a read of the rows.
``meta_sha256`` covers every field that changes results (the affine map, the class count,
shapes, dtype, the files' checksums): it is checked at every load (it costs nothing), so
an edited ``scale`` or ``num_classes`` is a ``ChecksumError``. Version 1 directories
(before it) still load, with a warning that says how to re-save them.

A memory-mapped ``data.npy`` is identified by its :func:`file_stamp` (size, mtime,
inode): a pass checks it before it reads (``engine/rows.py``), so a file truncated,
rewritten or replaced under a loaded dataset is a ``DatasetError`` naming it, not a SIGBUS
or results from stale norms.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ChecksumError, DatasetError, DatasetNotFoundError
from ..fileio import fsync_dir, no_space, remove_stale_temporaries, sha256_file, write_synced
from .storage import DTYPE_NAMES, STORAGE_DTYPES

__all__ = ["FORMAT_VERSION", "Stored", "read_npy_header", "open_npy", "npy_sha256", "write_dataset", "read_dataset",
           "meta_sha256", "file_stamp", "check_stamp", "MappedRows"]

FORMAT_VERSION = 2
"""Version of the directory format written by :func:`write_dataset`."""

FORMAT_NAME = "optden.dataset"


class _HashingWriter(io.RawIOBase):
    """A write-only file wrapper that hashes every byte written (so a save needs no re-read).

    f: the file to write through, or None to hash only."""

    def __init__(self, f=None):
        self._f = f
        self.sha = hashlib.sha256()

    def writable(self):
        return True

    def write(self, b):
        self.sha.update(b)
        return len(b) if self._f is None else self._f.write(b)


def npy_sha256(raw: np.ndarray) -> str:
    """sha256 of ``raw`` written as a ``.npy`` file (header and data), streamed in 16 MB
    pieces: equal to the checksum that :func:`write_dataset` records for ``data.npy``."""
    w = _HashingWriter()
    np.lib.format.write_array(w, raw, allow_pickle=False)
    return w.sha.hexdigest()


def read_npy_header(path: Path):
    """(shape, fortran_order, dtype, data_offset) of a .npy file; DatasetError if malformed or truncated."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:  # private: numpy's reader of the other header versions (3.0) has no public name
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


def meta_sha256(meta: dict) -> str:
    """sha256 of a meta.json's fields (all but ``meta_sha256`` itself), in canonical JSON."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def file_stamp(path) -> tuple:
    """(size, mtime in ns, inode, device) of a file: what changes when it is truncated,
    rewritten in place (``np.save`` / ``cp`` over it) or replaced."""
    st = os.stat(path)
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


def check_stamp(path, stamp: tuple) -> None:
    """DatasetError naming ``path`` unless its :func:`file_stamp` is still ``stamp``."""
    try:
        now = file_stamp(path)
    except OSError as e:
        raise DatasetError(f"{path}: the data file of a loaded dataset is gone ({e.strerror}); load it again") from None
    if now != stamp:
        what = [name for name, a, b in zip(("size", "modification time", "inode", "device"), stamp, now) if a != b]
        raise DatasetError(f"{path}: the data file changed on disk since the dataset was loaded ({', '.join(what)} "
                           "differ): its rows and cached norms no longer agree; load the dataset again")


class MappedRows:
    """The file behind memory-mapped rows: its stamp when opened, and reads that cannot fault.

    ``check()`` raises DatasetError naming the file when it was truncated, rewritten or
    replaced since (``file_stamp``); ``read_into(start, stop, row_bytes, out)`` copies rows
    with ``pread`` (a short read of a truncated file is a DatasetError, where touching the
    mapping past the file's end would kill the process with SIGBUS)."""

    def __init__(self, path):
        self.path = Path(path)
        self.stamp = file_stamp(self.path)
        self._file = None  # (open file, data offset), on first read

    def __getstate__(self):
        return {"path": self.path, "stamp": self.stamp, "_file": None}  # an open file does not pickle

    def check(self) -> None:
        check_stamp(self.path, self.stamp)

    def read_into(self, start: int, stop: int, row_bytes: int, out: np.ndarray) -> None:
        if self._file is None:
            self._file = (open(self.path, "rb", buffering=0), read_npy_header(self.path)[3])
        f, offset = self._file
        want = (stop - start) * row_bytes
        got = os.preadv(f.fileno(), [memoryview(out).cast("B")[:want]], offset + start * row_bytes)
        if got != want:
            raise DatasetError(f"{self.path}: truncated while in use: rows {start}..{stop - 1} need bytes up to "
                               f"{offset + stop * row_bytes}, the file ends before; load the dataset again")


def open_npy(path: Path) -> np.ndarray:
    """Memory-map a checked .npy file read-only."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DatasetError(f"{path}: cannot be memory-mapped ({e})") from None


@dataclass
class Stored:
    """What a dataset directory holds (see the module docstring), as :func:`read_dataset` found it.

    raw: (M, d) read-only memmap of data.npy; stats: (center, centered_sqnorms, sqnorms)
    float64, read-only; data_sha256: the checksum of data.npy when it was verified, else None.
    """

    raw: np.ndarray
    dtype: str
    image_shape: tuple
    scale: float
    offset: float
    labels: np.ndarray | None
    num_classes: int | None
    stats: tuple
    data_file: Path
    data_sha256: str | None


def write_dataset(dir, raw: np.ndarray, dtype: str, image_shape, scale: float, offset: float, labels,
                  num_classes, stats) -> str:
    """Write a dataset directory atomically; returns the sha256 of data.npy.

    Files are written under temporary names and moved into place with os.replace; an
    existing meta.json is removed first and the new one written last, so an interrupted
    save leaves a directory that :func:`read_dataset` refuses. Other files in ``dir``
    (e.g. an index) are left alone. stats: (center (d,), centered_sqnorms (M,), sqnorms (M,)).
    """
    dir = Path(dir)
    if dir.exists() and not dir.is_dir():
        raise DatasetError(f"dir: {dir} exists and is not a directory")
    dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(dir)  # what a killed save left (a live one's are kept)
    M, d = raw.shape
    tag = f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = {}
    checksums = {}
    needed = int(raw.nbytes) + 3 * 8 * (M + d) + (0 if labels is None else 8 * M)
    try:
        with no_space(dir, needed):
            _write_files(dir, raw, dtype, image_shape, scale, offset, labels, num_classes, stats, tag, tmp, checksums)
        fsync_dir(dir)
    finally:
        for p in tmp.values():
            try:
                p.unlink()
            except FileNotFoundError:
                pass
    return checksums["data.npy"]


def _write_files(dir, raw, dtype, image_shape, scale, offset, labels, num_classes, stats, tag, tmp, checksums):
    """The body of :func:`write_dataset`: temporaries ``tmp`` (name -> path, removed by
    the caller if still there), then the moves, meta.json last."""
    center, centered, sqnorms = stats
    M, d = raw.shape
    tmp["data.npy"] = dir / ("data.npy" + tag)
    with open(tmp["data.npy"], "wb") as f:
        w = _HashingWriter(f)
        np.lib.format.write_array(w, raw, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    checksums["data.npy"] = w.sha.hexdigest()
    if labels is not None:
        tmp["labels.npy"] = dir / ("labels.npy" + tag)
        # through a Python writer: np.save on a real file uses tofile, whose short write on a
        # full disk carries no errno
        write_synced(tmp["labels.npy"], lambda f: np.lib.format.write_array(
            _HashingWriter(f), np.asarray(labels, dtype=np.int64), allow_pickle=False))
        checksums["labels.npy"] = sha256_file(tmp["labels.npy"])
    tmp["norms.npz"] = dir / ("norms.npz" + tag)
    write_synced(tmp["norms.npz"], lambda f: np.savez(f, center=center, centered_sqnorms=centered,
                                                      sqnorms=sqnorms))
    checksums["norms.npz"] = sha256_file(tmp["norms.npz"])
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "M": int(M),
        "d": int(d),
        "image_shape": list(image_shape),
        "dtype": dtype,
        "storage_dtype": STORAGE_DTYPES[dtype].numpy.str,
        "scale": scale,
        "offset": offset,
        "num_classes": num_classes,
        "sha256": checksums,
    }
    meta["meta_sha256"] = meta_sha256(meta)
    tmp["meta.json"] = dir / ("meta.json" + tag)
    write_synced(tmp["meta.json"], lambda f: f.write(json.dumps(meta, indent=1).encode()))
    # Commit: invalidate the old set, move the payload in, then the marker.
    (dir / "meta.json").unlink(missing_ok=True)
    # pop only after a successful move, so an interrupted move still cleans up its temporary
    for name in ("data.npy", "labels.npy", "norms.npz"):
        if name in tmp:
            os.replace(tmp[name], dir / name)
            del tmp[name]
    if labels is None:
        (dir / "labels.npy").unlink(missing_ok=True)
    os.replace(tmp["meta.json"], dir / "meta.json")
    del tmp["meta.json"]


def read_dataset(dir, verify: bool = True) -> Stored:
    """Read a directory written by :func:`write_dataset`; ``data.npy`` is memory-mapped.

    Raises DatasetNotFoundError if the directory or a file is missing, DatasetError if
    ``data.npy`` is truncated or disagrees with ``meta.json``, ChecksumError (when
    ``verify``) if a file's sha256 differs from the one recorded. ``verify=False`` skips
    the checksums (a full read) but still checks sizes, shapes and dtypes.
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
    if meta.get("format") != FORMAT_NAME or version > FORMAT_VERSION:
        raise DatasetError(f"{meta_path}: format {meta.get('format')!r} version {version} is not supported "
                           f"(this optden reads {FORMAT_NAME} up to version {FORMAT_VERSION})")
    if version >= 2:
        if meta.get("meta_sha256") != meta_sha256(meta):
            raise ChecksumError(f"{meta_path}: its fields (scale, offset, num_classes, shapes, dtype or checksums) "
                                "differ from those recorded when the dataset was saved: the file was edited or is "
                                "corrupt. Restore it, or rebuild the dataset from its source")
    else:
        warnings.warn(f"{meta_path}: saved by an older optden (format version {version}): its fields (scale, "
                      "offset, num_classes) are not covered by a checksum. Re-save it to add one: "
                      f"optden.Dataset.load({str(dir)!r}).save({str(dir)!r})", UserWarning, stacklevel=3)
    if dtype not in DTYPE_NAMES:
        raise DatasetError(f"{meta_path}: unknown dtype {dtype!r}")
    stored_as = STORAGE_DTYPES[dtype].numpy
    files = {"data.npy": dir / "data.npy", "norms.npz": dir / "norms.npz"}
    if num_classes is not None:
        files["labels.npy"] = dir / "labels.npy"
    for name, p in files.items():
        if not p.is_file():
            raise DatasetNotFoundError(f"dir: {dir} is missing {name}")
    shape, fortran, ndt, _ = read_npy_header(files["data.npy"])
    if shape != (M, d) or fortran or ndt != stored_as:
        raise DatasetError(
            f"{files['data.npy']}: holds {shape} {ndt}{' (Fortran order)' if fortran else ''} but meta.json "
            f"says ({M}, {d}) {dtype} (stored as {stored_as})"
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
        read_npy_header(files["labels.npy"])
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
    for s in stats:
        s.setflags(write=False)
    return Stored(raw=open_npy(files["data.npy"]), dtype=dtype, image_shape=image_shape, scale=scale,
                  offset=offset, labels=labels, num_classes=num_classes, stats=stats,
                  data_file=files["data.npy"], data_sha256=checksums["data.npy"] if verify else None)
