"""Durable files: streamed sha256, directory fsync, and atomic replace-by-rename.

Every writer of finished work (dataset directories, job batches, ingestion chunks) goes
through these, so a crash leaves either the old file or the complete new one.
"""
from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

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


def atomic_write(path, write) -> None:
    """``write(f)`` into a temporary file beside ``path``, fsync, rename over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        write_synced(tmp, write)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
