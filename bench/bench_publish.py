"""Benchmark of publishing: spooled counts to a local Mosquitto at QoS 1, and the drain of a
backlog after an outage.

Starts its own Mosquitto (``tests/support/mqtt_broker.py``: password, ACL, TLS listener; plain port
used here) on free loopback ports. Every message is a real signed counts envelope (~530
bytes). Prints one table; speeds are set against paho alone at QoS 1, measured in the same run
on the same broker:

* ``paho QoS 0``: publish everything, no acknowledgement: the wire's ceiling;
* ``paho QoS 1``: the same, each message acknowledged, with the agent's in-flight window and
  protocol (MQTT 5): the protocol's cost without the spool;
* ``agent, broker up``: the agent's publisher sending a spool of N windows (SQLite reads,
  PUBACKs matched by message id, deletions committed in batches), from its connection to an
  empty spool;
* ``drain after outage``: N windows spooled while the broker is down (the publisher backing
  off), then the broker starts: from the broker's start, and from the publisher's
  reconnection, to an empty spool (goal: under 10 s for 10,000);
* ``spool append``: what the pipeline pays per window: validate, sign, commit with fsync.

Usage: ``python bench/bench_publish.py [--messages 10000]``
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import nacl.signing
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the broker fixture of the tests

from firmware_agent.contract.messages import AgentId, SiteId, counts_payload, seal  # noqa: E402
from firmware_agent.service.publish import BrokerSettings, Publisher  # noqa: E402
from firmware_agent.service.run import agent_meta  # noqa: E402
from firmware_agent.service.spool import Spool, SpoolSettings  # noqa: E402
from firmware_agent.settings import load_config  # noqa: E402
from tests.agent.test_messages import _window as counts_window  # noqa: E402
from tests.support.mqtt_broker import HOST, Mosquitto, TestCertificates, find_mosquitto  # noqa: E402

SITE, AGENT, PASSWORD = "bench", "a1", "bench-secret"
INFLIGHT = 64


def _window(i: int) -> dict[str, object]:
    """A counts v2 window (tests/agent/test_messages.py's), as the agent publishes it."""
    start = 1_709_625_600 + 300 * i
    window = counts_window()
    window["window_start"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start))
    window["probe_requests"] = 96 + i % 50
    return window


def _fill(path: Path, n: int, key: nacl.signing.SigningKey) -> float:
    """Spool n windows as the pipeline does; seconds taken."""
    site, agent = SiteId(SITE), AgentId(AGENT)
    started = time.perf_counter()
    with Spool(path, SpoolSettings(max_windows=max(n, 1))) as spool:
        for i in range(n):
            window = _window(i)
            spool.append(
                300 * i,
                lambda seq, w=window: seal(counts_payload(site, agent, seq, "0" * 16, w), key),
            )
    return time.perf_counter() - started


def _paho(broker: Mosquitto, bodies: list[bytes], qos: int) -> float:
    """paho alone: publish everything at ``qos``; seconds until the last is out (QoS 0) or
    acknowledged (QoS 1)."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"bench-paho-{qos}", protocol=mqtt.MQTTv5
    )
    client.username_pw_set(f"{SITE}/{AGENT}", PASSWORD)
    client.max_inflight_messages_set(INFLIGHT)
    client.max_queued_messages_set(0)
    client.connect(HOST, broker.port)
    client.loop_start()
    try:
        started = time.perf_counter()
        infos = [client.publish(f"footfall/v1/{SITE}/{AGENT}/counts", b, qos=qos) for b in bodies]
        infos[-1].wait_for_publish(60)
        return time.perf_counter() - started
    finally:
        client.disconnect()
        client.loop_stop()


def _publisher(broker: Mosquitto, spool: Path, key: nacl.signing.SigningKey) -> Publisher:
    settings = BrokerSettings(
        host=HOST,
        port=broker.port,
        username=f"{SITE}/{AGENT}",
        password=PASSWORD,
        max_inflight=INFLIGHT,
        backoff_initial_ms=50,
        backoff_max_s=1,
    )
    environ = {"FOOTFALL_AGENT_SITE": SITE, "FOOTFALL_AGENT_ID": AGENT}
    meta = agent_meta(load_config(None, environ=environ))
    return Publisher(settings, SiteId(SITE), AgentId(AGENT), key, spool, SpoolSettings(), meta)


def _drain(publisher: Publisher) -> tuple[float, float]:
    """Start the publisher, tell it to stop once the spool is empty: (moment it connected,
    moment it was done), perf_counter seconds."""
    connected: list[float] = []

    def watch() -> None:
        publisher.connected.wait()
        connected.append(time.perf_counter())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    publisher.start()
    publisher.stop(None)
    if not publisher.join(120):
        raise SystemExit("the publisher did not drain the spool within 120 s")
    done = time.perf_counter()
    watcher.join(1)
    if publisher.error is not None:
        raise SystemExit(f"publisher failed: {publisher.error}")
    return connected[0], done


def _pending(path: Path) -> int:
    with Spool(path) as spool:
        return spool.state().pending


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000)
    args = parser.parse_args()
    n = args.messages
    logging.getLogger("footfall.agent").setLevel(logging.ERROR)  # the outage's warnings
    binary = find_mosquitto()
    if binary is None:
        raise SystemExit("mosquitto is not installed (apt-get install mosquitto)")
    key = nacl.signing.SigningKey.generate()
    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        broker = Mosquitto(
            binary,
            root / "broker",
            TestCertificates.make(root / "certs"),
            {(SITE, AGENT): PASSWORD},
        )
        broker.start()
        try:
            fill_s = _fill(root / "filled.sqlite3", n, key)
            with Spool(root / "filled.sqlite3") as spool:
                bodies = [m.body for m in spool.pending(limit=n)]
            for name in ("steady.sqlite3", "backlog.sqlite3"):  # the same N windows twice
                shutil.copy(root / "filled.sqlite3", root / name)
            rows.append(("paho QoS 0, no acknowledgement", _paho(broker, bodies, 0)))
            paho_qos1 = _paho(broker, bodies, 1)
            rows.append((f"paho QoS 1, {INFLIGHT} in flight (baseline)", paho_qos1))
            connected, done = _drain(_publisher(broker, root / "steady.sqlite3", key))
            assert _pending(root / "steady.sqlite3") == 0
            rows.append(("agent, broker up: spool -> broker QoS 1", done - connected))

            broker.stop()
            publisher = _publisher(broker, root / "backlog.sqlite3", key)
            drain: list[tuple[float, float]] = []
            drainer = threading.Thread(target=lambda: drain.append(_drain(publisher)))
            drainer.start()
            time.sleep(2.0)  # the outage: the publisher retries and backs off
            up = time.perf_counter()
            broker.start()
            drainer.join()
            connected, done = drain[0]
            assert _pending(root / "backlog.sqlite3") == 0
            rows.append(("drain after outage, from broker start", done - up))
            rows.append(("drain after outage, from reconnection", done - connected))
        finally:
            broker.kill()
    rows.append(("spool append: validate, sign, commit+fsync", fill_s))

    print(f"cores: {os.cpu_count()}, python {sys.version.split()[0]}, {n:,} counts messages\n")
    header = f"{'path':<46} {'seconds':>8} {'messages/s':>11} {'vs paho QoS 1':>14}"
    print(header)
    print("-" * len(header))
    for name, seconds in rows:
        print(f"{name:<46} {seconds:>8.3f} {n / seconds:>11,.0f} {paho_qos1 / seconds:>14.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
