"""Durable files: streamed sha256, directory fsync, atomic replace-by-rename, full disks.

Every writer of finished work (dataset directories, job batches, ingestion chunks) goes
through these, so a crash leaves either the old file or the complete new one, and a full
disk is an error that names the directory (``no_space``), never a crash: final arrays are
written through file objects (``atomic_write_npy``), not memory maps, whose writes to a
full file system kill the process with SIGBUS.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import uuid
from pathlib import Path

import numpy as np

from .errors import DiskFullError, InputError

#: errno values that mean "no space left" (the device, or the user's quota).
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)

_HASH_CHUNK = 8 << 20


def sha256_file(path) -> str:
    """sha256 hex digest of a file, streamed in 8 MB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path) -> None:
    """Make a directory's entries (a rename, a new file) durable; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_synced(path, write) -> None:
    """``write(f)`` into ``path`` (binary), flushed and fsynced before returning."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def no_space(path, needed: int | None = None):
    """Turn a "no space left" OSError raised inside the block into a ``DiskFullError``
    naming the directory of ``path`` and the bytes needed (``needed``: the size of what
    was being written, None when unknown). Other OSErrors pass unchanged."""
    try:
        yield
    except DiskFullError:
        raise
    except OSError as e:
        if e.errno not in NO_SPACE_ERRNOS:
            raise
        p = Path(path)
        where = p if p.is_dir() else p.parent
        what = f"needed {needed} bytes" if needed is not None else "the write did not fit"
        err = DiskFullError(f"no space left on {where} ({what})")
        err.errno, err.filename = e.errno, str(path)
        raise err from None


def foreign_write_error(exc: Exception, path, needed: int | None = None) -> Exception:
    """The error to raise for a library's failed write to ``path`` that reports only text
    (FAISS's RuntimeError "... (No space left on device)"): a ``DiskFullError`` when the
    text says the disk is full, else the exception itself."""
    text = str(exc)
    if "No space left" in text or "Disk quota exceeded" in text:
        p = Path(path)
        what = f"needed about {needed} bytes" if needed is not None else "the write did not fit"
        err = DiskFullError(f"no space left on {p.parent} ({what})")
        err.errno, err.filename = errno.ENOSPC, str(path)
        return err
    return exc


def describe_os_error(exc: OSError, writing_to=None) -> str:
    """One line for an OSError (a full or read-only disk, a permission): what failed and
    on which file, without the ``[Errno N]`` noise. writing_to: the directory the command
    writes to, named when the error itself names no file."""
    if isinstance(exc, DiskFullError):
        return str(exc)
    what = exc.strerror or str(exc)
    if exc.errno in NO_SPACE_ERRNOS:
        what = "no space left on the device"
    if exc.filename:
        return f"{what} ({exc.filename})"
    return f"{what} (writing to {writing_to})" if writing_to is not None else what


def atomic_write(path, write, size: int | None = None) -> None:
    """``write(f)`` into a temporary file beside ``path``, fsync, rename over ``path``.

    size: the bytes it writes, when known (for the message of a full disk)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with no_space(path, size):
            write_synced(tmp, write)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def npy_header(dtype, shape) -> bytes:
    """The ``.npy`` header (magic, version, padded dict) of a C-order array."""
    import io

    buf = io.BytesIO()
    d = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
    try:
        np.lib.format.write_array_header_1_0(buf, d)
    except ValueError:  # a header over 64 KiB (a very long shape): version 2.0
        buf = io.BytesIO()
        np.lib.format.write_array_header_2_0(buf, d)
    return buf.getvalue()


def atomic_write_npy(path, dtype, shape, pieces) -> None:
    """Write a ``.npy`` file from ``pieces``, C-contiguous arrays that concatenate along
    axis 0 to ``shape``, atomically (temporary file, fsync, rename) and through a file
    object: its full size is reserved first (``posix_fallocate``), so a disk that cannot
    hold it fails at once with ``DiskFullError``, and a write can never fault (no memory
    map). Only one piece is in memory at a time."""
    path = Path(path)
    dtype = np.dtype(dtype)
    header = npy_header(dtype, shape)
    size = len(header) + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    rows = 0

    def write(f):
        nonlocal rows
        if size and hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(f.fileno(), 0, size)
            except OSError as e:
                if e.errno in NO_SPACE_ERRNOS:
                    raise
                # a file system without fallocate: the writes below still report a full disk
        f.write(header)
        for piece in pieces:
            a = np.ascontiguousarray(piece, dtype=dtype)
            if a.size:  # an empty piece (a band whose patches were all dropped) has zero strides: no view
                f.write(memoryview(a).cast("B"))
            rows += a.shape[0]
        if rows != shape[0]:
            raise ValueError(f"atomic_write_npy: pieces hold {rows} rows, the shape says {shape[0]}")

    atomic_write(path, write, size)


def remove_stale_temporaries(directory, pattern: str = "*.tmp-*") -> list[Path]:
    """Delete the temporaries ``<name>.tmp-<pid>-<hex>`` (as ``atomic_write`` and
    ``write_dataset`` name them) in ``directory`` whose process is gone: what a killed
    write left. A live process's temporaries are kept. Returns the paths removed."""
    removed = []
    for p in Path(directory).glob(pattern):
        pid = p.name.rsplit(".tmp-", 1)[-1].split("-", 1)[0]
        if pid.isdigit() and (int(pid) == os.getpid() or _alive(int(pid))):
            continue
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DirectoryLock:
    """An exclusive ``fcntl`` lock on ``directory/.lock`` held while a job writes there, so
    that two runs never write (and delete each other's temporaries in) one directory.

    ``what`` names the directory's role in the error of a second run (e.g. "out"). The lock
    is released when the process exits, however it ends (the kernel drops it)."""

    def __init__(self, directory, what: str = "directory"):
        self.path = Path(directory) / ".lock"
        self.what = what
        self._fd = None

    def __enter__(self) -> "DirectoryLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            finally:
                os.close(fd)
            raise InputError(f"{self.what}: {self.path.parent} is in use by another run ({holder}); wait for "
                             "it to finish, or choose another directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
