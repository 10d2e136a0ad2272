"""Ingest against a real Mosquitto (tests/support/mqtt_broker.py) and a real database.

* verified messages are stored, hostile ones refused each with its own reason, and ingest goes
  on; a revocation takes effect at once; status and meta make the agent's health;
* two ingest processes on one shared subscription, PostgreSQL, 200 simulated agents: every
  window stored exactly once, even when one process is killed mid-stream (the other carries
  on; the killed one comes back under its client id and its session holds what it had not
  acknowledged);
* the broker restarted mid-stream: ingest resumes its persistent session, nothing is lost.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import sqlalchemy as sa
from paho.mqtt.enums import CallbackAPIVersion

from aggregator.config import AggregatorConfig, StoreSettings, load_config
from aggregator.ingest import Ingest, _greeting
from aggregator.mqtt import Delivery
from aggregator.registry import AgentEntry
from aggregator.store import Store, site_days, windows
from aggregator.verify import Accepted
from firmware_agent.contract.messages import AgentId, SiteId, seal, status_payload
from tests.support.agent_fleet import Fleet, fleet_broker, fleet_messages, make_agents, meta_of
from tests.support.aggregator_harness import Agent, drop_schema, pg_dsn
from tests.support.mqtt_broker import HOST, READER, Mosquitto, TestCertificates, wait_for
from tests.support.shared import REPO

NOW = int(time.time())


def config_for(
    broker: Mosquitto, store: StoreSettings, client_id: str = "ingest-1", **extra: object
) -> AggregatorConfig:
    overrides: dict[str, object] = {
        "store.dsn": store.dsn,
        "store.schema": store.schema,
        "store.data_dir": str(broker.root),
        "store.retention_days": 0,
        "broker.host": HOST,
        "broker.port": broker.port,
        "broker.username": READER[0],
        "broker.password": READER[1],
        "broker.keepalive_s": 5,
        "broker.backoff_max_s": 1,
        "ingest.client_id": client_id,
        "ingest.batch_wait_ms": 20,
    }
    return load_config(environ={}, overrides=overrides | extra)


@contextlib.contextmanager
def running(config: AggregatorConfig) -> Iterator[Ingest]:
    """Ingest in a thread of this process, stopped at the end."""
    with Store.open(config.store) as store:
        ingest = Ingest(config, store)
        thread = threading.Thread(target=ingest.run, daemon=True)
        thread.start()
        try:
            wait_for(ingest.connected.is_set, 10, "ingest to connect and subscribe")
            yield ingest
        finally:
            ingest.stop()
            thread.join(15)
            assert not thread.is_alive(), "ingest did not stop"


class AgentAccount:
    """One agent's broker account, publishing raw bytes at QoS 1 (paho, MQTT 3.1.1)."""

    def __init__(self, broker: Mosquitto, site: str, agent: str, password: str) -> None:
        self.prefix = f"footfall/v1/{site}/{agent}"
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        self.client.username_pw_set(f"{site}/{agent}", password)
        self.client.connect(HOST, broker.port)
        self.client.loop_start()

    def publish(self, kind: str, body: bytes, *, retain: bool = False, topic: str = "") -> None:
        info = self.client.publish(topic or f"{self.prefix}/{kind}", body, qos=1, retain=retain)
        info.wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def stored(settings: StoreSettings) -> int:
    with Store(settings) as store, store.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(windows)).scalar_one())


