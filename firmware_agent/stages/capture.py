"""Capture source: pcap and pcapng files (gzipped or not) and pcap streams, as batches of arrays.

:class:`CaptureReader` turns one capture into :class:`FrameBatch` objects: the frames of a
batch lie back to back in one ``uint8`` buffer, with per-frame offsets, captured lengths,
timestamps (ns since the epoch) and link types beside them, ready for the compiled parser.

Why not scapy's per-record loop: ``RawPcapReader`` costs a few microseconds per record (two
``read`` calls, ``struct.unpack``, a namedtuple, a ``bytes`` object), which caps a reader at a
few hundred thousand records per second; the agent must replay day-long captures and keep up
with a live interface, millions of frames per second. And every ``bytes`` object holding a
frame (scapy's, a buffered file's, zlib's) outlives its use in memory nothing can wipe. So the
reader opens the capture itself: it detects gzip by magic (and decompresses in a ``gzip -dc``
child process), tells pcapng from pcap, learns the endianness and nanosecond magic, and reads
the global header or the first Section Header Block. It reads big chunks straight into one
buffer and a numba function walks the records inside a chunk: it reads each record header,
checks it, copies the frame bytes compactly into the batch buffer and fills the per-frame
arrays, returning how far it got. The incomplete record at the end of a chunk is
carried to the front of the buffer and completed by the next read.

pcapng is walked the same way: the compiled splitter handles Enhanced (6), Simple (3) and the
obsolete Packet (2) blocks and stops at any other block, which Python handles: an Interface
Description Block (1) adds an interface (link type, ``if_tsresol``, ``if_tsoffset``), a new
Section Header Block resets the interfaces and may switch endianness, anything else is
skipped. Timestamps are converted with integers only, exactly (binary resolutions up to 2^-33).
A pcapng time is 64 bits of ticks, nanoseconds since 1970 are 63: a frame dated after
2262-04-11T23:47:16Z cannot be held and is skipped, counted in
:attr:`CaptureReader.frames_out_of_range` and logged (it used to wrap silently: 2300-01-01
became 1715-06-13, issue 16). A pcap time (32-bit seconds) always fits.

Memory is bounded by one chunk plus a batch or two whatever the file size: ``chunk_bytes`` is
both the read size and a batch's byte capacity (a batch ends at ``batch_frames`` frames or when
its buffer is full), and the read buffer only grows for a single record larger than it (up to
the corrupt-record limits below). On a pipe (``-`` for stdin, a FIFO, any non-seekable stream)
reads take only what has arrived (``read1``) and a batch is handed over as soon as that is
split, so ``tcpdump -U -w - | footfall-agent replay -`` is never held back to fill a batch;
regular files fill batches.

Damage is not an error: at a record cut short, an impossible record header (a captured length
over 262144 bytes, a bad block length) or a damaged gzip stream, the frames before it are
yielded, a warning is logged once and :attr:`CaptureReader.truncated` is set. Input that is
not a capture at all raises :class:`NotACaptureError`; a link type the parser cannot read
raises :class:`UnsupportedLinkTypeError`. Frame contents are never logged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import shutil
import stat
import struct
import subprocess
import sys
import threading
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any, BinaryIO, Final, TypeVar, cast

import numpy as np
from numpy.typing import NDArray

from firmware_agent.contract.errors import CaptureError, NotACaptureError, UnsupportedLinkTypeError
from firmware_agent.kernels import kernel
from firmware_agent.stages.batch import (
    LINKTYPE_AVS,
    LINKTYPE_IEEE802_11,
    LINKTYPE_PPI,
    LINKTYPE_PRISM,
    LINKTYPE_RADIOTAP,
    FrameBatch,
)

__all__ = [
    "MAX_CAPLEN",
    "SUPPORTED_LINK_TYPES",
    "CaptureReader",
    "open_capture",
    "read_ahead",
]

log = logging.getLogger("footfall.agent")
T = TypeVar("T")

SUPPORTED_LINK_TYPES: dict[int, str] = {
    LINKTYPE_IEEE802_11: "IEEE 802.11",
    LINKTYPE_PRISM: "Prism",
    LINKTYPE_RADIOTAP: "radiotap",
    LINKTYPE_AVS: "AVS",
    LINKTYPE_PPI: "PPI",
}
_OTHER_LINK_TYPES = {
    0: "BSD loopback",
    1: "Ethernet",
    9: "PPP",
    101: "raw IP",
    113: "Linux cooked",
    228: "raw IPv4",
    229: "raw IPv6",
    276: "Linux cooked v2",
}

MAX_CAPLEN: Final = 262144  # a record claiming more is corrupt (libpcap's own limit)
_MAX_BLOCK: Final = 16 << 20  # a pcapng block claiming more is corrupt (Wireshark's limit)
_SHB: Final = 0x0A0D0D0A
_IDB: Final = 1
_BOM_BIG: Final = b"\x1a\x2b\x3c\x4d"
_BOM_LITTLE: Final = b"\x4d\x3c\x2b\x1a"
_HEADER_BYTES = 24  # a pcap global header; a pcapng Section Header Block starts in it
_CAPTURE_MAGICS = (
    b"\xa1\xb2\xc3\xd4",
    b"\xd4\xc3\xb2\xa1",
    b"\xa1\xb2\x3c\x4d",
    b"\x4d\x3c\xb2\xa1",
    b"\x0a\x0d\x0d\x0a",
)

# Why a splitter returned.
_NEED_MORE: Final = 0  # the buffer ends inside a record: read more
_FULL: Final = 1  # the batch is full
_OTHER: Final = 2  # pcapng: a block for Python
_CORRUPT: Final = 3  # a record header that cannot be right: stop as at a cut
_GO_ON: Final = 4  # pcapng: Python has handled the block, split on

_MAX_NS: Final = (1 << 63) - 1  # the latest time ts_ns holds: 2262-04-11T23:47:16.854775807Z
_MAX_S: Final = _MAX_NS // 1_000_000_000 - 1  # whole seconds that leave room for a fraction

# Columns of the pcapng interface table handed to the splitter.
_IF_LINK, _IF_SNAPLEN, _IF_SHIFT, _IF_MUL, _IF_DIV, _IF_OFFSET = range(6)


@kernel()
def _u32(buf: NDArray[np.uint8], p: int, big: bool) -> int:
    b0, b1, b2, b3 = (p, p + 1, p + 2, p + 3) if big else (p + 3, p + 2, p + 1, p)
    return int(
        (np.int64(buf[b0]) << 24)
        | (np.int64(buf[b1]) << 16)
        | (np.int64(buf[b2]) << 8)
        | np.int64(buf[b3])
    )


@kernel()
def _copy(dst: NDArray[np.uint8], at: int, src: NDArray[np.uint8], start: int, size: int) -> None:
    """dst[at:at+size] = src[start:start+size] at memcpy speed: with unsigned indices (no
    negative-index wraparound) LLVM vectorises this loop; numba's slice copy is 4x slower."""
    at_u, start_u = np.uint64(at), np.uint64(start)
    for j in range(np.uint64(size)):
        dst[at_u + j] = src[start_u + j]


