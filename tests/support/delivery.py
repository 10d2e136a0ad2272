"""End-to-end delivery under faults: the agent's own publisher and spool, real ingest processes, a
real Mosquitto, a real database; the fault matrix of docs/aggregator.md.

A :class:`Rig` holds the parts: a Mosquitto of its own (tests/support/mqtt_broker.py, an account per
agent), a store (SQLite, or PostgreSQL in a schema of its own, optionally reached through a
:class:`~tests.support.mqtt_broker.Link` that can play a database gone), the aggregator's config
file
and receipt key, and ``agents`` simulated agents that make ``windows`` signed windows each
(recent, aligned 5-minute windows), ``rate`` a second.

The agents run in a process of their own (tests/support/delivery_agents.py): the agent's own
publisher
per agent, with the receipt key, until every spool is empty; so ``kill -9`` of the agents is a
real crash of their spools. Ingest runs as ``footfall-aggregator ingest`` processes.

:meth:`Rig.outcome` counts what the database holds: windows stored, lost (sent but not stored),
stored twice (a second row for an (agent, seq), or a roll-up that counted a window twice), and
:meth:`Rig.health_right` compares the agents' health with the truth.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from aggregator.config import StoreSettings
from aggregator.demo import amqtt_command
from aggregator.jetstream import COUNTS_STREAM
from aggregator.receipts import load_receipt_key
from aggregator.store import Store, agents, site_days, windows
from firmware_agent.contract.messages import public_key_text
from tests.support.agent_fleet import SimAgent, fleet_broker, make_agents
from tests.support.delivery_agents import WINDOW_S
from tests.support.mqtt_broker import (
    HOST,
    READER,
    Link,
    Mosquitto,
    TestCertificates,
    wait_for,
)
from tests.support.nats_cluster import NatsCluster, Ports
from tests.support.netns import require
from tests.support.ports import free_port

REPO = Path(__file__).resolve().parents[2]


class Amqtt:
    """amqtt, the demo's broker, as a rig's broker: the same port over restarts, nothing kept
    (no persistence), no password checked, MQTT 3.1.1."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.port = free_port()
        self.command = amqtt_command(root, self.port)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

        def up() -> bool:
            try:
                with socket.create_connection((HOST, self.port), timeout=0.2):
                    return True
            except OSError:
                return False

        wait_for(up, 30, f"amqtt on port {self.port}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        self.kill()  # it keeps nothing either way


def database_link(dsn: str) -> Link:
    """A link to the PostgreSQL server of ``dsn`` (its port), which can play it stopped."""
    return Link(HOST, int(dsn.rsplit(":", 1)[1].split("/", maxsplit=1)[0]))


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
    broker: Mosquitto | Amqtt | NatsCluster
    settings: StoreSettings
    agents: list[SimAgent]
    windows: int
    seed: str
    first: int  # the first window's start
    db_link: Link | None = None
    rate: float = 0  # windows made a second per agent (0: all at once)
    refused: tuple[int, ...] = ()  # windows (0 the first) signed but refused for their counts
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _store: Store | None = None
    _agents_at: tuple[str, str, int] | None = None

    @property
    def store(self) -> Store:
        """The rig's own handle on the database (not through the link)."""
        if self._store is None:
            self._store = Store(self.settings)
        return self._store

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
        rate: float = 0,
        db_link: Link | None = None,
        amqtt: bool = False,
        refused: tuple[int, ...] = (),
    ) -> Rig:
        """A rig; with ``amqtt``, the demo's broker instead of Mosquitto (MQTT 3.1.1); the
        windows numbered in ``refused`` (0 the first) are made with counts that do not add up
        (tests/support/delivery_agents.py)."""
        sim = make_agents(agents, "s1", seed=root.name)
        where = root / "broker"
        broker = Amqtt(where) if amqtt else fleet_broker(mosquitto, where, certs, sim)
        return cls._around(broker, root, settings, sim, windows, rate, db_link, refused)

    @classmethod
    def on_nats(
        cls, root: Path, settings: StoreSettings, *, agents: int, windows: int, rate: float
    ) -> Rig:
        """A rig whose broker is a 3-node NATS cluster (tests/support/nats_cluster.py): the
        agents publish to the first node's MQTT listener, the others in broker.hosts; ingest
        reads the JetStream streams."""
        sim = make_agents(agents, "s1", seed=root.name)
        cluster = NatsCluster(root / "nats", sim, Ports())
        return cls._around(cluster, root, settings, sim, windows, rate)

    @classmethod
    def _around(
        cls,
        broker: Mosquitto | Amqtt | NatsCluster,
        root: Path,
        settings: StoreSettings,
        sim: list[SimAgent],
        windows: int,
        rate: float,
        db_link: Link | None = None,
        refused: tuple[int, ...] = (),
    ) -> Rig:
        """The rig around a broker, which it starts; the site and the agents enrolled."""
        broker.start()
        now = int(time.time())
        first = now - now % WINDOW_S - WINDOW_S * windows
        rig = cls(root, broker, settings, sim, windows, root.name, first, db_link, rate, refused)
        with Store.open(settings) as store:
            store.add_site("s1", "Mall", "UTC", int(time.time()))
            store.add_agents("s1", {a.agent: a.public_key for a in sim}, int(time.time()))
        return rig

    @property
    def protocol(self) -> str:
        return "5" if isinstance(self.broker, Mosquitto) else "3.1.1"

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
        broker = (
            self.broker.ingest_settings()
            if isinstance(self.broker, NatsCluster)
            else f'host = "{HOST}"\nport = {self.broker.port}\nusername = "{READER[0]}"\n'
            f'password = "{READER[1]}"\nkeepalive_s = 5\nbackoff_max_s = 1\n'
            f'protocol = "{self.protocol}"\n'
        )
        path.write_text(
            f'[store]\ndsn = "{dsn}"\nschema = "{self.settings.schema}"\nretention_days = 0\n'
            f'data_dir = "{self.root}"\n[broker]\n{broker}'
            f'[ingest]\nbatch_wait_ms = 20\nshare_group = "{share_group}"\n'
            "receipt_interval_ms = 200\n"
        )
        return path

    def start_ingest(self, *names: str, share_group: str = "footfall") -> None:
        """Ingest processes, started together; returns once each reads from the broker."""
        for name in names:
            log = (self.root / f"{name}.log").open("ab")
            self.processes[name] = subprocess.Popen(
                [sys.executable, "-m", "aggregator.cli", "-v", "ingest",
                 "--config", str(self.ingest_config(share_group)),
                 "--set", f"ingest.client_id={name}"],
                cwd=REPO, stderr=log, stdout=subprocess.DEVNULL,
            )  # fmt: skip
            log.close()
        nats = isinstance(self.broker, NatsCluster)
        ready = f"consuming {COUNTS_STREAM}" if nats else "subscribed to"
        for name in names:
            wait_for(lambda name=name: ready in self.log(name), 20, f"{name} to subscribe")

    def start_agents(
        self, at: tuple[str, str, int] | None = None, *, receipts: bool = True
    ) -> None:
        """The agents' process (``at``: in that network namespace, the broker at that address
        and port); without ``receipts``, agents as they were before receipts (a window leaves
        the spool on the broker's PUBACK)."""
        self._agents_at = at or self._agents_at
        namespace, host, port = self._agents_at or ("", HOST, self.broker.port)
        hosts = self.broker.hosts if isinstance(self.broker, NatsCluster) else ""
        inside = ["ip", "netns", "exec", namespace] if namespace else []
        log = (self.root / "agents.log").open("ab")
        self.processes["agents"] = subprocess.Popen(
            [*inside, sys.executable, "-m", "tests.support.delivery_agents",
             "--root", str(self.root), "--host", host, "--port", str(port), "--hosts", hosts,
             "--agents", str(len(self.agents)),
             "--seed", self.seed, "--receipt-key", self.receipt_key if receipts else "",
             "--windows", str(self.windows), "--first", str(self.first),
             "--rate", str(self.rate), "--protocol", self.protocol,
             "--refused", ",".join(map(str, self.refused))],
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
        with self.store.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(windows)).scalar_one())

    def agents_done(self, timeout: float) -> None:
        """The agents' process ends once every spool is empty (receipts cover everything)."""
        process = self.processes["agents"]
        try:
            code = process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"agents still sending after {timeout} s ({self.stored()} of {self.total} "
                f"stored)\n{self.log('agents')[-3000:]}"
            ) from None
        del self.processes["agents"]
        assert code == 0, self.log("agents")[-3000:]

    def outcome(self) -> Outcome:
        with self.store.engine.connect() as conn:
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
        health = {a.agent: a for a in self.store.agents("s1")}
        with self.store.engine.connect() as conn:
            truth = conn.execute(
                sa.select(
                    agents.c.agent_id,
                    agents.c.status_last_seq,
                    sa.func.min(windows.c.seq),
                    sa.func.max(windows.c.seq),
                    sa.func.count(),
                )
                .join(windows, windows.c.agent_key == agents.c.agent_key)
                .group_by(agents.c.agent_id, agents.c.status_last_seq)
            ).all()
        return all(
            health[agent].missing == max(made, last) - first + 1 - count
            for agent, made, first, last, count in truth
            if made is not None and health[agent].windows == count
        )

    def stop(self) -> None:
        for name in list(self.processes):
            self.kill(name, signal.SIGKILL)
        self.broker.kill()
        if self._store is not None:
            self._store.close()


