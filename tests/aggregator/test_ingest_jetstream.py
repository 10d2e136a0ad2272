"""Ingest from a replicated stream: a 3-node NATS JetStream cluster on loopback
(tests/support/nats_cluster.py), agents publishing over MQTT 3.1.1 to the cluster's MQTT
listener, two ``footfall-aggregator ingest`` processes (``broker.kind = "jetstream"``, streams
with 3 replicas) and PostgreSQL.

The fault run is the agents' own: 50 agents, each the agent's :class:`Publisher` over its own
spool with the aggregator's receipt key (tests/support/delivery_agents.py, as for Mosquitto in
tests/integration/test_delivery.py), make 3,000 signed windows, and every one is stored exactly
once (0 lost, 0 stored twice, the roll-ups counting each once) through, in turn:

* a: one node killed with ``kill -9`` and restarted;
* c: the node every agent is connected to killed (they go on to the next in broker.hosts);
* d: the whole cluster killed and started again;
* b: one ingest process killed for good (the other gets what it held after
  ``broker.ack_wait_s``).

The agents end only when receipts cover every window, so they are what closes the gap NATS
leaves: its MQTT listener acknowledges a message before a stream stores it, and a whole-cluster
restart dropped 1 window of 3,000 that way once (aggregator/jetstream.py); an agent sends again
what no receipt covers. NATS keeps no receipt for an agent away when it went out: ingest sends
it again when the agent says it is connected (tested after the run).

Without ``FOOTFALL_TEST_PG_DSN`` or nats-server the tests skip, saying why (with
``FOOTFALL_REQUIRE_BROKER`` a missing nats-server fails).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import nats
import nats.errors
import paho.mqtt.client as mqtt
import pytest
import sqlalchemy as sa
from paho.mqtt.enums import CallbackAPIVersion

from aggregator.config import StoreSettings, load_config
from aggregator.jetstream import COUNTS_STREAM, STATE_STREAM, stream_configs, topic_of
from aggregator.store import agents as store_agents
from aggregator.store import windows
from firmware_agent.contract.messages import AgentId, SiteId, counts_payload, status_payload
from firmware_agent.service.publish import Publisher
from firmware_agent.service.run import agent_meta
from firmware_agent.service.spool import Spool, SpoolSettings
from firmware_agent.settings import load_config as load_agent_config
from firmware_agent.tools.doctor import FAIL, OK, check_broker
from tests.support.agent_fleet import SimAgent, fast_seal, make_agents, window
from tests.support.delivery import Rig
from tests.support.mqtt_broker import HOST, Subscriber, TestCertificates, wait_for
from tests.support.nats_cluster import AGGREGATOR, NatsCluster, Ports, nats_server
from tests.support.shared import REPO

AGENTS, WINDOWS, RATE = 20, 100, 8  # 2,000 windows, made over 12.5 s

pytestmark = pytest.mark.skipif(
    nats_server() is None and not os.environ.get("FOOTFALL_REQUIRE_BROKER"),
    reason="nats-server is not installed (.ci/run installs it)",
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


@pytest.fixture(scope="module")
def small_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    """A 3-node cluster with the accounts of agents a0 and a1 (make_agents(2, seed="small")),
    for the tests that need no fault run; a test that kills a node starts it again."""
    cluster = NatsCluster(tmp_path_factory.mktemp("nats"), _small_agents(), Ports())
    cluster.start()
    yield cluster
    cluster.stop()


def _small_agents() -> list[SimAgent]:
    return make_agents(2, "s1", seed="small")


def test_an_agent_may_publish_only_under_its_own_topic(small_cluster: NatsCluster) -> None:
    """hardware/nats's permissions, as the cluster runs them: a0 posing as a1 reaches nobody;
    its own message, sent after on the same connection (so it arrives after), is the first
    and only one heard."""
    a0, a1 = _small_agents()
    cluster = small_cluster

    async def heard() -> list[str]:
        nc = await nats.connect(
            cluster.servers.split(","), user=AGGREGATOR[0], password=AGGREGATOR[1]
        )
        sub = await nc.subscribe("footfall.>")
        await nc.flush()
        own, forged = (f"footfall/v1/s1/{a.agent}/status" for a in (a0, a1))
        await asyncio.to_thread(_publish_as, a0, cluster.nodes[0].mqtt, [forged, own])
        first = await sub.next_msg(timeout=10)
        await nc.flush()
        subjects = [first.subject] + ["more"] * sub.pending_msgs
        await nc.close()
        return subjects

    assert asyncio.run(heard()) == ["footfall.v1.s1.a0.status"]


def test_doctor_checks_a_node_and_the_agent_fails_over_to_the_next(
    small_cluster: NatsCluster, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``footfall-agent doctor``'s broker check accepts a node's MQTT listener with the
    agent's account and refuses a wrong password; then the agent's own publisher (MQTT 3.1.1),
    its first node down, is taken to the next by broker.hosts, and its window leaves the spool
    (the node acknowledged it)."""
    agent = _small_agents()[0]
    cluster = small_cluster
    first, *others = cluster.nodes
    try:
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
        if not first.running:
            cluster.restart(first)


