"""The agents' side of tests/support/delivery.py, in a process of its own (``python -m
tests.support.delivery_agents``, kept light: no aggregator, no pytest plugins): one
:class:`firmware_agent.service.publish.Publisher` per simulated agent, exactly as ``footfall-agent
run`` drives it, over the agent's own spool, into which :func:`produce` puts the agent's
windows at a rate (as the pipeline would); then it sends until every spool is empty, and
exits. A ``kill -9`` of this process is a real crash of the agents.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import nacl.signing

from firmware_agent.contract.messages import AgentId, SiteId, counts_payload
from firmware_agent.service.publish import BrokerSettings, Publisher
from firmware_agent.service.spool import Spool, SpoolSettings
from tests.support.agent_fleet import SimAgent, fast_seal, make_agents, meta_of, window
from tests.support.mqtt_broker import HOST

WINDOW_S = 300
RECEIPT_TIMEOUT_S = 1  # the agents re-send what no receipt covers after this long


def spool_path(root: Path, agent: SimAgent) -> Path:
    return root / "agents" / f"{agent.site}-{agent.agent}.sqlite3"


def produce(
    root: Path,
    agents: Sequence[SimAgent],
    windows_each: int,
    first: int,
    rate: float,
    notify: Sequence[Callable[[], None]],
    refused: frozenset[int] = frozenset(),
) -> None:
    """Spool each agent's windows ``first``, ``first + 300``, ... (``windows_each`` of them,
    sealed as the agent seals them, seq allocated by the spool), ``rate`` a second per agent
    (0: at once), calling the agent's ``notify`` after each batch, as the pipeline does. A
    window already spooled (before a crash) is not made again: the agent's own rule. The
    windows numbered in ``refused`` (0 the first) have counts that do not add up (their dwell
    bands do not sum to ``visits_ended``): signed, and refused by ingest for their content."""
    spools = [Spool(spool_path(root, agent)) for agent in agents]
    made = []
    for spool in spools:
        spool._db.execute("PRAGMA synchronous=OFF")  # a fixture: no power cut to survive
        newest = spool.state().newest_window
        made.append(0 if newest is None else (newest - first) // WINDOW_S + 1)
    started = time.monotonic()
    try:
        while min(made) < windows_each:
            due = windows_each if not rate else int(rate * (time.monotonic() - started)) + 1
            for a, (agent, spool) in enumerate(zip(agents, spools, strict=True)):
                while made[a] < min(due, windows_each):
                    i = made[a]
                    start = first + WINDOW_S * i
                    body = window(i, a) | {"window_start": _utc(start)}
                    if i in refused:
                        body["visits_ended"] = 17
                    spool.append(start, functools.partial(_sealed, agent, body))
                    made[a] += 1
                notify[a]()
            time.sleep(0.005)
    finally:
        for spool in spools:
            spool.close()


def _sealed(agent: SimAgent, body: dict[str, object], seq: int) -> bytes:
    site, name = SiteId(agent.site), AgentId(agent.agent)
    payload = counts_payload(site, name, seq, "9f3c1a7e52b04d68", body, version=1)
    return fast_seal(payload, agent.key)


def _utc(unix_s: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix_s))


def main(argv: Sequence[str] | None = None) -> int:
    """The agents' process: a publisher per agent over its spool, the windows made at a rate
    into the spools, then sending until every spool is empty."""
    parser = argparse.ArgumentParser(prog="python -m tests.support.delivery_agents")
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--host", default=HOST)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--hosts", default="", help="more host:port pairs (broker.hosts)")
    parser.add_argument("--agents", type=int, required=True)
    parser.add_argument("--seed", required=True)
    parser.add_argument("--receipt-key", default="", help="empty: PUBACK is enough")
    parser.add_argument("--windows", type=int, required=True)
    parser.add_argument("--first", type=int, required=True)
    parser.add_argument("--rate", type=float, default=0)
    parser.add_argument("--protocol", default="5")
    parser.add_argument("--refused", default="", help="windows (0 the first) that do not add up")
    args = parser.parse_args(argv)
    sim = make_agents(args.agents, "s1", seed=args.seed)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(threadName)s %(message)s")
    publishers = []
    for agent in sim:
        settings = BrokerSettings(
            host=args.host,
            port=args.port,
            hosts=args.hosts,
            username=f"{agent.site}/{agent.agent}",
            password=agent.password,
            keepalive_s=2,
            backoff_initial_ms=100,
            backoff_max_s=1,
            connect_timeout_s=2,
            protocol=args.protocol,
            receipt_key=args.receipt_key,
            receipt_timeout_s=RECEIPT_TIMEOUT_S,
            resend_per_s=2000,
        )
        key = nacl.signing.SigningKey(bytes(agent.key))
        publisher = Publisher(
            settings,
            SiteId(agent.site),
            AgentId(agent.agent),
            key,
            spool_path(args.root, agent),
            SpoolSettings(),
            meta_of(agent.site, agent.agent),
        )
        publisher.start()
        publishers.append(publisher)
    refused = frozenset(int(i) for i in args.refused.split(",") if i)
    notify = [p.notify for p in publishers]
    produce(args.root, sim, args.windows, args.first, args.rate, notify, refused)
    for publisher in publishers:
        publisher.stop(None)  # send until the spool is empty, however long it takes
    for publisher in publishers:
        publisher.join()
    failed = [str(p.error) for p in publishers if p.error is not None]
    # Into the log the test shows when this process fails (its standard output is not kept).
    level = logging.ERROR if failed else logging.INFO
    logging.log(level, "settled %d windows; failed: %s", sum(p.settled for p in publishers), failed)
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
