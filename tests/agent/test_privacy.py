"""Privacy invariants as tests: no address, SSID or key leaves a replay, in any encoding,
in either privacy mode (more in tests/agent/test_privacy_modes.py and tests/agent/test_audit.py).

Every shared capture is replayed through the real command line with INFO logging (counts,
the estimate stage's people_est, and its signal-threshold log lines included), from an
empty working directory. Everything it prints (stdout, stderr) and every file it leaves is
searched for every address in the capture (all address fields of all frames) in colon,
dash and plain hex, either case, as raw bytes, in base64, and as unkeyed MD5/SHA-1/SHA-256
of the six bytes and of the colon text; for every non-empty SSID; and for every epoch key
that was created, as hex, base64 or raw bytes.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest

from firmware_agent import cli
from firmware_agent.contract.errors import CaptureError
from firmware_agent.stages.batch import LINKTYPE_IEEE802_11, LINKTYPE_RADIOTAP
from firmware_agent.stages.capture import CaptureReader
from firmware_agent.stages.privacy import MODES
from tests.support.shared import shared_capture_names

TestT = TypeVar("TestT", bound=Callable[..., None])


def _secrets_of(path: Path) -> tuple[set[bytes], set[bytes]]:
    """All addresses (6 bytes) and non-empty SSIDs in a capture, read independently."""
    macs: set[bytes] = set()
    ssids: set[bytes] = set()
    try:
        with CaptureReader(path) as reader:
            for batch in reader:
                for off, length, lt in zip(
                    batch.offsets, batch.lengths, batch.link_types, strict=True
                ):
                    frame = bytes(batch.data[off : off + length])
                    if lt == LINKTYPE_RADIOTAP and len(frame) >= 4:
                        frame = frame[struct.unpack_from("<H", frame, 2)[0] :]
                    elif lt != LINKTYPE_IEEE802_11:
                        continue
                    for start in (4, 10, 16):
                        if len(frame) >= start + 6:
                            macs.add(frame[start : start + 6])
                    if len(frame) > 26 and frame[0] == 0x40 and frame[24] == 0 and frame[25] >= 4:
                        ssids.add(frame[26 : 26 + frame[25]])
    except CaptureError:
        pass
    macs.discard(b"\xff" * 6)
    macs.discard(bytes(6))
    return macs, ssids


def _encodings(mac: bytes) -> list[bytes]:
    hexes = [mac.hex(sep) for sep in (":", "-")] + [mac.hex()]
    texts = hexes + [h.upper() for h in hexes]
    out = [t.encode() for t in texts] + [mac, base64.b64encode(mac), base64.b64encode(mac)[:7]]
    for digest in (hashlib.md5, hashlib.sha1, hashlib.sha256):
        out.append(digest(mac).hexdigest().encode())
        out.append(digest(mac.hex(":").encode()).hexdigest().encode())
    return out


def _key_encodings(words: np.ndarray) -> list[bytes]:
    raw = words.astype("<u8").tobytes()
    return [raw, raw.hex().encode(), raw.hex().upper().encode(), base64.b64encode(raw)]


def u64_hits(blob: bytes, wanted: np.ndarray) -> int:
    """How many of the 8-byte runs of ``blob``, at any offset, read little endian, are in
    ``wanted`` (a sorted uint64 array)."""
    if not len(wanted):
        return 0
    low = np.zeros(1 << 16, bool)  # a first sieve on the low 16 bits: few runs pass it
    low[wanted & np.uint64(0xFFFF)] = True
    data = np.frombuffer(blob, np.uint8)
    hits = 0
    for offset in range(8):
        words = data[offset : offset + (len(data) - offset) // 8 * 8].view("<u8")
        candidates = words[low[words.view("<u2")[::4]]]
        at = np.minimum(np.searchsorted(wanted, candidates), len(wanted) - 1)
        hits += int(np.count_nonzero(wanted[at] == candidates))
    return hits


def _leaks(blob: bytes, macs: set[bytes]) -> bool:
    lowered = blob.lower()
    return any(n in blob or n.lower() in lowered for mac in macs for n in _encodings(mac))


@pytest.mark.parametrize(
    "text",
    [
        "seen A4-5E-60-01-02-03 here",
        "id=a45e60010203",
        "b64=pF5gAQID",
        "md5 " + hashlib.md5(bytes.fromhex("a45e60010203")).hexdigest(),
        "sha256 " + hashlib.sha256(b"a4:5e:60:01:02:03").hexdigest(),
    ],
)
def test_leak_detector_finds_each_encoding(text: str) -> None:
    mac = bytes.fromhex("a45e60010203")
    assert _leaks(text.encode(), {mac})
    assert _leaks(b"raw " + mac, {mac})
    assert not _leaks(b"window_start 2023-02-08T11:40:00Z devices 88", {mac})


# The start of a child process's script: every epoch key drawn goes into ``keys`` as the hex
# of its two words ("k0 k1"), for the child to print.
RECORD_KEYS_CHILD = textwrap.dedent(
    """
    from firmware_agent.stages import anonymize

    keys = []
    original = anonymize.EpochKey.__init__
    def remember(self):
        original(self)
        keys.append(" ".join(f"{w:016x}" for w in self.words.tolist()))
    anonymize.EpochKey.__init__ = remember
    """
)


def on_shared_captures_in_both_modes(test: TestT) -> TestT:
    """Run ``test`` for every shared capture (``name``) in both privacy modes (``mode``)."""
    for mark in (
        pytest.mark.parametrize("name", shared_capture_names()),
        pytest.mark.parametrize("mode", MODES),
        pytest.mark.shared,
    ):
        test = mark(test)
    return test


@on_shared_captures_in_both_modes
def test_replay_leaks_no_address_ssid_or_key(
    name: str,
    mode: str,
    pcaps_dir: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    recorded_keys: list[np.ndarray],
) -> None:
    capture = pcaps_dir / name
    macs, ssids = _secrets_of(capture)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FOOTFALL_PRIVACY_MODE", mode)
    cli.main(["-v", "replay", str(capture)])
    out, err = capfd.readouterr()
    if '"window_start"' in out and mode == "standard":  # the people stage and its logs too
        assert '"arrivals"' in out and '"occupancy_mean"' in out and '"static_excluded"' in out
    # The capture's own file name may contain an SSID ("linksys"): it is not a leak.
    blobs = {"stdout": out.encode(), "stderr": err.replace(str(capture), "<capture>").encode()}
    for root, _dirs, files in os.walk(tmp_path):
        for file in files:
            blobs[file] = (Path(root) / file).read_bytes()
    for where, blob in blobs.items():
        assert not _leaks(blob, macs), f"an address of {name} appears in {where}"
        for ssid in ssids:
            assert ssid not in blob, f"an SSID of {name} appears in {where}"
        for words in recorded_keys:
            for needle in _key_encodings(words):
                assert needle not in blob, f"an epoch key appears in {where}"
