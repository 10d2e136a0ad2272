"""The MQTT packet codec: the packets ingest's session (:mod:`aggregator.mqtt`) writes and
reads, MQTT 5 or 3.1.1, as functions over bytes (no socket, no state), so each packet can be
tested alone (``tests/aggregator/test_mqtt_codec.py``) and the tests' agent fleet
(``tests/support/agent_fleet.py``) speaks with the same code.

Written: CONNECT, SUBSCRIBE (QoS 1), PUBLISH (QoS 0 or 1), PUBACK, PINGREQ, DISCONNECT.
Read: PUBLISH, CONNACK, SUBACK, PUBACK, a packet's frame (:func:`next_packet`). Something a
broker sends that cannot be read raises :class:`ProtocolError` with what is wrong in it.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

__all__ = [
    "DISCONNECT",
    "PINGREQ",
    "ProtocolError",
    "Publish",
    "connect_packet",
    "decode_connack",
    "decode_puback",
    "decode_publish",
    "decode_suback",
    "next_packet",
    "puback_packets",
    "publish_packet",
    "read_varint",
    "skip_properties",
    "subscribe_packet",
    "varint",
]

PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"  # normal disconnection: the session stays (its expiry runs)


class ProtocolError(Exception):
    """The broker sent something this session cannot read, or refused it."""


def varint(n: int) -> bytes:
    """A variable byte integer (a packet's remaining length, a properties length)."""
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def read_varint(data: bytes | bytearray, at: int) -> tuple[int, int] | None:
    """(value, bytes used) of a variable byte integer at ``at``; None if incomplete."""
    value, shift = 0, 0
    for i in range(4):
        if at + i >= len(data):
            return None
        byte = data[at + i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i + 1
        shift += 7
    raise ProtocolError("malformed packet: a length of more than four bytes")


def skip_properties(data: bytes | bytearray, at: int, packet: str) -> int:
    """Where an MQTT 5 packet's properties that start at ``at`` end."""
    try:
        first = data[at]
    except IndexError:
        raise ProtocolError(f"malformed {packet}: no properties length") from None
    if first < 0x80:  # under 128 bytes of properties: one byte says so
        return at + 1 + first
    length = read_varint(data, at)
    if length is None:
        raise ProtocolError(f"malformed {packet}: its properties length is cut short")
    return at + length[1] + length[0]


def _string(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return struct.pack("!H", len(raw)) + raw


def connect_packet(
    client_id: str,
    username: str,
    password: str,
    keepalive_s: int,
    session_expiry_s: int,
    receive_maximum: int,
    v5: bool = True,
    maximum_packet_size: int = 0,
    *,
    clean_start: bool = False,
) -> bytes:
    """CONNECT, clean start (3.1.1: clean session) off unless ``clean_start``; MQTT 5 with the
    session expiry, receive maximum and maximum packet size (0: none), 3.1.1 (protocol level
    4) without properties."""
    flags = (0x80 if username else 0) | (0x40 if password else 0) | (0x02 if clean_start else 0)
    body = _string("MQTT") + bytes([5 if v5 else 4, flags]) + struct.pack("!H", keepalive_s)
    if v5:
        properties = b"\x11" + struct.pack("!I", session_expiry_s)
        properties += b"\x21" + struct.pack("!H", receive_maximum)
        if maximum_packet_size:
            properties += b"\x27" + struct.pack("!I", maximum_packet_size)
        body += varint(len(properties)) + properties
    body += _string(client_id)
    if username:
        body += _string(username)
    if password:
        body += _string(password.encode())
    return b"\x10" + varint(len(body)) + body


def subscribe_packet(mid: int, filters: Sequence[str], v5: bool = True) -> bytes:
    """SUBSCRIBE each filter at QoS 1 (MQTT 5: with no properties)."""
    body = struct.pack("!H", mid) + (b"\x00" if v5 else b"")
    for topic_filter in filters:
        body += _string(topic_filter) + b"\x01"
    return b"\x82" + varint(len(body)) + body


def publish_packet(
    topic: str | bytes,
    payload: bytes,
    v5: bool = True,
    *,
    qos: int = 0,
    mid: int = 0,
    retain: bool = False,
    dup: bool = False,
) -> bytes:
    """PUBLISH (MQTT 5: with no properties); ``mid``, the packet identifier, at QoS 1."""
    header = 0x30 | (0x08 if dup else 0) | qos << 1 | (0x01 if retain else 0)
    body = _string(topic) + (struct.pack("!H", mid) if qos else b"")
    body += (b"\x00" if v5 else b"") + payload
    return bytes([header]) + varint(len(body)) + body


def puback_packets(mids: Sequence[int]) -> bytes:
    """PUBACKs (success, no properties: the two-byte form, the same in 3.1.1)."""
    return b"".join(b"\x40\x02" + struct.pack("!H", mid) for mid in mids)


def next_packet(data: bytes | bytearray, at: int = 0) -> tuple[int, int, int] | None:
    """The packet at ``at``: (fixed header byte, where its body starts, where it ends); None
    until all of it is in ``data``."""
    if len(data) - at < 2:
        return None
    length = read_varint(data, at + 1)
    if length is None:
        return None
    start = at + 1 + length[1]
    end = start + length[0]
    return None if end > len(data) else (data[at], start, end)


# A PUBLISH's (qos, retain, topic, packet identifier (0 at QoS 0), payload): a plain tuple,
# as ingest reads thousands a second (a NamedTuple took 0.7-0.9 µs more each to make here).
Publish = tuple[int, bool, str, int, bytes]


def decode_publish(header: int, body: bytes | bytearray, v5: bool = True) -> Publish:
    """A PUBLISH from its fixed header byte and body; :class:`ProtocolError` names what is
    malformed (a broker that sends it is broken: the session connects again)."""
    qos = (header >> 1) & 3
    if qos == 3:
        raise ProtocolError("malformed PUBLISH: QoS 3")
    if len(body) < 2:
        raise ProtocolError("malformed PUBLISH: no topic")
    at = 2 + ((body[0] << 8) | body[1])
    if at > len(body):
        raise ProtocolError("malformed PUBLISH: its topic runs past the packet")
    try:
        topic = body[2:at].decode()
    except UnicodeDecodeError as exc:
        raise ProtocolError("malformed PUBLISH: its topic is not UTF-8") from exc
    mid = 0
    if qos:
        if at + 2 > len(body):
            raise ProtocolError("malformed PUBLISH: no packet identifier")
        mid = (body[at] << 8) | body[at + 1]
        if not mid:
            raise ProtocolError("malformed PUBLISH: packet identifier 0")
        at += 2
    if v5:
        at = skip_properties(body, at, "PUBLISH")
        if at > len(body):
            raise ProtocolError("malformed PUBLISH: its properties run past the packet")
    return qos, bool(header & 1), topic, mid, bytes(body[at:])


def decode_connack(body: bytes | bytearray) -> tuple[bool, int]:
    """A CONNACK's (session present, reason code; 3.1.1: return code)."""
    if len(body) < 2:
        raise ProtocolError("malformed CONNACK: shorter than 2 bytes")
    return bool(body[0] & 1), body[1]


def decode_suback(body: bytes | bytearray, v5: bool = True) -> bytes:
    """A SUBACK's reason codes (3.1.1: return codes), one per filter subscribed."""
    if len(body) < 3:
        raise ProtocolError("malformed SUBACK: no reason code")
    return bytes(body[skip_properties(body, 2, "SUBACK") if v5 else 2 :])


def decode_puback(body: bytes | bytearray) -> int:
    """A PUBACK's packet identifier (MQTT 5's reason code and properties, if any, ignored)."""
    if len(body) < 2:
        raise ProtocolError("malformed PUBACK: no packet identifier")
    return (body[0] << 8) | body[1]
