"""Keyed rows: an open-addressing hash table of numpy arrays, for numba kernels.

The count and estimate stages each keep, for the current epoch only, rows keyed by keyed
64-bit ids (device ids, fingerprints). A key of 0 marks an empty slot, so callers store an
id of 0 as 1. Kernels find a key's slot with :func:`slot` (linear probing; the ids are
SipHash outputs, uniform, so the low bits index well) and insert by writing the key.
:class:`KeyedRows` doubles a table once its owner finds it half full (in place, within a
reserve), and wipes in place. After its owner zeroes some keys (eviction),
:meth:`KeyedRows.rehash_in_place` moves the rest to where :func:`slot` looks for them within the
same arrays: no second table of the same size.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from firmware_agent.kernels import kernel

__all__ = ["KeyedRows", "rehash", "rehash_in_place", "slot"]


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


@kernel(export="void(u8[:], i8[:, :], u1[:])")
def rehash_in_place(
    keys: NDArray[np.uint64], rows: NDArray[np.int64], placed: NDArray[np.uint8]
) -> None:
    """Move every key (and its row) to where :func:`slot` finds it, within the same arrays.

    ``placed`` (one byte a slot) marks the slots already settled. A key is carried from its
    slot to the first slot from its home that is empty or holds a key not yet settled; it
    settles there, and a key it displaces is carried on. Settled slots are never emptied, so
    every key settles behind an unbroken run of settled keys from its home: what ``slot``
    needs. Each key settles once: O(keys) moves plus the probes. A slot left empty gets a row
    of zeros, as a wiped table's (the count kernel relies on it for a new key's row).
    """
    mask = keys.shape[0] - 1
    placed[:] = 0
    carry = np.empty(rows.shape[1], np.int64)
    other = np.empty(rows.shape[1], np.int64)
    for i in range(keys.shape[0]):
        if keys[i] == 0 or placed[i]:
            continue
        key = keys[i]
        carry[:] = rows[i, :]
        keys[i] = 0
        rows[i, :] = 0
        while True:
            j = np.int64(key & np.uint64(mask))
            while keys[j] != 0 and placed[j]:
                j = (j + 1) & mask
            placed[j] = 1
            if keys[j] == 0:
                keys[j] = key
                rows[j, :] = carry
                break
            displaced = keys[j]
            other[:] = rows[j, :]
            keys[j] = key
            rows[j, :] = carry
            key = displaced
            carry[:] = other


class KeyedRows:
    """``keys[i]`` owns ``rows[i]`` (int64 columns); capacity is a power of two.

    With ``reserve`` (a power of two) the arrays are allocated at that many slots at once and
    the table is their first ``capacity``: :meth:`grown` then doubles in place, up to the
    reserve. ``np.zeros`` takes large blocks from ``mmap``, whose pages cost memory only once
    written, so the unused tail costs address space, not RSS; growing into a second table
    while the first is alive took 1.5 times the grown table (the count stage's last doubling,
    to 524,288 slots: 69 MB for a moment, the busy day's peak once eviction stopped copying).
    Where the system refuses the reserve (Linux's default overcommit refuses a mapping larger
    than RAM and swap: ``count.max_devices`` of millions on a Pi) the table has none and grows
    into a new one, as before.
    """

    __slots__ = ("_all_keys", "_all_rows", "keys", "rows")

    def __init__(self, capacity: int, columns: int, reserve: int = 0) -> None:
        if capacity < 1 or capacity & (capacity - 1):
            raise ValueError(f"capacity must be a power of two, got {capacity}")
        try:
            self._all_keys = np.zeros(max(capacity, reserve), np.uint64)
            self._all_rows = np.zeros((max(capacity, reserve), columns), np.int64)
        except MemoryError:  # address space refused (a ceiling far above the RAM): no reserve
            self._all_keys = np.zeros(capacity, np.uint64)
            self._all_rows = np.zeros((capacity, columns), np.int64)
        self.keys = self._all_keys[:capacity]
        self.rows = self._all_rows[:capacity]

    @property
    def capacity(self) -> int:
        return int(self.keys.shape[0])

    def grown(self) -> KeyedRows:
        """A table twice the size with the same rows: this one, within its reserve; else a
        new one, and this one is wiped."""
        capacity = self.capacity * 2
        if capacity <= self._all_keys.shape[0]:
            self.keys = self._all_keys[:capacity]
            self.rows = self._all_rows[:capacity]
            self.rehash_in_place()
            return self
        bigger = KeyedRows(capacity, self.rows.shape[1])
        rehash(self.keys, self.rows, bigger.keys, bigger.rows)
        self.wipe()
        return bigger

    def rehash_in_place(self) -> None:
        """After keys were zeroed or the table grew: every row where :func:`slot` finds it.

        Eviction in the count stage used to rehash into a second table of the same size; at
        the default ceiling (524,288 slots x 88 B) that doubled the table's 46 MB for a moment.
        This needs one byte a slot."""
        rehash_in_place(self.keys, self.rows, np.zeros(self.capacity, np.uint8))

    def wipe(self) -> None:
        """Overwrite every key and row in place (the reserve beyond them was never written)."""
        self.keys.fill(0)
        self.rows.fill(0)
