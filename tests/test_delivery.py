"""The fault matrix (docs/aggregator.md): whatever the broker, ingest, the database, the agents
or the network do, 0 windows lost and 0 stored twice, and the agents' health right about the
missing windows while the fault lasts. Each run: 4 agents with 250 windows each in their
spools (tests/delivery.py), the agent's own publisher with receipts, real ingest processes, a
real Mosquitto, PostgreSQL. ``bench/bench_delivery.py`` runs the same faults with more windows
and a database outage of a minute.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from aggregator.config import StoreSettings
from tests.delivery import FAULTS, Rig
from tests.mqtt_broker import HOST, Link, TestCertificates

AGENTS, WINDOWS = 4, 250


@pytest.fixture
def db_link(pg_schema: tuple[str, str]) -> Iterator[Link]:
    """A link to the test PostgreSQL that the database fault can take down."""
    port = int(pg_schema[0].rsplit(":", 1)[1].split("/")[0])
    link = Link(HOST, port)
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
        agents=AGENTS,
        windows=WINDOWS,
        db_link=db_link,
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
