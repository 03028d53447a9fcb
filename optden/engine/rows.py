"""Row sources: the training rows a pass runs over, in blocks, on one device.

A ``RowSource`` is all rows of a Dataset, or the subset of one class label. It yields
blocks ``(index, raw, csq)``: global row indices (B,) int64, raw rows (B, d) in the
storage dtype on the device, and their centered squared norms ``||raw - center||^2``
(B,) float64. Rows are either resident on the device (copied once, when they fit the
memory budget) or streamed from the dataset's (possibly memory-mapped) storage.

Streaming a memory-mapped dataset (or any dataset onto a CUDA device) goes through
``optden.engine.prefetch.Prefetcher``: a reader thread copies the next block into a small ring
of host buffers (pinned for CUDA) while the current block is computed. The ring is the
only row storage a pass holds, and it is sized by ``memory_budget`` (bytes): blocks
shrink so that two of them (double buffering) fit the budget. ``stats`` accumulates the
prefetcher's accounting (peak rows held, rows read) over every pass.

Every pass and gather first checks that a memory-mapped dataset's file is the one it
loaded (``Dataset.check_unchanged``: size, mtime, inode), and contiguous rows are read
with ``pread`` (``Dataset.read_rows_into``), so a data file truncated, rewritten or
replaced under a denoiser is a ``DatasetError`` naming it, never a SIGBUS.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from ..data.storage import STORAGE_DTYPES
from ..errors import InputError
from .prefetch import Prefetcher, PrefetchStats, plan_blocks

#: Host buffers per streamed pass when the budget allows (one in use, two being read).
PREFETCH_SLOTS = 3


def parse_bytes(value, name: str = "memory_budget") -> int | None:
    """``None``, an int, or a string like "64M", "2G", "512k" -> bytes (None stays None)."""
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return None
    if isinstance(value, bool):
        raise InputError(f"{name}: expected a number of bytes, got {value!r}")
    if isinstance(value, (int, np.integer)):
        n = int(value)
    else:
        text = str(value).strip().upper().rstrip("B").rstrip("I")
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(text[-1:], 1)
        try:
            n = int(float(text[:-1] if mult > 1 else text) * mult)
        except (ValueError, OverflowError):  # "inf" overflows the int, "nan" is no number
            raise InputError(f"{name}: expected a finite number of bytes like 64M or 2G, got {value!r}") from None
    if n < 1:
        raise InputError(f"{name}: expected a positive number of bytes, got {value!r}")
    return n


def default_memory_budget() -> int | None:
    """The budget from the environment variable OPTDEN_MEMORY_BUDGET (e.g. "256M"), or None."""
    return parse_bytes(os.environ.get("OPTDEN_MEMORY_BUDGET"), "OPTDEN_MEMORY_BUDGET")


@dataclass
class RowSource:
    """Rows of ``dataset`` (all, or those listed in ``index``) served on ``device``.

    block_rows: rows per block; the torch backend converts one block to float64 at a
    time, so its memory is about ``block_rows * d * 8`` bytes per block.
    resident: hold the raw rows on the device (fast; costs M * d * itemsize bytes).
    memory_budget: bytes of raw rows a streamed pass may hold at once, an int or a
        string like "512M" (None: the environment's OPTDEN_MEMORY_BUDGET, else
        ``PREFETCH_SLOTS`` blocks). Candidate rows gathered for the exact re-score
        (top-k per query) are not part of it.
    prefetch: stream through the background reader (None: for memory-mapped datasets
        and CUDA devices; in-memory CPU datasets are used in place, zero-copy).
    """

    dataset: object
    device: torch.device
    block_rows: int
    index: np.ndarray | None = None
    resident: bool = False
    memory_budget: int | None = None
    prefetch: bool | None = None
    stats: PrefetchStats = field(default_factory=PrefetchStats)
    _raw: torch.Tensor | None = field(default=None, repr=False)
    _csq: torch.Tensor | None = field(default=None, repr=False)
    _idx: torch.Tensor | None = field(default=None, repr=False)
    _first: int | None = field(default=None, repr=False)

    def __post_init__(self):
        ds = self.dataset
        self.device = torch.device(self.device)
        self.memory_budget = parse_bytes(self.memory_budget)
        if self.index is None:
            csq = np.asarray(ds.centered_sqnorms)
        else:
            self.index = np.array(self.index, dtype=np.int64, copy=True)  # owned, writable
            csq = np.asarray(ds.centered_sqnorms)[self.index]
            n = self.index.shape[0]
            # a contiguous run of rows (a shard) is read as a slice, not gathered
            if n and self.index[-1] - self.index[0] == n - 1 and bool((np.diff(self.index) == 1).all()):
                self._first = int(self.index[0])
        self._csq = torch.from_numpy(np.array(csq, dtype=np.float64, copy=True)).to(self.device)
        self.center = torch.from_numpy(np.array(ds.center, dtype=np.float64, copy=True)).to(self.device)
        self.max_cnorm = float(np.sqrt(csq.max()))
        self.center_norm = float(np.linalg.norm(np.asarray(ds.center, dtype=np.float64)))
        if self.resident:
            self._raw = self._load(0, self.M).to(self.device)
        if self.index is not None:
            self._idx = torch.from_numpy(self.index).to(self.device)

    @property
    def M(self) -> int:
        return self.dataset.M if self.index is None else int(self.index.shape[0])

    @property
    def d(self) -> int:
        return self.dataset.d

    @property
    def dtype(self) -> str:
        return self.dataset.dtype

    def _load(self, start: int, stop: int) -> torch.Tensor:
        if self.index is None:
            return self.dataset.raw_block(start, stop)
        if self._first is not None:
            return self.dataset.raw_block(self._first + start, self._first + stop)
        return self.dataset.raw_rows(self.index[start:stop])

    def _load_into(self, start: int, stop: int, out: np.ndarray) -> None:
        """Copy local rows [start, stop) from storage into ``out`` (stop - start, d) numpy."""
        raw = self.dataset.raw
        if self.index is None or self._first is not None:
            first = self._first or 0
            read = getattr(self.dataset, "read_rows_into", None)
            if read is not None:  # a pread for memory-mapped rows: never a SIGBUS (Dataset.read_rows_into)
                read(first + start, first + stop, out)
            else:
                np.copyto(out, raw[first + start : first + stop])
        else:
            self._check_rows()  # gathered from the mapping: checked just before
            np.take(raw, self.index[start:stop], axis=0, out=out)

    def _check_rows(self) -> None:
        """DatasetError if the dataset's mapped file changed since it was loaded (size,
        mtime, inode: ``Dataset.check_unchanged``); every pass and gather starts with it."""
        check = getattr(self.dataset, "check_unchanged", None)
        if check is not None:
            check()

    @property
    def streams(self) -> bool:
        """True when passes read blocks through the background prefetcher."""
        if self._raw is not None:
            return False
        if self.prefetch is not None:
            return bool(self.prefetch)
        return bool(getattr(self.dataset, "is_memmap", False)) or self.device.type == "cuda"

    def stream_plan(self, rows: int | None = None) -> tuple[int, int]:
        """``(rows per block, host buffers)`` of a streamed pass under the memory budget.

        rows: the block size asked for (default ``block_rows``); the budget may shrink it.
        """
        row_bytes = self.d * np.dtype(self.dataset.raw.dtype).itemsize
        budget = parse_bytes(self.memory_budget) if self.memory_budget is not None else default_memory_budget()
        rows = min(self.block_rows if rows is None else rows, max(1, self.M))
        if budget is None:
            return rows, PREFETCH_SLOTS
        if budget < 2 * row_bytes:
            raise InputError(
                f"memory_budget: {budget} bytes cannot hold two rows of {row_bytes} bytes (double buffering)"
            )
        rows = min(rows, budget // (2 * row_bytes))
        return rows, int(max(2, min(PREFETCH_SLOTS, budget // (rows * row_bytes))))

    def resident_rows(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(raw (M, d), csq (M,))`` on the device when the rows are resident, else None
        (a pass may then cut them into blocks of its own size)."""
        if self._raw is None:
            return None
        return self._raw, self._csq

    def global_index(self, local: torch.Tensor) -> torch.Tensor:
        """Map positions within this source to dataset row indices."""
        return local if self._idx is None else self._idx[local]

    def blocks(self, start: int = 0, stop: int | None = None, rows: int | None = None
               ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Yield ``(offset, raw (B, d), csq (B,))`` for local rows [start, stop) in blocks.

        ``offset`` is the local position of the block's first row (use ``global_index``).
        ``rows``: rows per block (default ``block_rows``), e.g. larger blocks for a
        compiled backend. Streamed sources (see ``streams``) yield views of the
        prefetcher's ring buffers: each block is valid until the next one is requested;
        blocks may be smaller than asked to fit ``memory_budget``.
        """
        stop = self.M if stop is None else stop
        step = self.block_rows if rows is None else max(1, int(rows))
        self._check_rows()
        if self.streams:
            rows, slots = self.stream_plan(step)
            pf = Prefetcher(
                self._load_into, plan_blocks(start, stop, rows), self.d, self.dataset.raw.dtype,
                STORAGE_DTYPES[self.dtype].torch, self.device, rows, slots,
            )
            try:
                for a, raw in pf:
                    yield a, raw, self._csq[a : a + raw.shape[0]]
            finally:
                pf.close()
                self.stats.absorb(pf.stats)
            return
        for a in range(start, stop, step):
            b = min(stop, a + step)
            if self._raw is not None:
                raw = self._raw[a:b]
            else:
                raw = self._load(a, b).to(self.device, non_blocking=True)
            yield a, raw, self._csq[a:b]

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """Raw rows (K, d) at local positions ``local`` (any shape, flattened)."""
        flat = local.reshape(-1)
        if self._raw is not None:
            return self._raw[flat.to(self._raw.device)]
        self._check_rows()
        rows = self._load_rows(flat.cpu().numpy())
        return rows.to(self.device)

    def _load_rows(self, local: np.ndarray) -> torch.Tensor:
        glob = local if self.index is None else self.index[local]
        return self.dataset.raw_rows(glob)
