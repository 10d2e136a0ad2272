"""End-to-end delivery under faults: the agent's own publisher and spool, real ingest
processes, a real Mosquitto, a real database; the fault matrix of docs/aggregator.md.

A :class:`Rig` holds the parts: a Mosquitto of its own (tests/mqtt_broker.py, an account per
agent), a store (SQLite, or PostgreSQL in a schema of its own, optionally reached through a
:class:`~tests.mqtt_broker.Link` that can play a database gone), the aggregator's config
file and receipt key, and ``agents`` simulated agents whose spools are filled beforehand with
``windows`` signed windows each (recent, aligned 5-minute windows).

The agents run in a process of their own (``python -m tests.delivery``, :func:`main`): one
:class:`firmware_agent.publish.Publisher` per agent, exactly as ``footfall-agent run`` drives
it, with the receipt key, until every spool is empty; so ``kill -9`` of the agents is a real
crash of their spools. Ingest runs as ``footfall-aggregator ingest`` processes.

:meth:`Rig.outcome` counts what the database holds: windows stored, lost (sent but not
stored), stored twice (a second row for an (agent, seq), or a roll-up that counted a window
twice), and :meth:`Rig.health_right` compares the agents' health with the truth.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nacl.signing
import sqlalchemy as sa

from aggregator.config import StoreSettings
from aggregator.receipts import load_receipt_key
from aggregator.store import Store, agents, site_days, windows
from firmware_agent.messages import (
    AgentId,
    SiteId,
    counts_payload,
    meta_payload,
    public_key_text,
)
from firmware_agent.publish import BrokerSettings, Publisher
from firmware_agent.spool import Spool, SpoolSettings
from tests.agent_fleet import SimAgent, fast_seal, fleet_broker, make_agents, window
from tests.conftest import REPO
from tests.mqtt_broker import HOST, READER, Link, Mosquitto, TestCertificates, wait_for

WINDOW_S = 300
THRESHOLDS = {"rssi_threshold_dbm": -75, "min_dwell_s": 120, "visit_gap_s": 600, "lateness_s": 10}
PRIVACY = {
    "mode": "standard",
    "device_hash": "siphash-2-4",
    "key_bits": 128,
    "key_lifetime_s": 90000,
    "id_bits": None,
    "suppress_below": 5,
    "dp_epsilon": None,
    "dp_epsilon_day": None,
}
RECEIPT_TIMEOUT_S = 2  # the agents re-send what no receipt covers after this long


def spool_path(root: Path, agent: SimAgent) -> Path:
    return root / "agents" / f"{agent.site}-{agent.agent}.sqlite3"


def fill_spools(root: Path, agents: Sequence[SimAgent], windows_each: int, end: int) -> None:
    """Give each agent's spool ``windows_each`` signed windows ending before ``end`` (aligned),
    sealed as the agent seals them, seq allocated by the spool."""
    first = end - end % WINDOW_S - WINDOW_S * windows_each
    for a, agent in enumerate(agents):

        def sealed(seq: int, body: dict[str, object], agent: SimAgent = agent) -> bytes:
            payload = counts_payload(
                SiteId(agent.site), AgentId(agent.agent), seq, "9f3c1a7e52b04d68", body
            )
            return fast_seal(payload, agent.key)

        with Spool(spool_path(root, agent)) as spool:
            spool._db.execute("PRAGMA synchronous=OFF")  # a fixture: no power cut to survive
            for i in range(windows_each):
                start = first + WINDOW_S * i
                body = window(i, a) | {"window_start": _utc(start)}
                spool.append(start, lambda seq, body=body: sealed(seq, body))


def _utc(unix_s: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix_s))


def _meta(agent: SimAgent) -> dict[str, object]:
    return meta_payload(
        SiteId(agent.site),
        AgentId(agent.agent),
        agent_version="0.1.0",
        window_s=WINDOW_S,
        epoch_length="midnight",
        epoch_timezone="UTC",
        thresholds=THRESHOLDS,
        privacy=PRIVACY,
    )


@dataclass(frozen=True)
class Outcome:
    """What the database holds after a run."""

    sent: int
    stored: int
    lost: int
    twice: int

    def row(self, fault: str, seconds: float) -> str:
        return (
            f"| {fault} | {self.sent} | {self.stored} | {self.lost} | {self.twice} | "
            f"{seconds:.1f} |"
        )


@dataclass
class Rig:
    """The parts of one fault run (module docstring)."""

    root: Path
    broker: Mosquitto
    settings: StoreSettings
    agents: list[SimAgent]
    windows: int
    seed: str
    db_link: Link | None = None
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @classmethod
    def make(
        cls,
        root: Path,
        mosquitto: str,
        certs: TestCertificates,
        settings: StoreSettings,
        *,
        agents: int,
        windows: int,
        db_link: Link | None = None,
    ) -> Rig:
        seed = root.name
        sim = make_agents(agents, "s1", seed=seed)
        broker = fleet_broker(mosquitto, root / "broker", certs, sim)
        broker.start()
        fill_spools(root, sim, windows, int(time.time()))
        rig = cls(root, broker, settings, sim, windows, seed, db_link)
        with Store.open(settings) as store:
            store.add_site("s1", "Mall", "UTC", int(time.time()))
            store.add_agents("s1", {a.agent: a.public_key for a in sim}, int(time.time()))
        return rig

    @property
    def total(self) -> int:
        return len(self.agents) * self.windows

    @property
    def receipt_key(self) -> str:
        return public_key_text(load_receipt_key(self.root / "receipt.key"))

    def ingest_config(self, share_group: str) -> Path:
        dsn = self.settings.dsn
        if self.db_link is not None:  # through the link that plays the database gone
            dsn = dsn.replace(f":{self.db_link.target[1]}/", f":{self.db_link.port}/")
        path = self.root / f"aggregator-{share_group or 'plain'}.toml"
        path.write_text(
            f'[store]\ndsn = "{dsn}"\nschema = "{self.settings.schema}"\nretention_days = 0\n'
            f'data_dir = "{self.root}"\n'
            f'[broker]\nhost = "{HOST}"\nport = {self.broker.port}\nusername = "{READER[0]}"\n'
            f'password = "{READER[1]}"\nkeepalive_s = 5\nbackoff_max_s = 1\n'
            f'[ingest]\nbatch_wait_ms = 20\nshare_group = "{share_group}"\n'
            "receipt_interval_ms = 200\n"
        )
        return path

    def start_ingest(self, name: str, share_group: str = "footfall") -> None:
        log = (self.root / f"{name}.log").open("ab")
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", "aggregator.cli", "-v", "ingest",
             "--config", str(self.ingest_config(share_group)),
             "--set", f"ingest.client_id={name}"],
            cwd=REPO, stderr=log, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        log.close()
        wait_for(lambda: "connected to broker" in self.log(name), 20, f"{name} to connect")
        time.sleep(0.3)  # its SUBACK

    def start_agents(self, port: int | None = None) -> None:
        log = (self.root / "agents.log").open("ab")
        self.processes["agents"] = subprocess.Popen(
            [sys.executable, "-m", "tests.delivery", "--root", str(self.root),
             "--port", str(port or self.broker.port), "--agents", str(len(self.agents)),
             "--seed", self.seed, "--receipt-key", self.receipt_key],
            cwd=REPO, stderr=log, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        log.close()

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def published(self) -> int:
        """Windows the agents' broker acknowledged, first sends and re-sends alike."""
        return self.log("agents").count("published counts")

    def kill(self, name: str, signum: int = signal.SIGKILL) -> None:
        process = self.processes.pop(name)
        process.send_signal(signum)
        process.wait(20)

    def stored(self) -> int:
        with Store(self.settings) as store, store.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(windows)).scalar_one())

    def agents_done(self, timeout: float) -> None:
        """The agents' process ends once every spool is empty (receipts cover everything)."""
        process = self.processes.pop("agents")
        try:
            code = process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            raise AssertionError(
                f"agents still sending after {timeout} s ({self.stored()} of {self.total} "
                f"stored)\n{self.log('agents')[-3000:]}"
            ) from None
        assert code == 0, self.log("agents")[-3000:]

    def outcome(self) -> Outcome:
        with Store(self.settings) as store, store.engine.connect() as conn:
            rows = conn.execute(sa.select(sa.func.count()).select_from(windows)).scalar_one()
            ids = sa.select(windows.c.agent_key, windows.c.seq).distinct().subquery()
            distinct = conn.execute(sa.select(sa.func.count()).select_from(ids)).scalar_one()
            rolled = conn.execute(sa.select(sa.func.sum(site_days.c.windows))).scalar() or 0
        assert rolled == rows, f"the roll-ups counted {rolled} windows, the store holds {rows}"
        return Outcome(self.total, distinct, self.total - distinct, rows - distinct)

    def health_right(self) -> bool:
        """Every agent with windows stored and a status: its missing windows (``agents
        list``) are those from its first stored one to the last it made (its status's
        ``last_seq``) that are not stored. (Windows before the first stored one cannot be
        told apart from none: an agent's first seq is the time its spool was made.)"""
        with Store(self.settings) as store:
            health = {a.agent: a for a in store.agents("s1")}
            with store.engine.connect() as conn:
                truth = conn.execute(
                    sa.select(
                        agents.c.agent_id,
                        agents.c.status_last_seq,
                        sa.func.min(windows.c.seq),
                        sa.func.count(),
                    )
                    .join(windows, windows.c.agent_key == agents.c.agent_key)
                    .group_by(agents.c.agent_id, agents.c.status_last_seq)
                ).all()
        return all(
            health[agent].missing == made - first + 1 - count
            for agent, made, first, count in truth
            if made is not None and health[agent].windows == count
        )

    def stop(self) -> None:
        for name in list(self.processes):
            self.kill(name, signal.SIGKILL)
        self.broker.kill()