@kernel(
    export=(
        "UniTuple(i8, 4)(u1[:], i8, i8, b1, b1, i8, u1[:], i8[:], i4[:], i8[:], u2[:], i8, i8, b1)"
    )
)
def _split_pcap(
    buf: NDArray[np.uint8],
    pos: int,
    end: int,
    big: bool,
    nano: bool,
    link: int,
    data: NDArray[np.uint8],
    offsets: NDArray[np.int64],
    lengths: NDArray[np.int32],
    ts_ns: NDArray[np.int64],
    links: NDArray[np.uint16],
    n: int,
    used: int,
    copy: bool,
) -> tuple[int, int, int, int]:
    """Split the pcap records in buf[pos:end] into the batch from row n, data byte used.

    Without ``copy`` the rows point into ``buf`` itself and ``data`` is not touched.
    """
    frac_ns = 1 if nano else 1000
    while n < offsets.size:
        if end - pos < 16:
            return pos, n, used, _NEED_MORE
        caplen = _u32(buf, pos + 8, big)
        if caplen > MAX_CAPLEN:
            return pos, n, used, _CORRUPT
        if end - pos - 16 < caplen:
            return pos, n, used, _NEED_MORE
        if copy:
            if used + caplen > data.size:
                break
            _copy(data, used, buf, pos + 16, caplen)
            offsets[n] = used
            used += caplen
        else:
            offsets[n] = pos + 16
        lengths[n] = caplen
        ts_ns[n] = _u32(buf, pos, big) * 1_000_000_000 + _u32(buf, pos + 4, big) * frac_ns
        links[n] = link
        n += 1
        pos += 16 + caplen
    return pos, n, used, _FULL


