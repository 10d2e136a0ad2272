"""Live source: probe requests from a monitor-mode interface (``iface:<name>``), block by block.

:class:`LiveCapture` opens an ``AF_PACKET`` socket on the interface and yields the same
:class:`~firmware_agent.stages.batch.FrameBatch` objects a capture file gives, so the pipeline
cannot tell a live run from a replay:

* **Kernel filter.** Only probe requests reach the agent: the classic-BPF program for
  ``type mgt subtype probe-req`` is attached (``SO_ATTACH_FILTER``) before the socket is bound,
  so not one other frame is queued. The programs are constants (:data:`PROBE_REQUEST_FILTERS`),
  compiled once by libpcap and pasted here, so the agent needs no libpcap at run time. A frame
  whose radio header is too short to find the 802.11 header never passes it: live, ``malformed``
  counts damaged probe requests only, where a replay also counts unreadable radio headers.
* **Ring.** Frames land in a ``PACKET_RX_RING`` (``TPACKET_V3``) shared with the kernel: blocks
  of many frames, handed over when full or after ``_BLOCK_TIMEOUT_MS``. A compiled walk turns
  every ready block into one batch whose rows point *into the ring* (a transient batch: zero
  copy, no system call per frame). The kernel's timestamps (ns) come with each frame.
* **Release.** A block goes back to the kernel when the generator is resumed: the pipeline's
  parse stage (:func:`firmware_agent.stages.pipeline.parse_frames`, run by ``map`` inside
  :func:`~firmware_agent.stages.capture.read_ahead`) has parsed the batch by then, because ``map``
  parses a batch before it asks for the next one, and a
  :class:`~firmware_agent.stages.batch.ProbeBatch`
  owns its arrays. Before handing a block back its frame bytes are zeroed (they hold addresses
  and SSIDs), then a release fence orders those writes before the status word the kernel reads;
  an acquire fence orders reading a ready block's status before reading its frames (needed on
  the Pi's ARM cores; free on x86).
* **Fallback.** Where the ring cannot be set up (an old or restricted kernel), a plain receive
  loop (``recvmsg_into`` with kernel timestamps) fills a buffer of its own: one system call per
  frame, a few hundred thousand frames per second at most, plenty for one radio.
* **Drops.** ``PACKET_STATISTICS`` (frames the filter accepted, frames dropped because the ring
  was full) is read on demand and accumulated (:meth:`LiveCapture.kernel_stats`): the kernel
  resets it at each read.
* **Quiet air.** When no frame comes for ``idle_s``, an empty batch is yielded anyway, so that
  the pipeline can close windows on the wall clock
  (:meth:`~firmware_agent.stages.pipeline.Pipeline.tick`).

The link type comes from the interface's hardware type (radiotap for a monitor interface on any
current driver); :class:`LiveSettings` can override it (a veth pair in the tests carries radiotap
frames on an Ethernet-typed device). Frame contents are never logged.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import mmap
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Final

import numpy as np
from numpy.typing import NDArray

from firmware_agent.contract.errors import LiveCaptureError
from firmware_agent.kernels import compiler_module, kernel
from firmware_agent.stages.batch import (
    LINKTYPE_AVS,
    LINKTYPE_IEEE802_11,
    LINKTYPE_PRISM,
    LINKTYPE_RADIOTAP,
    FrameBatch,
)
from firmware_agent.stages.capture import SUPPORTED_LINK_TYPES
from firmware_agent.stages.channels import ChannelHopper
from firmware_agent.stages.config import LiveSettings

__all__ = [
    "IFACE_PREFIX",
    "PROBE_REQUEST_FILTERS",
    "KernelStats",
    "LiveCapture",
    "interface_facts",
]

log = logging.getLogger("footfall.agent")

IFACE_PREFIX: Final = "iface:"

# Classic BPF for ``type mgt subtype probe-req``, per link type, as (code, jt, jf, k). Made with
# tcpdump 4.99.3 / libpcap 1.10.3 (Debian 12): ``tcpdump -y IEEE802_11_RADIO -i mon0 -dd
# 'type mgt subtype probe-req'``, or without an interface ``tcpdump -r EMPTY -dd '...'`` where
# EMPTY is a pcap header alone (snaplen 262144) with the link type. Each program accepts the
# whole frame (262144) or nothing. libpcap cannot filter 802.11 inside PPI (192).
PROBE_REQUEST_FILTERS: Final[dict[int, tuple[tuple[int, int, int, int], ...]]] = {
    LINKTYPE_RADIOTAP: (
        (0x30, 0, 0, 0x00000003),  # ldb [3]         radiotap length, high byte
        (0x64, 0, 0, 0x00000008),  # lsh #8
        (0x07, 0, 0, 0x00000000),  # tax
        (0x30, 0, 0, 0x00000002),  # ldb [2]         low byte
        (0x4C, 0, 0, 0x00000000),  # or x
        (0x07, 0, 0, 0x00000000),  # tax             x = radiotap length
        (0x50, 0, 0, 0x00000000),  # ldb [x + 0]     802.11 frame control, first byte
        (0x54, 0, 0, 0x000000FC),  # and #0xfc       type and subtype
        (0x15, 0, 1, 0x00000040),  # jeq #0x40       management, probe request
        (0x06, 0, 0, 0x00040000),  # ret #262144
        (0x06, 0, 0, 0x00000000),  # ret #0
    ),
    LINKTYPE_IEEE802_11: (
        (0x30, 0, 0, 0x00000000),
        (0x54, 0, 0, 0x000000FC),
        (0x15, 0, 1, 0x00000040),
        (0x06, 0, 0, 0x00040000),
        (0x06, 0, 0, 0x00000000),
    ),
    LINKTYPE_PRISM: (  # the AVS header may stand where a Prism header is expected
        (0x20, 0, 0, 0x00000000),
        (0x54, 0, 0, 0xFFFFF000),
        (0x15, 0, 2, 0x80211000),
        (0x20, 0, 0, 0x00000004),
        (0x05, 0, 0, 0x00000001),
        (0x00, 0, 0, 0x00000090),
        (0x02, 0, 0, 0x00000000),
        (0x07, 0, 0, 0x00000000),
        (0x61, 0, 0, 0x00000000),
        (0x50, 0, 0, 0x00000000),
        (0x54, 0, 0, 0x000000FC),
        (0x15, 0, 1, 0x00000040),
        (0x06, 0, 0, 0x00040000),
        (0x06, 0, 0, 0x00000000),
    ),
    LINKTYPE_AVS: (
        (0x20, 0, 0, 0x00000004),
        (0x07, 0, 0, 0x00000000),
        (0x50, 0, 0, 0x00000000),
        (0x54, 0, 0, 0x000000FC),
        (0x15, 0, 1, 0x00000040),
        (0x06, 0, 0, 0x00040000),
        (0x06, 0, 0, 0x00000000),
    ),
}

# Linux hardware types (ARPHRD_*) of wireless interfaces, and their pcap link types.
_ARPHRD_LINK_TYPES: Final = {801: LINKTYPE_IEEE802_11, 802: LINKTYPE_PRISM, 803: LINKTYPE_RADIOTAP}
_ARPHRD_NAMES: Final = {1: "Ethernet", 772: "loopback", 776: "IPv6-in-IPv4", 65534: "none (tun)"}

_ETH_P_ALL: Final = 0x0003
_SOL_PACKET: Final = 263
_PACKET_RX_RING: Final = 5
_PACKET_STATISTICS: Final = 6
_PACKET_VERSION: Final = 10
_TPACKET_V3: Final = 2
_TP_STATUS_USER: Final = 1
_SO_ATTACH_FILTER: Final = 26
_SO_RCVBUFFORCE: Final = 33
_SO_TIMESTAMPNS: Final = 35  # also SCM_TIMESTAMPNS
_SIOCGIFFLAGS: Final = 0x8913
_SIOCGIFHWADDR: Final = 0x8927
_IFF_UP: Final = 0x1

_BLOCK_BYTES: Final = 1 << 18  # 256 KiB: a power-of-two number of pages on 4k and 16k kernels
_BLOCK_TIMEOUT_MS: Final = 100  # the kernel hands over a block that is not full after this
_TAKE_BLOCKS: Final = 8  # ready blocks walked into one batch, at most
_MIN_FRAME_SLOT: Final = 64  # tpacket3_hdr (48) + sockaddr_ll, aligned: no frame takes less
_RECV_BUFFER: Final = 4 << 20  # the fallback's batch buffer
_RECV_FRAME: Final = 1 << 16  # room kept for one frame in the fallback
_DROP_CHECK_S: Final = 60  # how often the kernel's drop counter is looked at (and logged)
NS: Final = 1_000_000_000

Taken = tuple[FrameBatch, Callable[[], None]]  # a batch, and what to do once it is parsed


@dataclass(frozen=True, slots=True)
class KernelStats:
    """The socket's counters since it was opened (the kernel's ``PACKET_STATISTICS``)."""

    packets: int  # frames the filter accepted, dropped ones included
    drops: int  # frames lost because the ring (or receive buffer) was full
    freezes: int  # times the ring was full (TPACKET_V3 only)


def interface_facts(iface: str) -> tuple[int, int, bool]:
    """(ARPHRD hardware type, pcap link type or 0, up) of an interface; LiveCaptureError if it
    is absent or cannot be looked at (that needs CAP_NET_RAW)."""
    try:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    except PermissionError as exc:
        raise LiveCaptureError(f"looking at interface {iface!r} needs CAP_NET_RAW") from exc
    with sock:
        hatype, link_type = _hardware_type(sock, iface)
        return hatype, link_type, _is_up(sock, iface)


def _ifreq(sock: socket.socket, iface: str, request: int) -> bytes:
    try:
        name = iface.encode()
        if not 0 < len(name) < 16:
            raise OSError(0, "not an interface name")
        return fcntl.ioctl(sock.fileno(), request, struct.pack("16s16x", name))
    except OSError as exc:
        raise LiveCaptureError(
            f"interface {iface!r} does not exist ({exc.strerror}); 'ip link' lists the "
            "interfaces, 'iw dev' the wireless ones"
        ) from exc


def _hardware_type(sock: socket.socket, iface: str) -> tuple[int, int]:
    (hatype,) = struct.unpack_from("H", _ifreq(sock, iface, _SIOCGIFHWADDR), 16)
    return hatype, _ARPHRD_LINK_TYPES.get(hatype, 0)


def _is_up(sock: socket.socket, iface: str) -> bool:
    (flags,) = struct.unpack_from("H", _ifreq(sock, iface, _SIOCGIFFLAGS), 16)
    return bool(flags & _IFF_UP)


def _attach_filter(sock: socket.socket, program: tuple[tuple[int, int, int, int], ...]) -> None:
    code = b"".join(struct.pack("HBBI", *insn) for insn in program)
    buffer = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("HP", len(program), ctypes.addressof(buffer))
    sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)  # the kernel copies it now


intrinsics = compiler_module("firmware_agent.kernels.intrinsics")


@kernel(export="UniTuple(i8, 2)(u4[:], i8, i8, i8, i8, i8, i8[:], i4[:], i8[:], u2[:])")
def _take_blocks(
    ring32: NDArray[np.uint32],
    block_bytes: int,
    n_blocks: int,
    first: int,
    most: int,
    link: int,
    offsets: NDArray[np.int64],
    lengths: NDArray[np.int32],
    ts_ns: NDArray[np.int64],
    links: NDArray[np.uint16],
) -> tuple[int, int]:
    """Walk the ready blocks from ``first`` (at most ``most``) into the batch arrays.

    Offsets are byte offsets into the ring. Returns (frames, blocks taken). A block's layout
    (``linux/if_packet.h``): ``tpacket_block_desc`` with status at byte 8, frame count at 12,
    first frame at 16, used length at 20; each frame starts with a ``tpacket3_hdr``: next offset
    (0), seconds (4), nanoseconds (8), captured length (12), frame start (``tp_mac``, 24).
    """
    n = 0
    taken = 0
    while taken < most and taken < n_blocks:
        b = (first + taken) % n_blocks
        base = b * block_bytes
        w = base // 4
        if ring32[w + 2] & _TP_STATUS_USER == 0:
            break
        intrinsics.acquire_fence()
        count = int(ring32[w + 3])
        if n + count > offsets.shape[0]:
            break
        used = min(int(ring32[w + 5]), block_bytes)
        p = int(ring32[w + 4])
        for _ in range(count):
            if p < 24 or p % 4 != 0 or p + 48 > used:
                break  # cannot happen with a sane kernel; never read outside the block
            h = (base + p) // 4
            caplen = int(ring32[h + 3])
            mac = int(ring32[h + 6]) & 0xFFFF
            if p + mac + caplen > used:
                break
            offsets[n] = base + p + mac
            lengths[n] = caplen
            ts_ns[n] = int(ring32[h + 1]) * NS + int(ring32[h + 2])
            links[n] = link
            n += 1
            step = int(ring32[h])
            if step == 0:
                break
            p += step
        taken += 1
    return n, taken


@kernel(export="void(u1[:], u4[:], i8, i8, i8, i8)")
def _release_blocks(
    ring: NDArray[np.uint8],
    ring32: NDArray[np.uint32],
    block_bytes: int,
    n_blocks: int,
    first: int,
    count: int,
) -> None:
    """Zero the frames of ``count`` blocks from ``first``, then hand the blocks to the kernel."""
    for t in range(count):
        base = ((first + t) % n_blocks) * block_bytes
        w = base // 4
        start = np.uint64(base + min(int(ring32[w + 4]), block_bytes))
        stop = np.uint64(base + min(int(ring32[w + 5]), block_bytes))
        for i in range(start, stop):  # unsigned indices: LLVM turns this into memset
            ring[i] = 0
        intrinsics.release_fence()
        ring32[w + 2] = 0  # TP_STATUS_KERNEL


def _empty(ring: NDArray[np.uint8]) -> FrameBatch:
    """A batch of no frames: what quiet air yields after ``idle_s``."""
    return FrameBatch(
        ring,
        np.empty(0, np.int64),
        np.empty(0, np.int32),
        np.empty(0, np.int64),
        np.empty(0, np.uint16),
        True,
    )


class LiveCapture:
    """Streams probe requests from a live interface as FrameBatch objects (see module doc).

    A context manager and a single-use iterable. ``stop`` (an event, or :meth:`stop`) ends the
    iteration within ``idle_s``. Opening needs ``CAP_NET_RAW``.
    """

    def __init__(
        self,
        iface: str,
        settings: LiveSettings | None = None,
        *,
        stop: threading.Event | None = None,
        idle_s: float = 0.25,
        use_ring: bool = True,
    ) -> None:
        settings = settings or LiveSettings()
        self.iface = iface
        self.name = IFACE_PREFIX + iface
        self.records_read = 0
        self.bytes_read = 0  # nothing like a file position here; kept for the progress line
        self._stop = stop or threading.Event()
        self._idle_s = idle_s
        self._stats_lock = threading.Lock()
        self._totals = [0, 0, 0]
        self._closed = False
        self._ring: NDArray[np.uint8] | None = None
        self._map: mmap.mmap | None = None
        self._hopper: ChannelHopper | None = None
        self._bound = False
        try:
            self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # receives nothing yet
        except PermissionError as exc:
            raise LiveCaptureError(
                f"reading interface {iface!r} needs CAP_NET_RAW: run as root, or give the "
                "service AmbientCapabilities=CAP_NET_RAW (hardware/footfall-agent.service)"
            ) from exc
        try:
            self.link_type = self._link_type(settings)
            _attach_filter(self._sock, PROBE_REQUEST_FILTERS[self.link_type])
            self.mode = "ring" if use_ring and self._map_ring(settings.ring_mb) else "recv"
            if self.mode == "recv":
                self._prepare_recv(settings.ring_mb)
            self._sock.bind((iface, _ETH_P_ALL))
            self._bound = True
            if settings.hop:
                self._hopper = ChannelHopper(iface, settings.hop_channels, settings.hop_dwell_ms)
                self._hopper.start()
        except OSError as exc:
            self.close()
            raise LiveCaptureError(f"interface {iface!r}: cannot open: {exc.strerror}") from exc
        except BaseException:
            self.close()
            raise
        log.info(
            "capturing on %s: link type %s, %s",
            iface,
            SUPPORTED_LINK_TYPES[self.link_type],
            "kernel ring" if self.mode == "ring" else "receive loop",
        )

    def _link_type(self, settings: LiveSettings) -> int:
        hatype, link_type = _hardware_type(self._sock, self.iface)
        if not _is_up(self._sock, self.iface):
            raise LiveCaptureError(
                f"interface {self.iface!r} is down: 'ip link set {self.iface} up' "
                "(hardware/footfall-monitor.service does it at boot)"
            )
        if settings.link_type is not None:
            return settings.link_type
        if not link_type:
            kind = _ARPHRD_NAMES.get(hatype, f"hardware type {hatype}")
            raise LiveCaptureError(
                f"interface {self.iface!r} is not in monitor mode (it is {kind}): make a monitor "
                f"interface with 'iw phy <phy> interface add mon0 type monitor' "
                "(hardware/footfall-monitor.service), or set source.link_type if its frames "
                "carry radiotap anyway"
            )
        return link_type

    def _map_ring(self, ring_mb: int) -> bool:
        """Set up the TPACKET_V3 ring; False (and a log line) where the kernel refuses."""
        n_blocks = max(2, (ring_mb << 20) // _BLOCK_BYTES)
        req = struct.pack(
            "7I", _BLOCK_BYTES, n_blocks, 2048, _BLOCK_BYTES // 2048 * n_blocks,
            _BLOCK_TIMEOUT_MS, 0, 0,
        )  # fmt: skip
        try:
            self._sock.setsockopt(_SOL_PACKET, _PACKET_VERSION, _TPACKET_V3)
            self._sock.setsockopt(_SOL_PACKET, _PACKET_RX_RING, req)
        except OSError as exc:
            log.warning(
                "interface %s: no kernel ring (%s); reading frame by frame", self.iface, exc
            )
            return False
        try:
            self._map = mmap.mmap(self._sock.fileno(), _BLOCK_BYTES * n_blocks)
        except OSError as exc:  # frames would go to a ring nobody reads: take it down again
            self._sock.setsockopt(_SOL_PACKET, _PACKET_RX_RING, bytes(28))
            log.warning("interface %s: cannot map the ring (%s); reading frame by frame",
                        self.iface, exc)  # fmt: skip
            return False
        self._ring = np.frombuffer(self._map, np.uint8)
        self._n_blocks = n_blocks
        return True

    def _prepare_recv(self, ring_mb: int) -> None:
        self._sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        try:  # beyond net.core.rmem_max: needs CAP_NET_ADMIN
            self._sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, ring_mb << 20)
        except PermissionError:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, ring_mb << 20)
        self._ring = np.zeros(_RECV_BUFFER, np.uint8)

    def __enter__(self) -> LiveCapture:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def stop(self) -> None:
        """End the iteration (within ``idle_s``)."""
        self._stop.set()

    def close(self) -> None:
        """Stop, close the socket, zero the ring. Call it once the iteration is over.

        The ring is unmapped only when no batch points into it any more (``mmap`` refuses while
        an array views it); until then it stays mapped, zeroed, so no reader can fault.
        """
        self._stop.set()
        if self._closed:
            return
        stats = self.kernel_stats()  # the last counts, kept for after the close
        self._closed = True
        if self._bound:
            log.info(
                "capture on %s stopped: %d probe requests, %d dropped by the kernel",
                self.iface, stats.packets, stats.drops,
            )  # fmt: skip
        if self._hopper is not None:
            self._hopper.stop()
        self._sock.close()
        if self._ring is not None:
            self._ring.fill(0)
        self._ring = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                log.debug("ring of %s unmapped once the last batch is gone", self.iface)

    def kernel_stats(self) -> KernelStats:
        """Frames accepted and dropped by the kernel since opening (until closing)."""
        with self._stats_lock:
            if not self._closed:
                raw = self._sock.getsockopt(_SOL_PACKET, _PACKET_STATISTICS, 12)
                values = struct.unpack(f"{len(raw) // 4}I", raw)
                for i, value in enumerate(values):
                    self._totals[i] += value
            return KernelStats(*self._totals)

    def __iter__(self) -> Iterator[FrameBatch]:
        ring = self._ring  # taken once: close() clears the attribute
        if ring is None:
            return iter(())
        take = self._ring_taker(ring) if self.mode == "ring" else self._recv_taker(ring)
        return self._batches(take, ring)

    def _batches(
        self, take: Callable[[], Taken | None], ring: NDArray[np.uint8]
    ) -> Iterator[FrameBatch]:
        """Batches as they come; an empty one after ``idle_s`` of quiet air."""
        poller = select.poll()
        poller.register(self._sock, select.POLLIN | select.POLLERR)
        idle_ms = max(1, int(self._idle_s * 1000))
        quiet_since = checked = time.monotonic()
        drops = 0
        while not self._stop.is_set():
            if self._hopper is not None and self._hopper.error is not None:
                raise self._hopper.error
            if time.monotonic() - checked >= _DROP_CHECK_S:
                checked = time.monotonic()
                now = self.kernel_stats().drops
                if now > drops:
                    log.warning(
                        "interface %s: the kernel dropped %d probe requests in the last %d s "
                        "(the agent falls behind: source.ring_mb, or a lighter load)",
                        self.iface, now - drops, _DROP_CHECK_S,
                    )  # fmt: skip
                drops = now
            taken = take()
            if taken is not None:
                batch, release = taken
                self.records_read += len(batch)
                try:
                    yield batch  # parsed before the generator is resumed (module doc)
                finally:
                    release()
                quiet_since = time.monotonic()
                continue
            if time.monotonic() - quiet_since >= self._idle_s:
                quiet_since = time.monotonic()
                yield _empty(ring)
            for _, event in poller.poll(idle_ms):
                if event & select.POLLERR and not self._stop.is_set():
                    err = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    raise LiveCaptureError(
                        f"interface {self.iface!r} failed: {os.strerror(err)} (was it removed?)"
                    )

    def _ring_taker(self, ring: NDArray[np.uint8]) -> Callable[[], Taken | None]:
        """The ready blocks as one batch pointing into the ring, and how to hand them back."""
        ring32 = ring.view(np.uint32)
        capacity = _TAKE_BLOCKS * (_BLOCK_BYTES // _MIN_FRAME_SLOT)
        offsets = np.empty(capacity, np.int64)
        lengths = np.empty(capacity, np.int32)
        ts_ns = np.empty(capacity, np.int64)
        links = np.empty(capacity, np.uint16)
        first = 0

        def take() -> Taken | None:
            nonlocal first
            n, count = _take_blocks(
                ring32, _BLOCK_BYTES, self._n_blocks, first, _TAKE_BLOCKS, self.link_type,
                offsets, lengths, ts_ns, links,
            )  # fmt: skip
            if not count:
                return None
            batch = FrameBatch(
                ring, offsets[:n].copy(), lengths[:n].copy(), ts_ns[:n].copy(),
                links[:n].copy(), True,
            )  # fmt: skip
            taken_from = first
            first = (first + count) % self._n_blocks

            def release() -> None:
                if not self._closed:
                    _release_blocks(ring, ring32, _BLOCK_BYTES, self._n_blocks, taken_from, count)

            return batch, release

        return take

    def _recv_taker(self, buf: NDArray[np.uint8]) -> Callable[[], Taken | None]:
        """What has arrived, frame by frame, into the buffer, and how to zero it after."""
        view = buf.data
        capacity = _RECV_BUFFER // 64
        offsets = np.empty(capacity, np.int64)
        lengths = np.empty(capacity, np.int32)
        ts_ns = np.empty(capacity, np.int64)
        ancillary = socket.CMSG_SPACE(16)
        self._sock.setblocking(False)

        def take() -> Taken | None:
            n = used = 0
            while n < capacity and used + _RECV_FRAME <= buf.size:
                try:
                    size, anc, _, _ = self._sock.recvmsg_into(
                        [view[used : used + _RECV_FRAME]], ancillary
                    )
                except BlockingIOError:
                    break
                stamp = time.time_ns()
                for level, kind, data in anc:
                    if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(data) >= 16:
                        sec, nsec = struct.unpack_from("qq", data)
                        stamp = sec * NS + nsec
                offsets[n], lengths[n], ts_ns[n] = used, min(size, _RECV_FRAME), stamp
                used += int(lengths[n])
                n += 1
            if not n:
                return None
            links = np.full(n, self.link_type, np.uint16)
            batch = FrameBatch(
                buf, offsets[:n].copy(), lengths[:n].copy(), ts_ns[:n].copy(), links, True
            )

            def release() -> None:
                buf[:used] = 0

            return batch, release

        return take
