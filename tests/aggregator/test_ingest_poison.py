"""Issue 16's findings on ingest, each on SQLite and PostgreSQL, against a real Mosquitto:

* one signed window dated 9999-12-31 (a site in UTC) or 0001-01-01 (a site in New York) made
  the roll-up raise ``OverflowError``: the store thread died, nothing more was stored for any
  site, ingest ignored a stop, and the broker sent the message again after every restart
  (now refused, acknowledged and never sent again: a restart receives nothing of it);
* a replayed message with ``\\n`` after its signature passed the schema (``re.search`` and
  ``$``), verified, and failed PostgreSQL's insert (89 characters): the same stall;
* a message the database refuses on its own (here a constraint refusing seq 666) failed its
  whole batch for ever; now it is quarantined and the rest of the batch is stored;
* retention remembered the largest seq among deleted windows whatever their date, so after a
  1970-dated window was deleted a current window with a lower seq was refused as ``expired``;
* a database gone for good: ingest exits non-zero with a clear message (its supervisor
  restarts it), instead of retrying silently for ever;
* a database that hangs (a lock held, a silent network): SIGTERM still ends ingest within its
  grace period.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import httpx
import pytest

from aggregator.cli import main
from aggregator.config import StoreSettings
from aggregator.errors import IngestFatalError
from aggregator.ingest import Ingest
from aggregator.registry import Registry
from aggregator.store import QUARANTINE_KEEP, BatchOutcome, Store
from aggregator.verify import Accepted, Refusal, Verifier
from firmware_agent.contract.messages import utc_text
from tests.aggregator.test_ingest import AgentAccount, _config_file, _spawn, config_for, running
from tests.support.aggregator_harness import Agent, refuse_seq_666, stored_seqs
from tests.support.delivery import database_link
from tests.support.mqtt_broker import HOST, Mosquitto, wait_for
from tests.support.ports import free_port

NOW = int(time.time())
RECENT = NOW - NOW % 300 - 3600  # an aligned window start an hour ago


def _with_newline_after_sig(sealed: bytes) -> bytes:
    envelope = json.loads(sealed)
    envelope["sig"] += "\n"
    return json.dumps(envelope).encode()


def test_no_poisonous_message_stops_ingest_for_the_others(
    store_settings: StoreSettings,
    start_broker: Callable[[Mapping[tuple[str, str], str]], Mosquitto],
    capsys: pytest.CaptureFixture[str],
) -> None:
    utc, york, other = Agent("utc", "a1"), Agent("ny", "b1"), Agent("utc", "a2")
    broker = start_broker({("utc", "a1"): "p1", ("ny", "b1"): "p2", ("utc", "a2"): "p3"})
    with Store.open(store_settings) as store:
        store.add_site("utc", "", "UTC", NOW)
        store.add_site("ny", "", "America/New_York", NOW)
        for a in (utc, york, other):
            store.add_agent(a.site, a.agent, a.public_key, NOW)
        refuse_seq_666(store)
        accounts = [
            AgentAccount(broker, a.site, a.agent, password)
            for a, password in ((utc, "p1"), (york, "p2"), (other, "p3"))
        ]
        config = config_for(broker, store_settings, **{"ingest.batch_wait_ms": 200})
        try:
            with running(config) as ingest:
                # In one batch: the two dates, the signature with a newline, and the window
                # the database refuses, between windows that are fine.
                accounts[0].publish("counts", utc.counts(1, "9999-12-31T00:00:00Z"))
                accounts[1].publish("counts", york.counts(1, "0001-01-01T00:00:00Z"))
                newline = _with_newline_after_sig(utc.counts(2, utc_text(RECENT)))
                accounts[0].publish("counts", newline)
                accounts[2].publish("counts", other.counts(665, utc_text(RECENT)))
                accounts[2].publish("counts", other.counts(666, utc_text(RECENT + 300)))
                accounts[2].publish("counts", other.counts(667, utc_text(RECENT + 600)))
                wait_for(lambda: ingest.stats.received >= 6, 10, "the first six messages")
                accounts[2].publish("counts", other.counts(668, utc_text(RECENT + 900)))
                sent = time.monotonic()
                wait_for(lambda: 668 in stored_seqs(store, "utc", "a2"), 1.0, "the window after")
                latency = time.monotonic() - sent
                refused = dict(ingest.stats.refused)
            counted_before = store.refusal_counts()
            # A restart under the same session: the broker sends none of them again (each
            # was acknowledged with its batch), and the next window is stored.
            with running(config) as again:
                accounts[2].publish("counts", other.counts(669, utc_text(RECENT + 1200)))
                wait_for(lambda: 669 in stored_seqs(store, "utc", "a2"), 5, "after the restart")
                received_again = again.stats.received
        finally:
            for account in accounts:
                account.close()
        assert latency < 1.0
        assert received_again == 1
        assert store.refusal_counts() == counted_before
        assert stored_seqs(store, "utc", "a2") == [665, 667, 668, 669]
        assert stored_seqs(store, "utc", "a1") == stored_seqs(store, "ny", "b1") == []
        assert refused == {"window_range": 2, "schema": 1, "store_failed": 1}
        counted = store.refusal_counts()
        assert counted[("window_range", "utc", "a1")] == counted[("window_range", "ny", "b1")] == 1
        assert counted[("schema", "utc", "a1")] == counted[("store_failed", "utc", "a2")] == 1
        *dated, quarantined = store.quarantined()
        assert (quarantined["reason"], quarantined["agent_id"]) == ("store_failed", "a2")
        # The two dates verified (signed by their agents): quarantined and settled, so their
        # agents stop sending them; the signature with a newline (schema) settles nothing.
        assert sorted((q["reason"], q["agent_id"]) for q in dated) == [
            ("window_range", "a1"),
            ("window_range", "b1"),
        ]
        keys = {}
        for a in (utc, york):
            entry = store.registry().get(a.site, a.agent)
            assert entry is not None
            keys[a.agent] = entry.key
        assert {k: v[2] for k, v in store.settled(keys.values()).items()} == {
            keys["a1"]: [(1, 1)],
            keys["b1"]: [(1, 1)],
        }
        assert "no_666" in quarantined["error"]
        assert json.loads(quarantined["message"])["payload"]["seq"] == 666
    where = [f"store.dsn={store_settings.dsn}", f"store.schema={store_settings.schema}"]
    assert main(["quarantine", "--set", where[0], "--set", where[1]]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:5] == ["RECEIVED", "REASON", "SITE", "AGENT", "BYTES"]
    assert [line.split()[1:4] for line in table[1:]].count(["store_failed", "utc", "a2"]) == 1


def test_retention_deletes_by_window_time_so_a_current_window_is_never_refused(
    store: Store,
) -> None:
    agent = Agent()
    store.add_site("s1", "", "UTC", NOW)
    store.add_agent("s1", "a1", agent.public_key, NOW)
    verifier = Verifier(65536)

    def accept(seq: int, start: int, received_at: int) -> Accepted:
        result = verifier.check(
            agent.topic, agent.counts(seq, utc_text(start)), store.registry(), received_at
        )
        assert isinstance(result, Accepted), result
        return result

    # A window dated 1970 (an agent whose clock had not been set) with a large seq.
    store.store_batch([accept(1_000_000, 600, 900)], now=NOW)
    late = accept(9, RECENT - 95 * 86400, NOW)  # verified before the prune, stored after it
    assert store.prune(NOW, 90) == 1
    skipped = store.store_batch([late], now=NOW).skipped
    assert [(m.payload["seq"], reason) for m, reason in skipped] == [(9, "expired")]
    current = accept(7, RECENT, NOW)  # a lower seq, never stored: not a replay
    assert [m.payload["seq"] for m in store.store_batch([current], now=NOW).stored] == [7]
    replay = verifier.check(
        agent.topic, agent.counts(1_000_000, utc_text(600)), store.registry(), NOW
    )
    assert not isinstance(replay, Accepted) and replay.reason in {"expired", "window_range"}
    old = verifier.check(
        agent.topic, agent.counts(8, utc_text(RECENT - 91 * 86400)), store.registry(), NOW
    )
    assert not isinstance(old, Accepted) and old.reason == "expired"


def _one_agent(
    start_broker: Callable[[Mapping[tuple[str, str], str]], Mosquitto], settings: StoreSettings
) -> tuple[Agent, Mosquitto]:
    """Agent s1/a1 (broker password "pw"), enrolled in the store of ``settings``."""
    agent = Agent("s1", "a1")
    with Store.open(settings) as store:
        store.add_site("s1", "", "UTC", NOW)
        store.add_agent("s1", "a1", agent.public_key, NOW)
    return agent, start_broker({("s1", "a1"): "pw"})


def _drop_windows(settings: StoreSettings) -> None:
    """The database loses a table for good."""
    if settings.dsn.startswith("sqlite"):
        with sqlite3.connect(settings.dsn.removeprefix("sqlite:///")) as db:
            db.execute("PRAGMA foreign_keys = OFF")
            db.execute("DROP TABLE windows")
        return
    with Store(settings) as store, store.begin() as conn:
        conn.exec_driver_sql("DROP TABLE windows CASCADE")


def test_ingest_exits_non_zero_when_its_database_is_gone_for_good(
    store_settings: StoreSettings,
    start_broker: Callable[[Mapping[tuple[str, str], str]], Mosquitto],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SQLite says "no such table" as an error that may pass (retried for
    ingest.database_retry_s); PostgreSQL says the table does not exist, which no retry
    mends: every message fails alone and so does the probe of the tables, so ingest exits
    at once."""
    agent, broker = _one_agent(start_broker, store_settings)
    monkeypatch.setenv("FOOTFALL_AGG_INGEST_DATABASE_RETRY_S", "2")
    log = tmp_path / "ingest.log"
    config = _config_file(tmp_path / "aggregator.toml", broker, store_settings)
    process = _spawn(config, "ingest-gone", log)
    account = AgentAccount(broker, "s1", "a1", "pw")
    try:
        wait_for(lambda: "subscribed to" in log.read_text(), 20, "ingest to subscribe")
        _drop_windows(store_settings)
        account.publish("counts", agent.counts(1, utc_text(RECENT)))
        started = time.monotonic()
        status = process.wait(30)
        took = time.monotonic() - started
    finally:
        account.close()
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait()
    text = log.read_text()
    assert status == 1, text
    assert took < 15, text
    assert "footfall-aggregator: error: ingest stopped" in text
    if store_settings.dsn.startswith("sqlite"):
        assert "for 2 s (ingest.database_retry_s)" in text
        assert "no such table: windows" in text
    else:
        assert 'relation "windows" does not exist' in text


