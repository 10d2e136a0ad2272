"""Ingest: agents' messages from the broker, verified, stored once, acknowledged after commit.

One process holds one MQTT 5 session (:mod:`aggregator.mqtt`) under a stable client id, with
``clean_start`` off and a session expiry, so the broker keeps what it has for the process while
the process is away (a restart, a crash, a broker restart with persistence). With
``broker.protocol = "3.1.1"`` (a broker without 5) it is a 3.1.1 session with clean session off,
less what needs 5: no shared subscription (the settings refuse a share group), no session expiry
or receive maximum (docs/aggregator.md). It subscribes to

* ``$share/<group>/footfall/v1/+/+/counts``: a shared subscription, so several processes in a
  group split the counts between them;
* ``footfall/v1/+/+/status`` and ``…/meta``: ordinary subscriptions (a shared one gets no
  retained messages), so every process learns every agent's state.

The session's thread only queues what arrives. The worker (the thread that calls
:meth:`Ingest.run`) takes up to ``ingest.batch_max`` messages (or what came within
``ingest.batch_wait_ms``), verifies each (:mod:`aggregator.verify`), stores the batch in one
transaction (:meth:`Store.store_batch`) and only then acknowledges every message of the batch
(:meth:`Session.ack`), in the order they arrived, refused ones included. A crash anywhere
before the commit leaves the batch unacknowledged: the broker sends it again, to this process
when it comes back (its session), and the store skips what it already holds. The broker sends
at most ``ingest.receive_maximum`` messages ahead of the acknowledgements (MQTT 5 Receive
Maximum), which bounds the memory a backlog takes.

An acknowledgement belongs to its connection: after a reconnection the broker sends again what
was not acknowledged, so acknowledgements of messages from an older connection are dropped.

If the database fails, the batch is retried with a capped backoff, unacknowledged, for as long
as it takes; the broker holds everything behind it.

Mosquitto 2 hands a shared subscription's messages round-robin to every member's session,
connected or not, and does not pass the messages of a member that is away to another: they
wait in that member's session until it comes back under its client id (or until the session
expires). Run every ingest process under a supervisor that restarts it (systemd
``Restart=always``) with its own fixed ``ingest.client_id``.

With ``broker.kind = "jetstream"`` the session is :class:`aggregator.jetstream.JetStreamSession`
instead: durable pull consumers shared by every ingest process on a replicated NATS cluster,
where a dead process's messages go to another after ``broker.ack_wait_s``. Verification,
storage, refusals and acknowledgement after the commit are this module's, the same for both.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aggregator.config import AggregatorConfig
from aggregator.errors import StoreError
from aggregator.mqtt import Delivery, Session
from aggregator.registry import Registry
from aggregator.store import BatchOutcome, Store
from aggregator.verify import REASONS, Accepted, Refusal, Verifier

if TYPE_CHECKING:
    from aggregator.jetstream import JetStreamSession

__all__ = ["Ingest", "IngestStats", "topics"]

log = logging.getLogger("footfall.aggregator")

_QUIET_REASONS = frozenset({"duplicate"})  # normal after a redelivery: logged at INFO


def topics(share_group: str) -> list[tuple[str, bool]]:
    """(topic filter, shared) that ingest subscribes to; without a share group, the counts
    subscription is a plain one (one ingest process)."""
    counts = "footfall/v1/+/+/counts"
    return [
        (f"$share/{share_group}/{counts}" if share_group else counts, bool(share_group)),
        ("footfall/v1/+/+/status", False),
        ("footfall/v1/+/+/meta", False),
    ]


@dataclass(slots=True)
class _Verified:
    """A batch through the verify stage, on its way to the store stage."""

    batch: list[tuple[Delivery, float]]
    accepted: list[Accepted] = field(default_factory=list)
    tally: Counter[tuple[str, str, str]] = field(default_factory=Counter)


@dataclass(slots=True)
class IngestStats:
    """What ingest did since it started."""

    received: int = 0
    stored: int = 0  # counts windows inserted
    accepted: int = 0  # messages verified (counts, status, meta)
    refused: Counter[str] = field(default_factory=Counter)  # by reason, store's skips too
    batches: int = 0
    db_s: float = 0.0  # in store transactions
    started: float = field(default_factory=time.monotonic)


class _RefusalLog:
    """Logs a refusal once per reason and agent per interval; counts the rest."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last: dict[tuple[str, str], tuple[float, int]] = {}
        self._lock = threading.Lock()

    def note(self, refusal: Refusal, now: float) -> None:
        ident = (refusal.reason, refusal.who)
        with self._lock:  # the verify and store stages both refuse
            last, suppressed = self._last.get(ident, (-1e18, 0))
            if now - last < self.interval_s:
                self._last[ident] = (last, suppressed + 1)
                return
            self._last[ident] = (now, 0)
        more = f" ({suppressed} more since the last line)" if suppressed else ""
        level = logging.INFO if refusal.reason in _QUIET_REASONS else logging.WARNING
        log.log(
            level,
            "refused a message from %s: %s: %s%s",
            refusal.who,
            refusal.reason,
            refusal.detail,
            more,
        )
        if len(self._last) > 100_000:  # an attacker cycling through ids: forget, keep counting
            self._last.clear()


