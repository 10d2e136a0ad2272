"""Nothing is lost whatever the network does: the broker killed mid-replay, the agent killed
with SIGKILL, the network cut for longer than the keep-alive. In each case a subscriber that
de-duplicates by (agent, seq) gets every window of the capture exactly once, in order, with the
counts ``footfall-agent replay`` gives for it.

The agent replays the bundled sample (3 hours) at 3600 times its pace, a window every 83 ms, so
each fault falls in the middle of the replay.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from firmware_agent.cli import BUNDLED_SAMPLE
from tests.support.agent_harness import AgentFiles, counts_of, prepare_agent, unique_id
from tests.support.mqtt_broker import Link, Mosquitto, Subscriber, wait_for

StartBroker = Callable[[Mapping[tuple[str, str], str]], Mosquitto]
PACE = {"source.speed": "3600"}


def _all_windows_once_in_order(
    sub: Subscriber, files: AgentFiles, expected: list[dict[str, Any]]
) -> None:
    wait_for(lambda: len(sub.windows()) >= len(expected), 20, "every window")
    windows = sub.windows()
    seqs = [w["seq"] for w in windows]
    assert seqs == sorted(seqs), "out of order"
    assert counts_of(windows) == expected
    for envelope in sub.envelopes("/counts"):
        envelope.verify(files.verify_key)


def _reconnected_with_backlog(log: str) -> bool:
    """Some connection after the first found windows waiting in the spool."""
    spooled = [
        int(n) for n in re.findall(r"connected to broker \S+ as .*\((\d+) windows spooled", log)
    ]
    return len(spooled) >= 2 and max(spooled[1:]) > 0


def test_broker_killed_mid_replay_and_restarted(
    start_broker: StartBroker, sample_windows: list[dict[str, Any]], tmp_path: Path
) -> None:
    site, agent = unique_id("s"), "a1"
    broker = start_broker({(site, agent): f"pw-{agent}"})
    # A persistent session, saved: the restarted broker queues for the subscriber what
    # the agent re-sends before the subscriber is back.
    sub = Subscriber(broker, persistent=True)
    broker.save()
    files = prepare_agent(tmp_path, broker, site, agent, PACE)
    try:
        run = files.start("--source", str(BUNDLED_SAMPLE))
        wait_for(lambda: len(sub.windows()) >= 8, 20, "8 windows")
        broker.kill()
        time.sleep(1.0)  # the outage: windows keep being counted and spooled
        broker.start()
        assert run.wait(30) == 0, files.log_text()
        _all_windows_once_in_order(sub, files, sample_windows)
    finally:
        sub.close()
    log = files.log_text()
    assert "lost the connection" in log
    assert _reconnected_with_backlog(log), log


def test_agent_killed_with_sigkill_and_restarted(
    start_broker: StartBroker, sample_windows: list[dict[str, Any]], tmp_path: Path
) -> None:
    site, agent = unique_id("s"), "a1"
    broker = start_broker({(site, agent): f"pw-{agent}"})
    sub = Subscriber(broker)
    files = prepare_agent(tmp_path, broker, site, agent, PACE)
    try:
        run = files.start("--source", str(BUNDLED_SAMPLE))
        wait_for(lambda: len(sub.windows()) >= 10, 20, "10 windows")
        run.kill()
        run.wait(10)
        wait_for(
            lambda: any(e.payload["cause"] == "lost" for e in sub.envelopes("/status")),
            10,
            "the last will (offline, lost)",
        )
        again = files.start("--source", str(BUNDLED_SAMPLE))
        assert again.wait(30) == 0, files.log_text()
        _all_windows_once_in_order(sub, files, sample_windows)
    finally:
        sub.close()
    assert "windows already spooled before this start" in files.log_text()


def test_network_cut_longer_than_the_keepalive(
    start_broker: StartBroker, sample_windows: list[dict[str, Any]], tmp_path: Path
) -> None:
    site, agent = unique_id("s"), "a1"
    broker = start_broker({(site, agent): f"pw-{agent}"})
    link = Link("127.0.0.1", broker.port)
    sub = Subscriber(broker)  # straight to the broker: only the agent is cut off
    settings = PACE | {"broker.port": link.port, "broker.keepalive_s": 1}
    files = prepare_agent(tmp_path, broker, site, agent, settings)
    try:
        run = files.start("--source", str(BUNDLED_SAMPLE))
        wait_for(lambda: len(sub.windows()) >= 5, 20, "5 windows")
        link.cut()
        wait_for(
            lambda: any(e.payload["cause"] == "lost" for e in sub.envelopes("/status")),
            5,
            "the broker to give the agent up (last will)",
        )
        wait_for(lambda: "keep-alive" in files.log_text(), 5, "the agent to give the broker up")
        time.sleep(1.0)  # and stay cut off a while longer: reconnections are refused
        link.restore()
        assert run.wait(30) == 0, files.log_text()
        _all_windows_once_in_order(sub, files, sample_windows)
    finally:
        sub.close()
        link.close()
    log = files.log_text()
    assert "no answer within the keep-alive" in log
    assert _reconnected_with_backlog(log), log
