"""Publish stage: spooled counts go to the broker in order, and stay spooled until they are safe.

One thread (:class:`Publisher`) owns one MQTT connection at a time (:class:`Connection`: a
paho-mqtt 2 client driven by its ``loop()`` in that thread) and its own handle on the spool:

1. connect: MQTT 5 or 3.1.1 (``broker.protocol``; nothing here needs 5), user name and
   password, TLS with a CA file and an optional client certificate, keep-alive; the last will
   is ``offline`` (cause ``lost``), retained, on the status topic;
2. publish ``online`` and ``meta`` (retained), then every spooled counts message in sequence
   order, QoS 1, with at most ``broker.max_inflight`` awaiting their PUBACK;
3. a window leaves the spool when it is safe (deletions are committed in batches):

   * **with the aggregator's receipt key** (``broker.receipt_key``): when a receipt says the
     aggregator holds it. The agent subscribes to its own ``.../receipt`` topic, where the
     aggregator keeps (retained) a receipt signed with its receipt key: the seq ranges it has
     settled (:func:`firmware_agent.contract.messages.settled_ranges`). A receipt that does not
     verify
     is ignored. A window sent ``broker.receipt_timeout_s`` ago that no receipt covers is sent
     again, oldest first, at most ``broker.resend_per_s`` a second (one above the last seq a
     receipt named only once receipts have said nothing new for as long; the timeout doubles
     while receipts come later than it, up to 16 times): whatever the broker lost
     (a crash without persistence, a shared subscription it forgot, an ingest replica gone
     for good, amqtt dropping what a client had not acknowledged) comes back, and the
     aggregator, idempotent on (agent, seq), stores it once. The status is published again
     every ``broker.receipt_timeout_s`` while the spool's size changes, so the aggregator's
     health sees a spool filling;
   * **without it** (an aggregator that sends no receipts): on the broker's PUBACK, which is
     only as safe as the broker's memory (docs/aggregator.md);

4. when the connection drops (keep-alive timeout, broker gone, network cut) everything not
   safe stays spooled; after a capped exponential backoff with jitter a new connection starts
   again from the oldest spooled message (with receipts: the oldest no broker has
   acknowledged; those a broker had are left to the re-send timer, or every reconnection to
   a slow broker would send the whole backlog again). Each connection is a new paho client
   with a clean session, so paho never re-sends anything by itself and the order stays ours;
5. at stop: keep sending until the spool is empty or the grace period is over, publish
   ``offline`` (cause ``stopped``) and disconnect cleanly, so the broker drops the will.

The status (v2) also carries the eviction rounds of the count and estimate stages (read from
the ``evictions`` callable the pipeline's thread keeps current); ``online`` is published again
when new windows are spooled and the spool dropped windows or a table evicted since the last.

Broker refusals become sentences (:func:`reason_in_words`): bad user name or password, not
authorised, TLS failures naming the CA file. With MQTT 3.1.1 a broker that refuses a publish
for lack of rights still acknowledges it (the protocol has no way to say no): use MQTT 5,
whose PUBACK says "not authorised", to find ACL mistakes.
"""

from __future__ import annotations

import bisect
import logging
import math
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import nacl.signing
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from firmware_agent.contract import broker
from firmware_agent.contract.broker import Backoff, BrokerBase
from firmware_agent.contract.errors import BrokerError, MessageError, SignatureError
from firmware_agent.contract.messages import (
    AgentId,
    Envelope,
    SiteId,
    Topic,
    seal,
    settled_ranges,
    status_payload,
    utc_text,
    verify_key_from_text,
)
from firmware_agent.contract.resolve import setting
from firmware_agent.service.spool import Spool, SpooledMessage, SpoolSettings, SpoolState

__all__ = ["BrokerSettings", "Connection", "Publisher", "paho_client", "reason_in_words"]

log = logging.getLogger("footfall.agent")

