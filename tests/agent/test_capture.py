"""The capture source stage: pcap/pcapng files, gzip, pipes and stdin, damage and errors.

Real captures are checked against two independent readers: tshark's frame count (the oracle
in ../shared) and scapy's per-record ``RawPcapReader`` / ``RawPcapNgReader`` iteration.
Synthetic captures (written here with ``struct`` or numpy) cover what the real ones lack.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import random
import struct
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple, cast

import numpy as np
import pytest
from scapy.layers.inet import IP
from scapy.layers.l2 import Ether
from scapy.utils import RawPcapNgReader, RawPcapReader, wrpcap

from firmware_agent.cli import BUNDLED_SAMPLE
from firmware_agent.contract.errors import CaptureError, NotACaptureError, UnsupportedLinkTypeError
from firmware_agent.stages.batch import (
    LINKTYPE_IEEE802_11,
    LINKTYPE_PRISM,
    LINKTYPE_RADIOTAP,
    FrameBatch,
)
from firmware_agent.stages.capture import MAX_CAPLEN, CaptureReader, open_capture
from tests.support.shared import REPO, shared_capture_names

TSHARK_LINKTYPES = {
    "ieee-802-11": LINKTYPE_IEEE802_11,
    "ieee-802-11-radiotap": LINKTYPE_RADIOTAP,
    "ieee-802-11-prism": LINKTYPE_PRISM,
}
TRUNCATED = [
    "aircrackng_pmkid-not-recognized.cap",
    "wifite2_handshake_has_1234.cap",
    "scapy_bad_rsn_parsing_overrides_ssid.pcap",
]
HUAWEI = "gianlucavigo_01_HuaweiTablet_01_filtered"


class Frames(NamedTuple):
    frames: list[bytes]
    ts_ns: list[int]
    link_types: list[int]
    batch_sizes: list[int]


def check_layout(batch: FrameBatch) -> None:
    """A batch holds its frames back to back and nothing else (in place: in order, inside)."""
    assert len(batch) == len(batch.offsets) == len(batch.ts_ns) == len(batch.link_types)
    ends = batch.offsets + batch.lengths
    if batch.transient:
        assert np.all(batch.offsets[1:] >= ends[:-1]) and ends[-1] <= batch.data.size
        return
    assert np.array_equal(batch.offsets, np.cumsum(batch.lengths, dtype=np.int64) - batch.lengths)
    assert batch.data.size == (ends[-1] if len(batch) else 0)


def collect(reader: CaptureReader) -> Frames:
    out = Frames([], [], [], [])
    with reader:
        for batch in reader:
            check_layout(batch)
            out.batch_sizes.append(len(batch))
            for i in range(len(batch)):
                start = int(batch.offsets[i])
                out.frames.append(batch.data[start : start + int(batch.lengths[i])].tobytes())
            out.ts_ns.extend(batch.ts_ns.tolist())
            out.link_types.extend(batch.link_types.tolist())
    assert reader.records_read == len(out.frames)
    return out


def read(source: str | os.PathLike[str] | BinaryIO, **kwargs: Any) -> Frames:
    return collect(CaptureReader(source, **kwargs))


def scapy_records(path: Path) -> Frames:
    """What scapy's per-record iteration gives, timestamps converted exactly with integers."""
    out = Frames([], [], [], [])
    with RawPcapReader(str(path)) as reader:
        meta: Any  # PacketMetadata, or PacketMetadataNg for pcapng
        for data, meta in reader:
            out.frames.append(data)
            if isinstance(reader, RawPcapNgReader):
                ticks = (meta.tshigh << 32) | meta.tslow
                out.ts_ns.append(ticks * 10**9 // meta.tsresol)
                out.link_types.append(meta.linktype)
            else:
                out.ts_ns.append(meta.sec * 10**9 + meta.usec * (1 if reader.nano else 1000))
                out.link_types.append(reader.linktype & 0xFFFF)  # high bits: FCS length
    return out


def pcap_bytes(
    records: list[tuple[int, int, bytes]], *, link: int = 127, nano: bool = False, big: bool = False
) -> bytes:
    e = ">" if big else "<"
    out = [struct.pack(e + "IHHiIII", 0xA1B23C4D if nano else 0xA1B2C3D4, 2, 4, 0, 0, 65535, link)]
    out += [struct.pack(e + "IIII", s, f, len(p), len(p)) + p for s, f, p in records]
    return b"".join(out)


def ng_block(btype: int, body: bytes, e: str) -> bytes:
    body += bytes(-len(body) % 4)
    return (
        struct.pack(e + "II", btype, len(body) + 12) + body + struct.pack(e + "I", len(body) + 12)
    )


def ng_shb(e: str) -> bytes:
    return ng_block(0x0A0D0D0A, struct.pack(e + "IHHq", 0x1A2B3C4D, 1, 0, -1), e)


def ng_idb(link: int, e: str, *options: tuple[int, bytes]) -> bytes:
    opts = b"".join(
        struct.pack(e + "HH", code, len(v)) + v + bytes(-len(v) % 4) for code, v in options
    )
    return ng_block(1, struct.pack(e + "HHI", link, 0, 0) + opts + bytes(4), e)


def ng_epb(iface: int, ticks: int, payload: bytes, e: str) -> bytes:
    head = struct.pack(e + "5I", iface, ticks >> 32, ticks & 0xFFFFFFFF, len(payload), len(payload))
    return ng_block(6, head + payload, e)


def ng_pb(iface: int, ticks: int, payload: bytes, e: str) -> bytes:
    head = struct.pack(
        e + "HH4I", iface, 0, ticks >> 32, ticks & 0xFFFFFFFF, len(payload), len(payload)
    )
    return ng_block(2, head + payload, e)


def synthetic_pcapng() -> tuple[bytes, Frames]:
    """Two sections (little-, then big-endian), mixed interfaces, resolutions and blocks."""
    s1 = 1_700_000_000
    data = b"".join(
        [
            ng_shb("<"),
            ng_idb(127, "<"),  # default resolution: microseconds
            ng_idb(105, "<", (9, b"\x09"), (14, struct.pack("<q", 100))),  # ns, +100 s
            ng_block(0x0BAD, b"unknown block", "<"),
            ng_block(4, bytes(8), "<"),  # name resolution block: skipped
            ng_epb(0, s1 * 10**6 + 123_456, b"A" * 5, "<"),
            ng_epb(1, s1 * 10**9 + 987_654_321, b"B" * 7, "<"),
            ng_block(3, struct.pack("<I", 3) + b"CCC", "<"),  # simple packet block: no time
            ng_epb(5, 0, b"skipped: no interface 5", "<"),
            ng_shb(">"),  # a new section: interfaces numbered from 0 again
            ng_idb(119, ">", (9, bytes([0x80 | 20]))),  # 2^-20 s
            ng_epb(0, (s1 << 20) + (1 << 19), b"D" * 9, ">"),
            ng_pb(0, (s1 << 20) + 3, b"EE", ">"),  # obsolete Packet Block
        ]
    )
    expected = Frames(
        [b"A" * 5, b"B" * 7, b"CCC", b"D" * 9, b"EE"],
        [
            s1 * 10**9 + 123_456_000,
            (s1 + 100) * 10**9 + 987_654_321,
            0,
            s1 * 10**9 + 500_000_000,
            s1 * 10**9 + 3 * 10**9 // 2**20,
        ],
        [127, 105, 127, 119, 119],
        [],
    )
    return data, expected


@pytest.mark.shared
@pytest.mark.parametrize("name", shared_capture_names())
def test_shared_capture_reads_like_tshark_and_scapy(
    name: str, pcaps_dir: Path, oracle: dict[str, dict[str, Any]]
) -> None:
    """Frame count, cut flag, link type and time span as tshark; records as scapy."""
    row = oracle[name]
    path = pcaps_dir / name
    if not row["file_type"]:  # tshark cannot read it: neither can we, and we say so
        with pytest.raises(NotACaptureError, match="not a pcap or pcapng capture"):
            CaptureReader(path)
        return
    reader = CaptureReader(path)
    got = collect(reader)
    assert len(got.frames) == row["frames"]
    assert reader.truncated == row["read_error"]
    assert reader.file_type == row["file_type"]
    assert set(got.link_types) == {TSHARK_LINKTYPES[row["linktypes"]]}
    assert min(got.ts_ns) / 1e9 == pytest.approx(row["first_ts"], abs=2e-6)
    assert max(got.ts_ns) / 1e9 == pytest.approx(row["last_ts"], abs=2e-6)
    expected = scapy_records(path)
    n = len(got.frames)  # scapy also returns the partial record at a cut: compare before it
    assert got.frames == expected.frames[:n]
    assert got.ts_ns == expected.ts_ns[:n]
    assert got.link_types == expected.link_types[:n]
    in_place = read(path, in_place=True)  # batches pointing into the read buffer
    assert (in_place.frames, in_place.ts_ns) == (got.frames, got.ts_ns)


@pytest.mark.shared
@pytest.mark.parametrize("name", TRUNCATED)
def test_capture_cut_mid_record_yields_frames_up_to_the_cut_and_warns(
    name: str, pcaps_dir: Path, oracle: dict[str, dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    assert oracle[name]["read_error"]
    reader = CaptureReader(pcaps_dir / name)
    with caplog.at_level(logging.WARNING, logger="footfall.agent"):
        got = collect(reader)
    frames = oracle[name]["frames"]
    assert len(got.frames) == frames
    assert reader.truncated
    assert caplog.messages == [
        f"{pcaps_dir / name}: cut mid-record after {frames} records; read up to the cut"
    ]


@pytest.mark.shared
def test_pcap_and_pcapng_of_the_same_capture_give_identical_frames(pcaps_dir: Path) -> None:
    pcap = read(pcaps_dir / f"{HUAWEI}.pcap")
    pcapng = read(pcaps_dir / f"{HUAWEI}.pcapng")
    assert len(pcap.frames) == 1310
    assert pcap.frames == pcapng.frames
    assert pcap.link_types == pcapng.link_types
    # The pcapng file keeps nanoseconds (if_tsresol 9), the pcap microseconds.
    assert pcap.ts_ns == [t // 1000 * 1000 for t in pcapng.ts_ns]
    assert pcap.ts_ns != pcapng.ts_ns


@pytest.mark.shared
@pytest.mark.parametrize(
    "name", [f"{HUAWEI}.pcapng", "aircrackng_pmkid-not-recognized.cap", "aircrackng_wpa.cap"]
)
def test_tiny_batches_and_chunks_give_the_same_frames(name: str, pcaps_dir: Path) -> None:
    """Records cut by every chunk boundary are carried over; batches stop at batch_frames."""
    whole = read(pcaps_dir / name, chunk_bytes=8 << 20)
    tiny = read(pcaps_dir / name, batch_frames=7, chunk_bytes=1000)
    in_place = read(pcaps_dir / name, batch_frames=7, chunk_bytes=1000, in_place=True)
    assert tiny.frames == whole.frames == in_place.frames
    assert tiny.ts_ns == whole.ts_ns == in_place.ts_ns
    assert max(tiny.batch_sizes) == 7
    assert len(whole.batch_sizes) == 1


@pytest.mark.shared
@pytest.mark.parametrize("name", [f"{HUAWEI}.pcap", f"{HUAWEI}.pcapng"])
def test_gzipped_capture_reads_the_same(name: str, pcaps_dir: Path, tmp_path: Path) -> None:
    gz = tmp_path / f"{name}.gz"
    gz.write_bytes(gzip.compress((pcaps_dir / name).read_bytes()))
    assert read(gz) == read(pcaps_dir / name)


@pytest.mark.shared
def test_cut_gzip_yields_the_frames_before_the_cut_and_warns(
    pcaps_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    whole = read(pcaps_dir / f"{HUAWEI}.pcap")
    packed = gzip.compress((pcaps_dir / f"{HUAWEI}.pcap").read_bytes())
    cut = tmp_path / "cut.pcap.gz"
    cut.write_bytes(packed[: len(packed) // 2])
    reader = CaptureReader(cut)
    with caplog.at_level(logging.WARNING, logger="footfall.agent"):
        got = collect(reader)
    assert 0 < len(got.frames) < len(whole.frames)
    assert got.frames == whole.frames[: len(got.frames)]
    assert reader.truncated
    assert "cut mid-record" in caplog.text


@pytest.mark.shared
@pytest.mark.parametrize("gzipped", [False, True], ids=["plain", "gzip"])
def test_pcap_stream_through_a_pipe_reads_the_same(
    gzipped: bool, pcaps_dir: Path, tmp_path: Path
) -> None:
    path = pcaps_dir / "fryza_p1_sc6-61_2024-03-31_anonymized.pcap"
    expected = read(path)
    if gzipped:
        gz = tmp_path / "capture.pcap.gz"
        gz.write_bytes(gzip.compress(path.read_bytes()))
        path = gz
    with subprocess.Popen(["cat", str(path)], stdout=subprocess.PIPE) as cat:
        got = read(cast(BinaryIO, cat.stdout))
    assert got.frames == expected.frames
    assert got.ts_ns == expected.ts_ns


@pytest.mark.shared
def test_open_capture_dash_reads_standard_input(pcaps_dir: Path) -> None:
    path = pcaps_dir / "gianlucavigo_02_iPadApple_01_filtered.pcapng"
    script = (
        "import hashlib\n"
        "from firmware_agent.stages.capture import open_capture\n"
        "digest = hashlib.sha256()\n"
        "with open_capture('-') as reader:\n"
        "    for b in reader:\n"
        "        digest.update(b.data.tobytes() + b.lengths.tobytes() + b.ts_ns.tobytes())\n"
        "print(reader.name, reader.records_read, digest.hexdigest())\n"
    )
    with path.open("rb") as stdin:
        done = subprocess.run(
            [sys.executable, "-c", script],
            stdin=stdin,
            capture_output=True,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            timeout=120,
            check=True,
        )
    digest = hashlib.sha256()
    with CaptureReader(path) as reader:
        for b in reader:
            digest.update(b.data.tobytes() + b.lengths.tobytes() + b.ts_ns.tobytes())
    assert done.stdout.split() == ["<stdin>", "502", digest.hexdigest()]


def test_stream_hands_over_frames_before_the_writer_finishes() -> None:
    """On a pipe a batch comes out as soon as what has arrived is split (tcpdump -U | agent)."""
    records = [(1_700_000_000 + i, 0, bytes([i]) * 40) for i in range(10)]
    blob = pcap_bytes(records)
    read_fd, write_fd = os.pipe()
    with os.fdopen(read_fd, "rb") as rx, os.fdopen(write_fd, "wb") as tx:
        first = blob[: 24 + 5 * 56 + 20]  # five records and a bit of the sixth
        tx.write(first)
        tx.flush()
        reader = CaptureReader(rx)
        batches = iter(reader)
        result: list[FrameBatch] = []
        worker = threading.Thread(target=lambda: result.append(next(batches)))
        worker.start()
        worker.join(timeout=30)
        arrived_early = not worker.is_alive()
        tx.write(blob[len(first) :])
        tx.close()
        worker.join()
        rest = list(batches)
    assert arrived_early, "the reader waited for more input before handing over a batch"
    assert len(result[0]) == 5
    assert sum(len(b) for b in rest) == 5
    assert not reader.truncated


@pytest.mark.parametrize("big", [False, True], ids=["little-endian", "big-endian"])
@pytest.mark.parametrize("nano", [False, True], ids=["usec", "nsec"])
def test_pcap_timestamps_in_either_byte_order_and_resolution(
    nano: bool, big: bool, tmp_path: Path
) -> None:
    path = tmp_path / "t.pcap"
    path.write_bytes(
        pcap_bytes([(1_700_000_000, 999_999, b"x"), (1_700_000_001, 1, b"yy")], nano=nano, big=big)
    )
    got = read(path)
    unit = 1 if nano else 1000
    assert got.ts_ns == [1_700_000_000 * 10**9 + 999_999 * unit, 1_700_000_001 * 10**9 + unit]
    assert got.frames == [b"x", b"yy"]


@pytest.mark.parametrize("chunk_bytes", [8, 8 << 20], ids=["tiny-chunks", "default-chunks"])
def test_pcapng_sections_interfaces_resolutions_and_block_types(
    chunk_bytes: int, tmp_path: Path
) -> None:
    data, expected = synthetic_pcapng()
    path = tmp_path / "mixed.pcapng"
    path.write_bytes(data)
    reader = CaptureReader(path, chunk_bytes=chunk_bytes, batch_frames=2)
    got = collect(reader)
    assert got._replace(batch_sizes=[]) == expected
    assert reader.link_types_seen == {105, 119, 127}
    assert reader.file_type == "pcapng"
    assert not reader.truncated


def test_pcapng_cut_mid_block_yields_frames_before_it_and_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data, expected = synthetic_pcapng()
    path = tmp_path / "cut.pcapng"
    path.write_bytes(data[:-6])
    reader = CaptureReader(path)
    with caplog.at_level(logging.WARNING, logger="footfall.agent"):
        got = collect(reader)
    assert got.frames == expected.frames[:-1]
    assert reader.truncated
    assert caplog.messages == [f"{path}: cut mid-record after 4 records; read up to the cut"]


def test_garbage_record_header_is_a_cut_not_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = pcap_bytes([(1, 0, b"a" * 10)] * 3)
    bad = struct.pack("<IIII", 1, 0, MAX_CAPLEN + 1, 10) + b"a" * 10
    path = tmp_path / "garbage.pcap"
    path.write_bytes(good + bad + good[24:])
    reader = CaptureReader(path)
    with caplog.at_level(logging.WARNING, logger="footfall.agent"):
        got = collect(reader)
    assert len(got.frames) == 3
    assert reader.truncated
    assert caplog.messages == [f"{path}: cut mid-record after 3 records; read up to the cut"]


@pytest.mark.shared
@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("aelk_wpa-Induction.pcap", "an HTML page"),
        ("aircrackng_wep_64_ptw_02.cap", "starts with bytes"),
    ],
)
def test_shared_non_captures_raise_not_a_capture_naming_the_file(
    name: str, hint: str, pcaps_dir: Path
) -> None:
    with pytest.raises(NotACaptureError) as err:
        CaptureReader(pcaps_dir / name)
    message = str(err.value)
    assert message.startswith(f"{pcaps_dir / name}: not a pcap or pcapng capture (")
    assert hint in message
    assert len(message) < len(str(pcaps_dir / name)) + 120  # a hint, not a dump


@pytest.mark.parametrize(
    ("content", "hint"),
    [
        (b"", "it is empty"),
        (random.Random(0).randbytes(4096), "starts with bytes"),
        (gzip.compress(b"hello, not a capture\n" * 100), "gzip data with no capture inside"),
        (b"<html><body>404</body></html>", "an HTML page"),
        (b"\xd4\xc3\xb2\xa1\x02\x00", "short or malformed header"),
    ],
    ids=["empty", "random", "gzip-text", "html", "short-header"],
)
def test_non_captures_raise_not_a_capture_naming_the_file(
    content: bytes, hint: str, tmp_path: Path
) -> None:
    path = tmp_path / "input.pcap"
    path.write_bytes(content)
    with pytest.raises(NotACaptureError, match=f"^{path}: not a pcap or pcapng capture \\(") as err:
        CaptureReader(path)
    assert hint in str(err.value)


def test_missing_file_raises_capture_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(CaptureError, match=r"nope\.pcap: cannot open"):
        open_capture(tmp_path / "nope.pcap")


def test_ethernet_pcap_raises_unsupported_link_type_unless_overridden(tmp_path: Path) -> None:
    path = tmp_path / "ether.pcap"
    wrpcap(str(path), [Ether() / IP()] * 3)
    with pytest.raises(UnsupportedLinkTypeError) as err:
        CaptureReader(path)
    assert str(err.value) == (
        f"{path}: link type 1 (Ethernet) is not supported; supported: 105 (IEEE 802.11), "
        "119 (Prism), 127 (radiotap), 163 (AVS), 192 (PPI)"
    )
    reader = CaptureReader(path, link_type=LINKTYPE_RADIOTAP)
    got = collect(reader)
    assert len(got.frames) == 3
    assert set(got.link_types) == reader.link_types_seen == {LINKTYPE_RADIOTAP}


def test_ethernet_pcapng_interface_raises_unsupported_link_type_unless_overridden(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ether.pcapng"
    path.write_bytes(ng_shb("<") + ng_idb(1, "<") + ng_epb(0, 0, b"frame", "<"))
    with pytest.raises(UnsupportedLinkTypeError, match=r"link type 1 \(Ethernet\)"):
        read(path)
    assert read(path, link_type=LINKTYPE_RADIOTAP).link_types == [LINKTYPE_RADIOTAP]


def test_memory_stays_bounded_reading_a_200_mb_pcap(tmp_path: Path) -> None:
    """Memory is one chunk plus a batch or two (8 + 2 x 9.4 MiB by default), not the file."""
    records, size = 1_000_000, 184
    record = np.dtype([("hdr", "<u4", 4), ("data", "u1", size)])
    path = tmp_path / "big.pcap"
    with path.open("wb") as f:
        f.write(pcap_bytes([]))
        piece = np.zeros(records // 10, record)
        piece["hdr"][:, 2:] = size
        for i in range(10):
            piece["hdr"][:, 0] = 1_700_000_000 + i
            piece.tofile(f)
    file_size = path.stat().st_size
    assert file_size > 200_000_000
    warm_up = tmp_path / "warm-up.pcap"  # numba's first call loads its type context
    warm_up.write_bytes(pcap_bytes([(0, 0, b"x")]))
    read(warm_up)
    tracemalloc.start()
    try:
        with CaptureReader(path) as reader:
            frames = sum(len(batch) for batch in reader)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert frames == records
    assert peak < 40 << 20, f"peak {peak >> 20} MiB reading a {file_size >> 20} MiB file"


def test_closing_a_reader_zeroes_its_read_buffer() -> None:
    reader = CaptureReader(BUNDLED_SAMPLE, in_place=True)
    batch = next(iter(reader))
    assert batch.transient and batch.data.any()
    reader.close()
    assert not batch.data.any()


def test_pcapng_frames_dated_after_2262_are_skipped_and_counted_not_wrapped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """64-bit pcapng ticks hold times that 63-bit nanoseconds cannot: 2300-01-01 became
    1715-06-13 (issue 16). Such a frame is skipped, counted and logged; the others are read."""
    now, y2300 = 1_700_000_000, 10_413_792_000  # 2300-01-01T00:00:00Z
    path = tmp_path / "future.pcapng"
    path.write_bytes(
        b"".join(
            [
                ng_shb("<"),
                ng_idb(127, "<"),  # microseconds: 2300 is 1.04e16 ticks, 1.04e19 ns
                ng_idb(105, "<", (9, b"\x09")),  # nanoseconds: 2^64 - 1 ticks is 2554
                ng_idb(105, "<", (9, bytes([0x80 | 20]))),  # 2^-20 s
                ng_epb(0, now * 10**6, b"A", "<"),
                ng_epb(0, y2300 * 10**6, b"B", "<"),
                ng_epb(1, (1 << 64) - 1, b"C", "<"),
                ng_epb(2, y2300 << 20, b"D", "<"),
                ng_epb(1, now * 10**9, b"E", "<"),
            ]
        )
    )
    with caplog.at_level(logging.WARNING, "footfall.agent"), CaptureReader(path) as reader:
        got = collect(reader)
        assert (got.frames, got.ts_ns) == ([b"A", b"E"], [now * 10**9, now * 10**9])
        assert reader.frames_out_of_range == 3
    assert "a frame dated after 2262-04-11" in caplog.text
    assert "3 frames skipped, dated after 2262-04-11" in caplog.text
