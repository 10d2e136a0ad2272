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

After each commit the agents whose windows the batch settled get a new signed receipt
(:mod:`aggregator.receipts`), published by the worker at most every
``ingest.receipt_interval_ms`` per agent: agents that have the receipt key keep a window
until a receipt covers it, so nothing the broker loses is lost. An agent's live ``connected``
status has its receipt published again too, for an agent that missed it while away. A counts
window refused for its content after its signature verified with the enrolled key (its range,
its sense, retention: :attr:`Refusal.settles`) is quarantined with its text and reason and
settled in the same transaction, so the receipt covers it and the agent stops sending it; a
message whose signature did not verify, or from an agent not enrolled, settles nothing.

**No message can stop ingest** (issue 16: one signed window dated 9999-12-31 did, for every
site, across restarts). Each message is verified on its own: an exception while verifying it
refuses it (``verify_failed``). If the database fails in a way that may pass (a connection, a
lock: :attr:`StoreError.transient`), the batch is retried with a capped backoff,
unacknowledged; the broker holds everything behind it. If the batch fails on what it holds (a
value the database refuses, an error computing its roll-ups), its messages are stored one by
one: one that fails alone, while the database answers a probe of its tables, is quarantined
(``store_failed``, the ``quarantine`` table), counted as a refusal of its agent and
acknowledged with the rest. A stage that fails unexpectedly, a database that refuses every
message (the probe fails too) or that stays unusable for ``ingest.database_retry_s`` is fatal:
:meth:`Ingest.run` stops both stages and raises :class:`IngestFatalError`, and the process
exits non-zero for its supervisor to start it again; the broker keeps what was not
acknowledged. A stop (SIGTERM) waits at most 10 s for the batch being stored, and at most
``ingest.stop_grace_s`` (20 s) for ingest as a whole: :meth:`Ingest.start` runs it in a
thread of its own, so the thread that takes the signal never waits on the database, and
:meth:`Ingest.finish` gives up on a database that neither answers nor fails (a lock held, a
silent network) with :class:`IngestFatalError`, within systemd's default grace of 90 s; the
batch in hand stays unacknowledged, and the broker sends it again.

Refusals are counted per reason, site and agent (``refusals``), but an agent that is not
enrolled is counted as agent ``''`` of its site (of site ``''`` if the site has no enrolled
agent): made-up topics add no rows.

The session announces ``ingest.max_message_bytes`` plus room for the topic as its MQTT 5
Maximum Packet Size: the broker drops a larger message for this session instead of sending
it. Under MQTT 3.1.1, or from a broker that sends one anyway, the session reads past it
without keeping it, and ingest refuses it as ``too_large`` (:mod:`aggregator.mqtt`).

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

import dataclasses
import functools
import hashlib
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from aggregator.config import AggregatorConfig
from aggregator.errors import IngestFatalError, StoreError
from aggregator.mqtt import PACKET_OVERHEAD, Delivery, Session
from aggregator.receipts import Receipts, load_receipt_key
from aggregator.registry import Registry, noisy
from aggregator.store import BatchOutcome, Store
from aggregator.transport import Transport
from aggregator.verify import REASONS, Accepted, Refusal, Verifier, WindowLimits

__all__ = ["Ingest", "IngestStats", "topics"]

log = logging.getLogger("footfall.aggregator")

_QUIET_REASONS = frozenset({"duplicate"})  # normal after a redelivery: logged at INFO
_STOP_WAIT_S = 10  # how long a stop waits for the store stage's batch in hand
T = TypeVar("T")


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
    quarantine: list[dict[str, Any]] = field(default_factory=list)  # verify_failed, settling
    settle: list[tuple[int, int]] = field(default_factory=list)  # (agent key, seq) refused
    greeted: set[int] = field(default_factory=set)  # agent keys that said "connected" just now


