"""Background reading of row blocks: the next block is read while the current one is used.

A :class:`Prefetcher` walks a list of row ranges ``[(a, b), ...]`` of a (typically
memory-mapped) storage. A reader thread copies each range into one of a fixed ring of
host buffers (``slots`` buffers of ``block_rows`` rows; page-locked when the target
device is CUDA), so disk reads and page faults overlap the computation on the previous
block. On CUDA the host -> device copy of the next block is issued on a side stream
(non-blocking, from pinned memory) before the current block is handed out: double
buffering on the device as well.

Memory: the ring is allocated once, ``slots * block_rows * row_bytes`` bytes, and is all
the row storage the prefetcher ever holds; :class:`PrefetchStats` records the peak
number of rows held at once (blocks being read, queued or in use) so that callers and
tests can check a memory budget.
"""
from __future__ import annotations

import concurrent.futures
import os
import queue
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from ..data.storage import by_numpy
from ..errors import InputError

__all__ = ["Prefetcher", "PrefetchStats", "plan_blocks"]


@dataclass
class PrefetchStats:
    """Accounting of one prefetcher (or, accumulated, of every pass of a row source).

    row_bytes: bytes of one raw row.      capacity_rows: rows the host ring can hold.
    peak_rows: most rows held at once (read or being read, queued, or in use).
    rows_read: rows copied from storage.  blocks: blocks handed out.
    wait_seconds: time the consumer waited for the reader (0 when reading keeps up).
    """

    row_bytes: int = 0
    capacity_rows: int = 0
    peak_rows: int = 0
    rows_read: int = 0
    blocks: int = 0
    wait_seconds: float = 0.0

    @property
    def peak_bytes(self) -> int:
        return self.peak_rows * self.row_bytes

    def absorb(self, other: "PrefetchStats") -> None:
        """Fold the counters of a finished pass into these (peaks take the max)."""
        self.row_bytes = other.row_bytes
        self.capacity_rows = max(self.capacity_rows, other.capacity_rows)
        self.peak_rows = max(self.peak_rows, other.peak_rows)
        self.rows_read += other.rows_read
        self.blocks += other.blocks
        self.wait_seconds += other.wait_seconds


def plan_blocks(start: int, stop: int, block_rows: int) -> list[tuple[int, int]]:
    """Ranges ``[(a, b), ...]`` covering ``[start, stop)`` with at most ``block_rows`` rows each."""
    return [(a, min(stop, a + block_rows)) for a in range(start, stop, block_rows)]


_DONE = object()
# A block is split among the reader threads only in parts of at least this many bytes.
_MIN_PART_BYTES = 4 << 20