# --- the faults: each starts the parts, does its harm, and undoes it (or not); the caller
# --- then waits for the agents' spools to empty. Each returns whether the agents' health was
# --- right about the missing windows while the fault lasted.


def _until_stored(rig: Rig, share: float) -> None:
    wait_for(lambda: rig.stored() >= rig.total * share, 60, f"{share:.0%} of the windows")


def broker_killed_while_ingest_away(rig: Rig, _outage_s: float) -> bool:
    """Finding 3: every window acknowledged by the broker and queued for an ingest that is
    away, then the broker killed before it saved them."""
    rig.start_ingest("ingest-a", "")  # its session exists: the broker queues for it
    rig.kill("ingest-a", signal.SIGTERM)
    rig.start_agents()
    wait_for(lambda: rig.published() >= rig.total, 60, "the broker to acknowledge everything")
    rig.broker.kill()
    rig.broker.start()
    rig.start_ingest("ingest-a", "")
    _until_stored(rig, 0.1)
    return rig.health_right()


def broker_killed_while_ingest_runs(rig: Rig, _outage_s: float) -> bool:
    rig.start_ingest("ingest-a", "")
    rig.start_agents()
    _until_stored(rig, 0.3)
    rig.broker.kill()
    right = rig.health_right()
    time.sleep(0.5)
    rig.broker.start()
    return right


