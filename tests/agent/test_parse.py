"""The numba parse stage equals its plain-Python twin frame by frame, and stays in bounds.

``tests/support/reference_parse.py`` is written from the formats' specifications (radiotap, Prism,
AVS, PPI, 802.11) and the parse stage's documented row rules; every test here holds
:func:`firmware_agent.stages.parse.parse_batch` to it:

* generated frames (hypothesis draws a seed, a ``random.Random`` builds a few hundred frames
  from it): radiotap headers with random fields, alignment, extended presence bitmaps and
  wrong lengths; random frame control, elements, truncation and garbage; Prism, AVS, PPI;
* the same frames inside a buffer of poison bytes (and, in tests/integration/test_parse_bounds.py,
  every generated and real frame alone at a PROT_NONE page, compiled afresh with
  ``NUMBA_BOUNDSCHECK=1``: an index past the end raises, any other stray read faults);
* every frame of every shared real capture;
* one test per documented behaviour, and one per place where parse.py departs from a
  format's specification (those fail until parse.py follows the specification).

Failure messages show generated frames in hex; for real frames they name the capture, the
frame number and the differing fields, never a MAC or an SSID.
"""

from __future__ import annotations

import functools
import random
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.dot11 import RadioTap
from scapy.packet import Raw

from firmware_agent.contract.errors import NotACaptureError
from firmware_agent.stages.batch import (
    KIND_FCS_BAD,
    KIND_MALFORMED,
    KIND_NO_SA,
    KIND_PROBE,
    LINKTYPE_AVS,
    LINKTYPE_IEEE802_11,
    LINKTYPE_PPI,
    LINKTYPE_PRISM,
    LINKTYPE_RADIOTAP,
    RSSI_MISSING,
    SSID_DIRECTED,
    SSID_NONE,
    SSID_WILDCARD,
    FrameBatch,
    ProbeBatch,
)
from firmware_agent.stages.capture import CaptureReader
from firmware_agent.stages.parse import parse_batch
from tests.support import reference_parse as ref
from tests.support.reference_parse import Row, reference_parse
from tests.support.shared import REQUIRE_SHARED, SHARED, shared_capture_names

Frame = tuple[bytes, int]  # frame bytes, link type
FUZZ = settings(max_examples=25, deadline=None)
FRAMES_PER_EXAMPLE = 300


# --- batches and rows ---------------------------------------------------------------------


def frame_batch(
    frames: Sequence[Frame], *, gap: Callable[[int], int] | None = None, poison: int = 0
) -> FrameBatch:
    """A FrameBatch of these frames; gap(i) poison bytes before frame i (and after the last)."""
    data = bytearray()
    offsets = []
    for i, (frame, _) in enumerate(frames):
        data += bytes([poison]) * (gap(i) if gap else 0)
        offsets.append(len(data))
        data += frame
    data += bytes([poison]) * (gap(len(frames)) if gap else 0)
    return FrameBatch(
        data=np.frombuffer(bytes(data), np.uint8).copy(),
        offsets=np.array(offsets, np.int64),
        lengths=np.array([len(frame) for frame, _ in frames], np.int32),
        ts_ns=np.arange(1, len(frames) + 1, dtype=np.int64) * 1_000_000_007,
        link_types=np.array([link for _, link in frames], np.uint16),
    )


def rows_of(probes: ProbeBatch) -> list[Row]:
    return [
        Row(
            kind=int(probes.kind[i]),
            ts_ns=int(probes.ts_ns[i]),
            mac=probes.mac[i].tobytes(),
            seq=int(probes.seq[i]),
            rssi=int(probes.rssi[i]),
            freq_mhz=int(probes.freq_mhz[i]),
            ssid=int(probes.ssid[i]),
            fp=int(probes.fp[i]),
        )
        for i in range(len(probes))
    ]


def reference_rows(batch: FrameBatch) -> list[Row]:
    data = batch.data.tobytes()
    rows = []
    for i in range(len(batch)):
        start = int(batch.offsets[i])
        frame = data[start : start + int(batch.lengths[i])]
        row = reference_parse(frame, int(batch.link_types[i]), int(batch.ts_ns[i]))
        if row is not None:
            rows.append(row)
    return rows


def parse_one(frame: bytes, link_type: int = LINKTYPE_RADIOTAP) -> Row | None:
    """The numba row of one frame, in an array of exactly its length."""
    rows = rows_of(parse_batch(frame_batch([(frame, link_type)])))
    assert len(rows) <= 1
    return rows[0] if rows else None


def differing(got: Row | None, expected: Row | None) -> str:
    if got is None or expected is None:
        return f"numba row {got}, reference row {expected}"
    names = [name for name in Row.__slots__ if getattr(got, name) != getattr(expected, name)]
    return ", ".join(
        f"{n}: numba {getattr(got, n)!r} != reference {getattr(expected, n)!r}" for n in names
    )


def assert_parses_like_reference(frames: Sequence[Frame]) -> None:
    """Every frame's numba row equals the reference row (one batch, then frame by frame)."""
    batch = frame_batch(frames)
    if rows_of(parse_batch(batch)) == reference_rows(batch):
        return
    for frame, link in frames:
        got, expected = parse_one(frame, link), reference_parse(frame, link, 1_000_000_007)
        assert got == expected, f"link type {link}, frame {frame.hex()}: {differing(got, expected)}"
    raise AssertionError("batch rows differ from the reference though each frame agrees alone")


# --- frame builders -----------------------------------------------------------------------


def element(eid: int, body: bytes) -> bytes:
    return bytes((eid, len(body))) + body


HT_CAPS = element(45, bytes.fromhex("ef0917ffff000000000000000000000000000000000000000000"))
VHT_CAPS = element(191, bytes.fromhex("b2798033faff0c03faff0c03"))
RATES = element(1, bytes.fromhex("02040b16"))
EXT_RATES = element(50, bytes.fromhex("0c1218243048606c"))
EXT_CAPS = element(127, bytes.fromhex("0000080400000040"))
WPS = element(221, bytes.fromhex("0050f204") + bytes.fromhex("104a000110103a000100") + bytes(16))
MSFT_OUI = bytes.fromhex("0050f2")


