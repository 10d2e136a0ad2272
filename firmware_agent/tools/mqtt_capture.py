"""MQTT PUBLISH messages out of a capture of agents' network traffic (pcap or pcapng).

A reviewer can record what really leaves an agent (``tcpdump -i eth0 -w agent.pcap port
1883``) and audit it offline with ``footfall-agent audit --pcap agent.pcap``. TCP streams
are put back together by sequence number (retransmissions are dropped), each stream is
read as MQTT from its CONNECT (which gives the protocol version: 3.1.1 or 5), and every
PUBLISH yields its topic and payload, in capture order. TLS streams cannot be read: they
are reported, as are streams whose start is missing.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from firmware_agent.contract.errors import CaptureError

__all__ = ["MqttStream", "publishes"]

_CONNECT, _PUBLISH = 1, 3


@dataclass(slots=True)
class MqttStream:
    """One direction of one TCP connection: its segments by sequence number."""

    name: str
    first_seen: int
    segments: dict[int, bytes] = field(default_factory=dict)
    syn_seq: int | None = None

    def data(self) -> bytes:
        """The stream's bytes from its first segment, holes left out."""
        out = bytearray()
        expected: int | None = None
        for seq in sorted(self.segments):
            chunk = self.segments[seq]
            if expected is not None and seq < expected:  # overlaps a retransmission
                chunk = chunk[expected - seq :]
            out += chunk
            expected = max(expected or 0, seq + len(self.segments[seq]))
        return bytes(out)


def publishes(path: Path, problems: list[str] | None = None) -> Iterator[tuple[str, bytes]]:
    """(topic, payload) of every MQTT PUBLISH in the capture, stream by stream in the order
    the streams began. What cannot be read is described in ``problems``."""
    from scapy.layers.inet import TCP  # noqa: PLC0415  (scapy is slow to import)
    from scapy.utils import PcapReader  # noqa: PLC0415

    notes = problems if problems is not None else []
    streams: dict[tuple[str, int, str, int], MqttStream] = {}
    try:
        reader = PcapReader(str(path))
    except (OSError, ValueError) as exc:
        raise CaptureError(f"{path}: cannot read the capture: {exc}") from exc
    with reader:
        for index, packet in enumerate(reader):
            if TCP not in packet:
                continue
            tcp = packet[TCP]
            ip = tcp.underlayer
            key = (str(ip.src), int(tcp.sport), str(ip.dst), int(tcp.dport))
            stream = streams.setdefault(key, MqttStream(f"{key[0]}:{key[1]}", index))
            seq = int(tcp.seq)
            if tcp.flags.S:
                stream.syn_seq = seq
            payload = bytes(tcp.payload)
            if payload:
                stream.segments.setdefault(seq, payload)
    for stream in sorted(streams.values(), key=lambda s: s.first_seen):
        data = stream.data()
        if not data:
            continue
        yield from _read_stream(stream.name, data, notes)


def _read_stream(name: str, data: bytes, notes: list[str]) -> Iterator[tuple[str, bytes]]:
    if data[0] == 0x16:
        notes.append(
            f"stream from {name}: TLS, cannot be read (capture before TLS or use --broker)"
        )
        return
    if data[0] >> 4 != _CONNECT:
        return  # the broker's direction, or a stream whose start is missing
    version = 4
    at = 0
    while at < len(data):
        try:
            kind, flags, body, at = _packet(data, at)
        except IndexError:
            notes.append(f"stream from {name}: ends inside an MQTT packet")
            return
        if kind == _CONNECT:
            version = body[2 + int.from_bytes(body[:2], "big")]
        elif kind == _PUBLISH:
            topic_len = int.from_bytes(body[:2], "big")
            topic = body[2 : 2 + topic_len].decode("utf-8", "replace")
            i = 2 + topic_len + (2 if (flags >> 1) & 3 else 0)  # packet id at QoS 1 and 2
            if version == 5:
                props, i = _varint(body, i)
                i += props
            yield topic, body[i:]


def _packet(data: bytes, at: int) -> tuple[int, int, bytes, int]:
    """(type, flags, body, next offset) of the MQTT packet at ``at``."""
    first = data[at]
    length, start = _varint(data, at + 1)
    if start + length > len(data):
        raise IndexError("truncated")
    return first >> 4, first & 0x0F, data[start : start + length], start + length


def _varint(data: bytes, at: int) -> tuple[int, int]:
    """MQTT's variable byte integer at ``at``: (value, offset after it)."""
    value, shift = 0, 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7