def broker_restarted_with_shared_subscription(rig: Rig, _outage_s: float) -> bool:
    rig.start_ingest("ingest-a")
    rig.start_ingest("ingest-b")
    rig.start_agents()
    _until_stored(rig, 0.3)
    rig.broker.stop()
    right = rig.health_right()
    rig.broker.start()
    return right


def replica_gone_for_good(rig: Rig, _outage_s: float) -> bool:
    rig.start_ingest("ingest-a")
    rig.start_ingest("ingest-b")
    rig.start_agents()
    _until_stored(rig, 0.25)
    rig.kill("ingest-b")  # never comes back: its share waits in its session
    time.sleep(1)
    return rig.health_right()


def ingest_killed(rig: Rig, outage_s: float) -> bool:
    rig.start_ingest("ingest-a", "")
    rig.start_agents()
    _until_stored(rig, 0.3)
    rig.kill("ingest-a")
    time.sleep(outage_s)
    right = rig.health_right()
    rig.start_ingest("ingest-a", "")
    return right


def database_stopped(rig: Rig, outage_s: float) -> bool:
    assert rig.db_link is not None, "the database fault needs the rig's database link"
    rig.start_ingest("ingest-a", "")
    rig.start_agents()
    _until_stored(rig, 0.3)
    rig.db_link.refuse()
    time.sleep(outage_s)
    right = rig.health_right()  # read past the link: the database itself is there
    rig.db_link.restore()
    return right


def agents_killed(rig: Rig, outage_s: float) -> bool:
    rig.start_ingest("ingest-a", "")
    rig.start_agents()
    _until_stored(rig, 0.3)
    rig.kill("agents")
    time.sleep(outage_s)
    right = rig.health_right()
    rig.start_agents()
    return right


def network_cut(rig: Rig, outage_s: float) -> bool:
    """The agents' network silently gone for longer than their keep-alive (2 s)."""
    link = Link(HOST, rig.broker.port)
    try:
        rig.start_ingest("ingest-a", "")
        rig.start_agents(link.port)
        _until_stored(rig, 0.3)
        link.cut()
        time.sleep(max(outage_s, 5))
        right = rig.health_right()
        link.restore()
        rig.agents_done(120)
    finally:
        link.close()
    return right


FAULTS = {
    "broker kill -9, ingest away": broker_killed_while_ingest_away,
    "broker kill -9, ingest running": broker_killed_while_ingest_runs,
    "broker restart, shared subscription": broker_restarted_with_shared_subscription,
    "one of two ingest replicas gone for good": replica_gone_for_good,
    "ingest kill -9": ingest_killed,
    "PostgreSQL stopped": database_stopped,
    "agents kill -9": agents_killed,
    "network cut": network_cut,
}


def main(argv: Sequence[str] | None = None) -> int:
    """The agents' process: a publisher per agent over its filled spool, with the receipt
    key, until every spool is empty."""
    parser = argparse.ArgumentParser(prog="python -m tests.delivery")
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--agents", type=int, required=True)
    parser.add_argument("--seed", required=True)
    parser.add_argument("--receipt-key", required=True)
    args = parser.parse_args(argv)
    import logging  # noqa: PLC0415 (the process's own log)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(threadName)s %(message)s")
    publishers = []
    for agent in make_agents(args.agents, "s1", seed=args.seed):
        settings = BrokerSettings(
            host=HOST,
            port=args.port,
            username=f"{agent.site}/{agent.agent}",
            password=agent.password,
            keepalive_s=2,
            backoff_initial_ms=100,
            backoff_max_s=1,
            connect_timeout_s=2,
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
            _meta(agent),
        )
        publisher.start()
        publishers.append(publisher)
    for publisher in publishers:
        publisher.stop(None)  # send until the spool is empty, however long it takes
    for publisher in publishers:
        publisher.join()
    failed = [str(p.error) for p in publishers if p.error is not None]
    print(json.dumps({"settled": sum(p.settled for p in publishers), "failed": failed}))
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
