"""Storage dtypes of training rows: the one table that the dataset, the row sources and
the backends read.

Rows are stored raw as uint8 (images), float16, bfloat16 or float32. numpy has no
bfloat16, so bfloat16 rows live in numpy as their uint16 bit patterns and torch reads
them back through a view; every conversion between the two goes through this module.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import DtypeError

__all__ = ["StorageDtype", "STORAGE_DTYPES", "DTYPE_NAMES", "FLOAT_DTYPE_NAMES", "storage_dtype", "by_numpy", "to_torch", "to_numpy",
           "bf16_bits_to_f32", "to_float64"]


@dataclass(frozen=True)
class StorageDtype:
    """One storage dtype.

    name:  "uint8", "float16", "bfloat16" or "float32" (``Dataset.dtype``).
    numpy: dtype of the numpy array that holds the rows (uint16 bit patterns for bfloat16).
    torch: dtype of the tensors rows are served in (``Dataset.raw_block``).
    bits:  torch dtype with the same bytes as ``numpy`` (int16 for bfloat16): a buffer of
           it can be viewed as either side without a copy.
    code:  the number the compiled kernels use for it (csrc/cuda/binding.cu).
    """

    name: str
    numpy: np.dtype
    torch: torch.dtype
    bits: torch.dtype
    code: int

    @property
    def itemsize(self) -> int:
        """Bytes per stored value."""
        return self.numpy.itemsize


STORAGE_DTYPES: dict[str, StorageDtype] = {
    "uint8": StorageDtype("uint8", np.dtype(np.uint8), torch.uint8, torch.uint8, 0),
    "float16": StorageDtype("float16", np.dtype(np.float16), torch.float16, torch.float16, 1),
    "bfloat16": StorageDtype("bfloat16", np.dtype(np.uint16), torch.bfloat16, torch.int16, 2),
    "float32": StorageDtype("float32", np.dtype(np.float32), torch.float32, torch.float32, 3),
}

#: The storage dtype names, in the order of the table.
DTYPE_NAMES = tuple(STORAGE_DTYPES)
#: The floating storage dtypes (float data can be stored in any of them).
FLOAT_DTYPE_NAMES = tuple(n for n in DTYPE_NAMES if n != "uint8")


def storage_dtype(name, what: str = "dtype") -> StorageDtype:
    """The table entry of ``name``; DtypeError naming ``what`` for anything else."""
    entry = STORAGE_DTYPES.get(name) if isinstance(name, str) else None
    if entry is None:
        raise DtypeError(f"{what}: expected one of {DTYPE_NAMES}, got {name!r}")
    return entry


def by_numpy(np_dtype) -> StorageDtype:
    """The entry whose numpy storage dtype is ``np_dtype`` (uint16 means bfloat16 bits)."""
    dt = np.dtype(np_dtype)
    for entry in STORAGE_DTYPES.values():
        if entry.numpy == dt:
            return entry
    raise DtypeError(f"np_dtype: {dt} is not the storage of any of {DTYPE_NAMES}")


def to_torch(arr: np.ndarray, name: str) -> torch.Tensor:
    """Raw numpy rows (uint16 bits for bfloat16) -> a tensor in the storage dtype, sharing memory."""
    entry = storage_dtype(name)
    if entry.bits != entry.torch:
        arr = arr.view(np.int16)
    with warnings.catch_warnings():
        # Blocks of a read-only memmap are shared, not copied; callers must not write into them.
        warnings.filterwarnings("ignore", message=".*not writable.*")
        t = torch.from_numpy(arr)
    return t.view(entry.torch) if entry.bits != entry.torch else t


def to_numpy(raw: torch.Tensor) -> np.ndarray:
    """Raw rows as a C-contiguous CPU numpy array (bfloat16 as its int16 bits): what the
    C++ kernels read."""
    t = raw.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return np.ascontiguousarray(t.numpy())


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16, any shape) -> float32 values, same shape."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def to_float64(block: np.ndarray, name: str) -> np.ndarray:
    """A raw numpy block (k, d) of storage dtype ``name`` -> float64 (k, d) raw values."""
    if name == "bfloat16":
        return bf16_bits_to_f32(block).astype(np.float64)
    return block.astype(np.float64)
