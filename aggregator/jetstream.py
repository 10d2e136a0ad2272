"""Ingest's other transport: the agents' messages from streams on a NATS JetStream cluster.

Agents publish over MQTT 3.1.1 (``broker.protocol = "3.1.1"``) to the cluster's MQTT listener,
unchanged; NATS turns topic ``footfall/v1/<site>/<agent>/counts`` into subject
``footfall.v1.<site>.<agent>.counts``. ``footfall-aggregator`` itself creates, on every
start and idempotently (the same definition is accepted again; a changed one, such as more
replicas, is applied as an update), two streams with ``broker.stream_replicas`` copies:

* ``FOOTFALL_COUNTS`` captures ``footfall.v1.*.*.counts``, work-queue retention (a window
  leaves the stream when ingest acknowledges it), kept at most ``ingest.session_expiry_s``;
* ``FOOTFALL_STATE`` captures ``…status`` and ``…meta`` with one message per subject: the
  latest per agent, as a retained MQTT message is.

On each a durable pull consumer named ``ingest.share_group`` (``-state`` for the second) is
shared by every ingest process: each fetch hands a message to one process only, explicit
acknowledgement, ``broker.ack_wait_s`` before a message that was taken and not acknowledged
goes to another process (one that died holds nothing for good), at most
16 times ``ingest.receive_maximum`` unacknowledged across the processes. A process fetches only
while it holds fewer than ``ingest.receive_maximum`` unacknowledged messages.

:class:`JetStreamSession` offers what :class:`aggregator.mqtt.Session` offers ingest
(``start``, ``stop``, ``connected``, ``ack``, ``publish`` for receipts), so
:class:`aggregator.ingest.Ingest` verifies, stores and refuses exactly as it does for MQTT;
only the transport differs. Each message
becomes a :class:`Delivery` with the MQTT topic its subject stands for. ``ack`` acknowledges
after the commit; an acknowledgement lost with a connection only means the message comes again
(the store skips it as a duplicate).

What JetStream cannot give: NATS's MQTT listener (2.9) acknowledges an agent's QoS 1
PUBLISH when it has passed the message on inside NATS, not when a stream has stored it, and
no ``mqtt`` setting changes that (``stream_replicas``, ``consumer_replicas``, ``ack_wait``,
``max_ack_pending`` are about its own session streams and its deliveries to subscribers). A
message that arrives while the stream has no leader (seconds, during an election after its
leader's node died, or while a whole cluster starts again) is dropped after the agent was told
it was delivered: 1 window of 3,000 in one run of a whole-cluster restart. Receipts
(:mod:`aggregator.receipts`, the aggregator's signed word of what it stored) close that gap
end to end: an agent given the receipt key keeps a window until a receipt covers it and sends
it again when none does (tests/aggregator/test_ingest_jetstream.py: the agents' own
publishers through every fault, 0 lost). Receipts go out as plain NATS messages on
``footfall.v1.<site>.<agent>.receipt``, which the agent's MQTT subscription to its
``…/receipt`` topic receives unchanged (QoS 0). NATS keeps no retained message published from
the NATS side (only an MQTT client's PUBLISH with the retain flag is kept), so the receipt an
agent missed while away is published again when its ``connected`` status arrives
(:mod:`aggregator.ingest`): the same effect as a retained receipt, with no connection to the
MQTT listener and no per-agent message held in every node's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from aggregator.config import BrokerSettings
from aggregator.mqtt import Delivery
from aggregator.transport import Transport

__all__ = ["COUNTS_STREAM", "STATE_STREAM", "JetStreamSession", "stream_configs", "topic_of"]

log = logging.getLogger("footfall.aggregator")

COUNTS_STREAM = "FOOTFALL_COUNTS"
STATE_STREAM = "FOOTFALL_STATE"
_FETCH_WAIT_S = 1.0


def topic_of(subject: str) -> str:
    """The MQTT topic a NATS subject stands for (ids hold no '.', so no '//' escapes)."""
    return subject.replace(".", "/")


def stream_configs(replicas: int, max_age_s: int) -> list[StreamConfig]:
    """The two streams ingest reads (see the module docstring)."""
    return [
        StreamConfig(
            name=COUNTS_STREAM,
            subjects=["footfall.v1.*.*.counts"],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            num_replicas=replicas,
            max_age=float(max_age_s),
        ),
        StreamConfig(
            name=STATE_STREAM,
            subjects=["footfall.v1.*.*.status", "footfall.v1.*.*.meta"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=replicas,
            max_msgs_per_subject=1,
        ),
    ]


class JetStreamSession(Transport):
    """Durable pull consumers on the two streams, fed to ``on_message`` (see the module
    docstring). The client runs in a thread of its own with its own event loop."""

    def __init__(
        self,
        settings: BrokerSettings,
        *,
        durable: str,
        max_age_s: int,
        receive_maximum: int,
        on_message: Callable[[Delivery], None],
    ) -> None:
        super().__init__(
            settings,
            receive_maximum=receive_maximum,
            on_message=on_message,
            thread_name="footfall-jetstream",
        )
        self.durable = durable
        self.max_age_s = max_age_s
        self._pending: dict[int, Msg] = {}
        self._ids = itertools.count(1)
        self._loop = asyncio.new_event_loop()
        self._nc: Any = None  # the connection, once made
        self._stopping: asyncio.Event | None = None

    def stop(self, timeout: float = 5.0) -> None:
        """Send the acknowledgements queued, close the connection and end the thread."""
        if self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(timeout)

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Acknowledge deliveries (after their commit), in the order given."""
        with self._lock:
            msgs = [m for m in (self._pending.pop(d.mid, None) for d in deliveries) if m]
        if msgs:
            with contextlib.suppress(RuntimeError):  # the loop has ended: they come again
                asyncio.run_coroutine_threadsafe(self._ack(msgs), self._loop)

    def publish(self, topic: str, payload: bytes) -> bool:
        """Send a message (a receipt) on the subject for ``topic``; False (nothing sent) while
        not connected. Agents subscribed over MQTT get it as QoS 0, not retained: one that
        connects is sent its receipt again when its status says so (module docstring)."""
        if self._nc is None or not self.connected.is_set():
            return False
        subject = topic.replace("/", ".")
        with contextlib.suppress(RuntimeError):
            asyncio.run_coroutine_threadsafe(self._nc.publish(subject, payload), self._loop)
            return True
        return False

    async def _ack(self, msgs: list[Msg]) -> None:
        for msg in msgs:
            try:
                await msg.ack()
            except Exception as exc:  # the connection is gone: the message comes again
                log.info("JetStream: an acknowledgement was not sent (%s)", exc)
                return

    # --- the session's thread --------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._main())
        finally:
            self._loop.close()

    async def _main(self) -> None:
        stopping = self._stopping = asyncio.Event()
        s = self.settings
        nc = self._nc = await self._connect(stopping)
        if nc is None:
            return
        try:
            js = nc.jetstream(timeout=float(s.connect_timeout_s))
            pulls = [
                asyncio.create_task(self._pull(js, COUNTS_STREAM, self.durable)),
                asyncio.create_task(self._pull(js, STATE_STREAM, f"{self.durable}-state")),
            ]
            await stopping.wait()
            for task in pulls:
                task.cancel()
            await asyncio.gather(*pulls, return_exceptions=True)
            await nc.flush(timeout=2)
        except Exception as exc:
            log.warning("JetStream: stopping: %s", exc)
        finally:
            self.connected.clear()
            with contextlib.suppress(Exception):
                await nc.close()

    async def _connect(self, stopping: asyncio.Event) -> Any:
        """The NATS connection (it reconnects by itself, to any server listed), or None if
        stopped before one was made."""
        s = self.settings

        async def lost() -> None:
            self.connected.clear()
            log.warning("JetStream: lost the connection to the cluster; connecting again")

        async def back() -> None:  # the streams and durable consumers are still there
            self.connected.set()
            log.info("JetStream: connected again to the cluster")

        async def error(exc: Exception) -> None:
            log.info("JetStream: %s", exc)

        options: dict[str, Any] = {
            "servers": s.server_urls,
            "connect_timeout": s.connect_timeout_s,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 0.25,
            "ping_interval": s.keepalive_s,
            "disconnected_cb": lost,
            "reconnected_cb": back,
            "error_cb": error,
            "name": self.durable,
        }
        if s.username:
            options |= {"user": s.username, "password": s.password}
        context = s.ssl_context()
        if context is not None:
            options["tls"] = context
        attempt = 0
        while not stopping.is_set():
            try:
                return await nats.connect(**options)
            except Exception as exc:
                attempt += 1
                wait = min(0.25 * 2**attempt, s.backoff_max_s)
                log.warning("JetStream %s: %s; connecting again in %.1f s", self.address, exc, wait)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), wait)
        return None

    async def _ensure(self, js: Any, stream: str, durable: str) -> Any:
        """Create or update the stream and its consumer; the pull subscription."""
        config = next(
            c
            for c in stream_configs(self.settings.stream_replicas, self.max_age_s)
            if c.name == stream
        )
        try:
            await js.add_stream(config)
        except nats.js.errors.BadRequestError:  # exists with another definition
            await js.update_stream(config)
        consumer = ConsumerConfig(
            durable_name=durable,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=float(self.settings.ack_wait_s),
            deliver_policy=DeliverPolicy.ALL,
            max_ack_pending=self.receive_maximum * 16,
            max_deliver=-1,
        )
        await js.add_consumer(stream, consumer)
        return await js.pull_subscribe_bind(durable, stream=stream)

    async def _pull(self, js: Any, stream: str, durable: str) -> None:
        """Fetch and hand over messages until cancelled, setting things up again after any
        failure (a cluster restarting, a stream electing its leader)."""
        sub = None
        while True:
            try:
                if sub is None:
                    sub = await self._ensure(js, stream, durable)
                    self.connected.set()
                    log.info("JetStream: consuming %s as %s", stream, durable)
                room = self.receive_maximum - len(self._pending)
                if room <= 0:
                    await asyncio.sleep(0.01)
                    continue
                try:
                    msgs = await sub.fetch(min(room, 500), timeout=_FETCH_WAIT_S)
                except nats.errors.TimeoutError:
                    continue
                for msg in msgs:
                    mid = next(self._ids)
                    with self._lock:
                        self._pending[mid] = msg
                    self.on_message(
                        Delivery(0, mid, 1, False, topic_of(msg.subject), msg.data, len(msg.data))
                    )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("JetStream %s: %s: %s; trying again", stream, type(exc).__name__, exc)
                if sub is not None:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()
                sub = None
                await asyncio.sleep(0.5)
