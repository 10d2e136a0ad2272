"""Privacy on the wire: real captures replayed through a real broker, watched from ``#``.

No topic or payload, and nothing the agent leaves on disk (spool database and its WAL, key
file) or prints, holds any address of the captures in any encoding (the helpers of
test_privacy), any of their SSIDs or any epoch key; every payload validates against its
schema and its signature verifies with the agent's public key.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pytest

from firmware_agent import cli
from firmware_agent.contract.messages import Envelope
from tests.agent.test_privacy import _encodings, _key_encodings, _secrets_of
from tests.support.agent_harness import AgentFiles, prepare_agent, unique_id
from tests.support.mqtt_broker import Mosquitto, Subscriber, wait_for

StartBroker = Callable[[Mapping[tuple[str, str], str]], Mosquitto]

CAPTURES = (
    "fryza_p1_sc6-61_2023-02-21_anonymized.pcap",  # the most probe requests
    "baccichet_iPhone11-B_anonymized.pcap",
    "aircrackng_wpa2-psk-linksys.cap",  # directed probes for an SSID
    "gianlucavigo_02_iPadApple_01_filtered.pcapng",
)


class _Needles:
    """What ``_leaks`` looks for, found in one pass: every encoding of every address, by length
    (thousands of addresses times 20 encodings make ``_leaks`` slow on many blobs)."""

    def __init__(self, macs: set[bytes]) -> None:
        self.by_length: dict[int, set[bytes]] = {}
        for mac in macs:
            for needle in _encodings(mac):
                self.by_length.setdefault(len(needle), set()).add(needle.lower())

    def found(self, blob: bytes) -> bool:
        lowered = blob.lower()
        return any(
            lowered[i : i + n] in group
            for n, group in self.by_length.items()
            for i in range(len(lowered) - n + 1)
        )


@pytest.mark.shared
def test_nothing_identifying_reaches_the_broker_or_the_disk(
    pcaps_dir: Path,
    start_broker: StartBroker,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    recorded_keys: list[np.ndarray],
) -> None:
    site = unique_id("s")
    agents = [f"a{i}" for i in range(len(CAPTURES))]
    broker = start_broker({(site, agent): f"pw-{agent}" for agent in agents})
    keys = recorded_keys
    sub = Subscriber(broker, "#")
    runs: dict[str, AgentFiles] = {}
    try:
        for agent, name in zip(agents, CAPTURES, strict=True):
            files = prepare_agent(tmp_path / agent, broker, site, agent)
            assert (
                cli.main(
                    ["-v", "run", "--config", str(files.config), "--source", str(pcaps_dir / name)]
                )
                == 0
            )
            runs[agent] = files

        def all_stopped() -> bool:
            stopped = {
                e.payload["agent"]
                for e in sub.envelopes("/status")
                if e.payload["cause"] == "stopped"
            }
            return stopped == set(agents)

        wait_for(all_stopped, 10, "every agent's offline status")
        messages = sub.snapshot()
    finally:
        sub.close()
    out, err = capfd.readouterr()

    macs: set[bytes] = set()
    ssids: set[bytes] = set()
    for name in CAPTURES:
        capture_macs, capture_ssids = _secrets_of(pcaps_dir / name)
        macs |= capture_macs
        ssids |= capture_ssids
    assert macs and ssids and keys
    for name in CAPTURES:  # file names may hold an SSID ("linksys"): they are no leak
        err = err.replace(str(pcaps_dir / name), "<capture>")
    blobs = {"stdout": out.encode(), "stderr": err.encode()}
    for i, (topic, body, _) in enumerate(messages):
        blobs[f"message {i} on {topic}"] = topic.encode() + b"\n" + body
    for files in runs.values():
        for root, _dirs, names in os.walk(files.root):
            for file in names:
                path = Path(root) / file
                if file != "agent.toml":  # written by the test, not the agent
                    blobs[str(path.relative_to(tmp_path))] = path.read_bytes()
    assert sum(name.endswith("spool.sqlite3") for name in blobs) == len(agents)
    needles = _Needles(macs)
    assert needles.found(b"at " + next(iter(macs)).hex(":").upper().encode())
    for where, blob in blobs.items():
        assert not needles.found(blob), f"an address appears in {where}"
        for ssid in ssids:
            assert ssid not in blob, f"an SSID appears in {where}"
        for words in keys:
            for needle in _key_encodings(words):
                assert needle not in blob, f"an epoch key appears in {where}"

    counts = 0
    for topic, body, _ in messages:
        envelope = Envelope.parse(body)  # validates the envelope and the payload
        assert str(envelope.topic) == topic
        envelope.verify(runs[envelope.payload["agent"]].verify_key)
        counts += envelope.payload["kind"] == "counts"
    assert counts >= 60
