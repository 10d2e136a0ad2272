"""The fault matrix (docs/aggregator.md): whatever the broker, ingest, the database, the agents or
the network do, 0 windows lost and 0 stored twice, and the agents' health right about the
missing windows while the fault lasts. Each run: 4 agents making 250 windows each, 100 a
second, into their spools (tests/support/delivery.py), the agent's own publisher with receipts, real
ingest processes, a real Mosquitto, PostgreSQL. ``bench/bench_delivery.py`` runs the same
faults with more windows and a database outage of a minute.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aggregator.config import StoreSettings
from firmware_agent.contract.messages import utc_text
from tests.support.delivery import FAULTS, Rig, broker_killed_while_ingest_away, database_link
from tests.support.delivery_agents import WINDOW_S
from tests.support.mqtt_broker import Link, TestCertificates

AGENTS, WINDOWS, RATE = 4, 250, 100  # 1,000 windows, made over 2.5 s


@pytest.fixture
def db_link(pg_schema: tuple[str, str]) -> Iterator[Link]:
    """A link to the test PostgreSQL that the database fault can take down."""
    link = database_link(pg_schema[0])
    yield link
    link.close()


@pytest.mark.parametrize("fault", list(FAULTS))
def test_no_window_lost_or_stored_twice_whatever_fails(
    fault: str,
    mosquitto_bin: str,
    test_certificates: TestCertificates,
    pg_schema: tuple[str, str],
    db_link: Link,
    tmp_path: Path,
) -> None:
    rig = Rig.make(
        tmp_path,
        mosquitto_bin,
        test_certificates,
        StoreSettings(*pg_schema),
        agents=AGENTS // 2 if "amqtt" in fault else AGENTS,  # amqtt: a slow broker, in Python
        windows=WINDOWS,
        rate=RATE,
        db_link=db_link,
        amqtt="amqtt" in fault,
    )
    try:
        health_right = FAULTS[fault](rig, 2.0)
        if "agents" in rig.processes:
            rig.agents_done(90)
        outcome = rig.outcome()
    finally:
        rig.stop()
    assert (outcome.lost, outcome.twice) == (0, 0), outcome
    assert health_right, "the agents' health was wrong about the missing windows"


def test_without_receipts_a_broker_crash_loses_what_it_acknowledged(
    mosquitto_bin: str,
    test_certificates: TestCertificates,
    pg_schema: tuple[str, str],
    tmp_path: Path,
) -> None:
    """Agents as they were before receipts (and agents without broker.receipt_key still):
    the spool lets a window go on the broker's PUBACK, so a broker killed before it saved
    the queue of an ingest that was away takes every window with it (issue 16, finding 3;
    the shipped config's prompt autosave narrows this, receipts close it)."""
    rig = Rig.make(
        tmp_path, mosquitto_bin, test_certificates, StoreSettings(*pg_schema), agents=2,
        windows=250,
    )  # fmt: skip
    try:
        broker_killed_while_ingest_away(rig, 0, receipts=False)
        rig.agents_done(30)
        time.sleep(2)  # ingest is back: what the broker still had would arrive now
        outcome = rig.outcome()
    finally:
        rig.stop()
    assert outcome.lost == outcome.sent == 500


def test_a_window_refused_after_it_verified_is_settled_and_not_sent_again(
    mosquitto_bin: str,
    test_certificates: TestCertificates,
    store_settings: StoreSettings,
    tmp_path: Path,
) -> None:
    """Agents with receipts; two windows of each are signed with the agent's key but their
    counts do not add up: ingest refuses them (``inconsistent``) and quarantines them, and
    the receipt covers them, so every spool empties (without settling, the agents would send
    them again until their spool cap dropped them) and each arrived once. The agents' health
    counts them as refused, not missing."""
    refused = (3, 11)
    rig = Rig.make(
        tmp_path, mosquitto_bin, test_certificates, store_settings, agents=2, windows=20,
        refused=refused,
    )  # fmt: skip
    try:
        rig.start_ingest("ingest-a", share_group="")
        rig.start_agents()
        rig.agents_done(30)
        time.sleep(1)  # their last status
        outcome = rig.outcome()
        quarantined = rig.store.quarantined()
        health = rig.store.agents("s1")
    finally:
        rig.stop()
    assert outcome.stored == rig.total - len(refused) * len(rig.agents) and outcome.twice == 0
    starts = sorted(
        (q["agent_id"], json.loads(q["message"])["payload"]["window_start"]) for q in quarantined
    )
    assert {q["reason"] for q in quarantined} == {"inconsistent"}
    assert starts == sorted(  # each refused window arrived once: not sent again
        (a.agent, utc_text(rig.first + WINDOW_S * i)) for a in rig.agents for i in refused
    )
    assert [(h.agent, h.windows, h.refused, h.missing) for h in health] == [
        (a.agent, rig.windows - len(refused), len(refused), 0) for a in rig.agents
    ]