PROTOCOLS = dict(zip(broker.PROTOCOLS, (mqtt.MQTTv5, mqtt.MQTTv311), strict=True))
_ACK_BATCH = 256  # acknowledged messages deleted per commit, at most
_ACK_DELAY_S = 0.05  # longest an acknowledgement waits for its commit


@dataclass(frozen=True, slots=True)
class BrokerSettings(BrokerBase):
    """The agent's broker settings: the common ones (:class:`BrokerBase`) and its failover
    hosts, flow control, stop grace and receipts; checked where made."""

    hosts: str = setting(  # more host:port pairs, tried in turn
        "",
        "More brokers, tried in turn after broker.host:broker.port fails or is lost: host:port "
        "pairs separated by commas (the other nodes of a cluster). Empty: broker.host only.",
    )
    max_inflight: int = setting(
        64, "Counts messages sent and not yet acknowledged (QoS 1), at most."
    )
    backoff_initial_ms: int = setting(
        500, "First wait (ms) before reconnecting; it doubles at each failure, with jitter."
    )
    stop_grace_s: int = setting(
        10, "On SIGTERM, how long (s) to keep sending spooled windows before going offline."
    )
    receipt_key: str = setting(  # the aggregator's receipt public key, base64; "": PUBACK is enough
        "",
        "The aggregator's receipt public key (base64, 'footfall-aggregator receipt-key' prints "
        "it): a window then leaves the spool only when a receipt signed with it says the "
        "aggregator stored it, and is sent again when none does. Empty: a window leaves the "
        "spool on the broker's acknowledgement (an aggregator without receipts).",
    )
    receipt_timeout_s: int = setting(
        60,
        "With broker.receipt_key: a window sent this long (s) ago and still not in a receipt "
        "is sent again, oldest first.",
    )
    resend_per_s: int = setting(
        100, "With broker.receipt_key: windows sent again per second, at most."
    )

    def problems(self) -> list[str]:
        problems = BrokerBase.problems(self)
        for pair in self.hosts.split(","):
            host, _, port = pair.strip().rpartition(":")
            if pair.strip() and not (host and port.isdigit() and 1 <= int(port) <= 65535):
                problems.append(f"broker.hosts must be host:port pairs, got {pair.strip()!r}")
        if not 1 <= self.max_inflight <= 65535:
            problems.append(
                f"broker.max_inflight must be between 1 and 65535, got {self.max_inflight}"
            )
        if not 10 <= self.backoff_initial_ms <= 1000 * self.backoff_max_s:
            problems.append(
                "broker.backoff_initial_ms must be at least 10 and at most broker.backoff_max_s "
                f"({self.backoff_max_s} s), got {self.backoff_initial_ms}"
            )
        if not 0 <= self.stop_grace_s <= 3600:
            problems.append(
                f"broker.stop_grace_s must be between 0 and 3600, got {self.stop_grace_s}"
            )
        if not 1 <= self.receipt_timeout_s <= 86400:
            problems.append(
                f"broker.receipt_timeout_s must be between 1 and 86400, got "
                f"{self.receipt_timeout_s}"
            )
        if not 1 <= self.resend_per_s <= 100_000:
            problems.append(
                f"broker.resend_per_s must be between 1 and 100000, got {self.resend_per_s}"
            )
        if self.receipt_key:
            try:
                verify_key_from_text(self.receipt_key)
            except SignatureError as exc:
                problems.append(f"broker.receipt_key: {exc}")
        return problems

    def brokers(self) -> list[BrokerSettings]:
        """These settings for broker.host, then for each of broker.hosts."""
        more = [p.strip().rpartition(":") for p in self.hosts.split(",") if p.strip()]
        return [self] + [replace(self, host=h, port=int(p), hosts="") for h, _, p in more]

    @property
    def receipt_verify_key(self) -> nacl.signing.VerifyKey | None:
        """The key receipts must be signed with; None: no receipts, PUBACK is enough."""
        return verify_key_from_text(self.receipt_key) if self.receipt_key else None

    def backoff(self) -> Backoff:
        """The reconnection backoff: from broker.backoff_initial_ms, doubling up to
        broker.backoff_max_s."""
        return Backoff(self.backoff_initial_ms / 1000, self.backoff_max_s)


