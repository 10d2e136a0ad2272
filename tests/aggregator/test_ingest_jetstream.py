"""Ingest from a replicated stream: a 3-node NATS JetStream cluster on loopback
(tests/support/nats_cluster.py), 50 simulated agents publishing 3,000 signed windows over MQTT 3.1.1
to the cluster's MQTT listener, two ``footfall-aggregator ingest`` processes
(``broker.kind = "jetstream"``, streams with 3 replicas) and PostgreSQL. Every window is
stored exactly once (every agent's seqs 1..60 once, the roll-ups counting each once) while:

* a: one node is killed with ``kill -9`` and restarted;
* b: one ingest process is killed for good (the other gets what it held after
  ``broker.ack_wait_s``);
* c: the node every agent is connected to is killed (they connect to the next one);
* d: the whole cluster is killed and restarted.

and agent a0, subscribed over MQTT to its receipt topic on another node, gets the signed
receipt of all its windows, published by ingest as a NATS message.

The fleet has no receipts; once stored windows stop growing for 10 s, the test sends again
what the store lacks, as an agent with the receipt key does (it prints how many): NATS's MQTT
listener acknowledges a message before a stream stores it, and one run of (d) lost 1 window
of 3,000 that way before this step existed. A resent window already in the stream is skipped
by the store as a duplicate.

Without ``FOOTFALL_TEST_PG_DSN`` or nats-server the tests skip, saying why (with
``FOOTFALL_REQUIRE_BROKER`` a missing nats-server fails).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import nats
import nats.errors
import paho.mqtt.client as mqtt
import pytest
import sqlalchemy as sa
from paho.mqtt.enums import CallbackAPIVersion

from aggregator.config import StoreSettings, load_config
from aggregator.jetstream import COUNTS_STREAM, STATE_STREAM, stream_configs, topic_of
from aggregator.store import Store, windows
from aggregator.store import agents as store_agents
from firmware_agent.contract.messages import AgentId, SiteId, counts_payload
from firmware_agent.service.publish import Publisher
from firmware_agent.service.run import agent_meta
from firmware_agent.service.spool import Spool, SpoolSettings
from firmware_agent.settings import load_config as load_agent_config
from firmware_agent.tools.doctor import FAIL, OK, check_broker
from tests.aggregator.test_ingest import _every_window_once, stored
from tests.support.agent_fleet import (
    Fleet,
    SimAgent,
    fast_seal,
    fleet_messages,
    make_agents,
    window,
)
from tests.support.mqtt_broker import HOST, Subscriber, TestCertificates, wait_for
from tests.support.nats_cluster import AGGREGATOR, NatsCluster, Ports, nats_server
from tests.support.shared import REPO

NOW = int(time.time())
AGENTS, WINDOWS = 50, 60

pytestmark = pytest.mark.skipif(
    nats_server() is None and not os.environ.get("FOOTFALL_REQUIRE_BROKER"),
    reason="nats-server is not installed (.ci/run installs it)",
)


def _config_file(path: Path, cluster: NatsCluster, settings: StoreSettings) -> Path:
    path.write_text(
        f'[store]\ndsn = "{settings.dsn}"\nschema = "{settings.schema}"\nretention_days = 0\n'
        f'data_dir = "{path.parent}"\n'
        f'[broker]\nkind = "jetstream"\nservers = "{cluster.servers}"\n'
        f'username = "{AGGREGATOR[0]}"\npassword = "{AGGREGATOR[1]}"\nstream_replicas = 3\n'
        "ack_wait_s = 3\nkeepalive_s = 5\nbackoff_max_s = 1\nconnect_timeout_s = 3\n"
        "[ingest]\nbatch_wait_ms = 20\n"
    )
    return path


def _resend_what_is_missing(
    settings: StoreSettings, agents: list[SimAgent], cluster: NatsCluster
) -> int:
    """What an agent with the receipt key does: once stored windows stop growing, send again
    the windows that no receipt covers (here: read from the store). NATS acknowledged them, so
    the fleet let them go; the cluster dropped them (the MQTT listener's PUBACK comes before a
    stream stores the message: docs/aggregator.md). The number sent again."""
    before, quiet_since = -1, time.monotonic()
    while (now := stored(settings)) < len(agents) * WINDOWS:
        if now != before:  # growing: wait until it has not grown for 10 s (3 ack waits)
            before, quiet_since = now, time.monotonic()
        elif time.monotonic() - quiet_since > 10:
            break
        time.sleep(0.5)
    with Store(settings) as store, store.engine.connect() as conn:
        held = set(
            conn.execute(
                sa.select(store_agents.c.agent_id, windows.c.seq).join(
                    store_agents, store_agents.c.agent_key == windows.c.agent_key
                )
            ).all()
        )
    for agent in agents:
        agent.messages = [
            m for i, m in enumerate(agent.messages) if (agent.agent, i + 1) not in held
        ]
    missing = sum(len(a.messages) for a in agents)
    if missing:
        Fleet(cluster.mqtt_ports[1:], [a for a in agents if a.messages]).start().join(30)
    return missing


def _through(receipts: Subscriber) -> int:
    """The through_seq of the last signed receipt received (0: none)."""
    got = receipts.envelopes("receipt")
    return int(got[-1].payload["through_seq"]) if got else 0


def _spawn(config_file: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "aggregator.cli", "ingest", "--config", str(config_file)],
            cwd=REPO,
            stderr=err,
        )


def test_subjects_map_to_the_agents_topics_and_the_streams_keep_their_meaning() -> None:
    assert topic_of("footfall.v1.s1.a-7.counts") == "footfall/v1/s1/a-7/counts"
    counts, state = stream_configs(3, 86400)
    assert (counts.name, counts.num_replicas, counts.max_age) == (COUNTS_STREAM, 3, 86400.0)
    assert counts.subjects == ["footfall.v1.*.*.counts"]
    assert state.name == STATE_STREAM
    assert state.max_msgs_per_subject == 1  # status and meta: the latest per agent


def test_jetstream_settings_are_checked() -> None:
    config = load_config(environ={}, overrides={"broker.kind": "jetstream"})
    assert config.broker.server_urls == ["nats://localhost:4222"]
    with pytest.raises(Exception, match=r"broker.kind must be 'mqtt' or 'jetstream'"):
        load_config(environ={}, overrides={"broker.kind": "kafka"})
    with pytest.raises(Exception, match=r"broker.servers must be nats://host:port"):
        load_config(environ={}, overrides={"broker.servers": "n1:4222"})
    with pytest.raises(Exception, match=r"broker.stream_replicas must be between 1 and 5"):
        load_config(environ={}, overrides={"broker.stream_replicas": 7})


def test_the_reference_deployment_is_a_valid_nats_configuration(
    test_certificates: TestCertificates, tmp_path: Path
) -> None:
    """hardware/nats/, with the test certificates and a store directory in place of /etc and
    /var: nats-server -t accepts each node's file (includes, TLS, accounts, mqtt block)."""
    certs = test_certificates
    places = {
        "/etc/nats/certs/node.crt": str(certs.server_cert),
        "/etc/nats/certs/node.key": str(certs.server_key),
        "/etc/nats/certs/ca.crt": str(certs.ca),
        "/var/lib/nats": str(tmp_path),
    }
    for source in (REPO / "hardware" / "nats").glob("*.conf"):
        text = source.read_text()
        for old, new in places.items():
            text = text.replace(old, new)
        (tmp_path / source.name).write_text(text)
    for node in ("nats-1.conf", "nats-2.conf", "nats-3.conf"):
        checked = subprocess.run(
            [str(nats_server()), "-c", str(tmp_path / node), "-t"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert checked.returncode == 0, checked.stderr
        assert "is valid" in checked.stdout + checked.stderr
    accounts = (REPO / "hardware" / "nats" / "footfall-accounts.conf").read_text()
    assert 'publish: ["footfall.v1.my-shop.door.>"]' in accounts  # an agent: its own topics


def _publish_as(agent: SimAgent, port: int, topics: list[str]) -> None:
    """Publish b"x" at QoS 0 on each topic over MQTT 3.1.1 with the agent's account."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.username_pw_set(f"{agent.site}/{agent.agent}", agent.password)
    client.reconnect_delay_set(0.1, 1)
    client.connect(HOST, port, keepalive=5)
    client.loop_start()
    try:  # a fresh cluster's first MQTT connection may be refused while it makes its streams
        wait_for(client.is_connected, 30, f"{agent.agent}'s MQTT connection")
        for topic in topics:
            client.publish(topic, b"x", qos=0).wait_for_publish(5)
    finally:
        client.disconnect()
        client.loop_stop()


def test_an_agent_may_publish_only_under_its_own_topic(tmp_path: Path) -> None:
    """hardware/nats's permissions, as the cluster runs them: a0 posing as a1 reaches nobody;
    its own message, sent after, arrives."""
    a0, a1 = make_agents(2, "s1")
    cluster = NatsCluster(tmp_path / "nats", [a0, a1], Ports())
    cluster.start()

    async def heard() -> list[str]:
        nc = await nats.connect(
            cluster.servers.split(","), user=AGGREGATOR[0], password=AGGREGATOR[1]
        )
        sub = await nc.subscribe("footfall.>")
        await nc.flush()
        own, forged = (f"footfall/v1/s1/{a.agent}/status" for a in (a0, a1))
        await asyncio.to_thread(_publish_as, a0, cluster.nodes[0].mqtt, [forged, own])
        subjects = []
        with contextlib.suppress(nats.errors.TimeoutError):
            while True:
                subjects.append((await sub.next_msg(timeout=2)).subject)
        await nc.close()
        return subjects

    try:
        assert asyncio.run(heard()) == ["footfall.v1.s1.a0.status"]
    finally:
        cluster.stop()


def _fault_a(cluster: NatsCluster, procs: dict[str, subprocess.Popen[bytes]]) -> None:
    node = cluster.nodes[1]
    cluster.kill(node)
    time.sleep(1)
    cluster.restart(node)


def _fault_b(cluster: NatsCluster, procs: dict[str, subprocess.Popen[bytes]]) -> None:
    procs["ingest-a"].send_signal(signal.SIGKILL)  # for good: its messages go to ingest-b
    procs["ingest-a"].wait(10)


def _fault_c(cluster: NatsCluster, procs: dict[str, subprocess.Popen[bytes]]) -> None:
    cluster.kill(cluster.nodes[0])  # every agent's node; it stays down until the end


def _fault_d(cluster: NatsCluster, procs: dict[str, subprocess.Popen[bytes]]) -> None:
    for node in cluster.nodes:
        cluster.kill(node)
    time.sleep(1)
    cluster.start()


FAULTS: dict[str, Callable[[NatsCluster, dict[str, subprocess.Popen[bytes]]], None]] = {
    "a-node-killed-and-restarted": _fault_a,
    "b-ingest-killed-for-good": _fault_b,
    "c-agents-node-killed": _fault_c,
    "d-whole-cluster-restarted": _fault_d,
}


def test_doctor_checks_a_node_and_the_agent_fails_over_to_the_next(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``footfall-agent doctor``'s broker check accepts a node's MQTT listener with the
    agent's account and refuses a wrong password; then the agent's own publisher (MQTT 3.1.1),
    its first node down, is taken to the next by broker.hosts, and its window leaves the spool
    (the node acknowledged it)."""
    (agent,) = make_agents(1, "s1")
    cluster = NatsCluster(tmp_path / "nats", [agent], Ports())
    cluster.start()
    try:
        first, *others = cluster.nodes
        config = load_agent_config(
            None,
            environ={},
            overrides={
                "agent.site": "s1",
                "agent.id": "a0",
                "broker.host": HOST,
                "broker.port": first.mqtt,
                "broker.hosts": ",".join(f"{HOST}:{n.mqtt}" for n in others),
                "broker.username": "s1/a0",
                "broker.password": agent.password,
                "broker.protocol": "3.1.1",
                "broker.backoff_initial_ms": 50,
                "broker.backoff_max_s": 1,
            },
        )
        # doctor's broker check, while every node is up (the MQTT listener then makes its
        # session streams, with 3 replicas: a stream with 3 replicas cannot be made on 2 nodes)
        finding = check_broker(config)
        assert (finding.status, finding.detail) == (
            OK,
            f"{HOST}:{first.mqtt} (no TLS) accepted s1/a0 as 's1/a0'",
        )
        wrong = dataclasses.replace(
            config, broker=dataclasses.replace(config.broker, password="wrong")
        )
        assert check_broker(wrong).status == FAIL
        cluster.kill(first)
        spool_path = tmp_path / "spool.sqlite3"
        with Spool(spool_path) as spool:
            spool.append(0, lambda seq: fast_seal(counts_payload(
                SiteId("s1"), AgentId("a0"), seq, "0" * 16, window(0)), agent.key))  # fmt: skip
        publisher = Publisher(
            config.broker,
            SiteId("s1"),
            AgentId("a0"),
            agent.key,
            spool_path,
            SpoolSettings(),
            agent_meta(config),
        )
        with caplog.at_level(logging.INFO, logger="footfall.agent"):
            publisher.start()
            wait_for(
                lambda: any(
                    f"connected to broker {HOST}:{n.mqtt} as site=s1 agent=a0" in caplog.text
                    for n in others
                ),
                30,
                "a connection to another node",
            )
            publisher.stop(5)
            assert publisher.join(10)
        with Spool(spool_path) as spool:
            assert spool.state().pending == 0
    finally:
        cluster.stop()


@pytest.mark.parametrize("fault", list(FAULTS))
def test_every_window_stored_once_through_a_fault(
    fault: str, pg_schema: tuple[str, str], tmp_path: Path
) -> None:
    settings = StoreSettings(*pg_schema)
    agents = make_agents(AGENTS, "s1")
    total = fleet_messages(agents, WINDOWS)
    cluster = NatsCluster(tmp_path / "nats", agents, Ports())
    cluster.start()
    with Store.open(settings) as store:
        store.add_site("s1", "Mall", "Europe/Paris", NOW)
        store.add_agents("s1", {a.agent: a.public_key for a in agents}, NOW)
    config_file = _config_file(tmp_path / "aggregator.toml", cluster, settings)
    logs = {name: tmp_path / f"{name}.log" for name in ("ingest-a", "ingest-b")}
    procs = {name: _spawn(config_file, log) for name, log in logs.items()}
    fleet: Fleet | None = None
    try:
        for log in logs.values():
            wait_for(lambda log=log: f"consuming {COUNTS_STREAM}" in log.read_text(), 30, log.name)
        # agent a0 listening for its receipts on node 3 (not killed in a to c)
        receipts = Subscriber(
            cluster.nodes[2].mqtt, "footfall/v1/s1/a0/receipt", account=("s1/a0", "pw-0")
        )
        fleet = Fleet(cluster.mqtt_ports, agents, rate=400).start()
        wait_for(lambda: stored(settings) >= total // 4, 30, "a quarter of the windows")
        FAULTS[fault](cluster, procs)
        fleet.join(60)
        resent = _resend_what_is_missing(settings, agents, cluster)
        wait_for(lambda: stored(settings) >= total, 60, f"all {total} windows")
        if not fault.startswith("d-"):  # the receipt, unchanged, through the MQTT listener
            wait_for(lambda: _through(receipts) == WINDOWS, 15, "a0's receipt of every window")
    except AssertionError as exc:
        logs_text = "\n".join(f"--- {n}\n{p.read_text()[-3000:]}" for n, p in logs.items())
        raise AssertionError(f"{exc}\n{logs_text}\n{cluster.logs()}") from exc
    finally:
        if fleet is not None:
            fleet.stop()
        if receipts is not None:
            receipts.close()
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        exits = {name: proc.wait(20) for name, proc in procs.items()}
        cluster.stop()
    print(f"{fault}: {resent} windows missing once ingest went quiet, sent again")
    killed = {"ingest-a"} if fault.startswith("b-") else set()
    assert all(code == 0 for name, code in exits.items() if name not in killed), exits
    _every_window_once(settings, AGENTS, WINDOWS)