def mpdu(
    *elements: bytes, fc: int = 0x40, flags: int = 0, addr2: bytes = b"\x02" * 6, seq: int = 1234
) -> bytes:
    """An 802.11 management frame (an HT Control field when the Order bit is set)."""
    header = struct.pack("<BBH6s6s6sH", fc, flags, 0, b"\xff" * 6, addr2, b"\xff" * 6, seq << 4)
    if flags & 0x80:
        header += b"\x00\x00\x00\x00"
    return header + b"".join(elements)


def radiotap(
    fields: dict[int, bytes], *, it_len: int | None = None, words: Sequence[int] = ()
) -> bytes:
    """A radiotap header with these first-namespace fields (aligned) and extra presence words."""
    present = sum(1 << bit for bit in fields) | (ref.RT_EXT if words else 0)
    body = bytearray(struct.pack("<I", present))
    for word in words:
        body += struct.pack("<I", word)
    for bit in sorted(fields):
        align, size = ref.RADIOTAP_FIELDS[bit]
        assert len(fields[bit]) == size
        body += bytes(-(4 + len(body)) % align) + fields[bit]
    length = 4 + len(body) if it_len is None else it_len
    return struct.pack("<BBH", 0, 0, length) + bytes(body)


def rt_signal(dbm: int, *, flags: int = 0, freq: int = 2437) -> bytes:
    """The usual sensor header: flags, channel, antenna signal."""
    return radiotap(
        {1: bytes([flags]), 3: struct.pack("<HH", freq, 0x00A0), 5: struct.pack("<b", dbm)}
    )


def prism_header(
    *, order: str = "<", msgcode: int = 0x44, channel: int = 6, rssi: int = -60
) -> bytes:
    """A 144-byte Prism header with the DIDs of its msgcode's family."""
    if msgcode == 0x41:
        did: Callable[[int], int] = lambda n: n << 12 | 0x041  # noqa: E731
    else:
        did = lambda n: n << 16 | 0x0044  # noqa: E731
    values = {3: channel, 4: rssi & 0xFFFFFFFF}
    items = b"".join(
        struct.pack(order + "IHHI", did(n), 0, 4, values.get(n, 0)) for n in range(1, 11)
    )
    return struct.pack(order + "II16s", msgcode, 144, b"wlan0") + items


def avs_header(
    *, channel: int = 6, ssi_type: int = 2, signal: int = -60, length: int = 64
) -> bytes:
    fixed = struct.pack(
        ">IIQQIIIIIIiiII",
        0x80211001,
        length,
        0,
        0,
        2,
        channel,
        20,
        0,
        0,
        ssi_type,
        signal,
        -95,
        0,
        0,
    )
    return fixed + bytes(length - len(fixed))


def ppi_common(*, flags: int = 0, freq: int = 2437, hop_set: int = 0, signal: int = -60) -> bytes:
    data = struct.pack("<QHHHHBBbb", 0, flags, 2, freq, 0x00A0, hop_set, 0, signal, -95)
    return struct.pack("<HH", 2, len(data)) + data


def ppi_header(*fields: bytes, flags: int = 0, dlt: int = LINKTYPE_IEEE802_11) -> bytes:
    body = b"".join(fields)
    return struct.pack("<BBHI", 0, flags, 8 + len(body), dlt) + body


# --- random frames ------------------------------------------------------------------------

OUIS = [MSFT_OUI, bytes.fromhex("001018"), bytes.fromhex("0017f2"), bytes.fromhex("506f9a")]
CHANNELS = [1, 6, 11, 13, 14, 36, 100, 149, 165, 184, 196, 0, 15, 31, 197, 255]
FREQS = [2412, 2437, 2462, 2484, 5180, 5500, 5745, 5955, 0]


def random_element(rng: random.Random) -> bytes:
    """One information element, well formed most of the time."""
    bad = rng.random() < 0.06
    pick = rng.randrange(15)
    if pick == 0:
        size = rng.choice([0, rng.randint(1, 32), rng.randint(33, 40)])
        return element(0, bytes(rng.choice(b"abcdefgh ") for _ in range(size)))
    if pick in (1, 2):  # rates, extended rates
        return element((1, 50)[pick - 1], rng.randbytes(0 if bad else rng.randint(1, 8)))
    if pick == 3:  # DS parameter set
        return element(3, rng.randbytes(rng.choice([0, 2]) if bad else 1))
    if pick == 4:
        return element(45, rng.randbytes(rng.choice([0, 25, 27]) if bad else 26))
    if pick == 5:
        return element(191, rng.randbytes(rng.choice([0, 11, 13]) if bad else 12))
    if pick == 6:
        return element(127, rng.randbytes(0 if bad else rng.randint(1, 10)))
    if pick == 7:
        return element(72, rng.randbytes(2 if bad else 1))
    if pick == 8:
        return element(74, rng.randbytes(13 if bad else 14))
    if pick in (9, 10):  # vendor specific: sometimes too short for an OUI, sometimes OUI only
        size = rng.choice([0, 1, 2]) if bad else rng.choice([3, 4, rng.randint(5, 40)])
        return element(221, (rng.choice(OUIS) + rng.randbytes(40))[:size])
    if pick == 11:  # Cisco's vendor element
        return element(150, rng.randbytes(rng.randint(0, 2) if bad else rng.randint(3, 8)))
    if pick == 12:  # extension: HE / EHT capabilities are fingerprinted, others not
        ext = rng.choice([35, 108, 2, 36, 106, rng.randrange(256)])
        return element(255, b"" if bad else bytes([ext]) + rng.randbytes(rng.randint(0, 30)))
    return element(
        rng.choice([7, 10, 59, 107, 114, 70, rng.randrange(256)]), rng.randbytes(rng.randint(0, 20))
    )