def test_ingest_stores_verified_messages_and_refuses_hostile_ones_with_their_reason(
    start_broker: Callable[[Mapping[tuple[str, str], str]], Mosquitto], tmp_path: Path
) -> None:
    a1, a2, a3 = Agent("s1", "a1"), Agent("s1", "a2"), Agent("s1", "a3")
    broker = start_broker({("s1", "a1"): "pw1", ("s1", "a2"): "pw2", ("s1", "a3"): "pw3"})
    settings = StoreSettings(f"sqlite:///{tmp_path / 'aggregator.sqlite3'}")
    with Store.open(settings) as store:
        store.add_site("s1", "Shop", "Europe/Paris", NOW)
        for agent in (a1, a3):
            store.add_agent("s1", agent.agent, agent.public_key, NOW)
        store.revoke_agent("s1", "a3", NOW)
    accounts = {
        a.agent: AgentAccount(broker, "s1", a.agent, f"pw{a.agent[1]}") for a in (a1, a2, a3)
    }
    good = a1.counts(1, "2024-03-05T10:55:00Z")
    forged = good.replace(b'"probe_requests":96', b'"probe_requests":99')
    extra = good.replace(b'"devices":11', b'"devices":11,"mac":"aa:bb:cc:dd:ee:ff"')
    deep = b'{"alg":"ed25519","payload":' + b"[" * 3000 + b"]" * 3000 + b"}"
    hostile = [
        ("a1", forged, "bad_signature"),
        ("a2", a2.counts(1, "2024-03-05T10:55:00Z"), "unknown_agent"),
        ("a3", a3.counts(1, "2024-03-05T10:55:00Z"), "revoked_agent"),
        ("a1", good, "duplicate"),  # a replay of the message just stored
        ("a1", extra, "schema"),
        ("a1", a2.counts(2, "2024-03-05T11:00:00Z").replace(b'"a2"', b'"a1"'), "bad_signature"),
        ("a1", Agent("s1", "a2").counts(3, "2024-03-05T11:05:00Z"), "topic_mismatch"),
        ("a1", b"{" + b" " * 66_000 + b"}", "too_large"),  # the broker drops a larger one
        ("a1", b'{"alg":"ed\xff\xfe"}', "not_utf8"),
        ("a1", deep, "too_deep"),
    ]
    config = config_for(broker, settings)
    try:
        with running(config) as ingest:
            accounts["a1"].publish("counts", good)
            wait_for(lambda: ingest.stats.stored == 1, 10, "the first window")
            for name, body, _ in hostile:
                accounts[name].publish("counts", body)
            accounts["a1"].publish("counts", a1.counts(2, "2024-03-05T11:00:00Z"))  # still going
            status = status_payload(
                SiteId("s1"),
                AgentId("a1"),
                cause="connected",
                at=NOW,
                spool_pending=0,
                spool_dropped=3,
                last_seq=2,
                evictions=(4, 9),
            )
            accounts["a1"].publish("status", seal(status, a1.key), retain=True)
            meta = meta_of("s1", "a1")
            accounts["a1"].publish("meta", seal(meta, a1.key), retain=True)
            total = 1 + len(hostile) + 3
            wait_for(lambda: ingest.stats.received >= total, 20, f"{total} messages")

            with Store(settings) as store:
                store.revoke_agent("s1", "a1", NOW)  # takes effect at the next batch
            accounts["a1"].publish("counts", a1.counts(3, "2024-03-05T11:05:00Z"))
            wait_for(lambda: ingest.stats.received >= total + 1, 10, "the revoked agent's window")
            refused = dict(ingest.stats.refused)
    finally:
        for account in accounts.values():
            account.close()
    expected: dict[str, int] = {}
    for _, _, reason in hostile:
        expected[reason] = expected.get(reason, 0) + 1
    expected["revoked_agent"] += 1
    assert refused == expected
    assert stored(settings) == 2
    with Store(settings) as store:
        health = {h.agent: h for h in store.agents()}
        assert (health["a1"].state, health["a1"].spool_dropped) == ("online", 3)
        assert (health["a1"].count_evictions, health["a1"].estimate_evictions) == (4, 9)
        assert health["a1"].revoked_at is not None
        counted = store.refusal_counts()
        assert counted[("bad_signature", "s1", "a1")] == 2
        assert counted[("unknown_agent", "s1", "")] == 1  # not a row per made-up agent
        with store.engine.connect() as conn:
            meta_text = conn.execute(
                sa.text("SELECT meta FROM agents WHERE agent_id = 'a1'")
            ).scalar()
    assert '"agent_version":"0.1.0"' in meta_text