# --- the faults: each starts the parts, does its harm, and undoes it (or not); the caller
# --- then waits for the agents' spools to empty. Each returns whether the agents' health was
# --- right about the missing windows while the fault lasted.


def _until_moving(count: Callable[[], int], target: float, what: str, stall_s: float = 60) -> None:
    """Wait until ``count()`` reaches ``target``; fail only when it has not moved for ``stall_s``
    seconds. A fixed 60-s deadline, counted from before the agents' process had even started,
    failed the receipt-less baseline once in a whole-suite run (500 windows not all acknowledged):
    on 2 cores shared by a dozen processes that process needs most of its time to start (it
    imports SQLAlchemy and the numba stages: 0.8 s of CPU alone, 13 s of wall time measured at
    load 10). What the tests wait for is that delivery goes on, not that it is quick."""
    last, since = count(), time.monotonic()
    while (now := count()) < target:
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > stall_s:
            raise AssertionError(f"{what}: stuck at {now} of {target:g} for {stall_s:g} s")
        time.sleep(0.05)


def _until_stored(rig: Rig, share: float) -> None:
    _until_moving(rig.stored, rig.total * share, f"{share:.0%} of the windows stored")


def _mid_stream(rig: Rig, replicas: int = 1, agents_at: tuple[str, str, int] | None = None) -> None:
    """Ingest (one process on a plain subscription, or ``replicas`` on a shared one) and the
    agents started (``agents_at``: in that namespace, to that address and port), and a share of
    the windows stored: the moment a fault strikes."""
    names = ("ingest-a", "ingest-b")[:replicas]
    rig.start_ingest(*names, share_group="footfall" if replicas > 1 else "")
    rig.start_agents(agents_at)
    _until_stored(rig, 0.3)


