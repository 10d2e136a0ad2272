"""Secrets in memory that must not reach swap or a core dump: page-locked word arrays.

:func:`locked_words` maps a private anonymous page (or more) of its own, so that locking and
unlocking it never touches another object's memory, marks it ``MADV_DONTDUMP`` (left out of
core dumps) and locks it with ``mlock(2)`` (never paged out to swap). :func:`release` zeroes
the words and unlocks the page; the mapping goes when the last reference to the array does.

Locking is best effort: without ``CAP_IPC_LOCK`` a process may lock ``RLIMIT_MEMLOCK`` bytes
(8 MiB by default on current systemd; one page per epoch key is needed), and a failure is
logged as a warning, once per reason, and the words are used unlocked.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import os

import numpy as np
from numpy.typing import NDArray

__all__ = ["locked_words", "release"]

log = logging.getLogger("footfall.agent")

_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
for _name in ("mlock", "munlock"):
    getattr(_LIBC, _name).argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    getattr(_LIBC, _name).restype = ctypes.c_int
_WARNED: set[int] = set()  # errno values already logged


def _span(words: NDArray[np.uint64]) -> tuple[int, int]:
    """The page-aligned start and length of the pages holding ``words``."""
    start = int(words.__array_interface__["data"][0])
    first = start - start % mmap.PAGESIZE
    end = -(-(start + words.nbytes) // mmap.PAGESIZE) * mmap.PAGESIZE
    return first, end - first


def locked_words(n: int) -> NDArray[np.uint64]:
    """``n`` zeroed 64-bit words on locked pages of their own (best effort, see above)."""
    size = -(-max(n * 8, 1) // mmap.PAGESIZE) * mmap.PAGESIZE
    pages = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    pages.madvise(mmap.MADV_DONTDUMP)
    words: NDArray[np.uint64] = np.frombuffer(pages, np.uint64, count=n)
    if _LIBC.mlock(*_span(words)) != 0:
        errno = ctypes.get_errno()
        if errno not in _WARNED:
            _WARNED.add(errno)
            log.warning(
                "could not lock the epoch key's memory page (mlock: %s): it may be paged out "
                "to swap; raise RLIMIT_MEMLOCK (systemd: LimitMEMLOCK) or run without swap",
                os.strerror(errno),
            )
    return words


def release(words: NDArray[np.uint64]) -> None:
    """Zero ``words`` in place, then unlock their pages."""
    words[:] = 0
    _LIBC.munlock(*_span(words))