class Ingest:
    """One ingest process's MQTT session and worker (see the module docstring)."""

    def __init__(
        self,
        config: AggregatorConfig,
        store: Store,
        *,
        on_batch: Callable[[BatchOutcome], None] | None = None,
    ) -> None:
        self.config = config
        self.settings = config.ingest
        self.store = store
        self.verifier = Verifier(config.ingest.max_message_bytes)
        self.stats = IngestStats()
        self._on_batch = on_batch
        self._queue: queue.SimpleQueue[tuple[Delivery, float]] = queue.SimpleQueue()
        self._verified: queue.Queue[_Verified | None] = queue.Queue(maxsize=1)
        self._refusals = _RefusalLog(config.ingest.log_interval_s)
        self._stats_lock = threading.Lock()
        self._registry: Registry | None = None
        self._stop = threading.Event()
        self._pool = (
            ThreadPoolExecutor(self.settings.verify_threads, thread_name_prefix="footfall-verify")
            if self.settings.verify_threads > 1
            else None
        )
        self.session = self._session()
        self.connected = self.session.connected

    def _session(self) -> Session | JetStreamSession:
        """The transport: an MQTT session, or JetStream consumers (broker.kind); the rest of
        ingest is the same for both."""
        if self.config.broker.kind == "jetstream":
            from aggregator.jetstream import JetStreamSession  # noqa: PLC0415 (nats-py: [nats])

            return JetStreamSession(
                self.config.broker,
                durable=self.settings.share_group or "footfall",
                max_age_s=self.settings.session_expiry_s,
                receive_maximum=self.settings.receive_maximum,
                on_message=self._on_message,
            )
        return Session(
            self.config.broker,
            client_id=self.settings.client_id,
            session_expiry_s=self.settings.session_expiry_s,
            receive_maximum=self.settings.receive_maximum,
            filters=[topic for topic, _ in topics(self.settings.share_group)],
            on_message=self._on_message,
        )

    def _on_message(self, delivery: Delivery) -> None:
        self._queue.put((delivery, time.time()))

    # --- the worker ------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask :meth:`run` to finish its batch and return (safe from any thread or signal)."""
        self._stop.set()

    def run(self) -> None:
        """Connect, then verify and store batches until :meth:`stop`.

        Two stages overlap: this thread takes and verifies batch n+1 while the store thread
        commits batch n (both stages spend much of their time outside the GIL: Ed25519, the
        database); the store thread acknowledges each batch after its commit, in order."""
        self.session.start()
        store_thread = threading.Thread(target=self._store_stage, name="footfall-store")
        store_thread.start()
        next_prune = time.monotonic()
        next_summary = time.monotonic() + self.settings.log_interval_s
        try:
            while not self._stop.is_set():
                batch = self._take()
                if batch:
                    verified = self._verify_stage(batch)
                    if verified is None:
                        break
                    self._verified.put(verified)
                now = time.monotonic()
                if now >= next_prune:
                    next_prune = now + self.settings.prune_interval_s
                    self._prune()
                if now >= next_summary:
                    next_summary = now + self.settings.log_interval_s
                    self._summary()
        finally:
            self._stop.set()  # the store stage stops retrying a batch the database refuses
            self._verified.put(None)
            store_thread.join()
            self.session.stop()
            if self._pool is not None:
                self._pool.shutdown()
            self._summary()

    def _take(self) -> list[tuple[Delivery, float]]:
        """Up to batch_max messages: wait for a first, then for more until batch_wait_ms."""
        try:
            first = self._queue.get(timeout=0.2)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.settings.batch_wait_ms / 1000
        while len(batch) < self.settings.batch_max:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    batch.append(self._queue.get(timeout=left))
                except queue.Empty:
                    break
        return batch

    def _verify_stage(self, batch: list[tuple[Delivery, float]]) -> _Verified | None:
        """Verify a batch against the current registry (read again, with retries, if the
        database fails); None if stopped meanwhile."""
        delay = 0.2
        while True:
            try:
                registry = self._current_registry()
                break
            except StoreError as exc:
                if self._stop.is_set():
                    return None
                log.error("cannot read the registry: %s; retrying", exc)
                self._stop.wait(delay)
                delay = min(delay * 2, self.config.broker.backoff_max_s)
        verified = _Verified(batch)
        now = time.monotonic()
        refused: list[Refusal] = []
        for result in self._check(batch, registry):
            if isinstance(result, Refusal):
                verified.tally[(result.reason, result.site, result.agent)] += 1
                refused.append(result)
                self._refusals.note(result, now)
            else:
                verified.accepted.append(result)
        with self._stats_lock:
            self.stats.accepted += len(verified.accepted)
            self.stats.refused.update(r.reason for r in refused)
        return verified

    def _store_stage(self) -> None:
        """Store verified batches in order, acknowledging each after its commit."""
        while True:
            verified = self._verified.get()
            if verified is None:
                return
            outcome = self._store(verified)
            if outcome is None:
                continue  # stopping with the database down: the broker keeps the batch
            self.session.ack([delivery for delivery, _ in verified.batch])
            with self._stats_lock:
                self.stats.batches += 1
                self.stats.received += len(verified.batch)
                self.stats.stored += len(outcome.stored)
                self.stats.refused.update(reason for _, reason in outcome.skipped)
            now = time.monotonic()
            for message, reason in outcome.skipped:
                self._refusals.note(
                    Refusal(reason, REASONS[reason], message.agent.site, message.agent.agent),
                    now,
                )
            if self._on_batch is not None:
                self._on_batch(outcome)

    def _store(self, verified: _Verified) -> BatchOutcome | None:
        delay = 0.2
        while True:
            started = time.perf_counter()
            try:
                return self.store.store_batch(verified.accepted, verified.tally, int(time.time()))
            except StoreError as exc:
                if self._stop.is_set():
                    log.warning("stopping with a batch unstored (%s); the broker keeps it", exc)
                    return None
                log.error(
                    "cannot store a batch of %d messages: %s; retrying", len(verified.batch), exc
                )
                self._stop.wait(delay)
                delay = min(delay * 2, self.config.broker.backoff_max_s)
            finally:
                self.stats.db_s += time.perf_counter() - started

    def _check(
        self, batch: list[tuple[Delivery, float]], registry: Registry
    ) -> list[Accepted | Refusal]:
        """Verify a batch, in order; big batches in parallel (Ed25519 lets go of the GIL)."""
        check = self.verifier.check

        def chunk(items: list[tuple[Delivery, float]]) -> list[Accepted | Refusal]:
            return [check(d.topic, d.payload, registry, int(at)) for d, at in items]

        if self._pool is None or len(batch) < 32:
            return chunk(batch)
        size = -(-len(batch) // self.settings.verify_threads)
        parts = self._pool.map(chunk, [batch[i : i + size] for i in range(0, len(batch), size)])
        return [result for part in parts for result in part]

    def _current_registry(self) -> Registry:
        """The registry snapshot, read again when the store's registry version moved."""
        started = time.perf_counter()
        try:
            version = self.store.registry_version()
            if self._registry is None or self._registry.version != version:
                self._registry = self.store.registry()
                log.info(
                    "registry loaded: %d agents (version %d)", len(self._registry.agents), version
                )
        finally:
            self.stats.db_s += time.perf_counter() - started
        return self._registry

    def _prune(self) -> None:
        retention = self.config.store.retention_days
        try:
            deleted = self.store.prune(int(time.time()), retention)
        except StoreError as exc:
            log.error("retention: cannot delete old windows: %s", exc)
            return
        if deleted:
            log.info("retention: deleted %d windows older than %d days", deleted, retention)

    def _summary(self) -> None:
        s = self.stats
        refused = ", ".join(f"{reason}={n}" for reason, n in sorted(s.refused.items()))
        v = self.verifier
        log.info(
            "ingest: %d messages received, %d windows stored, %d refused%s; time: parse %.2f s, "
            "signatures %.2f s, database %.2f s",
            s.received,
            s.stored,
            sum(s.refused.values()),
            f" ({refused})" if refused else "",
            v.parse_s,
            v.verify_s,
            s.db_s,
        )