def _outage(rig: Rig, seconds: float) -> bool:
    """The fault lasts ``seconds``; whether the agents' health was right meanwhile."""
    time.sleep(seconds)
    return rig.health_right()


def broker_killed_while_ingest_away(rig: Rig, _outage_s: float, receipts: bool = True) -> bool:
    """Finding 3: every window acknowledged by the broker and queued for an ingest that is
    away, then the broker killed before it saved them."""
    rig.start_ingest("ingest-a", share_group="")  # its session exists: the broker queues for it
    rig.kill("ingest-a", signal.SIGTERM)
    rig.start_agents(receipts=receipts)
    _until_moving(rig.published, rig.total, "the broker acknowledging every window")
    rig.broker.kill()
    rig.broker.start()
    rig.start_ingest("ingest-a", share_group="")
    if receipts:
        _until_stored(rig, 0.1)
    return rig.health_right()


def _broker_down(rig: Rig, replicas: int, down: Callable[[], None], seconds: float) -> bool:
    _mid_stream(rig, replicas)
    down()
    right = _outage(rig, seconds)
    rig.broker.start()
    return right


def broker_killed(rig: Rig, _outage_s: float) -> bool:
    """Mosquitto killed while ingest runs (or amqtt, the demo's broker, which keeps nothing
    and forgets what a client had not acknowledged anyway), and started again."""
    return _broker_down(rig, 1, rig.broker.kill, 0.5)


