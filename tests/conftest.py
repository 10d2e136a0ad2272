"""Shared fixtures: where the real captures live, and the tshark oracle.

``../shared`` sits beside a developer's or CI's checkout but is not shipped to users.
Tests that need it skip with a stated reason when it is absent; CI sets
``FOOTFALL_REQUIRE_SHARED=1`` so that a missing ``../shared`` fails instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

# Fixtures for tests against a real Mosquitto and a running agent, for every test module.
from tests.agent_harness import (  # noqa: F401
    reap_agents,
    recorded_keys_fixture,
    sample_windows,
)
from tests.aggregator_harness import pg_schema, store, store_settings  # noqa: F401
from tests.mqtt_broker import mosquitto_bin, start_broker, test_certificates  # noqa: F401
from tests.netns import veth  # noqa: F401
from tests.web_harness import browser, served  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FOOTFALL_SHARED", REPO.parent / "shared"))
REQUIRE_SHARED = os.environ.get("FOOTFALL_REQUIRE_SHARED") == "1"


def shared_path(*parts: str) -> Path:
    """A path inside ../shared; skip (or fail under FOOTFALL_REQUIRE_SHARED=1) if absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        reason = (
            f"{path} is absent: ../shared (real captures and the tshark oracle) sits beside "
            "a developer's checkout but is not shipped; set FOOTFALL_SHARED to point at it"
        )
        if REQUIRE_SHARED:
            pytest.fail(reason + " (FOOTFALL_REQUIRE_SHARED=1 makes this a failure)")
        pytest.skip(reason)
    return path


def shared_capture_names() -> list[str]:
    """Names of the shared captures, for parametrisation (empty when ../shared is absent)."""
    pcaps = SHARED / "data" / "pcaps"
    if not pcaps.is_dir():
        return ["<no shared captures>"]
    return sorted(p.name for p in pcaps.iterdir() if not p.name.endswith(".csv"))


@pytest.fixture(scope="session")
def pcaps_dir() -> Path:
    return shared_path("data", "pcaps")


@pytest.fixture(scope="session")
def oracle() -> dict[str, dict[str, Any]]:
    """tshark's facts about every shared capture, keyed by file name."""
    path = shared_path("data", "tshark_expected.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {Path(row["file"]).name: row for row in rows}