class Prefetcher:
    """Iterate ``(a, block)`` over ``ranges`` with the reads done ahead in a thread.

    load: ``load(a, b, out)`` copies storage rows [a, b) into ``out`` ((b - a, d) numpy
        view of a ring buffer, in the storage's numpy dtype).
    ranges: list of (a, b) with ``b - a <= block_rows``.
    d: values per row; np_dtype: numpy storage dtype; torch_dtype: the tensor dtype the
        blocks are viewed as (e.g. bfloat16 stored as uint16 bits).
    device: where blocks are delivered. CPU: the block is a view of the ring buffer,
        valid until the next block is requested. CUDA: a device tensor.
    slots: host ring buffers (>= 2; 2 is double buffering: one in use, one being read).
    readers: threads that copy parts of one block in parallel (default min(4, CPUs));
        parts are at least 4 MB, so small blocks are read by one thread.

    Iterating yields ``(a, block (b - a, d))``. Use it as an iterator once; ``close()``
    (or leaving a ``with`` block) stops the reader early.
    """

    def __init__(
        self,
        load: Callable[[int, int, np.ndarray], None],
        ranges: list[tuple[int, int]],
        d: int,
        np_dtype: np.dtype,
        torch_dtype: torch.dtype,
        device: torch.device,
        block_rows: int,
        slots: int = 2,
        readers: int | None = None,
    ):
        if slots < 2:
            raise InputError(f"slots: the prefetcher needs at least 2 buffers, got {slots}")
        if block_rows < 1:
            raise InputError(f"block_rows: expected a positive integer, got {block_rows}")
        self._load = load
        self._ranges = list(ranges)
        if any(b - a > block_rows or b <= a for a, b in self._ranges):
            raise InputError("ranges: every range must hold 1..block_rows rows")
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"
        self._np_dtype = np.dtype(np_dtype)
        self._torch_dtype = torch_dtype
        self.block_rows = int(block_rows)
        self.slots = int(min(slots, max(2, len(self._ranges))))
        row_bytes = d * self._np_dtype.itemsize
        self.stats = PrefetchStats(row_bytes=row_bytes, capacity_rows=self.slots * self.block_rows)
        # The ring: numpy views for the reader, torch views (same memory) for the consumer.
        self._host = []
        for _ in range(self.slots):
            t = torch.empty((self.block_rows, d), dtype=by_numpy(self._np_dtype).bits, pin_memory=self._cuda)
            self._host.append(t)
        self._host_np = [t.numpy().view(self._np_dtype) for t in self._host]
        self._free: queue.Queue = queue.Queue()
        for i in range(self.slots):
            self._free.put(i)
        self._ready: queue.Queue = queue.Queue()
        self._held = 0  # rows in buffers taken from the free list and not yet returned
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._copy_stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._events: list = [None] * self.slots  # CUDA: copy-out finished, buffer reusable
        # Several threads copy parts of a block at once: page faults / reads are issued in
        # parallel, which storage (and the page cache) serve faster than one stream.
        self.readers = max(1, int(readers if readers is not None else min(4, os.cpu_count() or 1)))
        self._pool = None
        self._thread = threading.Thread(target=self._reader, name="optden-prefetch", daemon=True)
        self._started = False

    # ---------------------------------------------------------------- reader thread
    def _take(self, rows: int) -> int | None:
        while not self._stop.is_set():
            try:
                slot = self._free.get(timeout=0.1)
            except queue.Empty:
                continue
            ev = self._events[slot]
            if ev is not None:
                ev.synchronize()  # the device copy out of this pinned buffer has finished
                self._events[slot] = None
            with self._lock:
                self._held += rows
                self.stats.peak_rows = max(self.stats.peak_rows, self._held)
            return slot
        return None

    def _give_back(self, slot: int, rows: int) -> None:
        with self._lock:
            self._held -= rows
        self._free.put(slot)

    def _read(self, a: int, b: int, out: np.ndarray) -> None:
        parts = min(self.readers, max(1, (b - a) * self.stats.row_bytes // _MIN_PART_BYTES))
        if parts <= 1:
            self._load(a, b, out)
            return
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.readers, thread_name_prefix="optden-prefetch")
        cuts = [a + (b - a) * i // parts for i in range(parts + 1)]
        futures = [self._pool.submit(self._load, lo, hi, out[lo - a : hi - a]) for lo, hi in zip(cuts, cuts[1:])]
        for f in futures:
            f.result()  # re-raises a reader's error

    def _reader(self) -> None:
        try:
            for a, b in self._ranges:
                # Reserve the rows of a whole buffer: it is what the ring holds, whatever b - a.
                slot = self._take(self.block_rows)
                if slot is None:
                    return
                self._read(a, b, self._host_np[slot][: b - a])
                self.stats.rows_read += b - a
                self._ready.put((a, b, slot))
            self._ready.put(_DONE)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            self._ready.put(exc)

    # ---------------------------------------------------------------- consumer
    def _next_ready(self):
        import time

        t0 = time.perf_counter()
        item = self._ready.get()
        self.stats.wait_seconds += time.perf_counter() - t0
        if isinstance(item, BaseException):
            raise item
        return item

    def _to_device(self, a, b, slot):
        """Host slot -> (a, block, slot) where block is on the target device."""
        host = self._host[slot][: b - a].view(self._torch_dtype)
        if not self._cuda:
            return a, host, slot
        with torch.cuda.stream(self._copy_stream):
            dev = host.to(self.device, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self._copy_stream)
        self._events[slot] = ev
        return a, dev, slot

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        if self._started:
            raise RuntimeError("a Prefetcher can be iterated once")
        self._started = True
        if not self._ranges:
            return
        self._thread.start()
        try:
            item = self._next_ready()
            cur = None if item is _DONE else self._to_device(*item)
            while cur is not None:
                a, block, slot = cur
                # Start the next block's device copy before handing this one out; a read
                # error surfaces after the blocks read before it have been used.
                pending = None
                try:
                    item = self._next_ready()
                    nxt = None if item is _DONE else self._to_device(*item)
                except Exception as exc:
                    pending, nxt = exc, None
                if self._cuda:
                    torch.cuda.current_stream(self.device).wait_event(self._events[slot])
                    block.record_stream(torch.cuda.current_stream(self.device))
                    # the pinned buffer is free once its copy has run (the reader waits on the event)
                    self._give_back(slot, self.block_rows)
                self.stats.blocks += 1
                yield a, block
                if not self._cuda:
                    self._give_back(slot, self.block_rows)  # the consumer is done with the view
                if pending is not None:
                    raise pending
                cur = nxt
        finally:
            self.close()

    def close(self) -> None:
        """Stop the reader thread (idempotent)."""
        self._stop.set()
        if self._started and self._thread.is_alive():
            # unblock a reader waiting for a free slot; it checks _stop every 0.1 s
            self._thread.join(timeout=30)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