def random_elements(rng: random.Random) -> bytes:
    body = b"".join(random_element(rng) for _ in range(rng.randint(0, 12)))
    roll = rng.random()
    if roll < 0.08:  # an element claiming more than is there
        body += bytes((rng.randrange(256), rng.randint(1, 255))) + rng.randbytes(rng.randint(0, 3))
    elif roll < 0.12:  # one byte left over
        body += rng.randbytes(1)
    return body


def random_mpdu(rng: random.Random) -> bytes:
    fc = (
        0x40
        if rng.random() < 0.8
        else rng.choice([0x50, 0x80, 0x08, 0x88, 0xD4, 0x41, 0x44, 0x42, rng.randrange(256)])
    )
    flags = 0
    roll = rng.random()
    if roll < 0.2:
        flags = 0x80
    elif roll < 0.3:
        flags = rng.randrange(256)
    addr2 = rng.randbytes(6)
    return mpdu(random_elements(rng), fc=fc, flags=flags, addr2=addr2, seq=rng.randrange(4096))


def random_channel(rng: random.Random) -> int:
    return rng.choice(CHANNELS) if rng.random() < 0.9 else rng.getrandbits(32)


def random_signal(rng: random.Random) -> int:
    """A signal in dBm, now and then any 32-bit value."""
    return rng.randint(-100, -20) if rng.random() < 0.85 else rng.getrandbits(32) - (1 << 31)


def random_radiotap(rng: random.Random, *, damage: bool = True) -> tuple[bytes, int]:
    """(radiotap header, its Flags value): random fields 0..22, more presence words, damage."""
    fields: dict[int, bytes] = {}
    flags = 0
    bare = rng.random() < 0.1  # now and then none of the fields 0..5 that the parser reads
    for bit, (_, size) in ref.RADIOTAP_FIELDS.items():
        if rng.random() >= (0.7 if bit in (1, 3, 5) else 0.25) or (bare and bit <= 5):
            continue
        if bit == 1:
            flags = rng.choice([0, 0x10, 0x40, 0x50, 0x02, rng.randrange(256)])
            fields[bit] = bytes([flags])
        elif bit == 3:
            fields[bit] = struct.pack("<HH", rng.choice([*FREQS, rng.randrange(65536)]), 0x00A0)
        elif bit == 5:
            fields[bit] = struct.pack("<b", rng.randint(-128, 127))
        else:
            fields[bit] = rng.randbytes(size)
    words: list[int] = []
    tail = b""
    if rng.random() < 0.3:  # more presence words: radiotap (bit 29) and vendor (bit 30) namespaces
        words = [
            rng.getrandbits(29) | rng.choice([0, 1 << 29, 1 << 30])
            for _ in range(rng.randint(1, 3))
        ]
        words = [word | ref.RT_EXT for word in words[:-1]] + words[-1:]
        tail = rng.randbytes(rng.randint(0, 24))  # the later namespaces' data: never read
    header = bytearray(radiotap(fields, words=words) + tail)
    header[2:4] = struct.pack("<H", len(header))
    if not damage:
        return bytes(header), flags
    roll = rng.random()
    if roll < 0.06:  # the last presence word says another follows, past the header's end
        header[4 + 4 * len(words) + 3] |= 0x80
    elif roll < 0.16:  # it_len wrong, shorter or longer
        header[2:4] = struct.pack("<H", rng.randint(0, len(header) + 40))
    elif roll < 0.19:
        header[0] = rng.randint(1, 255)  # a radiotap version that does not exist
    return bytes(header), flags


def random_avs(rng: random.Random, *, version: int | None = None) -> bytes:
    length = rng.choice([64, 64, 80, rng.randint(0, 100)])
    if version is None:
        version = rng.choice([0x80211001, 0x80211002, rng.getrandbits(32)])
    ssi_type = rng.choice([0, 1, 2, 2, 3])
    fixed = struct.pack(
        ">IIQQIIIIIIiiII",
        *(version, length, 0, 0, 2, random_channel(rng), 20, 0, 0),
        *(ssi_type, random_signal(rng), -95, 0, 0),
    )
    return fixed + rng.randbytes(max(length - len(fixed), 0))


def random_prism(rng: random.Random) -> bytes:
    if rng.random() < 0.15:  # an AVS header under the Prism link type
        return random_avs(rng, version=0x80211001)
    order = "<" if rng.random() < 0.8 else ">"
    msgcode = rng.choice([0x44, 0x44, 0x41])
    channel = random_channel(rng)
    header = bytearray(
        prism_header(order=order, msgcode=msgcode, channel=channel, rssi=random_signal(rng))
    )
    if rng.random() < 0.05:
        header[0:4] = rng.randbytes(4)  # a msgcode nobody knows
    for item in range(10):
        at = 24 + 12 * item
        if rng.random() < 0.1:
            header[at + 4 : at + 6] = struct.pack(order + "H", 1)  # status: no value
        if rng.random() < 0.04:
            header[at : at + 4] = rng.randbytes(4)  # a DID nobody knows
    if rng.random() < 0.1:
        header[4:8] = struct.pack(order + "I", rng.randint(0, 200))
    return bytes(header)


def random_ppi(rng: random.Random) -> tuple[bytes, int]:
    """(PPI header, its 802.11-Common flags as radiotap Flags)."""
    cflags = rng.choice([0, 1, 4, 5, rng.randrange(16)])
    signal = rng.choice([-128, 0, rng.randint(-100, -20), rng.randint(-100, -20)])
    common = ppi_common(
        flags=cflags, freq=rng.choice(FREQS), hop_set=rng.randrange(256), signal=signal
    )
    if rng.random() < 0.08:  # an 802.11-Common field of the wrong length
        size = rng.choice([16, 24])
        common = struct.pack("<HH", 2, size) + (common[4:] + rng.randbytes(4))[:size]
    fields = [common]
    for _ in range(rng.randint(0, 2)):
        size = rng.randint(0, 13)
        kind = rng.choice([3, 4, 30002, 30003, rng.randrange(65536)])
        fields.insert(
            rng.randint(0, len(fields)), struct.pack("<HH", kind, size) + rng.randbytes(size)
        )
    aligned = rng.random() < 0.25
    if aligned:
        fields = [field + bytes(-len(field) % 4) for field in fields]
    dlt = LINKTYPE_IEEE802_11 if rng.random() < 0.92 else rng.choice([127, 1])
    header = bytearray(ppi_header(*fields, flags=1 if aligned else rng.choice([0, 0, 2]), dlt=dlt))
    if rng.random() < 0.05:
        header[2:4] = struct.pack("<H", rng.randint(0, len(header) + 8))
    return bytes(header), (0x10 if cflags & 1 else 0) | (0x40 if cflags & 4 else 0)