def test_a_stop_ends_ingest_within_its_grace_while_the_database_is_gone(
    start_broker: Callable[[Mapping[tuple[str, str], str]], Mosquitto], tmp_path: Path
) -> None:
    settings = StoreSettings(f"sqlite:///{tmp_path / 'aggregator.sqlite3'}")
    agent, broker = _one_agent(start_broker, settings)
    with Store.open(settings) as store:
        ingest = Ingest(config_for(broker, settings), store)
        thread = threading.Thread(target=ingest.run, daemon=True)
        thread.start()
        account = AgentAccount(broker, "s1", "a1", "pw")
        try:
            wait_for(ingest.connected.is_set, 10, "ingest to connect")
            _drop_windows(settings)
            account.publish("counts", agent.counts(1, utc_text(RECENT)))
            wait_for(lambda: ingest.stats.accepted == 1, 5, "the window verified")
            time.sleep(1.0)  # the store stage retries the database meanwhile
            started = time.monotonic()
            ingest.stop()
            thread.join(10)
            took = time.monotonic() - started
        finally:
            account.close()
    assert not thread.is_alive()
    assert took < 2
    assert ingest.stats.stored == 0


@contextlib.contextmanager
def _database_hangs(settings: StoreSettings) -> Iterator[tuple[StoreSettings, Callable[[], None]]]:
    """The settings ingest is to use, and a call that makes its database hang without
    failing: on SQLite another connection holds the write lock; on PostgreSQL every
    connection goes silent (a link that takes what is sent and answers nothing) and new ones
    are refused."""
    if settings.dsn.startswith("sqlite"):
        holder = sqlite3.connect(settings.dsn.removeprefix("sqlite:///"), isolation_level=None)
        try:
            yield settings, lambda: holder.execute("BEGIN IMMEDIATE")
        finally:
            holder.close()
        return
    link = database_link(settings.dsn)
    dsn = settings.dsn.replace(f":{link.target[1]}/", f":{link.port}/")
    try:
        yield StoreSettings(dsn, settings.schema), link.cut
    finally:
        link.close()