def _spawn(
    config_file: Path, client_id: str, log: Path, command: str = "ingest", *more: str
) -> subprocess.Popen[bytes]:
    """``footfall-aggregator <command>`` (ingest, or serve with ingest in it) with the
    settings of ``config_file`` and ``more`` arguments, its log in ``log``."""
    with log.open("ab") as err:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "aggregator.cli",
                command,
                "--config",
                str(config_file),
                "--set",
                f"ingest.client_id={client_id}",
                *more,
            ],
            cwd=REPO,
            stderr=err,
        )


def _config_file(path: Path, broker: Mosquitto, settings: StoreSettings) -> Path:
    path.write_text(
        f'[store]\ndsn = "{settings.dsn}"\nschema = "{settings.schema}"\nretention_days = 0\n'
        f'data_dir = "{broker.root}"\n'
        f'[broker]\nhost = "{HOST}"\nport = {broker.port}\nusername = "{READER[0]}"\n'
        f'password = "{READER[1]}"\nkeepalive_s = 5\nbackoff_max_s = 1\n'
        "[ingest]\nbatch_wait_ms = 20\n"
    )
    return path


def _every_window_once(settings: StoreSettings, agents: int, per_agent: int) -> None:
    with Store(settings) as store, store.engine.connect() as conn:
        per = conn.execute(
            sa.select(
                windows.c.agent_key,
                sa.func.count(),
                sa.func.min(windows.c.seq),
                sa.func.max(windows.c.seq),
            ).group_by(windows.c.agent_key)
        ).all()
        rolled = conn.execute(sa.select(sa.func.sum(site_days.c.windows))).scalar_one()
    assert len(per) == agents
    assert {tuple(row[1:]) for row in per} == {(per_agent, 1, per_agent)}
    assert rolled == agents * per_agent  # the roll-ups counted each window once