def random_frame(rng: random.Random, link: int) -> Frame:
    """A frame of this link type: a radio header, an 802.11 frame, then maybe damage."""
    header, flags = b"", 0
    if link == LINKTYPE_RADIOTAP:
        header, flags = random_radiotap(rng)
    elif link == LINKTYPE_PRISM:
        header = random_prism(rng)
    elif link == LINKTYPE_AVS:
        header = random_avs(rng)
    elif link == LINKTYPE_PPI:
        header, flags = random_ppi(rng)
    frame = header + random_mpdu(rng)
    if flags & 0x10 and rng.random() < 0.9:
        frame += rng.randbytes(4)  # the FCS
    roll = rng.random()
    if roll < 0.12:  # cut anywhere
        frame = frame[: rng.randint(0, len(frame))]
    elif roll < 0.16:  # cut within the radio header or the first 32 bytes after it
        frame = frame[: rng.randint(0, min(len(frame), len(header) + 32))]
    elif roll < 0.19:  # flipped bytes
        damaged = bytearray(frame)
        for _ in range(rng.randint(1, 4)):
            if damaged:
                damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        frame = bytes(damaged)
    elif roll < 0.23:  # garbage
        frame = rng.randbytes(rng.randint(0, 80))
    elif roll < 0.25:  # garbage after a good radio header
        frame = header + rng.randbytes(rng.randint(0, 40))
    return frame, link


def random_frames(seed: int, links: Sequence[int], count: int = FRAMES_PER_EXAMPLE) -> list[Frame]:
    rng = random.Random(seed)
    return [random_frame(rng, rng.choice(links)) for _ in range(count)]


SEEDS = st.integers(0, 2**64 - 1)
SPEC_LINKS = (LINKTYPE_PRISM, LINKTYPE_AVS, LINKTYPE_PPI)
ALL_LINKS = (LINKTYPE_RADIOTAP, LINKTYPE_IEEE802_11, *SPEC_LINKS)


# --- generated frames against the reference -----------------------------------------------


@FUZZ
@given(seed=SEEDS)
def test_generated_radiotap_frames_give_the_reference_rows(seed: int) -> None:
    assert_parses_like_reference(random_frames(seed, [LINKTYPE_RADIOTAP]))


@FUZZ
@given(seed=SEEDS)
def test_generated_bare_80211_frames_give_the_reference_rows(seed: int) -> None:
    assert_parses_like_reference(random_frames(seed, [LINKTYPE_IEEE802_11]))


@FUZZ
@given(seed=SEEDS)
def test_generated_prism_avs_and_ppi_frames_give_the_reference_rows(seed: int) -> None:
    assert_parses_like_reference(random_frames(seed, SPEC_LINKS))


def test_frames_of_a_link_type_the_parser_does_not_know_give_malformed_rows() -> None:
    frames = [(rt_signal(-50) + mpdu(RATES), link) for link in (0, 1, 113, 65535)]
    rows = rows_of(parse_batch(frame_batch(frames)))
    assert [row.kind for row in rows] == [KIND_MALFORMED] * 4
    assert rows == reference_rows(frame_batch(frames))


@settings(max_examples=10, deadline=None)
@given(seed=SEEDS)
def test_reference_radiotap_fields_equal_scapys_dissection(seed: int) -> None:
    """The twin's radiotap reading agrees with a third reader (scapy has no FHSS field)."""
    rng = random.Random(seed)
    for _ in range(40):
        header, _ = random_radiotap(rng, damage=False)
        if struct.unpack_from("<I", header, 4)[0] & (1 << ref.RT_FHSS):
            continue
        frame = header + random_mpdu(rng)
        assert radio_of_scapy(frame) == radio_of_reference(frame), frame.hex()


class RadioTapHeader(RadioTap):
    """Scapy's radiotap dissector without the 802.11 layers after it (they cost 2 ms)."""

    def guess_payload_class(self, payload: bytes) -> type[Raw]:
        return Raw


def radio_of_scapy(frame: bytes) -> tuple[int, bool, bool, int, int]:
    """(length, FCS at end, FCS failed, dBm, MHz) of a radiotap header as scapy reads it."""
    header = frame[: struct.unpack_from("<H", frame, 2)[0]]
    packet: Any = RadioTapHeader(header + bytes(64))  # slack for fields scapy sizes its own way
    flags = 0 if packet.Flags is None else int(packet.Flags)
    rssi = RSSI_MISSING if packet.dBm_AntSignal is None else int(packet.dBm_AntSignal)
    freq = int(packet.ChannelFrequency or 0)
    return int(packet.len), bool(flags & 0x10), bool(flags & 0x40), rssi, freq


def radio_of_reference(frame: bytes) -> tuple[int, bool, bool, int, int] | None:
    radio = ref.radio_header(frame, LINKTYPE_RADIOTAP)
    if radio is None:
        return None
    return radio.length, radio.fcs_at_end, radio.fcs_failed, radio.rssi, radio.freq_mhz


# --- bounds ---------------------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(seed=SEEDS)
def test_no_frame_is_read_beyond_its_ends_in_a_buffer_of_poison(seed: int) -> None:
    """Poison bytes around every frame change nothing: no read leaves a frame's bytes."""
    frames = random_frames(seed, ALL_LINKS)
    gaps = random.Random(seed).choices(range(17), k=len(frames) + 1)
    packed = rows_of(parse_batch(frame_batch(frames)))
    for poison in (0x00, 0xFF, 0x40, 0xDD, 0x80):
        batch = frame_batch(frames, gap=gaps.__getitem__, poison=poison)
        assert rows_of(parse_batch(batch)) == packed, f"poison {poison:#04x}"