def _node_killed_and_restarted(rig: Rig, cluster: NatsCluster) -> None:
    cluster.kill(cluster.nodes[1])
    cluster.restart(cluster.nodes[1])


def _agents_node_killed(rig: Rig, cluster: NatsCluster) -> None:
    cluster.kill(cluster.nodes[0])  # every agent's node; down until the cluster restarts


def _cluster_restarted(rig: Rig, cluster: NatsCluster) -> None:
    cluster.kill()
    for node in cluster.nodes:
        cluster.restart(node)


def _ingest_killed_for_good(rig: Rig, cluster: NatsCluster) -> None:
    rig.kill("ingest-a")  # its unacknowledged messages go to ingest-b


FAULTS: dict[str, Callable[[Rig, NatsCluster], None]] = {
    "a: a node kill -9 and restart": _node_killed_and_restarted,
    "c: the agents' node kill -9": _agents_node_killed,
    "d: the whole cluster restarted": _cluster_restarted,
    "b: an ingest process killed for good": _ingest_killed_for_good,
}


def _greeted_back(rig: Rig, cluster: NatsCluster) -> int:
    """Agent a0, connecting after its windows were stored, says it is connected: the
    through_seq of the receipt it is sent in answer."""
    a0 = rig.agents[0]
    receipts = Subscriber(
        cluster.nodes[2].mqtt, f"footfall/v1/s1/{a0.agent}/receipt", account=("s1/a0", a0.password)
    )
    try:
        hello = status_payload(
            SiteId("s1"), AgentId(a0.agent), cause="connected", at=int(time.time()),
            spool_pending=0, spool_dropped=0, last_seq=0,
        )  # fmt: skip
        receipts.client.publish("footfall/v1/s1/a0/status", fast_seal(hello, a0.key), qos=1)
        wait_for(lambda: bool(receipts.envelopes("receipt")), 15, "a0's receipt")
        return int(receipts.envelopes("receipt")[-1].payload["through_seq"])
    finally:
        receipts.close()


def test_every_window_stored_once_through_every_fault(
    pg_schema: tuple[str, str], tmp_path: Path
) -> None:
    rig = Rig.on_nats(
        tmp_path, StoreSettings(*pg_schema), agents=AGENTS, windows=WINDOWS, rate=RATE
    )
    cluster = rig.broker
    assert isinstance(cluster, NatsCluster)
    exits = {}
    try:
        rig.start_ingest("ingest-a", "ingest-b")
        rig.start_agents()
        after = 0  # stored when the last fault was over
        for share, (name, fault) in zip((0.1, 0.3, 0.5, 0.7), FAULTS.items(), strict=True):
            # each fault strikes once the one before has let 10 % more be stored
            mark = max(rig.total * share, after + rig.total * 0.1)
            wait_for(lambda m=mark: rig.stored() >= m, 60, f"{mark:.0f} stored, before {name}")
            fault(rig, cluster)
            after = rig.stored()
        rig.agents_done(60)  # every spool empty: receipts cover every window
        through = _greeted_back(rig, cluster)
        with rig.store.engine.connect() as conn:
            last = conn.execute(
                sa.select(sa.func.max(windows.c.seq))
                .join(store_agents, store_agents.c.agent_key == windows.c.agent_key)
                .where(store_agents.c.agent_id == "a0")
            ).scalar_one()
        for name in list(rig.processes):  # a clean stop after all that
            process = rig.processes.pop(name)
            process.terminate()
            exits[name] = process.wait(20)
        outcome = rig.outcome()
    except AssertionError as exc:
        logs = "\n".join(f"--- {n}\n{rig.log(n)[-3000:]}" for n in ("ingest-a", "ingest-b"))
        raise AssertionError(f"{exc}\n{logs}\n{cluster.logs()}") from exc
    finally:
        rig.stop()
    assert (outcome.lost, outcome.twice) == (0, 0), outcome
    assert exits == {"ingest-b": 0}, exits
    assert through == last, f"a0 was sent a receipt through seq {through}, it made {last}"
