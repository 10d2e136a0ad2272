"""Anonymize stage: transmitter addresses become keyed device ids, then are wiped.

A device id is SipHash-2-4 of the 6 address bytes under the current :class:`EpochKey`,
computed by a vectorised numba kernel that equals ``nacl.hash.siphash24`` (libsodium's
``crypto_shorthash``) bit for bit. The model fingerprint from the parser is keyed the
same way (SipHash of its 8 little-endian bytes), so neither can be compared across
epochs or sensors. The address array is overwritten with zeros as soon as it is hashed.

The key is 16 bytes from the kernel's random source read straight into a numpy array (no
immutable copy is ever made) that :meth:`EpochKey.wipe` overwrites. It is never written to
disk, logged or sent. (The epoch's public label is not drawn here: it is computed from
public values, :func:`firmware_agent.stages.privacy.epoch_label`.)
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from firmware_agent.kernels import kernel
from firmware_agent.stages import memlock
from firmware_agent.stages.batch import KIND_NO_SA, DeviceBatch, ProbeBatch

__all__ = ["EpochKey", "anonymize", "siphash24_mac", "siphash24_u64"]

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_C0 = np.uint64(0x736F6D6570736575)
_C1 = np.uint64(0x646F72616E646F6D)
_C2 = np.uint64(0x6C7967656E657261)
_C3 = np.uint64(0x7465646279746573)


class EpochKey:
    """A random 128-bit SipHash key that lives in memory only, for one epoch."""

    __slots__ = ("_words",)

    def __init__(self) -> None:
        # Read straight into the array: no bytes object (which cannot be wiped) ever holds it.
        # Its page is locked: never swapped out, left out of core dumps (memlock).
        self._words = memlock.locked_words(2)
        with open("/dev/urandom", "rb", buffering=0) as urandom:
            if urandom.readinto(self._words.data.cast("B")) != 16:
                raise OSError("/dev/urandom gave fewer than 16 bytes")

    @property
    def words(self) -> NDArray[np.uint64]:
        """The key as two little-endian 64-bit words (k0, k1), as SipHash reads it."""
        return self._words

    def wipe(self) -> None:
        """Overwrite the key in place and unlock its page; the object is useless afterwards."""
        memlock.release(self._words)

    def __repr__(self) -> str:
        return "EpochKey(key=<hidden>)"


@kernel(inline=True)
def _rotl(x: np.uint64, b: int) -> np.uint64:
    return ((x << np.uint64(b)) | (x >> np.uint64(64 - b))) & _M64


@kernel(inline=True)
def _sipround(
    v0: np.uint64, v1: np.uint64, v2: np.uint64, v3: np.uint64
) -> tuple[np.uint64, np.uint64, np.uint64, np.uint64]:
    v0 = v0 + v1
    v1 = _rotl(v1, 13) ^ v0
    v0 = _rotl(v0, 32)
    v2 = v2 + v3
    v3 = _rotl(v3, 16) ^ v2
    v0 = v0 + v3
    v3 = _rotl(v3, 21) ^ v0
    v2 = v2 + v1
    v1 = _rotl(v1, 17) ^ v2
    v2 = _rotl(v2, 32)
    return v0, v1, v2, v3


@kernel(inline=True)
def _siphash_blocks(k: NDArray[np.uint64], m: np.uint64, full: bool, tail: np.uint64) -> np.uint64:
    """SipHash-2-4 of at most one full 8-byte block ``m`` followed by the final ``tail``."""
    v0 = k[0] ^ _C0
    v1 = k[1] ^ _C1
    v2 = k[0] ^ _C2
    v3 = k[1] ^ _C3
    if full:
        v3 ^= m
        v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
        v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
        v0 ^= m
    v3 ^= tail
    v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
    v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
    v0 ^= tail
    v2 ^= np.uint64(0xFF)
    for _ in range(4):
        v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
    return v0 ^ v1 ^ v2 ^ v3


@kernel(inline=True)
def _hash_mac(mac: NDArray[np.uint8], i: int, k: NDArray[np.uint64]) -> np.uint64:
    tail = np.uint64(6) << np.uint64(56)
    for b in range(6):
        tail |= np.uint64(mac[i, b]) << np.uint64(8 * b)
    return _siphash_blocks(k, np.uint64(0), False, tail)


@kernel(inline=True)
def _hash_u64(value: np.uint64, k: NDArray[np.uint64]) -> np.uint64:
    return _siphash_blocks(k, value, True, np.uint64(8) << np.uint64(56))


@kernel(export="void(u1[:, :], u8[:], u8[:])")
def siphash24_mac(mac: NDArray[np.uint8], k: NDArray[np.uint64], out: NDArray[np.uint64]) -> None:
    """out[i] = SipHash-2-4 of the 6 bytes mac[i] under k; then mac is zeroed."""
    for i in range(mac.shape[0]):
        out[i] = _hash_mac(mac, i, k)
        mac[i, :] = 0


@kernel(export="void(u8[:], u8[:], u8[:])")
def siphash24_u64(
    values: NDArray[np.uint64], k: NDArray[np.uint64], out: NDArray[np.uint64]
) -> None:
    """out[i] = SipHash-2-4 of the 8 little-endian bytes of values[i] under k."""
    for i in range(values.shape[0]):
        out[i] = _hash_u64(values[i], k)


@kernel(export="void(u1[:], u1[:, :], u8[:], u8[:], u8[:], u1[:], u8[:])")
def _key_rows(
    kind: NDArray[np.uint8],
    mac: NDArray[np.uint8],
    fp: NDArray[np.uint64],
    k: NDArray[np.uint64],
    device: NDArray[np.uint64],
    randomised: NDArray[np.uint8],
    keyed_fp: NDArray[np.uint64],
) -> None:
    """One pass over the rows: ids, randomised flags, keyed fingerprints; addresses zeroed."""
    for i in range(kind.shape[0]):
        randomised[i] = (mac[i, 0] >> 1) & 1
        zero = np.uint64(0)  # a bare 0 would unify with uint64 as float64
        device[i] = zero if kind[i] & KIND_NO_SA else _hash_mac(mac, i, k)
        mac[i, :] = 0
        keyed_fp[i] = zero if fp[i] == zero else _hash_u64(fp[i], k)


def anonymize(probes: ProbeBatch, key: EpochKey) -> DeviceBatch:
    """Key every address and fingerprint; the batch's address array is zeroed."""
    n = len(probes)
    device = np.empty(n, np.uint64)
    randomised = np.empty(n, np.uint8)
    fp = np.empty(n, np.uint64)
    _key_rows(probes.kind, probes.mac, probes.fp, key.words, device, randomised, fp)
    return DeviceBatch(
        kind=probes.kind,
        ts_ns=probes.ts_ns,
        device=device,
        randomised=randomised,
        seq=probes.seq,
        rssi=probes.rssi,
        fp=fp,
        frames=probes.frames,
    )