def _call_api(port: int) -> None:
    """A sign-in, which reads the database (the limiter): waits while the database hangs."""
    with (
        contextlib.suppress(httpx.HTTPError),
        httpx.Client(cookies={"footfall_csrf": "c"}, timeout=120) as client,
    ):
        client.post(f"http://{HOST}:{port}/login", data={"name": "x", "password": "y", "csrf": "c"})


@pytest.mark.parametrize("command", ["ingest", "serve"])
def test_sigterm_ends_ingest_within_its_grace_while_the_database_hangs(
    store_settings: StoreSettings,
    command: str,
    start_broker: Callable[[Mapping[tuple[str, str], str]], Mosquitto],
    tmp_path: Path,
) -> None:
    """SIGTERM while a batch waits on a database that neither answers nor fails (a lock
    held, a silent network): ``ingest``, or ``serve`` with ingest in it and an API call
    waiting too, exits within its grace, saying that it left the batch to the broker. It
    used to wait for the database: 60 s on SQLite (its lock timeout, twice over), for ever
    on PostgreSQL."""
    agent = Agent("s1", "a1")
    broker = start_broker({("s1", "a1"): "pw"})
    with Store.open(store_settings) as store:
        store.add_site("s1", "", "UTC", NOW)
        store.add_agent("s1", "a1", agent.public_key, NOW)
    log, port = tmp_path / "ingest.log", free_port()
    grace = 3  # ingest.stop_grace_s: the default 20 s, shortened so the test does not wait it out
    more = ["--set", f"ingest.stop_grace_s={grace}"]
    more += ["--set", f"serve.port={port}"] if command == "serve" else []
    with _database_hangs(store_settings) as (settings, hang):
        config = _config_file(tmp_path / "agg.toml", broker, settings)
        process = _spawn(config, "hang", log, command, *more)
        account = AgentAccount(broker, "s1", "a1", "pw")
        try:
            wait_for(lambda: "subscribed to" in log.read_text(), 20, "ingest to subscribe")
            hang()
            account.publish("counts", agent.counts(1, utc_text(RECENT)))
            if command == "serve":
                threading.Thread(target=_call_api, args=(port,), daemon=True).start()
            time.sleep(2)  # the window taken and the database waited on
            process.send_signal(signal.SIGTERM)
            started = time.monotonic()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(60)
            took = time.monotonic() - started
        finally:
            account.close()
            if process.poll() is None:
                process.kill()
                process.wait()
    text = log.read_text()
    calls = 10 if command == "serve" else 0  # serve gives API calls in progress 10 s
    assert took < grace + calls + 10, text  # well under systemd's default TimeoutStopSec: 90 s
    # Either the batch waited on a connection that went silent ("the broker sends it again")
    # or, when ingest had to open a new connection after the cut, the link refused it and
    # ingest was retrying ("the broker keeps the batch"): which one depends on the pool.
    left = ("the broker sends it again", "the broker keeps the batch")
    assert process.returncode is not None and any(s in text for s in left), text
    if command == "serve" and not settings.schema:  # SQLite: the sign-in waited for the
        assert "timeout graceful shutdown exceeded" in text, text  # write lock: given up


