"""Running ``footfall-agent run`` in tests: its config file and key, its process, and what
``footfall-agent replay`` says about the same capture (the counts the broker must receive)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import nacl.signing
import numpy as np
import pytest

from firmware_agent.cli import BUNDLED_SAMPLE
from firmware_agent.contract.signing import create_signing_key
from firmware_agent.stages import anonymize
from tests.support.mqtt_broker import HOST, Mosquitto

AGENT = [sys.executable, "-m", "firmware_agent.cli"]
_started: list[subprocess.Popen[bytes]] = []  # agents started by a test, reaped after it
HEADER = ("kind", "v", "site", "agent", "seq", "epoch")  # what a counts payload adds to a window
UTC = {"FOOTFALL_EPOCH_TIMEZONE": "UTC"}


def unique_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def toml_text(settings: Mapping[str, object]) -> str:
    """A TOML file from dotted names (``broker.port``) and string or integer values."""
    tables: dict[str, list[str]] = {}
    for name, value in settings.items():
        table, key = name.split(".")
        tables.setdefault(table, []).append(f"{key} = {json.dumps(value)}")
    return "".join(f"[{table}]\n" + "\n".join(lines) + "\n" for table, lines in tables.items())


@dataclass
class AgentFiles:
    """One agent's config file, directories and key, and the log of its runs."""

    root: Path
    site: str
    agent: str
    config: Path
    verify_key: nacl.signing.VerifyKey

    @property
    def log(self) -> Path:
        return self.root / "agent.log"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    def start(self, *args: str, stdin: int | IO[bytes] | None = None) -> subprocess.Popen[bytes]:
        """``footfall-agent run --config ...`` in a child process, logging to :attr:`log`."""
        with self.log.open("ab") as log:
            process = subprocess.Popen(
                [*AGENT, "run", "--config", str(self.config), *args],
                stdin=stdin if stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=os.environ | UTC,
            )
        _started.append(process)
        return process

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


def prepare_agent(
    root: Path,
    broker: Mosquitto,
    site: str,
    agent: str,
    settings: Mapping[str, object] | None = None,
) -> AgentFiles:
    """Config (quick reconnects, UTC epochs, fast replay) and a signing key for an agent whose
    broker account ``<site>/<agent>`` has the password ``pw-<agent>``; ``settings`` (by dotted
    name) override."""
    root.mkdir(parents=True, exist_ok=True)
    values: dict[str, object] = {
        "agent.site": site,
        "agent.id": agent,
        "agent.config_dir": str(root / "etc"),
        "agent.state_dir": str(root / "state"),
        "broker.host": HOST,
        "broker.port": broker.port,
        "broker.username": f"{site}/{agent}",
        "broker.password": f"pw-{agent}",
        "broker.keepalive_s": 5,
        "broker.backoff_initial_ms": 50,
        "broker.backoff_max_s": 1,
        "epoch.timezone": "UTC",
        "source.speed": "fast",
    }
    values.update(settings or {})
    config = root / "agent.toml"
    config.write_text(toml_text(values))
    key = create_signing_key(root / "etc")
    return AgentFiles(root, site, agent, config, key.verify_key)


def replay_windows(capture: Path) -> list[dict[str, Any]]:
    """``footfall-agent replay CAPTURE`` (UTC epochs): one dict per window."""
    result = subprocess.run(
        [*AGENT, "replay", str(capture)],
        capture_output=True,
        check=True,
        env=os.environ | UTC,
    )
    return [json.loads(line) for line in result.stdout.splitlines()]


def counts_of(payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Counts payloads without their header: what ``replay`` prints for the same windows."""
    return [{k: v for k, v in p.items() if k not in HEADER} for p in payloads]


@pytest.fixture(scope="session")
def sample_windows() -> list[dict[str, Any]]:
    """``footfall-agent replay`` of the bundled sample (UTC epochs)."""
    return replay_windows(BUNDLED_SAMPLE)


@pytest.fixture(autouse=True)
def reap_agents() -> Iterator[None]:
    """Kill what a test's agents left running (a failed test may leave one reading stdin)."""
    yield
    while _started:
        process = _started.pop()
        if process.poll() is None:
            process.kill()
            process.wait(10)
        if process.stdin is not None:
            process.stdin.close()


@pytest.fixture(name="recorded_keys")
def recorded_keys_fixture(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[np.ndarray]]:
    """Every epoch key drawn during the test, copied as it is drawn."""
    keys: list[np.ndarray] = []
    original = anonymize.EpochKey.__init__

    def remember(self: Any) -> None:
        original(self)
        keys.append(self.words.copy())

    monkeypatch.setattr(anonymize.EpochKey, "__init__", remember)
    yield keys


def scrape(port: int) -> dict[str, float]:
    """An agent's metrics (``metrics.port``) by name."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
        text = response.read().decode()
    return {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
