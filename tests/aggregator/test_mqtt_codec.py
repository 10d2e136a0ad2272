"""The MQTT packet codec of ingest (and of the tests' agent fleet), packet by packet.

What it writes and reads back comes out the same (MQTT 5 and 3.1.1); what it writes for a
broker only (CONNECT, SUBSCRIBE) is held to the bytes the MQTT specifications give; a packet a
broker could send broken is refused with what is wrong in it, never an IndexError. Real brokers
(Mosquitto, amqtt, NATS) speak with it in test_ingest*.py.
"""

from __future__ import annotations

import pytest

from aggregator.mqtt_codec import (
    ProtocolError,
    connect_packet,
    decode_connack,
    decode_puback,
    decode_publish,
    decode_suback,
    next_packet,
    puback_packets,
    publish_packet,
    read_varint,
    subscribe_packet,
    varint,
)


@pytest.mark.parametrize(
    ("value", "size"),
    [(0, 1), (127, 1), (128, 2), (16_383, 2), (16_384, 3), (2_097_151, 3), (2_097_152, 4)],
)
def test_variable_byte_integers_round_trip_at_each_length(value: int, size: int) -> None:
    encoded = varint(value)
    assert len(encoded) == size
    assert read_varint(b"\xff" + encoded, 1) == (value, size)
    assert read_varint(encoded[:-1], 0) is None  # not all here yet


@pytest.mark.parametrize("v5", [True, False])
@pytest.mark.parametrize(
    ("qos", "mid", "retain", "dup"),
    [(0, 0, True, False), (1, 1, False, False), (1, 65535, False, True)],
)
@pytest.mark.parametrize("payload", [b"", b"{}", bytes(range(256)) * 300])
def test_publish_round_trips(
    v5: bool, qos: int, mid: int, retain: bool, dup: bool, payload: bytes
) -> None:
    topic = "footfall/v1/s1/a-1_x/counts"
    data = publish_packet(topic, payload, v5, qos=qos, mid=mid, retain=retain, dup=dup)
    packet = next_packet(b"junk" + data, 4)
    assert packet is not None
    header, start, end = packet
    assert end == 4 + len(data)
    assert header >> 4 == 3 and bool(header & 0x08) == dup
    body = (b"junk" + data)[start:end]
    assert tuple(decode_publish(header, body, v5)) == (qos, retain, topic, mid, payload)
    for cut in (1, 2, len(data) - 1):
        assert next_packet(data[:cut]) is None


def test_pubacks_round_trip() -> None:
    data = puback_packets([1, 300, 65535])
    mids, at = [], 0
    while (packet := next_packet(data, at)) is not None:
        header, start, at = packet
        assert header == 0x40
        mids.append(decode_puback(data[start:at]))
    assert (mids, at) == ([1, 300, 65535], len(data))
    assert decode_puback(b"\x01\x2c\x10\x00") == 300  # MQTT 5: a reason code and properties


def test_connect_is_the_specifications_bytes() -> None:
    # MQTT 3.1.1 (level 4), clean session, user name and password, no keep-alive: the fleet's.
    assert connect_packet("c", "u", "p", 0, 0, 0, v5=False, clean_start=True) == (
        b"\x10\x13\x00\x04MQTT\x04\xc2\x00\x00\x00\x01c\x00\x01u\x00\x01p"
    )
    # MQTT 5, session kept: Session Expiry Interval (0x11), Receive Maximum (0x21), Maximum
    # Packet Size (0x27); no user name nor password: ingest's without an account.
    assert connect_packet("ingest", "", "", 60, 3600, 2000, True, 65536) == (
        b"\x10\x20\x00\x04MQTT\x05\x00\x00\x3c"
        b"\x0d\x11\x00\x00\x0e\x10\x21\x07\xd0\x27\x00\x01\x00\x00"
        b"\x00\x06ingest"
    )


def test_subscribe_is_the_specifications_bytes() -> None:
    filters = ["$share/g/footfall/v1/+/+/counts", "footfall/v1/+/+/status"]
    v5 = subscribe_packet(1, filters)
    assert v5[:5] == b"\x82\x3e\x00\x01\x00"  # packet id 1, no properties
    assert v5[5:] == b"".join(len(f).to_bytes(2) + f.encode() + b"\x01" for f in filters)
    assert subscribe_packet(1, filters, v5=False) == b"\x82\x3d\x00\x01" + v5[5:]


def test_connack_and_suback_are_read_in_both_versions() -> None:
    assert decode_connack(b"\x01\x00") == (True, 0)
    assert decode_connack(b"\x00\x86\x00") == (False, 0x86)  # MQTT 5: bad user name or password
    assert decode_suback(b"\x00\x01\x00\x01\x80") == b"\x01\x80"  # MQTT 5, no properties
    assert decode_suback(b"\x00\x01\x03\x1f\x00\x00\x01", True) == b"\x01"  # a reason string
    assert decode_suback(b"\x00\x01\x01\x01", v5=False) == b"\x01\x01"


@pytest.mark.parametrize(
    ("header", "body", "v5", "reason"),
    [
        (0x36, b"\x00\x01t\x00\x01", False, "QoS 3"),
        (0x30, b"\x00", True, "no topic"),
        (0x30, b"\x00\x09topic", True, "its topic runs past the packet"),
        (0x30, b"\x00\x02\xff\xfe\x00", True, "its topic is not UTF-8"),
        (0x32, b"\x00\x01t\x00", False, "no packet identifier"),
        (0x32, b"\x00\x01t\x00\x00", False, "packet identifier 0"),
        (0x30, b"\x00\x01t", True, "no properties length"),
        (0x30, b"\x00\x01t\x05\x01", True, "its properties run past the packet"),
        (0x30, b"\x00\x01t\x80", True, "its properties length is cut short"),
    ],
)
def test_a_malformed_publish_is_refused_with_its_reason(
    header: int, body: bytes, v5: bool, reason: str
) -> None:
    with pytest.raises(ProtocolError, match=f"malformed PUBLISH: {reason}"):
        decode_publish(header, body, v5)


def test_other_malformed_packets_are_refused_with_their_reason() -> None:
    with pytest.raises(ProtocolError, match="a length of more than four bytes"):
        next_packet(b"\x30\xff\xff\xff\xff\x01")
    with pytest.raises(ProtocolError, match="malformed CONNACK: shorter than 2 bytes"):
        decode_connack(b"\x00")
    with pytest.raises(ProtocolError, match="malformed SUBACK: no reason code"):
        decode_suback(b"\x00\x01")
    with pytest.raises(ProtocolError, match="malformed PUBACK: no packet identifier"):
        decode_puback(b"\x01")