class _FaultyVerifier(Verifier):
    """A verifier that raises on one message (seq 13). No real message makes the verifier
    raise (the hostile suite's 62 kinds do not), so the fault is put in: what ingest does if
    a bug ever let one through."""

    def check(
        self, topic: str, data: bytes, registry: Registry, received_at: int, size: int = -1
    ) -> Accepted | Refusal:
        if b'"seq":13,' in data:
            raise ValueError("a bug in the verifier")
        return super().check(topic, data, registry, received_at, size)


def test_an_error_verifying_one_message_refuses_it_and_stops_no_one(
    store_settings: StoreSettings,
    start_broker: Callable[[Mapping[tuple[str, str], str]], Mosquitto],
) -> None:
    agent = Agent("s1", "a1")
    broker = start_broker({("s1", "a1"): "pw"})
    with Store.open(store_settings) as store:
        store.add_site("s1", "", "UTC", NOW)
        store.add_agent("s1", "a1", agent.public_key, NOW)
        account = AgentAccount(broker, "s1", "a1", "pw")
        config = config_for(broker, store_settings, **{"ingest.batch_wait_ms": 200})
        try:
            with running(config) as ingest:
                ingest.verifier = _FaultyVerifier(65536)
                for seq in (12, 13, 14):  # one batch
                    account.publish("counts", agent.counts(seq, utc_text(RECENT + 300 * seq)))
                wait_for(lambda: ingest.stats.received == 3, 10, "the batch")
                refused = dict(ingest.stats.refused)
        finally:
            account.close()
        assert stored_seqs(store, "s1", "a1") == [12, 14]
        assert refused == {"verify_failed": 1}
        (row,) = store.quarantined()
        assert (row["reason"], row["agent_id"], row["message"]) == ("verify_failed", "a1", None)
        assert row["error"] == "ValueError: a bug in the verifier"
        assert store.refusal_counts() == {("verify_failed", "s1", "a1"): 1}


