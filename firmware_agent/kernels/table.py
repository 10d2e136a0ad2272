"""Keyed rows: an open-addressing hash table of numpy arrays, for numba kernels.

The count and estimate stages each keep, for the current epoch only, rows keyed by keyed
64-bit ids (device ids, fingerprints). A key of 0 marks an empty slot, so callers store an
id of 0 as 1. Kernels find a key's slot with :func:`slot` (linear probing; the ids are
SipHash outputs, uniform, so the low bits index well) and insert by writing the key.
:class:`KeyedRows` doubles a table once its owner finds it half full, and wipes in place.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from firmware_agent.kernels import kernel

__all__ = ["KeyedRows", "rehash", "slot"]


@kernel(inline=True)
def slot(keys: NDArray[np.uint64], key: np.uint64) -> int:
    """The slot holding ``key``, or the empty slot where it belongs."""
    mask = keys.shape[0] - 1
    i = np.int64(key & np.uint64(mask))
    while keys[i] != 0 and keys[i] != key:
        i = (i + 1) & mask
    return i


@kernel(export="void(u8[:], i8[:, :], u8[:], i8[:, :])")
def rehash(
    keys: NDArray[np.uint64],
    rows: NDArray[np.int64],
    new_keys: NDArray[np.uint64],
    new_rows: NDArray[np.int64],
) -> None:
    for i in range(keys.shape[0]):
        if keys[i] != 0:
            j = slot(new_keys, keys[i])
            new_keys[j] = keys[i]
            new_rows[j, :] = rows[i, :]


class KeyedRows:
    """``keys[i]`` owns ``rows[i]`` (int64 columns); capacity is a power of two."""

    __slots__ = ("keys", "rows")

    def __init__(self, capacity: int, columns: int) -> None:
        if capacity < 1 or capacity & (capacity - 1):
            raise ValueError(f"capacity must be a power of two, got {capacity}")
        self.keys = np.zeros(capacity, np.uint64)
        self.rows = np.zeros((capacity, columns), np.int64)

    @property
    def capacity(self) -> int:
        return int(self.keys.shape[0])

    def grown(self) -> KeyedRows:
        """A table twice the size with the same rows; this one is wiped."""
        bigger = KeyedRows(self.capacity * 2, self.rows.shape[1])
        rehash(self.keys, self.rows, bigger.keys, bigger.rows)
        self.wipe()
        return bigger

    def wipe(self) -> None:
        """Overwrite every key and row in place."""
        self.keys.fill(0)
        self.rows.fill(0)
