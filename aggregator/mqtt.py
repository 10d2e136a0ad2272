"""The MQTT session ingest reads through (5, or 3.1.1): receive, and acknowledge when told to.

Ours, not a maintained client (issue 19's question, answered by ``bench/bench_ingest.py``,
which runs both side by side). paho-mqtt 2.2 costs about 150 µs of CPU per QoS 1 message
received and acknowledged here (it reads a packet's header a byte per ``recv`` call, builds a
``Properties`` object for every MQTT 5 PUBLISH, and writes each PUBACK on its own): receive
only, nothing else done, it ran at 22 % of our rate (1,527 against 6,934 messages/s,
2026-12-05, 2 cores at load 11.9; 7,128 against 27,958 on a quiet machine), while ingest's
whole CPU is 190-300 µs a message, signature check included. aiomqtt 2.5 is paho-mqtt under
asyncio (it requires paho-mqtt), so it costs at least as much. gmqtt 0.8 (asyncio) acknowledges
a QoS 1 message when its ``on_message`` coroutine returns (with ``optimistic_acknowledgement``
off): ingest acknowledges after a batch's commit, so up to ``ingest.receive_maximum`` (2,000)
coroutines would wait on each commit, each PUBACK written on its own, in an asyncio loop that
ingest's threads do not have; not measured, for it would need ingest rewritten around it.
Ingest needs a small part of MQTT, so this module does that part and nothing else, in about
20 µs per message; its packets are :mod:`aggregator.mqtt_codec`'s, unit-tested packet by
packet:

* one connection at a time, TCP or TLS (``ssl.SSLContext``), user name and password;
* MQTT 5 (``broker.protocol = "5"``): ``clean_start`` off with a Session Expiry Interval (the
  broker keeps the session and what is queued for it while we are away), a Receive Maximum
  (how many unacknowledged QoS 1 messages the broker may send ahead) and a Maximum Packet
  Size (the broker drops a larger message for us rather than send it);
* MQTT 3.1.1 (``"3.1.1"``, protocol level 4, for brokers without 5 such as amqtt):
  ``clean session`` off (the broker keeps the session for as long as it decides) and no
  properties in any packet; the broker's own limit bounds what it sends ahead. The two
  versions differ only in the packets' layout (:mod:`aggregator.mqtt_codec`) and the
  CONNACK's codes;
* SUBSCRIBE at QoS 1 on connecting (shared subscriptions are plain topic filters here);
* PUBLISH received (QoS 0 and 1), reads buffered 256 KiB at a time; one larger than the
  maximum packet size (3.1.1, which cannot announce it, or a broker that ignores it) is read
  past, never held: its topic and packet id are kept and it is delivered with an empty
  payload and its size, for ingest to refuse and acknowledge (a 100 MB message took ingest
  to 468 MB before: issue 16);
* PUBACK only when :meth:`Session.ack` is called (after the database commit), several per
  ``send``; acknowledgements of deliveries from an earlier connection are dropped, since the
  broker sends those again (their packet ids may now name other messages);
* keep-alive (PINGREQ when quiet; a connection silent for 1.5 keep-alives is lost), the
  server's DISCONNECT reason in words, reconnection with capped exponential backoff.

* PUBLISH sent, QoS 0 and retained (:meth:`Session.publish`: the agents' receipts, which are
  published again whenever they change, so one lost on the way costs nothing).

One thread (started by :meth:`Session.start`) owns the socket; :meth:`Session.ack` and
:meth:`Session.publish` may be called from any thread and wake it through a socket pair. It
never receives QoS 2 (it subscribes at QoS 1, so the broker downgrades).
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

from aggregator.config import BrokerSettings
from aggregator.mqtt_codec import (
    DISCONNECT,
    PINGREQ,
    ProtocolError,
    connect_packet,
    decode_connack,
    decode_publish,
    decode_suback,
    next_packet,
    puback_packets,
    publish_packet,
    read_varint,
    subscribe_packet,
)
from aggregator.transport import Transport
from firmware_agent.contract.broker import Backoff, reason_in_words

__all__ = ["PACKET_OVERHEAD", "Delivery", "ProtocolError", "Session"]

log = logging.getLogger("footfall.aggregator")

_READ_SIZE = 256 * 1024
# What a PUBLISH holds besides its payload: fixed header, topic (footfall/v1/<site>/<agent>/
# <kind> is at most 146 bytes), packet id, properties (a publisher's user properties count).
PACKET_OVERHEAD = 1024


class Delivery(NamedTuple):
    """One PUBLISH received (a tuple: thousands are made per second)."""

    generation: int  # the connection it came on
    mid: int  # packet identifier (0 for QoS 0)
    qos: int
    retain: bool
    topic: str
    payload: bytes  # empty when it was too large to keep
    size: int  # the payload's size as sent


class Session(Transport):
    """One MQTT 5 or 3.1.1 subscriber session (``settings.protocol``), kept connected (see
    the module docstring).

    ``on_message`` runs in the session's thread for every PUBLISH; it must be quick (ingest
    puts the delivery on a queue). ``maximum_packet_size`` (bytes, 0: none) is announced
    (MQTT 5) and enforced (a larger PUBLISH is delivered without its payload)."""

    def __init__(
        self,
        settings: BrokerSettings,
        *,
        client_id: str,
        session_expiry_s: int,
        receive_maximum: int,
        filters: Sequence[str],
        on_message: Callable[[Delivery], None],
        maximum_packet_size: int = 0,
    ) -> None:
        super().__init__(
            settings,
            receive_maximum=receive_maximum,
            on_message=on_message,
            thread_name="footfall-mqtt",
        )
        self.v5 = settings.protocol == "5"
        self.client_id = client_id
        self.session_expiry_s = session_expiry_s
        self.maximum_packet_size = maximum_packet_size
        self.filters = list(filters)
        self.context = settings.ssl_context()
        self.session_present = False
        self.connections = 0
        self._generation = 0
        self._acks: list[int] = []
        self._out: list[bytes] = []  # PUBLISH packets to send
        self._skip = 0  # bytes of a packet too large to keep still to come, and to drop
        self._stop = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    def stop(self, timeout: float = 5.0) -> None:
        """Disconnect (the broker keeps the session) and end the thread."""
        self._stop.set()
        self._wake()
        self._thread.join(timeout)
        self._wake_r.close()
        self._wake_w.close()

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Acknowledge QoS 1 deliveries of the current connection, in the order given."""
        with self._lock:
            mids = [d.mid for d in deliveries if d.qos == 1 and d.generation == self._generation]
            if not mids:
                return
            self._acks.extend(mids)
        self._wake()

    def publish(self, topic: str, payload: bytes) -> bool:
        """Send a retained QoS 0 message; False (nothing sent) while not connected."""
        if not self.connected.is_set():
            return False
        with self._lock:
            self._out.append(publish_packet(topic, payload, self.v5, retain=True))
        self._wake()
        return True

    def _wake(self) -> None:
        # BlockingIOError: already awake (the pair's buffer is full); OSError: closed.
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\x00")

    # --- the session's thread --------------------------------------------------------------

    def _run(self) -> None:
        # Every 0.1 s for the first 5 s after a loss (back before the agents, whose first retry
        # waits 0.25 to 0.5 s: a restarted Mosquitto 2.0 has lost the shared subscription until
        # ingest subscribes again), then doubling from 0.5 s with jitter, up to backoff_max_s.
        backoff = Backoff(0.5, self.settings.backoff_max_s, quick=50, quick_s=0.1)
        while not self._stop.is_set():
            sock: socket.socket | None = None
            try:
                sock, early = self._open()
                backoff.reset()
                self._serve(sock, early)
            except Exception as exc:
                if self._stop.is_set():
                    break
                if not isinstance(exc, OSError | ProtocolError):
                    log.exception("broker %s: unexpected error", self.address)
                wait = backoff.next()
                if backoff.attempt == 1 or wait >= 1:
                    log.warning(
                        "broker %s: %s; connecting again in %.1f s",
                        self.address,
                        _in_words(exc),
                        wait,
                    )
                self._stop.wait(wait)
            finally:
                with self._lock:
                    self._generation += 1  # acks of this connection are void now
                    self._acks.clear()
                    self._out.clear()
                self.connected.clear()
                if sock is not None:
                    sock.close()

    def _open(self) -> tuple[socket.socket, bytes]:
        """Connect; the socket and what came after the CONNACK (a resumed session's
        messages may follow it at once, in the same read)."""
        s = self.settings
        raw = socket.create_connection((s.host, s.port), timeout=s.connect_timeout_s)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock: socket.socket = raw
            if self.context is not None:
                sock = self.context.wrap_socket(raw, server_hostname=s.host)
            sock.sendall(
                connect_packet(
                    self.client_id,
                    s.username,
                    s.password,
                    s.keepalive_s,
                    self.session_expiry_s,
                    self.receive_maximum,
                    self.v5,
                    self.maximum_packet_size,
                )
            )
            try:
                header, body, early = self._read_one(sock)
            except TimeoutError:
                if not self.v5:
                    raise
                raise ProtocolError(
                    "no answer to CONNECT in time (a broker without MQTT 5, such as amqtt, says "
                    "nothing: if that is it, set broker.protocol = '3.1.1')"
                ) from None
            if header >> 4 != 2:
                raise ProtocolError(f"expected CONNACK, got packet type {header >> 4}")
            session_present, code = decode_connack(body)
            if code != 0:
                raise ProtocolError(f"refused the connection: {reason_in_words(code, self.v5)}")
        except BaseException:
            raw.close()
            raise
        self.session_present = session_present
        self.connections += 1
        log.info(
            "connected to broker %s as %s (session %s)",
            self.address,
            self.client_id,
            "resumed" if self.session_present else "new",
        )
        return sock, early

    def _read_one(self, sock: socket.socket) -> tuple[int, bytes, bytes]:
        """One whole packet, blocking (during the connection's handshake only): its header,
        its body, and the bytes read past it."""
        data = bytearray()
        while True:
            packet = next_packet(data)
            if packet is not None:
                header, start, end = packet
                return header, bytes(data[start:end]), bytes(data[end:])
            chunk = sock.recv(4096)
            if not chunk:
                raise ProtocolError("closed the connection before accepting it")
            data += chunk

    def _serve(self, sock: socket.socket, early: bytes) -> None:
        s = self.settings
        sock.settimeout(s.keepalive_s)
        sock.sendall(subscribe_packet(1, self.filters, self.v5))
        with self._lock:
            self._generation += 1
            generation = self._generation
        self._skip = 0
        selector = selectors.DefaultSelector()
        selector.register(sock, selectors.EVENT_READ)
        selector.register(self._wake_r, selectors.EVENT_READ)
        buffer = bytearray(early)
        del buffer[: self._packets(buffer, generation, sock)]
        last_in = last_out = time.monotonic()
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now - last_in > 1.5 * s.keepalive_s:
                    raise ProtocolError("no answer within 1.5 keep-alives (broker.keepalive_s)")
                if now - last_out >= s.keepalive_s:
                    sock.sendall(PINGREQ)
                    last_out = now
                for key, _ in selector.select(timeout=min(1.0, s.keepalive_s / 2)):
                    if key.fileobj is self._wake_r:
                        try:
                            while self._wake_r.recv(4096):
                                pass
                        except BlockingIOError:
                            pass
                        continue
                    chunk = sock.recv(_READ_SIZE)
                    if not chunk:
                        raise ProtocolError("the broker closed the connection")
                    self._keep(buffer, chunk)
                    while isinstance(sock, ssl.SSLSocket) and sock.pending():
                        self._keep(buffer, sock.recv(_READ_SIZE))
                    last_in = time.monotonic()
                    used = self._packets(buffer, generation, sock)
                    del buffer[:used]
                acks = self._take_acks()
                if acks:
                    sock.sendall(puback_packets(acks))
                    last_out = time.monotonic()
                out = self._take_out()
                if out:
                    sock.sendall(out)
                    last_out = time.monotonic()
            # The last batch's acknowledgements go before the DISCONNECT, or the broker sends
            # that batch again to the next connection (stored already: skipped as duplicates).
            sock.sendall(puback_packets(self._take_acks()) + DISCONNECT)
        finally:
            selector.close()

    def _take_out(self) -> bytes:
        with self._lock:
            out, self._out = self._out, []
        return b"".join(out)

    def _keep(self, buffer: bytearray, chunk: bytes) -> None:
        """Add what was read to the buffer, less the rest of a packet being read past."""
        if self._skip:
            dropped = min(self._skip, len(chunk))
            self._skip -= dropped
            chunk = chunk[dropped:]
        buffer += chunk

    def _take_acks(self) -> list[int]:
        with self._lock:
            acks, self._acks = self._acks, []
        return acks

    def _packets(self, data: bytearray, generation: int, sock: socket.socket) -> int:
        """Handle every whole packet in ``data``; the number of bytes used."""
        at, end = 0, len(data)
        while end - at >= 2:
            first = data[at + 1]
            if first < 0x80:  # a length under 128: one byte
                size, used = first, 1
            else:
                length = read_varint(data, at + 1)
                if length is None:
                    break
                size, used = length
            start = at + 1 + used
            header = data[at]
            kind = header >> 4
            if kind == 3 and size > self.maximum_packet_size > 0:
                if not self._oversize(header, data, start, size, generation):
                    break  # its topic and packet id are not all here yet
                if start + size > end:
                    self._skip = start + size - end
                    return end
                at = start + size
                continue
            if start + size > end:
                break
            if kind == 3:
                self._publish(header, data[start : start + size], generation)
            elif kind == 9:
                self._suback(bytes(data[start : start + size]))
            elif kind == 14:
                code = data[start] if size else 0
                raise ProtocolError(f"the broker disconnected us: {reason_in_words(code)}")
            elif kind != 13:  # 13: PINGRESP
                raise ProtocolError(f"unexpected packet type {kind}")
            at = start + size
        return at

    def _publish(self, header: int, body: bytearray, generation: int) -> None:
        qos, retain, topic, mid, payload = decode_publish(header, body, self.v5)
        self.on_message(Delivery(generation, mid, qos, retain, topic, payload, len(payload)))

    def _oversize(
        self, header: int, data: bytearray, start: int, size: int, generation: int
    ) -> bool:
        """Deliver a PUBLISH too large to keep, payload left out, once its topic and packet
        id are in ``data``; False until they are."""
        head = bytes(data[start : start + 2 + 0xFFFF + 2 + 4])
        if len(head) < 2:
            return False
        at = 2 + ((head[0] << 8) | head[1])
        qos = (header >> 1) & 3
        need = at + (2 if qos else 0) + (1 if self.v5 else 0)
        if len(head) < need:
            return False
        mid = (head[at] << 8) | head[at + 1] if qos else 0
        at += 2 if qos else 0
        if self.v5:
            length = read_varint(head, at)
            if length is None:
                return False
            at += length[1] + length[0]
        try:
            topic = head[2 : 2 + ((head[0] << 8) | head[1])].decode()
        except UnicodeDecodeError as exc:
            raise ProtocolError("malformed PUBLISH: its topic is not UTF-8") from exc
        payload_size = max(size - at, 0)
        self.on_message(Delivery(generation, mid, qos, bool(header & 1), topic, b"", payload_size))
        return True

    def _suback(self, body: bytes) -> None:
        codes = decode_suback(body, self.v5)
        refused = [
            f"{topic_filter}: {reason_in_words(code, self.v5)}"
            for topic_filter, code in zip(self.filters, codes, strict=False)
            if code >= 0x80
        ]
        if refused:
            log.error("broker %s refused subscriptions: %s", self.address, "; ".join(refused))
            return
        log.info("subscribed to %s on broker %s", ", ".join(self.filters), self.address)
        self.connected.set()


def _in_words(exc: BaseException) -> str:
    if isinstance(exc, ProtocolError):
        return str(exc)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: its certificate does not verify ({exc.verify_message})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (nothing listens there)"
    if isinstance(exc, socket.timeout | TimeoutError):
        return "no answer in time"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name: {exc.strerror}"
    return str(exc.strerror or exc) if isinstance(exc, OSError) else str(exc)