def reason_in_words(reason: ReasonCode) -> str:
    """An MQTT reason code as a sentence an operator can act on (paho's name where the
    contract's table has no words)."""
    name = reason.getName()
    return broker.reason_in_words(reason.value, default=name[:1].lower() + name[1:])


class _Events:
    """What paho's callbacks report (kept apart from the client: no reference cycle, so a
    dropped connection closes its sockets at once)."""

    def __init__(self) -> None:
        self.connack: ReasonCode | None = None
        self.lost: str | None = None
        self.acks: list[tuple[int, ReasonCode]] = []
        self.received: list[bytes] = []  # receipts (the only subscription)
        self.suback: list[ReasonCode] | None = None

    def on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        self.received.append(bytes(message.payload))

    def on_subscribe(self, _c: Any, _u: Any, _mid: int, reasons: list[ReasonCode], _p: Any) -> None:
        self.suback = reasons

    def on_connect(self, _c: Any, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        self.connack = reason

    def on_publish(self, _c: Any, _u: Any, mid: int, reason: ReasonCode, _p: Any) -> None:
        self.acks.append((mid, reason))

    def on_disconnect(self, _c: Any, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        if self.lost is None:
            self.lost = reason_in_words(reason)


class _Client(mqtt.Client):
    """paho's client, but a failed TLS handshake closes its socket (paho 2.2 leaves it open
    until the garbage collector finds it)."""

    def _ssl_wrap_socket(self, tcp_sock: socket.socket) -> ssl.SSLSocket:
        context = self._ssl_context
        if context is None:  # as paho's own: it calls this only with TLS on
            raise ValueError("TLS socket asked for without an SSL context")
        # The context checks the host name itself (check_hostname), as paho then relies on.
        ssl_sock = context.wrap_socket(
            tcp_sock, server_hostname=self._host, do_handshake_on_connect=False
        )
        try:
            ssl_sock.settimeout(self._connect_timeout)
            ssl_sock.do_handshake()
        except BaseException:
            ssl_sock.close()
            raise
        return ssl_sock


def paho_client(
    settings: BrokerSettings, client_id: str, context: ssl.SSLContext | None
) -> mqtt.Client:
    """A paho client for these settings, not yet connected: the protocol, a clean start
    (3.1.1: a clean session), the user name and password, TLS, the connect timeout."""
    client = _Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=PROTOCOLS[settings.protocol],
        clean_session=None if settings.protocol == "5" else True,
    )
    if settings.username:
        client.username_pw_set(settings.username, settings.password or None)
    if context is not None:
        client.tls_set_context(context)
    client.connect_timeout = settings.connect_timeout_s
    return client


class Connection:
    """One MQTT session, driven by :meth:`loop` in the thread that owns it."""

    def __init__(
        self,
        settings: BrokerSettings,
        context: ssl.SSLContext | None,
        client_id: str,
        will: tuple[Topic, bytes] | None = None,
    ) -> None:
        self.settings = settings
        self.events = _Events()
        client = paho_client(settings, client_id, context)
        if will is not None:  # the agent's own session: status goes offline if it drops
            client.will_set(str(will[0]), will[1], qos=1, retain=True)
        client.max_inflight_messages_set(settings.max_inflight)
        client.on_connect = self.events.on_connect
        client.on_publish = self.events.on_publish
        client.on_disconnect = self.events.on_disconnect
        client.on_message = self.events.on_message
        client.on_subscribe = self.events.on_subscribe
        self.client = client

    def open(self) -> None:
        """Connect and wait for the broker's CONNACK; :class:`BrokerError` in words otherwise."""
        s = self.settings
        where = f"broker {s.address}"
        try:
            if s.protocol == "5":
                self.client.connect(s.host, s.port, s.keepalive_s, clean_start=True)
            else:
                self.client.connect(s.host, s.port, s.keepalive_s)
        except ssl.SSLCertVerificationError as exc:
            raise BrokerError(
                f"TLS with {where} failed: its certificate does not verify against "
                f"broker.tls_ca {s.tls_ca} ({exc.verify_message})"
            ) from exc
        except ssl.SSLError as exc:
            raise BrokerError(f"TLS with {where} failed: {exc.reason or exc}") from exc
        except ConnectionRefusedError as exc:
            raise BrokerError(f"{where} refused the connection (nothing listens there)") from exc
        except socket.gaierror as exc:
            raise BrokerError(f"cannot resolve broker.host {s.host!r}: {exc.strerror}") from exc
        except TimeoutError as exc:
            raise BrokerError(f"{where} did not answer within {s.connect_timeout_s} s") from exc
        except OSError as exc:
            hint = " (does broker.port take TLS?)" if s.tls_ca else ""
            raise BrokerError(f"cannot connect to {where}: {exc.strerror or exc}{hint}") from exc
        deadline = time.monotonic() + s.connect_timeout_s
        while self.events.connack is None:
            if self.events.lost is not None or time.monotonic() > deadline:
                hint = (
                    "it may want a client certificate: broker.tls_cert and broker.tls_key"
                    if s.tls_ca
                    else "if it wants TLS, set broker.tls_ca"
                )
                raise BrokerError(f"{where} closed the connection before accepting it ({hint})")
            self.client.loop(0.05)
        if self.events.connack.is_failure:
            raise BrokerError(
                f"{where} refused the connection: {reason_in_words(self.events.connack)}"
            )

    def publish(self, topic: Topic, body: bytes, *, retain: bool = False) -> int:
        """Send at QoS 1; the message id that its PUBACK will carry."""
        info = self.client.publish(str(topic), body, qos=1, retain=retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._lost(f"cannot publish ({mqtt.error_string(info.rc)})")
        return info.mid

    def subscribe(self, topic: Topic) -> None:
        """Subscribe at QoS 0 (the SUBACK's verdict comes later, in ``events.suback``):
        receipts are published at QoS 0, so QoS 1 would buy nothing, and NATS's MQTT listener
        backs every QoS 1 subscription with a replicated JetStream consumer, whose creation
        timed out while a cluster restarted (a receipt subscription was then left deaf for
        good: aggregator/jetstream.py)."""
        rc, _ = self.client.subscribe(str(topic), qos=0)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._lost(f"cannot subscribe ({mqtt.error_string(rc)})")

    def received(self) -> list[bytes]:
        """The messages that came in since the last call."""
        received, self.events.received = self.events.received, []
        return received

    def loop(self, timeout: float) -> list[tuple[int, ReasonCode]]:
        """Run the network for up to ``timeout`` s; the acknowledgements that came in."""
        rc = self.client.loop(timeout)
        if self.events.lost is not None:
            self._lost(self.events.lost)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._lost(mqtt.error_string(rc))
        acks, self.events.acks = self.events.acks, []
        return acks

    def _lost(self, why: str) -> None:
        raise BrokerError(f"lost the connection to broker {self.settings.address}: {why}")

    def close(self) -> None:
        """Disconnect cleanly (the broker then drops the will); quiet if already gone."""
        if self.client.is_connected():
            self.client.disconnect()
            self.client.loop(0.1)


class Publisher:
    """The publishing thread (see the module docstring)."""

    def __init__(
        self,
        settings: BrokerSettings,
        site: SiteId,
        agent: AgentId,
        key: nacl.signing.SigningKey,
        spool_path: Path,
        spool_settings: SpoolSettings,
        meta: Mapping[str, object],
        evictions: Callable[[], tuple[int, int]] = lambda: (0, 0),
    ) -> None:
        self.settings = settings
        self._evictions = evictions  # the count and estimate stages' rounds (status v2)
        self._said_evictions = (0, 0)  # those of the last status sent
        self._context = settings.ssl_context()
        self.site, self.agent = site, agent
        self._key = key
        self._spool_path, self._spool_settings = spool_path, spool_settings
        self._meta = seal(meta, key)
        self._topics = {
            kind: Topic(site, agent, kind) for kind in ("counts", "status", "meta", "receipt")
        }
        self._receipt_key = settings.receipt_verify_key
        # With receipts: seq -> when a broker last acknowledged it (monotonic). A new
        # connection does not send these again at once (they may be on their way to ingest);
        # _resend does, if no receipt covers them in time.
        self._sent_at: dict[int, float] = {}
        self._reported = -1  # the spool_pending of the last status sent
        self._receipt_last = 0  # the highest last_seq a receipt has named
        self._progress_at = time.monotonic()  # when receipts last said more
        self._timeout = float(settings.receipt_timeout_s)  # re-send after (adapts: _adapt)
        self.settled = 0  # windows receipts took out of the spool since the start
        self._backoff = settings.backoff()
        self._brokers = settings.brokers()
        self._broker = 0  # the one to connect to next: the next listed after a failure
        self._wake = threading.Event()
        self._pause = threading.Event()  # interrupts a backoff wait when a stop is due
        self._stopping = False
        self._deadline: float | None = None
        self.connected = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="footfall-publish", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def notify(self) -> None:
        """New windows are in the spool."""
        self._wake.set()

    def stop(self, grace_s: float | None) -> None:
        """Finish: send what the spool holds, then go offline and end. With ``grace_s``, give
        up that many seconds from now (what is unsent stays spooled for the next start);
        with None, wait for the spool to empty however long the broker takes."""
        if grace_s is not None:
            deadline = time.monotonic() + grace_s
            self._deadline = deadline if self._deadline is None else min(self._deadline, deadline)
        self._stopping = True
        self._wake.set()
        self._pause.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread to end; False if it is still running after ``timeout``."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _overdue(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    def _run(self) -> None:
        try:
            with Spool(self._spool_path, self._spool_settings) as spool:
                while not (self._stopping and (self._overdue() or not spool.state().pending)):
                    try:
                        self._session(spool)
                        return
                    except BrokerError as exc:
                        self.connected.clear()
                        self._broker = (self._broker + 1) % len(self._brokers)
                        delay = self._backoff.next()
                        log.warning("%s; next attempt in %.2f s", exc, delay)
                        if self._deadline is not None:
                            delay = min(delay, max(0.0, self._deadline - time.monotonic()))
                        self._pause.wait(delay)
                        self._pause.clear()
                pending = spool.state().pending
                if pending:
                    log.warning("stopping with %d windows unsent: they stay spooled", pending)
        except Exception as exc:
            self.error = exc
            log.error("publisher stopped: %s", exc)

    def _status(self, cause: str, state: SpoolState) -> bytes:
        self._said_evictions = self._evictions()
        payload = status_payload(
            self.site,
            self.agent,
            cause=cause,
            at=int(time.time()),
            spool_pending=state.pending,
            spool_dropped=state.dropped,
            last_seq=state.last_seq,
            evictions=self._said_evictions,
        )
        return seal(payload, self._key)

    def _session(self, spool: Spool) -> None:
        """One connection: returns once stopped cleanly, raises BrokerError when lost."""
        state = spool.state()
        will = (self._topics["status"], self._status("lost", state))
        broker = self._brokers[self._broker]
        connection = Connection(broker, self._context, f"footfall-{self.site}-{self.agent}", will)
        try:
            connection.open()
            self._backoff.reset()
            self.connected.set()
            log.info(
                "connected to broker %s as site=%s agent=%s (%d windows spooled)",
                broker.address,
                self.site,
                self.agent,
                state.pending,
            )
            connection.publish(
                self._topics["status"], self._status("connected", state), retain=True
            )
            connection.publish(self._topics["meta"], self._meta, retain=True)
            self._reported = state.pending
            if self._receipt_key is not None:
                connection.subscribe(self._topics["receipt"])
            self._send(connection, spool, state.dropped)
            offline = self._status("stopped", spool.state())
            mid = connection.publish(self._topics["status"], offline, retain=True)
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                if any(acked == mid for acked, _ in connection.loop(0.05)):
                    break
            log.info("offline: site=%s agent=%s stopped", self.site, self.agent)
        finally:
            connection.close()

    def _send(self, connection: Connection, spool: Spool, dropped: int) -> None:
        """Send the spool in order until stopped (and drained, or overdue)."""
        receipt_key = self._receipt_key
        receipts = receipt_key is not None
        resend = _Resend(self.settings.resend_per_s)
        next_status = time.monotonic() + self.settings.receipt_timeout_s
        inflight: dict[int, SpooledMessage] = {}
        acked: list[int] = []
        acked_since = 0.0
        after = 0  # the highest sequence number sent on this connection
        more = True  # the spool may hold messages after `after`
        while True:
            if self._wake.is_set():
                self._wake.clear()
                more = True
                state = spool.state()
                if state.dropped != dropped or self._evictions() != self._said_evictions:
                    dropped = state.dropped
                    self._publish_status(connection, state)
            room = self.settings.max_inflight - len(inflight)
            if more and room > 0:
                batch = spool.pending(after, room)
                more = len(batch) == room
                for queued in batch:
                    after = queued.seq
                    if queued.seq not in self._sent_at:  # else a broker had it: see _resend
                        inflight[connection.publish(self._topics["counts"], queued.body)] = queued
            elif receipts and room > 0:
                self._resend(connection, spool, inflight, room, resend)
            for mid, reason in connection.loop(0.0 if more and room > 0 else 0.1):
                message = inflight.pop(mid, None)
                if reason.is_failure:
                    what = f"counts seq={message.seq}" if message else "status or meta"
                    raise BrokerError(
                        f"broker {self.settings.address} refused {what} for site={self.site} "
                        f"agent={self.agent}: {reason_in_words(reason)}"
                    )
                if message is None:
                    continue  # the status or meta message
                log.info(
                    "published counts site=%s agent=%s window=%s seq=%d",
                    self.site,
                    self.agent,
                    utc_text(message.window_start)[:16] + "Z",
                    message.seq,
                )
                if receipts:  # it leaves the spool when a receipt says so
                    self._sent_at[message.seq] = time.monotonic()
                    continue
                if not acked:
                    acked_since = time.monotonic()
                acked.append(message.seq)
            if receipt_key is not None:
                self._take_receipts(connection, spool, receipt_key)
                if time.monotonic() >= next_status:
                    next_status = time.monotonic() + self.settings.receipt_timeout_s
                    state = spool.state()
                    if state.pending != self._reported:
                        self._publish_status(connection, state)
            if acked and (
                len(acked) >= _ACK_BATCH
                or not inflight
                or time.monotonic() - acked_since >= _ACK_DELAY_S
            ):
                spool.ack(acked)
                acked.clear()
            idle = not (inflight or more or acked or self._wake.is_set())
            if idle and receipts and self._stopping:
                idle = not spool.state().pending
            if self._stopping and (idle or self._overdue()):
                if acked:
                    spool.ack(acked)
                return

    def _publish_status(self, connection: Connection, state: SpoolState) -> None:
        self._reported = state.pending
        connection.publish(self._topics["status"], self._status("connected", state), retain=True)

    def _resend(
        self,
        connection: Connection,
        spool: Spool,
        inflight: dict[int, SpooledMessage],
        room: int,
        resend: _Resend,
    ) -> None:
        """Send again, oldest first, the windows sent broker.receipt_timeout_s ago that no
        receipt has covered since; at most broker.resend_per_s a second. That is all for a
        window below the last seq a receipt named (a gap: later ones arrived, it did not); one
        above it waits until receipts have also said nothing new for the timeout, so an
        aggregator that is slowly catching up is not sent its backlog twice."""
        now = time.monotonic()
        budget = min(room, resend.budget(now))
        if budget <= 0 or now < resend.idle_until:
            return
        batch = spool.pending(resend.cursor, budget)
        timeout = self._timeout
        if not batch:  # looked at the whole spool: from the oldest again, a little later
            resend.cursor, resend.idle_until = 0, now + min(1.0, timeout / 4)
            return
        busy = {message.seq for message in inflight.values()}
        for queued in batch:
            resend.cursor = queued.seq
            if queued.seq in busy or now - self._sent_at.get(queued.seq, -math.inf) < timeout:
                continue
            if queued.seq > self._receipt_last and now - self._progress_at < timeout:
                continue
            inflight[connection.publish(self._topics["counts"], queued.body)] = queued
            resend.tokens -= 1
            resend.sent += 1
            if resend.sent == 1 or resend.sent % 1000 == 0:
                log.warning(
                    "no receipt for seq=%d after %.0f s: sent it again (%d windows sent again "
                    "on this connection)",
                    queued.seq,
                    timeout,
                    resend.sent,
                )

    def _adapt(self, waited: float) -> None:
        """Receipts came ``waited`` s after a broker took the window they cover: a re-send
        timeout shorter than that only sends duplicates (which slow the path further), so it
        doubles, up to 16 times ``broker.receipt_timeout_s``; quick receipts bring it back."""
        least = float(self.settings.receipt_timeout_s)
        if waited > self._timeout:
            timeout = min(self._timeout * 2, least * 16)
        elif waited < self._timeout / 4:
            timeout = max(least, self._timeout / 2)
        else:
            return
        if timeout != self._timeout:
            log.info(
                "receipts come %.1f s after the broker takes a window: re-sending after %.0f s",
                waited,
                timeout,
            )
            self._timeout = timeout

    def _take_receipts(
        self, connection: Connection, spool: Spool, key: nacl.signing.VerifyKey
    ) -> None:
        """Let go of the windows the receipts that came in cover."""
        suback, connection.events.suback = connection.events.suback, None
        if suback is not None and any(reason.is_failure for reason in suback):
            log.error(
                "broker %s refused the subscription to %s (%s): windows stay spooled until the "
                "broker's ACL lets this account read its receipt topic",
                self.settings.address,
                self._topics["receipt"],
                reason_in_words(suback[0]),
            )
        for body in connection.received():
            try:
                envelope = Envelope.parse(body)
                if envelope.topic != self._topics["receipt"]:
                    raise MessageError(f"it is a {envelope.topic.kind} message for another agent")
                try:
                    payload = envelope.verify(key)
                except SignatureError:
                    raise SignatureError(
                        "its signature does not verify with broker.receipt_key"
                    ) from None
                ranges = settled_ranges(payload)
            except MessageError as exc:
                log.warning("ignored a message on %s: %s", self._topics["receipt"], exc)
                continue
            left = spool.settle(ranges)
            self.settled += left
            if left or payload["last_seq"] > self._receipt_last:
                self._progress_at = time.monotonic()
            self._receipt_last = max(self._receipt_last, payload["last_seq"])
            starts = [lo for lo, _ in ranges]
            kept, oldest = {}, math.inf
            for seq, at in self._sent_at.items():
                if (i := bisect.bisect_right(starts, seq) - 1) < 0 or seq > ranges[i][1]:
                    kept[seq] = at
                else:
                    oldest = min(oldest, at)
            self._sent_at = kept
            if oldest < math.inf:
                self._adapt(time.monotonic() - oldest)
            if left:
                log.info(
                    "receipt: the aggregator holds seq %d to %d but %d gaps; %d windows left "
                    "the spool",
                    payload["first_seq"],
                    payload["last_seq"],
                    len(payload["gaps"]),
                    left,
                )


@dataclass(slots=True)
class _Resend:
    """What re-sending did on one connection: where it looked last, its token bucket."""

    per_s: float
    cursor: int = 0  # the spool is looked through from above this seq
    tokens: float = 0.0
    at: float = field(default_factory=time.monotonic)
    idle_until: float = 0.0
    sent: int = 0

    def budget(self, now: float) -> int:
        self.tokens = min(self.per_s, self.tokens + (now - self.at) * self.per_s)
        self.at = now
        return int(self.tokens)
