"""Row sources: the training rows a pass runs over, in blocks, on one device.

A ``RowSource`` is all rows of a Dataset, or the subset of one class label. It yields
blocks ``(index, raw, csq)``: global row indices (B,) int64, raw rows (B, d) in the
storage dtype on the device, and their centered squared norms ``||raw - center||^2``
(B,) float64. Rows are either resident on the device (copied once, when they fit the
memory budget) or streamed from the dataset's (possibly memory-mapped) storage.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

_TORCH_DTYPES = {
    "uint8": torch.uint8,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}


def torch_dtype(name: str) -> torch.dtype:
    return _TORCH_DTYPES[name]


@dataclass
class RowSource:
    """Rows of ``dataset`` (all, or those listed in ``index``) served on ``device``.

    block_rows: rows per block; the torch backend converts one block to float64 at a
    time, so its memory is about ``block_rows * d * 8`` bytes per block.
    resident: hold the raw rows on the device (fast; costs M * d * itemsize bytes).
    """

    dataset: object
    device: torch.device
    block_rows: int
    index: np.ndarray | None = None
    resident: bool = False
    _raw: torch.Tensor | None = field(default=None, repr=False)
    _csq: torch.Tensor | None = field(default=None, repr=False)
    _idx: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self):
        ds = self.dataset
        if self.index is None:
            csq = np.asarray(ds.centered_sqnorms)
        else:
            self.index = np.asarray(self.index, dtype=np.int64)
            csq = np.asarray(ds.centered_sqnorms)[self.index]
        self._csq = torch.from_numpy(np.array(csq, dtype=np.float64, copy=True)).to(self.device)
        self.center = torch.from_numpy(np.array(ds.center, dtype=np.float64, copy=True)).to(self.device)
        self.max_cnorm = float(np.sqrt(csq.max()))
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
        return self.dataset.raw_rows(self.index[start:stop])

    def global_index(self, local: torch.Tensor) -> torch.Tensor:
        """Map positions within this source to dataset row indices."""
        return local if self._idx is None else self._idx[local]

    def blocks(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Yield ``(offset, raw (B, d), csq (B,))`` for local rows [start, stop) in blocks.

        ``offset`` is the local position of the block's first row (use ``global_index``).
        """
        stop = self.M if stop is None else stop
        for a in range(start, stop, self.block_rows):
            b = min(stop, a + self.block_rows)
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
        rows = self._load_rows(flat.cpu().numpy())
        return rows.to(self.device)

    def _load_rows(self, local: np.ndarray) -> torch.Tensor:
        glob = local if self.index is None else self.index[local]
        return self.dataset.raw_rows(glob)
