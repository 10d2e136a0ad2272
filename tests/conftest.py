"""Fixtures every layer uses: the real captures, the tshark oracle, a Mosquitto of the test's own.

Light on purpose: the agent's layer (``tests/agent``) runs with only the agent's dependencies, so
nothing here imports the aggregator, its web stack or its database drivers; each layer's own
``conftest.py`` brings its harness.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.support.mqtt_broker import mosquitto_bin, start_broker, test_certificates  # noqa: F401
from tests.support.netns import veth  # noqa: F401
from tests.support.shared import shared_path


@pytest.fixture(scope="session")
def pcaps_dir() -> Path:
    return shared_path("data", "pcaps")


@pytest.fixture(scope="session")
def oracle() -> dict[str, dict[str, Any]]:
    """tshark's facts about every shared capture, keyed by file name."""
    path = shared_path("data", "tshark_expected.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {Path(row["file"]).name: row for row in rows}