@kernel(
    export=(
        "UniTuple(i8, 4)(u1[:], i8, i8, b1, i8[:, :], u1[:], i8[:], i4[:], i8[:], u2[:], "
        "i8, i8, b1, i8[:])"
    )
)
def _split_pcapng(
    buf: NDArray[np.uint8],
    pos: int,
    end: int,
    big: bool,
    ifaces: NDArray[np.int64],
    data: NDArray[np.uint8],
    offsets: NDArray[np.int64],
    lengths: NDArray[np.int32],
    ts_ns: NDArray[np.int64],
    links: NDArray[np.uint16],
    n: int,
    used: int,
    copy: bool,
    out_of_range: NDArray[np.int64],
) -> tuple[int, int, int, int]:
    """Split the pcapng packet blocks in buf[pos:end]; stop at any other block (_OTHER).
    A packet whose time nanoseconds since 1970 cannot hold is skipped, and counted in
    ``out_of_range[0]``."""
    while n < offsets.size:
        if end - pos < 8:
            return pos, n, used, _NEED_MORE
        btype = _u32(buf, pos, big)
        if btype not in (2, 3, 6):
            return pos, n, used, _OTHER
        blen = _u32(buf, pos + 4, big)
        if blen < 16 or blen % 4 != 0 or blen > _MAX_BLOCK:
            return pos, n, used, _CORRUPT
        if end - pos < blen:
            return pos, n, used, _NEED_MORE
        if _u32(buf, pos + blen - 4, big) != blen:
            return pos, n, used, _CORRUPT
        ticks = 0
        if btype == 3:  # Simple Packet Block: interface 0, no timestamp
            iface = 0
            caplen = min(_u32(buf, pos + 8, big), blen - 16)
            start = pos + 12
        else:  # Enhanced Packet Block, or the obsolete Packet Block (16-bit interface id)
            if blen < 32:
                return pos, n, used, _CORRUPT
            iface = _u32(buf, pos + 8, big)
            if btype == 2:
                iface = (iface >> 16) if big else (iface & 0xFFFF)
            ticks = (_u32(buf, pos + 12, big) << 32) | _u32(buf, pos + 16, big)
            caplen = _u32(buf, pos + 20, big)
            start = pos + 28
            if caplen > blen - 32:
                return pos, n, used, _CORRUPT
        if iface >= ifaces.shape[0]:  # no Interface Description Block for it: skip
            pos += blen
            continue
        if btype == 3 and ifaces[0, _IF_SNAPLEN] > 0:
            caplen = min(caplen, ifaces[0, _IF_SNAPLEN])
        if caplen > MAX_CAPLEN:
            return pos, n, used, _CORRUPT
        ns = 0
        if btype != 3:
            shift = ifaces[iface, _IF_SHIFT]
            mul = ifaces[iface, _IF_MUL]
            offset = ifaces[iface, _IF_OFFSET]
            if (  # 2^63 ticks or more (negative here), or more ns than int64 holds
                ticks < 0
                or (shift > 0 and ticks >> shift > _MAX_S)
                or (shift <= 0 and ticks > _MAX_NS // mul)
            ):
                out_of_range[0] += 1
                pos += blen
                continue
            if shift > 0:  # resolution 2^-shift s
                sec = ticks >> shift
                ns = sec * 1_000_000_000 + (((ticks - (sec << shift)) * 1_000_000_000) >> shift)
            else:  # resolution 10^-k s: ns = ticks * 10^(9-k) or ticks // 10^(k-9)
                ns = ticks * mul // ifaces[iface, _IF_DIV]
            if offset > _MAX_NS - ns:
                out_of_range[0] += 1
                pos += blen
                continue
            ns += offset
        if copy and used + caplen > data.size:
            break
        if copy:
            _copy(data, used, buf, start, caplen)
            offsets[n] = used
            used += caplen
        else:
            offsets[n] = start
        lengths[n] = caplen
        ts_ns[n] = ns
        links[n] = ifaces[iface, _IF_LINK]
        n += 1
        pos += blen
    return pos, n, used, _FULL


def _link_name(link_type: int) -> str:
    name = SUPPORTED_LINK_TYPES.get(link_type) or _OTHER_LINK_TYPES.get(link_type)
    return f"{link_type} ({name})" if name else str(link_type)


def _what_it_is(head: bytes) -> str:
    """A short hint of what a non-capture starts with (a few bytes at most)."""
    if not head:
        return "it is empty"
    if head[:2] == b"\x1f\x8b":
        return "gzip data with no capture inside"
    if head[:4] in _CAPTURE_MAGICS:
        return "a capture magic number, then a short or malformed header"
    text = head[:16]
    if all(32 <= c < 127 or c in b"\t\r\n" for c in text):
        html = b"<!doctype html" in text.lower() or b"<html" in text.lower()
        return f"starts with {text.decode('ascii')!r}" + (", an HTML page" if html else "")
    return f"starts with bytes {head[:4].hex(' ')}"


class CaptureReader:
    """Streams one capture as FrameBatch objects (context manager + iterable).

    With ``in_place`` the batches point into the reader's read buffer instead of copies
    (:attr:`FrameBatch.transient`): for a consumer that is done with each batch before it
    asks for the next, such as the agent's pipeline, which parses it at once.

    No frame byte sits anywhere the reader cannot zero (``docs/PRIVACY.md``): a file is
    opened unbuffered and a stream handed in is read below its buffer (its ``raw`` file),
    both straight into the read buffer; a gzipped capture is decompressed by a ``gzip -dc``
    child process whose output is read the same way, since zlib's output and window are
    Python ``bytes`` and C buffers that nothing can wipe. The headers are parsed here.
    """

    def __init__(
        self,
        source: str | os.PathLike[str] | BinaryIO,
        *,
        batch_frames: int = 65536,
        chunk_bytes: int = 1 << 20,
        link_type: int | None = None,
        in_place: bool = False,
    ) -> None:
        if batch_frames < 1 or chunk_bytes < 1:
            raise ValueError("batch_frames and chunk_bytes must be positive")
        self._batch_frames = batch_frames
        self._chunk_bytes = chunk_bytes
        self._override = link_type
        self._in_place = in_place
        self.records_read = 0
        self.truncated = False
        self.frames_out_of_range = 0  # pcapng frames skipped: a time ts_ns cannot hold
        self._out_of_range = np.zeros(1, np.int64)
        self.link_types_seen: set[int] = set()
        self._done = False
        self._damaged = False
        self._buf = np.zeros(max(chunk_bytes, _HEADER_BYTES), np.uint8)
        self._pos = self._end = 0
        self._child: subprocess.Popen[bytes] | None = None
        self._owned = False
        self._big = False
        self._nano = False
        self._link = 0
        self._ifaces: NDArray[np.int64] | None = None
        if isinstance(source, str | os.PathLike):
            self.name = os.fspath(source)
            try:
                self._file: Any = open(self.name, "rb", buffering=0)  # noqa: SIM115 (close())
            except OSError as err:
                raise CaptureError(f"{self.name}: cannot open: {err.strerror}") from err
            self._owned = True
            self._streaming = not stat.S_ISREG(os.fstat(self._file.fileno()).st_mode)
        else:
            name = getattr(source, "name", None)
            self.name = name if isinstance(name, str) else "<stream>"
            self._file = getattr(source, "raw", source)  # below any buffer: see the class
            self._streaming = not source.seekable()
        self._regular = not self._streaming
        self._stream: Any = self._file
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        """Read the capture's header (decompressing first if it is gzip)."""
        start = 0 if self._streaming else self._file.tell()
        self._fill(_HEADER_BYTES)
        head = self._buf[: min(self._end, 16)].tobytes()  # a header: no frame in it
        if head[:2] == b"\x1f\x8b":
            self._gunzip(start)
            self._fill(_HEADER_BYTES)
            if self._buf[:4].tobytes() not in _CAPTURE_MAGICS:
                raise NotACaptureError(
                    f"{self.name}: not a pcap or pcapng capture (gzip data with no capture inside)"
                )
        magic = self._buf[:4].tobytes()
        if magic == _SHB.to_bytes(4, "big"):
            if self._end < 12 or self._buf[8:12].tobytes() not in (_BOM_BIG, _BOM_LITTLE):
                raise NotACaptureError(
                    f"{self.name}: not a pcap or pcapng capture ({_what_it_is(head)})"
                )
            self.file_type = "pcapng"
            self._ifaces = np.zeros((0, 6), np.int64)
            return
        if magic not in _CAPTURE_MAGICS or self._end < 24:
            raise NotACaptureError(
                f"{self.name}: not a pcap or pcapng capture ({_what_it_is(head)})"
            )
        self.file_type = "pcap"
        self._big = magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d")
        self._nano = magic in (b"\xa1\xb2\x3c\x4d", b"\x4d\x3c\xb2\xa1")
        (link,) = struct.unpack(">I" if self._big else "<I", self._buf[20:24].tobytes())
        self._link = self._check_link_type(link & 0xFFFF)
        self._pos = 24

    def _fill(self, size: int) -> None:
        """Read until the buffer holds ``size`` bytes from its start, or the input ends."""
        while self._end < size:
            got = self._read_into(self._buf.data[self._end :])
            if got <= 0:
                return
            self._end += got

    def _gunzip(self, start: int) -> None:
        """Decompress in a ``gzip -dc`` child: its output is read into the buffer like a pipe.
        A file is handed to it from the start; a stream's bytes already read (the gzip header,
        compressed) are written to it first, and the rest is spliced over in the kernel."""
        gzip_bin = shutil.which("gzip")
        if gzip_bin is None:
            raise CaptureError(f"{self.name}: a gzipped capture needs the gzip program")
        piped = self._streaming
        if not piped:
            self._file.seek(start)
        self._child = subprocess.Popen(
            [gzip_bin, "-dc"],
            stdin=subprocess.PIPE if piped else self._file,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            bufsize=0,
        )
        if piped:
            head = self._buf[: self._end].copy()  # wiped once written: see _pump
            threading.Thread(
                target=_pump, args=(head, self._file, self._child), name="footfall-gunzip",
                daemon=True,
            ).start()  # fmt: skip
        self._buf.fill(0)
        self._pos = self._end = 0
        self._stream = self._child.stdout  # a regular file's still fills whole batches

    def __enter__(self) -> CaptureReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close what this reader opened (a stream handed in stays open); zero the buffer."""
        self._done = True
        self._buf.fill(0)
        if self._child is not None:  # the gzip child; closing it leaves the file open
            self._stream.close()
            self._child.kill()
            self._child.wait()
        if self._owned:
            self._file.close()

    def __iter__(self) -> Iterator[FrameBatch]:
        while (batch := self._next_batch()) is not None:
            yield batch

    def _check_link_type(self, declared: int) -> int:
        link_type = declared if self._override is None else self._override
        if link_type not in SUPPORTED_LINK_TYPES:
            supported = ", ".join(_link_name(t) for t in SUPPORTED_LINK_TYPES)
            raise UnsupportedLinkTypeError(
                f"{self.name}: link type {_link_name(link_type)} is not supported; "
                f"supported: {supported}"
            )
        self.link_types_seen.add(link_type)
        return link_type

    def _next_batch(self) -> FrameBatch | None:
        if self._done:
            return None
        copy = not self._in_place
        data = np.empty(max(self._chunk_bytes, MAX_CAPLEN) if copy else 0, np.uint8)
        offsets = np.empty(self._batch_frames, np.int64)
        lengths = np.empty(self._batch_frames, np.int32)
        ts_ns = np.empty(self._batch_frames, np.int64)
        links = np.empty(self._batch_frames, np.uint16)
        batch = (data, offsets, lengths, ts_ns, links)
        n = used = 0
        while True:
            before = n
            if self._ifaces is None:
                pos, n, used, status = _split_pcap(
                    self._buf,
                    self._pos,
                    self._end,
                    self._big,
                    self._nano,
                    self._link,
                    *batch,
                    n,
                    used,
                    copy,
                )
            else:
                pos, n, used, status = _split_pcapng(
                    self._buf,
                    self._pos,
                    self._end,
                    self._big,
                    self._ifaces,
                    *batch,
                    n,
                    used,
                    copy,
                    self._out_of_range,
                )
                self._note_out_of_range()
            self._pos = pos
            self.records_read += n - before
            if status == _OTHER:
                status = self._pcapng_block()
                if status == _GO_ON:
                    continue
            if status == _FULL:
                break
            if status == _NEED_MORE:
                if n and (self._streaming or self._in_place):
                    break  # hand over what has arrived (and, in place, before reading over it)
                if self._refill():
                    continue
                self._finish(cut=self._pos < self._end or self._damaged)
                break
            self._finish(cut=True)
            break
        if n == 0:
            return None
        if self._in_place:
            return FrameBatch(self._buf, offsets[:n], lengths[:n], ts_ns[:n], links[:n], True)
        return FrameBatch(data[:used], offsets[:n], lengths[:n], ts_ns[:n], links[:n])

    def _note_out_of_range(self) -> None:
        skipped = int(self._out_of_range[0])
        if skipped and not self.frames_out_of_range:
            log.warning(
                "%s: a frame dated after 2262-04-11, which nanoseconds since 1970 cannot hold: "
                "skipped; any more are counted",
                self.name,
            )
        self.frames_out_of_range = skipped

    def _finish(self, *, cut: bool) -> None:
        self._done = True
        if self.frames_out_of_range > 1:
            log.warning(
                "%s: %d frames skipped, dated after 2262-04-11",
                self.name,
                self.frames_out_of_range,
            )
        if cut:
            self.truncated = True
            log.warning(
                "%s: cut mid-record after %d records; read up to the cut",
                self.name,
                self.records_read,
            )

    def _refill(self) -> bool:
        """Keep the unsplit tail, read more after it; False at the end of the input."""
        tail = self._end - self._pos
        if tail == self._buf.size:  # one record larger than the buffer (bounded): grow
            old, self._buf = self._buf, np.concatenate((self._buf, np.empty_like(self._buf)))
            old.fill(0)
        else:
            self._buf[:tail] = self._buf[self._pos : self._end]
            self._buf[tail:] = 0  # what was split (or moved) is read over, or stays zero
        self._pos, self._end = 0, tail
        got = self._read_into(self._buf.data[tail:])
        self._end += got
        if got == 0 and self._child is not None and self._child.wait() != 0:
            self._damaged = True  # gzip stopped at a cut or damaged stream
        return got > 0

    def _read_into(self, view: memoryview) -> int:
        """Read into view, straight from the file below any buffer: from a stream what has
        arrived (one read), from a file what fits (but at its end)."""
        got = self._stream.readinto(view)
        return int(got or 0)

    @property
    def bytes_read(self) -> int:
        """Bytes of the input file consumed so far (compressed ones for .gz); 0 on a stream."""
        if not self._regular:
            return 0
        try:
            return int(self._file.tell())
        except (OSError, ValueError):
            return 0

    def _pcapng_block(self) -> int:
        """Handle the non-packet pcapng block at the read position; _GO_ON once done."""
        pos, avail = self._pos, self._end - self._pos
        if avail < 12:
            return _NEED_MORE
        head = self._buf[pos : pos + 12].tobytes()
        big = self._big
        btype = int.from_bytes(head[:4], "big" if big else "little")
        if btype == _SHB:
            if head[8:] not in (_BOM_BIG, _BOM_LITTLE):
                return _CORRUPT
            big = head[8:] == _BOM_BIG
        order = ">" if big else "<"
        (blen,) = struct.unpack_from(order + "I", head, 4)
        if blen < 12 or blen % 4 or blen > _MAX_BLOCK:
            return _CORRUPT
        if avail < blen:
            return _NEED_MORE
        block = self._buf[pos : pos + blen].tobytes()
        if struct.unpack_from(order + "I", block, blen - 4)[0] != blen:
            return _CORRUPT
        if btype == _SHB:  # a new section: new endianness, interfaces numbered from 0
            self._big = big
            self._ifaces = np.zeros((0, 6), np.int64)
        elif btype == _IDB:
            if blen < 20:
                return _CORRUPT
            row = self._interface(block[8:-4], order)
            self._ifaces = np.vstack((cast(NDArray[np.int64], self._ifaces), [row]))
        self._pos = pos + blen
        return _GO_ON

    def _interface(self, body: bytes, order: str) -> list[int]:
        """A row of the interface table from an Interface Description Block's body."""
        link_type, _, snaplen = struct.unpack_from(order + "HHI", body)
        link_type = self._check_link_type(link_type)
        shift, mul, div, offset = 0, 1000, 1, 0  # default resolution: microseconds
        pos = 8
        while pos + 4 <= len(body):
            code, size = struct.unpack_from(order + "HH", body, pos)
            value = body[pos + 4 : pos + 4 + size]
            if code == 0:
                break
            if code == 9 and len(value) == 1:  # if_tsresol
                exp = value[0] & 0x7F
                if value[0] & 0x80 and exp:  # 2^-exp
                    shift = min(exp, 62)
                else:  # 10^-exp (2^-0 is 10^-0)
                    mul, div = 10 ** max(9 - exp, 0), 10 ** min(max(exp - 9, 0), 18)
            elif code == 14 and len(value) == 8:  # if_tsoffset, seconds
                (seconds,) = struct.unpack(order + "q", value)
                offset = seconds * 1_000_000_000 if abs(seconds) < 1 << 33 else 0
            pos += 4 + size + (-size % 4)
        return [link_type, snaplen, shift, mul, div, offset]


def _pump(head: NDArray[np.uint8], source: Any, child: subprocess.Popen[bytes]) -> None:
    """Feed a gzip child: ``head`` (the compressed bytes already read), then the rest of
    ``source``, moved by ``splice(2)`` in the kernel when it has a file descriptor, else
    through one buffer. Compressed bytes can be frames in the clear (deflate stores a block
    it cannot shrink as it is), so both are wiped once written, and no ``bytes`` copy is made."""
    sink = cast(BinaryIO, child.stdin)
    buffer = np.zeros(1 << 16, np.uint8)
    try:
        sink.write(head.data)
        head.fill(0)
        try:
            fd = source.fileno()
        except (AttributeError, OSError):
            fd = None
        if fd is None:
            while got := source.readinto(buffer.data):
                sink.write(buffer.data[:got])
                buffer[:got] = 0
        else:
            while os.splice(fd, sink.fileno(), 1 << 16):
                pass
    except OSError:
        pass  # the reader closed early: the child is gone
    finally:
        head.fill(0)
        buffer.fill(0)
        with contextlib.suppress(OSError):
            sink.close()


def read_ahead(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Yield ``items`` while a background thread produces the next ones.

    The numba kernels release the GIL, so on two cores the work behind the next item
    (reading, splitting, parsing a batch) overlaps what the caller does with this one.
    At most ``depth`` items wait; an error in the producer is raised here; leaving early
    stops the producer.
    """
    done = object()
    box: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        box.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            box.put(done)
        except BaseException as exc:  # handed to the consumer, raised there
            box.put(exc)

    producer = threading.Thread(target=produce, name="footfall-capture", daemon=True)
    producer.start()
    try:
        while (item := box.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield cast(T, item)
    finally:
        stop.set()
        producer.join()


def open_capture(source: str | os.PathLike[str]) -> CaptureReader:
    """Open a capture file, or standard input for "-"."""
    if os.fspath(source) == "-":
        return CaptureReader(sys.stdin.buffer)
    return CaptureReader(source)