@functools.cache
def shared_frames() -> list[tuple[str, int, Frame]]:
    """(capture, frame number, frame) of every shared capture; [] when ../shared is absent."""
    pcaps = SHARED / "data" / "pcaps"
    if not pcaps.is_dir():
        if REQUIRE_SHARED:
            pytest.fail(f"{pcaps} is absent (FOOTFALL_REQUIRE_SHARED=1)")
        return []
    out = []
    for name in shared_capture_names():
        try:
            reader = CaptureReader(pcaps / name)
        except NotACaptureError:
            continue
        number = 0
        with reader:
            for batch in reader:
                data = batch.data.tobytes()
                for i in range(len(batch)):
                    start = int(batch.offsets[i])
                    frame = data[start : start + int(batch.lengths[i])]
                    out.append((name, number, (frame, int(batch.link_types[i]))))
                    number += 1
    return out


def assert_rows_equal(where: str, got: ProbeBatch, expected: list[Row]) -> None:
    """Column by column; a difference is named by row and field, never by MAC or SSID."""
    assert len(got) == len(expected), f"{where}: {len(got)} rows, reference {len(expected)}"
    if not expected:
        return
    columns: dict[str, tuple[Any, Any]] = {
        "kind": (got.kind, np.array([r.kind for r in expected], np.uint8)),
        "ts_ns": (got.ts_ns, np.array([r.ts_ns for r in expected], np.int64)),
        "mac": (got.mac, np.array([list(r.mac) for r in expected], np.uint8).reshape(-1, 6)),
        "seq": (got.seq, np.array([r.seq for r in expected], np.uint16)),
        "rssi": (got.rssi, np.array([r.rssi for r in expected], np.int16)),
        "freq_mhz": (got.freq_mhz, np.array([r.freq_mhz for r in expected], np.uint16)),
        "ssid": (got.ssid, np.array([r.ssid for r in expected], np.uint8)),
        "fp": (got.fp, np.array([r.fp for r in expected], np.uint64)),
    }
    for field, (numba, reference) in columns.items():
        same = (numba == reference).reshape(len(expected), -1).all(axis=1)
        if not same.all():
            row = int(np.argmin(same))
            values = "" if field == "mac" else f": numba {numba[row]}, reference {reference[row]}"
            pytest.fail(
                f"{where}: {int((~same).sum())} rows differ in {field}; the first is row {row}, "
                f"kind {int(got.kind[row])}{values}"
            )


@pytest.mark.shared
@pytest.mark.parametrize("name", shared_capture_names())
def test_every_frame_of_a_shared_capture_gives_the_reference_row(
    name: str, pcaps_dir: Path, oracle: dict[str, dict[str, Any]]
) -> None:
    try:
        reader = CaptureReader(pcaps_dir / name)
    except NotACaptureError:
        assert not oracle[name]["file_type"]  # tshark cannot read it either: no frames
        return
    with reader:
        for number, batch in enumerate(reader):
            got = parse_batch(batch)
            assert got.frames == len(batch)
            assert_rows_equal(f"{name} batch {number}", got, reference_rows(batch))


@pytest.mark.shared
def test_reference_radiotap_fields_equal_scapys_on_shared_frames(pcaps_dir: Path) -> None:
    """The twin reads real radiotap headers as scapy does (25 frames of each capture)."""
    checked: dict[str, int] = {}
    for name, number, (frame, link) in shared_frames():
        if link != LINKTYPE_RADIOTAP or checked.get(name, 0) >= 25 or number % 7:
            continue
        reference = radio_of_reference(frame)
        if reference is None or struct.unpack_from("<I", frame, 4)[0] & (1 << ref.RT_FHSS):
            continue
        assert radio_of_scapy(frame) == reference, f"{name} frame {number}"
        checked[name] = checked.get(name, 0) + 1
    assert sum(checked.values()) > 300


@pytest.mark.shared
@pytest.mark.parametrize(
    ("name", "kinds"),
    [
        ("tcpdump_ieee802.11_parse_elements_oobr.pcap", []),  # a beacon: counted, no row
        ("tcpdump_radiotap-heapoverflow.pcap", [KIND_MALFORMED]),  # 8 bytes, version 0x30
    ],
)
def test_fuzzer_finds_from_tcpdump_parse_without_error(
    name: str, kinds: list[int], pcaps_dir: Path
) -> None:
    with CaptureReader(pcaps_dir / name) as reader:
        batches = list(reader)
    assert sum(len(batch) for batch in batches) == 1
    probes = parse_batch(batches[0])
    assert (probes.frames, probes.kind.tolist()) == (1, kinds)
    assert_rows_equal(name, probes, reference_rows(batches[0]))


# --- documented behaviours ----------------------------------------------------------------


def both(frame: bytes, link: int = LINKTYPE_RADIOTAP) -> Row | None:
    """The numba row of one frame, after checking that the reference gives the same."""
    got = parse_one(frame, link)
    assert got == reference_parse(frame, link, 1_000_000_007), frame.hex()
    return got


def row_of(frame: bytes, link: int = LINKTYPE_RADIOTAP) -> Row:
    row = both(frame, link)
    assert row is not None
    return row


def test_a_well_formed_probe_gives_every_field() -> None:
    addr2 = bytes.fromhex("020000abcdef")
    row = row_of(
        rt_signal(-57, freq=5180) + mpdu(element(0, b""), RATES, HT_CAPS, addr2=addr2, seq=3001)
    )
    assert (row.kind, row.mac, row.seq, row.rssi, row.freq_mhz, row.ssid) == (
        KIND_PROBE,
        addr2,
        3001,
        -57,
        5180,
        SSID_WILDCARD,
    )
    assert row.ts_ns == 1_000_000_007
    assert row.fp not in (0, ref.FP_SEED)