def broker_restarted_with_shared_subscription(rig: Rig, _outage_s: float) -> bool:
    """A clean restart: Mosquitto 2.0 forgets the shared subscription."""
    return _broker_down(rig, 2, rig.broker.stop, 0)


def replica_gone_for_good(rig: Rig, _outage_s: float) -> bool:
    _mid_stream(rig, replicas=2)
    rig.kill("ingest-b")  # never comes back: its share waits in its session
    return _outage(rig, 1)


def ingest_killed(rig: Rig, outage_s: float) -> bool:
    _mid_stream(rig)
    rig.kill("ingest-a")
    right = _outage(rig, outage_s)
    rig.start_ingest("ingest-a", share_group="")
    return right


def database_stopped(rig: Rig, outage_s: float) -> bool:
    assert rig.db_link is not None, "the database fault needs the rig's database link"
    _mid_stream(rig)
    rig.db_link.refuse()
    right = _outage(rig, outage_s)  # read past the link: the database itself is there
    rig.db_link.restore()
    return right


def agents_killed(rig: Rig, outage_s: float) -> bool:
    _mid_stream(rig)
    rig.kill("agents")
    right = _outage(rig, outage_s)
    rig.start_agents()
    return right


@contextlib.contextmanager
def agents_network() -> Iterator[tuple[str, str, str]]:
    """A network namespace for the agents, joined to this one by a veth pair: (namespace,
    this side's device, this side's address). Needs root; removed whatever happens."""
    suffix = uuid.uuid4().hex[:8]
    namespace, outside, inside = f"footfall-net-{suffix}", f"ffo{suffix}", f"ffn{suffix}"
    subnet = f"10.{200 + int(suffix[:2], 16) % 50}.{int(suffix[2:4], 16)}"
    commands = [
        ["ip", "netns", "add", namespace],
        ["ip", "link", "add", outside, "type", "veth", "peer", "name", inside, "netns", namespace],
        ["ip", "addr", "add", f"{subnet}.1/30", "dev", outside],
        ["ip", "link", "set", outside, "up"],
        ["ip", "-n", namespace, "addr", "add", f"{subnet}.2/30", "dev", inside],
        ["ip", "-n", namespace, "link", "set", inside, "up"],
        ["ip", "-n", namespace, "link", "set", "lo", "up"],
    ]
    try:
        for command in commands:
            subprocess.run(command, check=True, capture_output=True)
        yield namespace, outside, f"{subnet}.1"
    finally:
        subprocess.run(["ip", "link", "del", outside], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True, check=False)


def network_cut(rig: Rig, outage_s: float) -> bool:
    """The agents in a network namespace of their own, whose link to the broker's goes down
    (nothing closed, packets dropped) for longer than their keep-alive (2 s)."""
    require(os.geteuid() == 0, "the network cut needs root (ip netns)")
    with agents_network() as (namespace, device, address):
        link = Link(HOST, rig.broker.port, bind=address)  # the broker, seen from the veth
        try:
            _mid_stream(rig, agents_at=(namespace, address, link.port))
            subprocess.run(["ip", "link", "set", device, "down"], check=True)
            right = _outage(rig, max(outage_s, 3.5))
            subprocess.run(["ip", "link", "set", device, "up"], check=True)
            rig.agents_done(120)
        finally:
            link.close()
    return right


FAULTS = {
    "broker kill -9, ingest away": broker_killed_while_ingest_away,
    "broker kill -9, ingest running": broker_killed,
    "broker restart, shared subscription": broker_restarted_with_shared_subscription,
    "one of two ingest replicas gone for good": replica_gone_for_good,
    "ingest kill -9": ingest_killed,
    "PostgreSQL stopped": database_stopped,
    "agents kill -9": agents_killed,
    "network cut": network_cut,
    "amqtt (the demo's broker) kill -9": broker_killed,
}