def test_two_ingest_processes_lose_nothing_when_one_is_killed_mid_stream(
    mosquitto_bin: str,
    test_certificates: TestCertificates,
    pg_schema: tuple[str, str],
    tmp_path: Path,
) -> None:
    settings = StoreSettings(*pg_schema)
    agents = make_agents(200, "s1")
    total = fleet_messages(agents, 20)
    broker = fleet_broker(mosquitto_bin, tmp_path / "broker", test_certificates, agents)
    broker.start()
    with Store.open(settings) as store:
        store.add_site("s1", "Mall", "Europe/Paris", NOW)
        store.add_agents("s1", {a.agent: a.public_key for a in agents}, NOW)
    config_file = _config_file(tmp_path / "aggregator.toml", broker, settings)
    logs = {name: tmp_path / f"{name}.log" for name in ("ingest-a", "ingest-b")}
    procs = {name: _spawn(config_file, name, log) for name, log in logs.items()}
    fleet: Fleet | None = None
    try:
        for log in logs.values():
            wait_for(lambda log=log: "subscribed to" in log.read_text(), 20, f"{log.name}")
        fleet = Fleet(broker.port, agents, rate=800).start()
        wait_for(lambda: stored(settings) >= total // 5, 30, "a fifth of the windows")
        procs["ingest-a"].send_signal(signal.SIGKILL)  # mid-batch, unacknowledged ones too
        procs["ingest-a"].wait(10)
        at_kill = stored(settings)
        wait_for(lambda: stored(settings) >= at_kill + total // 5, 30, "ingest-b carrying on")
        fleet.join(60)
        procs["ingest-a"] = _spawn(config_file, "ingest-a", logs["ingest-a"])  # its supervisor
        wait_for(lambda: stored(settings) == total, 60, f"all {total} windows")
        assert "session resumed" in logs["ingest-a"].read_text().split("connected to broker")[-1]
    finally:
        if fleet is not None:
            fleet.stop()
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        exits = [proc.wait(20) for proc in procs.values()]
        broker.kill()
    assert exits == [0, 0]
    _every_window_once(settings, 200, 20)


@pytest.mark.parametrize(
    ("database", "share_group"),
    [("sqlite", ""), ("postgresql", "footfall")],
    ids=["sqlite-plain-subscription", "postgresql-shared-subscription"],
)
def test_ingest_resumes_its_session_after_a_broker_restart_and_loses_nothing(
    mosquitto_bin: str,
    test_certificates: TestCertificates,
    database: str,
    share_group: str,
    tmp_path: Path,
) -> None:
    if database == "sqlite":
        settings = StoreSettings(f"sqlite:///{tmp_path / 'aggregator.sqlite3'}")
    else:
        settings = StoreSettings(pg_dsn(), f"ff_test_{uuid.uuid4().hex[:10]}")
    agents = make_agents(50, "s1")
    total = fleet_messages(agents, 30)
    broker = fleet_broker(mosquitto_bin, tmp_path / "broker", test_certificates, agents)
    broker.start()
    with Store.open(settings) as store:
        store.add_site("s1", "Mall", "Europe/Paris", NOW)
        store.add_agents("s1", {a.agent: a.public_key for a in agents}, NOW)
    fleet: Fleet | None = None
    config = config_for(broker, settings, **{"ingest.share_group": share_group})
    try:
        with running(config) as ingest:
            # Mosquitto 2.0 does not restore a shared subscription after a restart (a plain one
            # it does): ingest must subscribe again before the agents are back, or what they
            # send in between reaches nobody (docs/aggregator.md). Ingest retries every 0.1 s;
            # these agents wait 1 s (the real ones 0.25 to 0.5 s, then longer).
            fleet = Fleet(broker.port, agents, rate=600, reconnect_s=1.0 if share_group else 0.5)
            fleet.start()
            wait_for(lambda: ingest.stats.stored >= total // 4, 30, "a quarter of the windows")
            broker.stop()  # SIGTERM: Mosquitto saves its sessions and what they hold
            time.sleep(0.5)
            broker.start()
            fleet.join(60)
            try:
                wait_for(lambda: ingest.stats.stored >= total, 30, f"all {total} windows")
            except AssertionError as exc:
                raise AssertionError(f"{exc}: {ingest.stats}") from None
            assert ingest.session.connections >= 2 and ingest.session.session_present
            skipped = dict(ingest.stats.refused)
        assert set(skipped) <= {"duplicate"}  # redeliveries, skipped
        _every_window_once(settings, 50, 30)
    finally:
        if fleet is not None:
            fleet.stop()
        broker.kill()
        if settings.schema:
            drop_schema(settings.dsn, settings.schema)


def test_only_a_live_connected_status_is_answered_with_a_receipt() -> None:
    """An agent's live ``connected`` status has its receipt published again (NATS keeps no
    receipt for an agent that was away); a retained one, which a broker hands every new
    subscriber (every agent's at once when ingest starts), or any other message, does not."""
    (agent,) = make_agents(1, "s1")
    entry = AgentEntry(1, "s1", "a0", agent.key.verify_key, False, "UTC", 0)

    def greets(kind: str, cause: str, retained: bool) -> bool:
        payload = {"kind": kind, "cause": cause}
        message = Accepted(kind, payload, "", entry, NOW, "", NOW)
        topic = f"footfall/v1/s1/a0/{kind}"
        return _greeting(Delivery(1, 1, 1, retained, topic, b"", 0), message)

    assert greets("status", "connected", retained=False)
    assert not greets("status", "connected", retained=True)
    assert not greets("status", "stopped", retained=False)
    assert not greets("counts", "", retained=False)