def test_fcs_flag_strips_four_bytes_before_the_elements() -> None:
    body = mpdu(element(0, b""), RATES, HT_CAPS)
    fcs = bytes.fromhex("dd010000")  # as elements: a vendor element too short for its OUI
    plain = row_of(rt_signal(-50) + body)
    with_flag = row_of(rt_signal(-50, flags=0x10) + body + fcs)
    without_flag = row_of(rt_signal(-50) + body + fcs)
    assert with_flag.kind == plain.kind == KIND_PROBE
    assert with_flag.fp == plain.fp != 0
    assert without_flag.kind == KIND_PROBE | KIND_MALFORMED
    assert without_flag.fp == 0


def test_fcs_flag_counts_the_fcs_out_of_the_header_length() -> None:
    """23 bytes of header and an FCS are a header cut short, not a whole one."""
    frame = rt_signal(-50, flags=0x10) + mpdu()[:23] + b"\x00" * 4
    assert row_of(frame).kind == KIND_PROBE | KIND_MALFORMED
    frame = rt_signal(-50, flags=0x10) + mpdu()[:15] + b"\x00" * 4
    assert row_of(frame).kind == KIND_PROBE | KIND_MALFORMED | KIND_NO_SA


@pytest.mark.parametrize("flags", [0x40, 0x50], ids=["bad-fcs", "bad-fcs-and-fcs-present"])
def test_bad_fcs_flag_sets_kind_fcs_bad(flags: int) -> None:
    frame = (
        rt_signal(-50, flags=flags) + mpdu(element(0, b""), RATES) + b"\x00" * 4 * (flags >> 4 & 1)
    )
    row = row_of(frame)
    assert row.kind == KIND_PROBE | KIND_FCS_BAD
    assert row.mac == b"\x02" * 6  # still read: the counting stage decides what to do with it


@pytest.mark.parametrize(
    ("elements", "ssid"),
    [
        ([element(0, b"")], SSID_WILDCARD),
        ([element(0, b"Cafe Wifi")], SSID_DIRECTED),
        ([RATES], SSID_NONE),
        ([], SSID_NONE),
        ([RATES, element(0, b""), element(0, b"Cafe")], SSID_WILDCARD),
        ([element(0, b"Cafe"), element(0, b"")], SSID_DIRECTED),
        ([element(0, b"Cafe"), element(45, b"\x00")], SSID_DIRECTED),  # kept on a malformed row
    ],
    ids=["wildcard", "directed", "none", "empty", "first-wildcard", "first-directed", "malformed"],
)
def test_ssid_kind_is_that_of_the_first_ssid_element(elements: list[bytes], ssid: int) -> None:
    assert row_of(rt_signal(-50) + mpdu(*elements)).ssid == ssid


def test_fingerprint_ignores_ssid_ds_channel_and_vendor_bodies_but_changes_with_ht_caps() -> None:
    def fp(*elements: bytes) -> int:
        row = row_of(rt_signal(-50) + mpdu(*elements))
        assert row.kind == KIND_PROBE
        return row.fp

    base = fp(element(0, b""), RATES, element(3, b"\x01"), HT_CAPS, EXT_CAPS, WPS, VHT_CAPS)
    other_wps = element(221, WPS[2:6] + bytes(range(30)))
    same = [
        fp(element(0, b"Home"), RATES, element(3, b"\x01"), HT_CAPS, EXT_CAPS, WPS, VHT_CAPS),
        fp(element(0, b""), RATES, element(3, b"\x0b"), HT_CAPS, EXT_CAPS, WPS, VHT_CAPS),
        fp(element(0, b""), RATES, HT_CAPS, EXT_CAPS, WPS, VHT_CAPS),  # no DS element at all
        fp(RATES, element(3, b"\x01"), HT_CAPS, EXT_CAPS, WPS, VHT_CAPS),  # no SSID element
        fp(element(0, b""), RATES, element(3, b"\x01"), HT_CAPS, EXT_CAPS, other_wps, VHT_CAPS),
    ]
    assert same == [base] * len(same)
    other_ht = HT_CAPS[:2] + b"\xee" + HT_CAPS[3:]
    other_vendor = element(221, MSFT_OUI + b"\x08" + WPS[6:])  # same OUI, another type
    changed = [
        fp(element(0, b""), RATES, element(3, b"\x01"), other_ht, EXT_CAPS, WPS, VHT_CAPS),
        fp(element(0, b""), RATES, element(3, b"\x01"), HT_CAPS, EXT_CAPS, WPS),
        fp(element(0, b""), RATES, element(3, b"\x01"), EXT_CAPS, HT_CAPS, WPS, VHT_CAPS),
        fp(element(0, b""), EXT_RATES, element(3, b"\x01"), HT_CAPS, EXT_CAPS, WPS, VHT_CAPS),
        fp(element(0, b""), RATES, element(3, b"\x01"), HT_CAPS, EXT_CAPS, other_vendor, VHT_CAPS),
        fp(
            element(0, b""),
            RATES,
            element(3, b"\x01"),
            HT_CAPS,
            EXT_CAPS,
            WPS,
            VHT_CAPS,
            element(10, b"\x01"),
        ),
    ]
    assert base not in changed
    assert len(set(changed)) == len(changed)


def test_fingerprint_covers_he_and_eht_capabilities_but_no_other_extension_body() -> None:
    def fp(*elements: bytes) -> int:
        return row_of(rt_signal(-50) + mpdu(RATES, *elements)).fp

    assert fp(element(255, b"\x23\x01")) != fp(element(255, b"\x23\x02"))  # HE capabilities
    assert fp(element(255, b"\x6c\x01")) != fp(element(255, b"\x6c\x02"))  # EHT capabilities
    assert fp(element(255, b"\x02\x01")) == fp(element(255, b"\x02\x02"))  # FILS request params
    assert fp(element(255, b"\x02\x01")) == fp(element(255, b"\x24\x02"))  # order only: 255


