"""Fixtures every layer uses: the real captures, the tshark oracle, a Mosquitto of the test's own.

Light on purpose: the agent's layer (``tests/agent``) runs with only the agent's dependencies, so
nothing here imports the aggregator, its web stack or its database drivers; each layer's own
``conftest.py`` brings its harness.

It also marks every test by what it needs (markers registered in pyproject.toml), from the
fixtures it uses, so that a mark cannot be forgotten or outlive its reason: ``broker`` (a
Mosquitto of its own, or a NATS cluster), ``postgres`` (the PostgreSQL run of a parametrised
store, or a schema of its own), ``browser`` (Chromium), ``root`` (a veth pair in a network
namespace). Tests that need one of these without the fixture carry the mark themselves; ``slow``
and ``shared`` are always explicit. Select by them: ``-m "not slow"``, ``-m "not postgres"``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.support.mqtt_broker import mosquitto_bin, start_broker, test_certificates  # noqa: F401
from tests.support.netns import veth  # noqa: F401
from tests.support.shared import shared_path

# Fixture -> the marker of what a test that uses it (directly or through another) needs.
NEEDS = {
    "mosquitto_bin": "broker",
    "broker": "broker",  # test_ingest_mqtt311's brokers, test_demo's choice of broker
    "pg_schema": "postgres",
    "browser": "browser",
    "veth": "root",
}
# Parameters that choose PostgreSQL (aggregator_harness.store_settings, web_harness.served).
POSTGRES_PARAMS = {"postgresql"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        for fixture, marker in NEEDS.items():
            if fixture in fixtures:
                item.add_marker(marker)
        callspec = getattr(item, "callspec", None)
        if callspec is not None and POSTGRES_PARAMS & {
            v for v in callspec.params.values() if isinstance(v, str)
        }:
            item.add_marker("postgres")


@pytest.fixture(scope="session")
def pcaps_dir() -> Path:
    return shared_path("data", "pcaps")


@pytest.fixture(scope="session")
def oracle() -> dict[str, dict[str, Any]]:
    """tshark's facts about every shared capture, keyed by file name."""
    path = shared_path("data", "tshark_expected.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {Path(row["file"]).name: row for row in rows}