def test_a_stage_that_fails_unexpectedly_stops_ingest_loudly(
    store_settings: StoreSettings,
    start_broker: Callable[[Mapping[tuple[str, str], str]], Mosquitto],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The store stage used to die alone (the roll-up's OverflowError), leaving a process that
    stayed connected and stored nothing. Any error it does not expect now stops the other
    stage and makes :meth:`Ingest.run` raise, for the process to exit non-zero; the fault is
    put in through the after-batch hook, which runs in the store stage."""
    agent = Agent("s1", "a1")
    broker = start_broker({("s1", "a1"): "pw"})

    def fail(_outcome: BatchOutcome) -> None:
        raise RuntimeError("a bug in the store stage")

    with Store.open(store_settings) as store:
        store.add_site("s1", "", "UTC", NOW)
        store.add_agent("s1", "a1", agent.public_key, NOW)
        ingest = Ingest(config_for(broker, store_settings), store, on_batch=fail)
        thread = ingest.start(on_end=lambda: None)
        account = AgentAccount(broker, "s1", "a1", "pw")
        try:
            wait_for(ingest.connected.is_set, 10, "ingest to connect")
            account.publish("counts", agent.counts(1, utc_text(RECENT)))
            thread.join(20)  # it ends by itself
            assert not thread.is_alive()
            message = "ingest stopped: RuntimeError: a bug in the store stage"
            with pytest.raises(IngestFatalError, match=f"^{message}$"):
                ingest.finish(thread)
        finally:
            account.close()
    assert "the store stage failed: RuntimeError: a bug in the store stage" in caplog.text


def test_the_quarantine_keeps_its_newest_rows(store: Store) -> None:
    row = {"received_at": NOW, "reason": "store_failed", "site_id": "s1", "agent_id": "a1",
           "topic": "footfall/v1/s1/a1/counts", "error": "e", "size": 1, "digest": "0" * 64,
           "message": None}  # fmt: skip
    store.quarantine([row | {"size": i} for i in range(5)], NOW, keep=3)
    store.quarantine([row | {"size": 5}], NOW, keep=3)
    assert [kept["size"] for kept in store.quarantined()] == [3, 4, 5]
    assert store.refusal_counts() == {("store_failed", "s1", "a1"): 6}
    assert QUARANTINE_KEEP == 10_000  # what ingest keeps (docs/aggregator.md)