@pytest.mark.parametrize("cut", range(1, 25))
def test_probe_cut_short_is_malformed_and_without_sa_before_addr2(cut: int) -> None:
    frame = mpdu(addr2=bytes.fromhex("02aabbccddee"))[:cut]
    row = row_of(frame, LINKTYPE_IEEE802_11)
    if cut < 16:
        assert (row.kind, row.mac) == (KIND_PROBE | KIND_MALFORMED | KIND_NO_SA, bytes(6))
    elif cut < 24:
        assert (row.kind, row.mac) == (KIND_PROBE | KIND_MALFORMED, bytes.fromhex("02aabbccddee"))
    else:
        assert row.kind == KIND_PROBE  # a header and no elements: nothing is missing
    assert (row.ssid, row.fp, row.seq) == (
        (SSID_NONE, 0, 0) if cut < 24 else (0, ref.FP_SEED, 1234)
    )


def test_order_bit_puts_an_ht_control_field_before_the_elements() -> None:
    row = row_of(rt_signal(-50) + mpdu(element(0, b"x"), RATES, flags=0x80))
    assert (row.kind, row.ssid) == (KIND_PROBE, SSID_DIRECTED)
    assert row.fp == row_of(rt_signal(-50) + mpdu(element(0, b"x"), RATES)).fp
    assert row_of(rt_signal(-50) + mpdu(flags=0x80)[:27]).kind == KIND_PROBE | KIND_MALFORMED


@pytest.mark.parametrize(
    "element_list",
    [
        RATES + b"\x00",  # one byte left over
        RATES + element(0, b"abc")[:-1],  # an element running past the end
        element(221, b""),  # a vendor element without its OUI
        element(221, MSFT_OUI[:2]),
        element(45, bytes(25)),  # HT capabilities of the wrong length
        element(191, bytes(13)),
        element(1, b""),  # no rates
        element(3, b"\x01\x02"),
        element(74, bytes(13)),
    ],
    ids=[
        "left-over",
        "overrun",
        "vendor-empty",
        "vendor-2",
        "ht-25",
        "vht-13",
        "rates-0",
        "ds-2",
        "obss-13",
    ],
)
def test_an_element_breaking_the_length_rules_makes_the_probe_malformed(
    element_list: bytes,
) -> None:
    row = row_of(rt_signal(-50) + mpdu(element(0, b""), element_list))
    assert (row.kind, row.fp, row.ssid) == (KIND_PROBE | KIND_MALFORMED, 0, SSID_WILDCARD)
    assert row.seq == 1234 and row.mac == b"\x02" * 6


def test_radiotap_it_len_beyond_the_frame_gives_a_malformed_row() -> None:
    header = rt_signal(-50)
    frame = header + mpdu(RATES)
    long = frame[:2] + struct.pack("<H", len(frame) + 1) + frame[4:]
    assert row_of(long) == Row(KIND_MALFORMED, 1_000_000_007, bytes(6), 0, RSSI_MISSING, 0, 0, 0)
    assert row_of(frame[:2] + struct.pack("<H", len(frame)) + frame[4:]).kind == KIND_MALFORMED
    assert row_of(header[:7]).kind == KIND_MALFORMED
    assert row_of(b"").kind == KIND_MALFORMED
    assert row_of(b"", LINKTYPE_IEEE802_11).kind == KIND_MALFORMED


def test_radiotap_fields_are_aligned_from_the_header_start_after_every_presence_word() -> None:
    fields = {
        0: struct.pack("<Q", 1),
        1: b"\x10",
        2: b"\x02",
        3: struct.pack("<HH", 5745, 0x140),
        4: b"\x01\x02",
        5: struct.pack("<b", -71),
    }
    for words in ([], [1 << 29], [1 << 30 | ref.RT_EXT, 0x0000_0003]):
        frame = radiotap(fields, words=words) + mpdu(RATES) + b"\xff" * 4
        row = row_of(frame)
        assert (row.kind, row.rssi, row.freq_mhz) == (KIND_PROBE, -71, 5745), words


@pytest.mark.parametrize("fields", [{}, {5: b"\xc0"}], ids=["no-fields", "signal"])
def test_radiotap_presence_words_running_past_the_header_give_a_malformed_row(
    fields: dict[int, bytes],
) -> None:
    frame = bytearray(radiotap(fields, words=[ref.RT_EXT, 0]) + mpdu(RATES))
    frame[2:4] = struct.pack("<H", 12)  # the header ends before its third presence word
    assert row_of(bytes(frame)).kind == KIND_MALFORMED


@pytest.mark.parametrize(
    "fc",
    [0x50, 0x80, 0x00, 0xB0, 0x08, 0x88, 0x48, 0xD4, 0xC4, 0x41, 0x42, 0x43, 0x44, 0x4C],
    ids=lambda fc: f"fc0={fc:#04x}",
)
def test_frames_other_than_probe_requests_give_no_row(fc: int) -> None:
    frames = [(rt_signal(-50) + mpdu(element(0, b""), RATES, fc=fc), LINKTYPE_RADIOTAP)]
    frames += [(mpdu(RATES, fc=fc)[:cut], LINKTYPE_IEEE802_11) for cut in (1, 10, 24, 30)]
    probes = parse_batch(frame_batch(frames))
    assert (len(probes), probes.frames) == (0, len(frames))
    assert reference_rows(frame_batch(frames)) == []


def test_prism_avs_and_ppi_headers_give_signal_and_channel() -> None:
    body = mpdu(element(0, b""), RATES)
    for frame, link, rssi, freq in [
        (prism_header(channel=11, rssi=-67) + body, LINKTYPE_PRISM, -67, 2462),
        (prism_header(msgcode=0x41, channel=36) + body, LINKTYPE_PRISM, -60, 5180),
        (avs_header(channel=1, signal=-44) + body, LINKTYPE_AVS, -44, 2412),
        (avs_header(channel=149, ssi_type=1, length=80) + body, LINKTYPE_AVS, RSSI_MISSING, 5745),
    ]:
        row = row_of(frame, link)
        assert (row.kind, row.rssi, row.freq_mhz) == (KIND_PROBE, rssi, freq), link