@dataclass(slots=True)
class IngestStats:
    """What ingest did since it started."""

    received: int = 0
    stored: int = 0  # counts windows inserted
    accepted: int = 0  # messages verified (counts, status, meta)
    refused: Counter[str] = field(default_factory=Counter)  # by reason, store's skips too
    quarantined: int = 0
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


def _ascii(text: str, limit: int) -> str:
    """Text for a quarantine column: ASCII (anything else escaped), at most ``limit``."""
    return text.encode("ascii", "backslashreplace").decode()[:limit]


def _quarantine_row(
    reason: str, refusal_site: str, refusal_agent: str, topic: str, data: bytes, error: str, at: int
) -> dict[str, Any]:
    return {
        "received_at": at,
        "reason": reason,
        "site_id": refusal_site,
        "agent_id": refusal_agent,
        "topic": _ascii(topic, 200),
        "error": _ascii(error, 500),
        "size": len(data),
        "digest": hashlib.sha256(data).hexdigest(),
        "message": None,
    }


class _StoppedError(Exception):
    """Ingest was stopped while retrying the database."""


def _failure(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _topic_ids(topic: str) -> tuple[str, str]:
    """(site, agent) a topic names, or ("", "")."""
    parts = topic.split("/")
    if len(parts) == 5 and parts[:2] == ["footfall", "v1"]:
        return parts[2][:63], parts[3][:63]
    return "", ""


def _greeting(delivery: Delivery, message: Accepted) -> bool:
    """Whether the message is an agent's word that it is connected: a live status (not one a
    broker kept and hands every new subscriber) with cause ``connected``, which an agent sends
    on connecting (and again while its spool's size changes). Its receipt goes out again in
    answer, so an agent that was away when its last receipt went by (NATS keeps no receipt:
    :mod:`aggregator.jetstream`; a Mosquitto without persistence loses its retained ones in a
    restart) lets go of what is stored instead of sending it all again on its re-send
    timer."""
    return (
        message.kind == "status"
        and not delivery.retain
        and message.payload.get("cause") == "connected"
    )


def _with_metas(registry: Registry, results: Iterable[Accepted | Refusal]) -> Registry:
    """The registry with what the accepted meta messages say about their agents' noise."""
    changed = {
        (m.agent.site, m.agent.agent): dataclasses.replace(m.agent, noisy=noisy(m.payload))
        for m in results
        if isinstance(m, Accepted) and noisy(m.payload) != m.agent.noisy
    }
    if not changed:
        return registry
    return Registry(registry.version, {**registry.agents, **changed})


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
        self.verifier = Verifier(
            config.ingest.max_message_bytes,
            WindowLimits(
                past_s=config.ingest.max_window_age_days * 86400,
                future_s=config.ingest.max_window_lead_s,
            ),
        )
        self.stats = IngestStats()
        self._on_batch = on_batch
        self._queue: queue.SimpleQueue[tuple[Delivery, float]] = queue.SimpleQueue()
        self._verified: queue.Queue[_Verified] = queue.Queue(maxsize=1)
        self._refusals = _RefusalLog(config.ingest.log_interval_s)
        self._stats_lock = threading.Lock()
        self._registry: Registry | None = None
        self._stop = threading.Event()
        self._fatal: BaseException | None = None
        self._raised: BaseException | None = None  # by run, in the thread of start
        self._stopped_at = 0.0  # monotonic time of the first stop (0: not stopped)
        self._pool = (
            ThreadPoolExecutor(self.settings.verify_threads, thread_name_prefix="footfall-verify")
            if self.settings.verify_threads > 1
            else None
        )
        self.session = self._session()
        self.connected = self.session.connected
        self.receipts = Receipts(
            load_receipt_key(Path(self.settings.receipt_key_file)),
            store,
            self.session.publish,
            self.settings.receipt_interval_ms / 1000,
        )

    def _session(self) -> Transport:
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
            maximum_packet_size=self.settings.max_message_bytes + PACKET_OVERHEAD,
            filters=[topic for topic, _ in topics(self.settings.share_group)],
            on_message=self._on_message,
        )

    def _on_message(self, delivery: Delivery) -> None:
        self._queue.put((delivery, time.time()))

    # --- the worker ------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask :meth:`run` to finish its batch and return (safe from any thread or signal)."""
        if not self._stopped_at:
            self._stopped_at = time.monotonic()
        self._stop.set()

    def start(self, on_end: Callable[[], None]) -> threading.Thread:
        """:meth:`run` in a thread of its own, which calls ``on_end`` when run returns or
        raises; :meth:`finish` stops it and raises what it raised."""

        def run() -> None:
            try:
                self.run()
            except BaseException as exc:
                self._raised = exc
            finally:
                on_end()

        thread = threading.Thread(target=run, name="footfall-ingest", daemon=True)
        thread.start()
        return thread

    def finish(self, thread: threading.Thread) -> None:
        """Stop ingest started by :meth:`start` and wait for it until ``ingest.stop_grace_s``
        after the first stop; raise what it raised, or :class:`IngestFatalError` if it is still
        waiting on the database."""
        self.stop()
        grace = self.settings.stop_grace_s
        thread.join(max(0.0, self._stopped_at + grace - time.monotonic()))
        if thread.is_alive():
            raise IngestFatalError(
                f"ingest did not stop within {grace} s (ingest.stop_grace_s; the database has not "
                "answered): "
                "exiting without the batch in hand (unacknowledged: the broker sends it again)"
            )
        if self._raised is not None:
            raise self._raised

    def run(self) -> None:
        """Connect, then verify and store batches until :meth:`stop`; raise
        :class:`IngestFatalError` when ingest cannot go on (see the module docstring).

        Two stages overlap: this thread takes and verifies batch n+1 while the store thread
        commits batch n (both stages spend much of their time outside the GIL: Ed25519, the
        database); the store thread acknowledges each batch after its commit, in order."""
        self.session.start()
        store_thread = threading.Thread(
            target=self._store_stage, name="footfall-store", daemon=True
        )
        store_thread.start()
        next_prune = time.monotonic()
        next_summary = time.monotonic() + self.settings.log_interval_s
        try:
            while not self._stop.is_set():
                batch = self._take()
                if batch:
                    verified = self._verify_stage(batch)
                    if verified is None or not self._hand_over(verified):
                        break
                if self.session.connected.is_set():
                    self.receipts.flush()
                now = time.monotonic()
                if now >= next_prune:
                    next_prune = now + self.settings.prune_interval_s
                    self._prune()
                if now >= next_summary:
                    next_summary = now + self.settings.log_interval_s
                    self._summary()
        except BaseException as exc:
            self._die("the verify stage", exc)
        finally:
            self._stop.set()  # the store stage finishes the batch in hand, then returns
            store_thread.join(_STOP_WAIT_S)
            if store_thread.is_alive():
                log.error(
                    "the store did not finish its batch within %d s; stopping without it "
                    "(unacknowledged: the broker sends it again)",
                    _STOP_WAIT_S,
                )
            self.session.stop()
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
            self._summary()
        if self._fatal is not None:
            raise IngestFatalError(f"ingest stopped: {_failure(self._fatal)}") from self._fatal

    def _die(self, where: str, exc: BaseException) -> None:
        """A stage cannot go on: say why, and stop the other (run raises at its end)."""
        if self._fatal is None:
            self._fatal = exc
            if isinstance(exc, IngestFatalError):
                log.critical("%s", exc)
            else:
                log.critical("%s failed: %s", where, _failure(exc), exc_info=exc)
        self._stop.set()

    def _hand_over(self, verified: _Verified) -> bool:
        """Queue a verified batch for the store stage; False if stopped meanwhile."""
        while not self._stop.is_set():
            try:
                self._verified.put(verified, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

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
        try:
            registry = self._retrying("read the registry", self._current_registry)
        except _StoppedError:
            return None
        verified = _Verified(batch)
        now = time.monotonic()
        refused: list[Refusal] = []
        for (delivery, at), result in zip(batch, self._check(batch, registry), strict=True):
            if isinstance(result, Refusal):
                refused.append(result)
                self._refusals.note(result, now)
                reason, site, agent = self._counted_as(result, registry)
                if reason != "verify_failed" and result.settles is None:
                    verified.tally[(reason, site, agent)] += 1
                    continue
                row = _quarantine_row(
                    reason, site, agent, delivery.topic, delivery.payload, result.detail, int(at)
                )
                if result.settles is not None:  # it verified: keep its text, settle its seq
                    row["message"] = delivery.payload.decode()
                    verified.settle.append(result.settles)
                verified.quarantine.append(row)  # counted as a refusal by store.quarantine
            else:
                verified.accepted.append(result)
                if _greeting(delivery, result):
                    verified.greeted.add(result.agent.key)
        with self._stats_lock:
            self.stats.accepted += len(verified.accepted)
            self.stats.refused.update(r.reason for r in refused)
        return verified

    @staticmethod
    def _counted_as(refusal: Refusal, registry: Registry) -> tuple[str, str, str]:
        """(reason, site, agent) a refusal is counted under: an agent that is not enrolled as
        '' and a site without an enrolled agent as '', so made-up topics add no rows."""
        site, agent = refusal.site, refusal.agent
        if registry.get(site, agent) is None:
            agent = ""
            if site not in registry.sites:
                site = ""
        return refusal.reason, site, agent

    def _store_stage(self) -> None:
        """Store verified batches in order, acknowledging each after its commit; returns
        when stopped (after the batch in hand)."""
        try:
            while True:
                try:
                    verified = self._verified.get(timeout=0.2)
                except queue.Empty:
                    if self._stop.is_set():
                        return
                    continue
                outcome = self._store(verified)
                if outcome is None:
                    return  # stopping with the database down: the broker keeps the batch
                self.session.ack([delivery for delivery, _ in verified.batch])
                self.receipts.changed(outcome.settled | verified.greeted)
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
        except BaseException as exc:
            self._die("the store stage", exc)

    def _retrying(self, what: str, attempt: Callable[[], T]) -> T:
        """``attempt()``, again with a capped backoff while the database fails in a way that
        may pass (a connection, a lock); :class:`_StoppedError` if stopped meanwhile. A failure
        that lasts ingest.database_retry_s is fatal; any other error is raised at once."""
        delay, first_failure = 0.2, None
        while True:
            started = time.perf_counter()
            try:
                return attempt()
            except StoreError as exc:
                if not exc.transient:
                    raise
                if self._stop.is_set():
                    log.warning("stopping: cannot %s (%s); the broker keeps the batch", what, exc)
                    raise _StoppedError from exc
                now = time.monotonic()
                first_failure = first_failure or now
                limit = self.settings.database_retry_s
                if limit and now - first_failure >= limit:
                    raise IngestFatalError(
                        f"cannot {what} for {limit} s (ingest.database_retry_s): {exc}; exiting "
                        "for the supervisor to start ingest again"
                    ) from exc
                log.error("cannot %s: %s; retrying", what, exc)
                self._stop.wait(delay)
                delay = min(delay * 2, self.config.broker.backoff_max_s)
            finally:
                self.stats.db_s += time.perf_counter() - started

    def _store(self, verified: _Verified) -> BatchOutcome | None:
        """Store a batch; if the batch fails on what it holds, its messages one by one, and
        quarantine each that fails alone. None if stopped meanwhile."""
        try:
            return self._store_or_quarantine(verified)
        except _StoppedError:
            return None

    def _store_or_quarantine(self, verified: _Verified) -> BatchOutcome:
        now = int(time.time())
        tally = dict(verified.tally)
        refused: set[int] = set()  # agents whose receipt the quarantine moved
        if verified.quarantine:
            rows, settle = verified.quarantine, verified.settle
            refused = self._retrying(
                "quarantine", lambda: self.store.quarantine(rows, now, settle=settle)
            )
            with self._stats_lock:
                self.stats.quarantined += len(rows)
        try:
            stored = self._retrying(
                f"store a batch of {len(verified.batch)} messages",
                lambda: self.store.store_batch(verified.accepted, tally, now),
            )
            stored.settled |= refused
            return stored
        except (IngestFatalError, _StoppedError):
            raise
        except Exception as exc:
            log.warning(
                "a batch of %d messages failed (%s); storing them one by one",
                len(verified.batch),
                _failure(exc),
            )
        outcome = BatchOutcome(settled=refused)
        self._retrying("count refusals", lambda: self.store.store_batch([], tally, now))
        for message in verified.accepted:
            try:
                part = self._retrying(
                    "store a message",
                    functools.partial(self.store.store_batch, [message], None, now),
                )
            except (IngestFatalError, _StoppedError):
                raise
            except Exception as exc:
                self._quarantine_stored(message, exc, now)
                continue
            outcome.stored += part.stored
            outcome.skipped += part.skipped
            outcome.settled |= part.settled
        return outcome

    def _quarantine_stored(self, message: Accepted, exc: Exception, now: int) -> None:
        """Quarantine a verified message the store failed on alone, after making sure the
        database itself answers (else that is fatal)."""
        try:
            self._retrying("read the database", self.store.probe)
        except StoreError as broken:
            raise IngestFatalError(
                f"the database fails on every message, not this one: {broken}"
            ) from broken
        who = (message.agent.site, message.agent.agent)
        text = f'{{"alg":"ed25519","payload":{message.canonical},"sig":"{message.signature}"}}'
        row = _quarantine_row(
            "store_failed",
            *who,
            f"footfall/v1/{who[0]}/{who[1]}/{message.kind}",
            text.encode(),
            _failure(exc),
            message.received_at,
        )
        row["message"] = text
        self._retrying("quarantine", lambda: self.store.quarantine([row], now))
        refusal = Refusal("store_failed", _failure(exc), *who)
        self._refusals.note(refusal, time.monotonic())
        with self._stats_lock:
            self.stats.quarantined += 1
            self.stats.refused["store_failed"] += 1
            self.stats.accepted -= 1

    def _check(
        self, batch: list[tuple[Delivery, float]], registry: Registry
    ) -> list[Accepted | Refusal]:
        """Verify a batch, in order; big batches in parallel (Ed25519 lets go of the GIL).
        An agent's meta goes first, so its counts in the same batch meet the rules it says
        it follows; an error while verifying one message refuses that message."""
        check = self.verifier.check

        def one(delivery: Delivery, at: float, registry: Registry) -> Accepted | Refusal:
            try:
                return check(delivery.topic, delivery.payload, registry, int(at), delivery.size)
            except Exception as exc:
                where = _topic_ids(delivery.topic)
                return Refusal("verify_failed", _failure(exc), *where)

        metas = [i for i, (d, _) in enumerate(batch) if d.topic.endswith("/meta")]
        first = {i: one(*batch[i], registry) for i in metas}
        registry = _with_metas(registry, first.values())

        def chunk(items: list[tuple[int, tuple[Delivery, float]]]) -> list[Accepted | Refusal]:
            return [first[i] if i in first else one(d, at, registry) for i, (d, at) in items]

        numbered = list(enumerate(batch))
        if self._pool is None or len(batch) < 32:
            return chunk(numbered)
        size = -(-len(batch) // self.settings.verify_threads)
        parts = self._pool.map(chunk, [numbered[i : i + size] for i in range(0, len(batch), size)])
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
            "ingest: %d messages received, %d windows stored, %d refused%s, %d quarantined; "
            "time: parse %.2f s, signatures %.2f s, database %.2f s",
            s.received,
            s.stored,
            sum(s.refused.values()),
            f" ({refused})" if refused else "",
            s.quarantined,
            v.parse_s,
            v.verify_s,
            s.db_s,
        )
