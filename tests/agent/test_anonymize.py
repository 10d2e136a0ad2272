"""The numba SipHash kernels equal libsodium's crypto_shorthash bit for bit."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.encoding import RawEncoder
from nacl.hash import siphash24

from firmware_agent.stages.anonymize import EpochKey, anonymize, siphash24_mac, siphash24_u64
from firmware_agent.stages.batch import KIND_NO_SA, KIND_PROBE, ProbeBatch


def _nacl(message: bytes, key: bytes) -> int:
    return int.from_bytes(siphash24(message, key=key, encoder=RawEncoder), "little")


def _words(key: bytes) -> np.ndarray:
    return np.frombuffer(key, dtype="<u8").astype(np.uint64)


@settings(max_examples=300, deadline=None)
@given(
    macs=st.lists(st.binary(min_size=6, max_size=6), min_size=1, max_size=20),
    key=st.binary(min_size=16, max_size=16),
)
def test_mac_hash_equals_libsodium_siphash24(macs: list[bytes], key: bytes) -> None:
    arr = np.frombuffer(b"".join(macs), np.uint8).reshape(-1, 6).copy()
    out = np.empty(len(macs), np.uint64)
    siphash24_mac(arr, _words(key), out)
    assert [int(v) for v in out] == [_nacl(m, key) for m in macs]


@settings(max_examples=300, deadline=None)
@given(
    values=st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=20),
    key=st.binary(min_size=16, max_size=16),
)
def test_u64_hash_equals_libsodium_siphash24_of_le_bytes(values: list[int], key: bytes) -> None:
    arr = np.array(values, np.uint64)
    out = np.empty(len(values), np.uint64)
    siphash24_u64(arr, _words(key), out)
    assert [int(v) for v in out] == [_nacl(v.to_bytes(8, "little"), key) for v in values]


def test_mac_array_is_zeroed_once_hashed() -> None:
    arr = np.arange(60, dtype=np.uint8).reshape(10, 6)
    siphash24_mac(arr, _words(bytes(range(16))), np.empty(10, np.uint64))
    assert not arr.any()


def _probes(macs: np.ndarray, kind: np.ndarray) -> ProbeBatch:
    n = macs.shape[0]
    return ProbeBatch(
        kind=kind.astype(np.uint8),
        ts_ns=np.arange(n, dtype=np.int64),
        mac=macs,
        seq=np.zeros(n, np.uint16),
        rssi=np.zeros(n, np.int16),
        freq_mhz=np.zeros(n, np.uint16),
        ssid=np.zeros(n, np.uint8),
        fp=np.arange(n, dtype=np.uint64),
        frames=n,
    )


def test_anonymize_keys_ids_flags_randomised_and_wipes_addresses() -> None:
    macs = np.array([[0x02, 1, 2, 3, 4, 5], [0x00, 1, 2, 3, 4, 5], [0, 0, 0, 0, 0, 0]], np.uint8)
    kind = np.array([KIND_PROBE, KIND_PROBE, KIND_PROBE | KIND_NO_SA])
    key = EpochKey()
    expected = [_nacl(bytes(m), key.words.astype("<u8").tobytes()) for m in macs[:2]]
    batch = anonymize(_probes(macs, kind), key)
    assert [int(d) for d in batch.device[:2]] == expected
    assert batch.device[2] == 0
    assert batch.randomised.tolist() == [1, 0, 0]
    assert batch.fp[0] == 0  # an unparsed fingerprint stays 0
    assert not macs.any()


def test_a_new_epoch_key_gives_unlinkable_ids() -> None:
    mac = bytes([0x02, 9, 8, 7, 6, 5])
    a, b = EpochKey(), EpochKey()
    ids = []
    for key in (a, b):
        out = np.empty(1, np.uint64)
        siphash24_mac(np.frombuffer(mac, np.uint8).reshape(1, 6).copy(), key.words, out)
        ids.append(int(out[0]))
    assert ids[0] != ids[1]


def test_key_is_wiped_in_place_and_never_shown() -> None:
    key = EpochKey()
    words = key.words
    assert words.any()
    assert "hidden" in repr(key)
    assert words.astype("<u8").tobytes().hex() not in repr(key)
    key.wipe()
    assert not words.any()