def test_ppi_fcs_flags_act_like_radiotaps() -> None:
    body = mpdu(element(0, b""), RATES) + bytes.fromhex("dd010000")
    row = parse_one(ppi_header(ppi_common(flags=0x5)) + body, LINKTYPE_PPI)
    assert row is not None
    assert (row.kind, row.freq_mhz) == (KIND_PROBE | KIND_FCS_BAD, 2437)


# --- where parse.py departs from the specifications ---------------------------------------
# Each test states the specification's behaviour; it fails while parse.py does otherwise.


def test_ppi_signal_is_the_antenna_signal_byte_not_the_fhss_hop_set() -> None:
    """PPI 802.11-Common: ... FHSS hop set (16), hop pattern (17), dBm antenna signal (18)."""
    frame = ppi_header(ppi_common(hop_set=3, signal=-61)) + mpdu(RATES)
    row = parse_one(frame, LINKTYPE_PPI)
    assert row is not None
    assert row.rssi == -61, (
        f"parse.py reads the PPI signal at data offset 16 (the FHSS hop set, 3): got {row.rssi}"
    )


def test_ppi_antenna_signal_of_minus_128_means_no_signal() -> None:
    frame = ppi_header(ppi_common(hop_set=0, signal=-128)) + mpdu(RATES)
    row = parse_one(frame, LINKTYPE_PPI)
    assert row is not None
    assert row.rssi == RSSI_MISSING, f"PPI says -128 dBm is 'no value'; parse.py gives {row.rssi}"


def test_ppi_fields_are_padded_to_32_bits_when_the_header_says_so() -> None:
    gps = struct.pack("<HH", 30002, 5) + bytes(5) + bytes(3)  # 5 bytes of data, 3 of padding
    frame = ppi_header(gps, ppi_common(freq=5180, signal=-61), flags=1) + mpdu(RATES)
    row = parse_one(frame, LINKTYPE_PPI)
    assert row is not None
    assert (row.kind, row.freq_mhz) == (KIND_PROBE, 5180), (
        f"parse.py ignores the PPI alignment flag and misreads the field after padding: {row}"
    )


def test_ppi_common_field_of_another_length_than_20_is_not_read() -> None:
    common = ppi_common(flags=0x4, freq=5180, signal=-61)
    frame = ppi_header(struct.pack("<HH", 2, 24) + common[4:] + bytes(4)) + mpdu(RATES)
    row = parse_one(frame, LINKTYPE_PPI)
    assert row is not None
    assert (row.kind, row.freq_mhz) == (KIND_PROBE, 0), (
        f"an 802.11-Common field is exactly 20 bytes (Wireshark skips others); parse.py: {row}"
    )


def test_prism_header_in_big_endian_byte_order_is_read() -> None:
    frame = prism_header(order=">", channel=11, rssi=-67) + mpdu(RATES)
    row = parse_one(frame, LINKTYPE_PRISM)
    assert row is not None
    assert (row.kind, row.rssi, row.freq_mhz) == (KIND_PROBE, -67, 2462), (
        f"the msgcode gives the Prism byte order (Wireshark); parse.py assumes little: {row}"
    )


def test_avs_header_under_the_prism_link_type_is_read_as_avs() -> None:
    frame = avs_header(channel=11, signal=-67) + mpdu(RATES)
    row = parse_one(frame, LINKTYPE_PRISM)
    assert row is not None
    assert (row.kind, row.rssi, row.freq_mhz) == (KIND_PROBE, -67, 2462), (
        f"link type 119 frames starting 0x8021100x carry AVS headers (tcpdump, Wireshark): {row}"
    )


def test_prism_items_count_only_under_their_exact_did() -> None:
    header = bytearray(prism_header(channel=6))
    header[24 + 12 * 4 : 24 + 12 * 5] = struct.pack("<IHHI", 0xABCD3041, 0, 4, 11)  # not a channel
    row = parse_one(bytes(header) + mpdu(RATES), LINKTYPE_PRISM)
    assert row is not None
    assert row.freq_mhz == 2437, (
        f"DID 0xabcd3041 is no channel item; parse.py took it: {row.freq_mhz}"
    )


def test_prism_header_with_an_unknown_msgcode_is_unreadable() -> None:
    header = bytearray(prism_header())
    header[0:4] = struct.pack("<I", 0x12345678)
    row = parse_one(bytes(header) + mpdu(RATES), LINKTYPE_PRISM)
    assert row is not None
    assert row.kind == KIND_MALFORMED, f"msgcode 0x12345678 is no Prism header; parse.py read {row}"


@pytest.mark.parametrize(("channel", "freq"), [(184, 4920), (196, 4980)])
def test_channels_182_to_196_are_in_the_4_9_ghz_band(channel: int, freq: int) -> None:
    for frame, link in [
        (prism_header(channel=channel) + mpdu(RATES), LINKTYPE_PRISM),
        (avs_header(channel=channel) + mpdu(RATES), LINKTYPE_AVS),
    ]:
        row = parse_one(frame, link)
        assert row is not None
        assert row.freq_mhz == freq, (
            f"802.11 Annex E (and Linux, Wireshark): channel {channel} is {freq} MHz; "
            f"parse.py gives {row.freq_mhz} (5000 + 5n) for link type {link}"
        )


def test_signal_beyond_int16_is_missing_rather_than_wrapped() -> None:
    for frame, link in [
        (prism_header(rssi=0x0001FFC4) + mpdu(RATES), LINKTYPE_PRISM),  # 131012 wraps to -60
        (avs_header(signal=0x7FFFFFC4) + mpdu(RATES), LINKTYPE_AVS),
    ]:
        row = parse_one(frame, link)
        assert row is not None
        assert row.rssi == RSSI_MISSING, (
            f"a 32-bit signal beyond the int16 column wraps to {row.rssi} dBm (link {link})"
        )
