"""Benchmark of the aggregator's ingest: signed counts through a real Mosquitto into SQLite and
PostgreSQL, and the drain of a backlog.

Starts its own Mosquitto (``tests/support/mqtt_broker.py``, an account per agent) on free loopback
ports. The agents are a :class:`tests.support.agent_fleet.Fleet` in a process of its own: one MQTT
connection per agent, real Ed25519-signed counts envelopes (~530 bytes) at QoS 1. Ingest runs as
the real command (``footfall-aggregator ingest``), one or two processes on one shared
subscription. A run counts from the fleet's first message to the last window committed (the
database polled every 0.1 s).

Rows:

* ``receive only``: the MQTT side alone in the same run, every message received and
  acknowledged, nothing else: with paho-mqtt 2 (MQTT 5, manual acknowledgement, what the
  aggregator would use off the shelf) and with ``aggregator.mqtt`` (what it uses): the baselines
  the ingest rows are set against;
* ``ingest``: the same messages verified (schema, topic, enrolled agent, Ed25519 signature) and
  stored with their roll-ups, acknowledged after the commit; 1 and 2 processes;
* ``backlog``: 1,000 agents back from an outage each send their 100 spooled windows at once,
  100,000 messages: the time until the last is stored (goal: under 30 s);
* the time split: where ingest's worker spent its time (JSON and schema, signature, database),
  from the processes' own counters.

Usage: ``python bench/bench_ingest.py [--agents 200 --windows 100] [--pg DSN | --no-pg]``;
PostgreSQL from ``--pg``, else ``FOOTFALL_TEST_PG_DSN``, else the local server.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the broker fixture and the fleet of the tests

import paho.mqtt.client as mqtt  # noqa: E402
import sqlalchemy as sa  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402

from aggregator.config import BrokerSettings, StoreSettings  # noqa: E402
from aggregator.mqtt import Delivery, Session  # noqa: E402
from aggregator.store import Store  # noqa: E402
from firmware_agent.contract.messages import public_key_text  # noqa: E402
from tests.support.agent_fleet import fleet_broker, make_agents  # noqa: E402
from tests.support.mqtt_broker import HOST, READER, Mosquitto, TestCertificates, find_mosquitto  # noqa: E402

SHARE = "$share/bench/footfall/v1/+/+/counts"
CLI = str(Path(sys.executable).with_name("footfall-aggregator"))
EXTRA_SETTINGS: list[str] = []


@dataclass
class Result:
    label: str
    messages: int
    seconds: float
    split: dict[str, float] | None = None
    cpu_s: float = 0.0  # ingest processes' CPU time (user + system)

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds else 0.0


class FleetProcess:
    """``python -m tests.support.agent_fleet`` in a process of its own (it would steal the GIL)."""

    def __init__(self, port: int, agents: int, windows: int, seed: str) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.support.agent_fleet",
                "--port",
                str(port),
                "--agents",
                str(agents),
                "--windows",
                str(windows),
                "--seed",
                seed,
            ],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None and self.process.stdin is not None
        line = self.process.stdout.readline()
        if not line.startswith("ready"):
            raise SystemExit(f"fleet did not start: {line!r}")
        self.total = int(line.split()[1])

    def go(self) -> float:
        assert self.process.stdin is not None
        started = time.monotonic()
        self.process.stdin.write("go\n")
        self.process.stdin.flush()
        return started

    def wait(self) -> None:
        self.process.communicate(timeout=600)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def receive_only(broker: Mosquitto, agents: int, windows: int, seed: str, client: str) -> Result:
    """Every message received and acknowledged at once, nothing else."""
    fleet = FleetProcess(broker.port, agents, windows, seed)
    total = fleet.total
    done = threading.Event()
    got = [0]
    if client == "paho":
        paho = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id="bench-paho",
            protocol=mqtt.MQTTv5,
            manual_ack=True,
        )
        paho.username_pw_set(*READER)
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = 600
        properties.ReceiveMaximum = 2000

        def on_message(c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
            c.ack(message.mid, message.qos)
            got[0] += 1
            if got[0] >= total:
                done.set()

        subscribed = threading.Event()
        paho.on_message = on_message
        paho.on_connect = lambda c, *_: c.subscribe(SHARE, qos=1)
        paho.on_subscribe = lambda *_: subscribed.set()
        paho.connect(HOST, broker.port, clean_start=False, properties=properties)
        paho.loop_start()
        subscribed.wait(10)
    else:

        def on_delivery(delivery: Delivery) -> None:
            session.ack([delivery])
            got[0] += 1
            if got[0] >= total:
                done.set()

        session = Session(
            BrokerSettings(HOST, broker.port, READER[0], READER[1]),
            client_id="bench-own",
            session_expiry_s=600,
            receive_maximum=2000,
            filters=[SHARE],
            on_message=on_delivery,
        )
        session.start()
        session.connected.wait(10)
    started = fleet.go()
    done.wait(300)
    elapsed = time.monotonic() - started
    fleet.wait()
    if client == "paho":
        paho.disconnect()
        paho.loop_stop()
    else:
        session.stop()
    name = "paho-mqtt 2.2" if client == "paho" else "aggregator.mqtt"
    return Result(f"receive only, {name}", got[0], elapsed)


def mosquitto_toml(broker: Mosquitto) -> str:
    """The [broker] section of the aggregator's config for a bench Mosquitto."""
    return (
        f'[broker]\nhost = "{HOST}"\nport = {broker.port}\nusername = "{READER[0]}"\n'
        f'password = "{READER[1]}"\n'
    )


def ingest(
    root: Path,
    broker: Mosquitto | tuple[str, int],
    dsn: str,
    schema: str,
    agents: int,
    windows: int,
    seed: str,
    processes: int,
    label: str,
    ready: str = "connected to broker",
) -> Result:
    """One run; ``broker`` is a Mosquitto or (the [broker] section, the agents' MQTT port);
    ingest is up when each process's log says ``ready``."""
    broker_toml, port = (
        (mosquitto_toml(broker), broker.port) if isinstance(broker, Mosquitto) else broker
    )
    sims = make_agents(agents, seed=seed)
    settings = StoreSettings(dsn, schema, 0)
    with Store.open(settings) as store:
        store.add_site("s1", "bench", "Europe/Paris", 0)
        store.add_agents("s1", {a.agent: public_key_text(a.key) for a in sims}, 0)
    config = root / f"aggregator-{uuid.uuid4().hex[:6]}.toml"
    config.write_text(
        f'[store]\ndsn = "{dsn}"\nschema = "{schema}"\nretention_days = 0\n'
        f'data_dir = "{root}"\n'
        + broker_toml
        + '[ingest]\nshare_group = "bench"\nlog_interval_s = 3600\n'
    )
    logs = [root / f"ingest-{uuid.uuid4().hex[:6]}.log" for _ in range(processes)]
    procs = [
        subprocess.Popen(
            [
                CLI,
                "ingest",
                "--config",
                str(config),
                "--set",
                f"ingest.client_id=bench-{i}",
                *(f"--set={x}" for x in EXTRA_SETTINGS),
            ],
            stderr=log.open("w"),
        )
        for i, log in enumerate(logs)
    ]
    deadline = time.monotonic() + 30
    while not all(ready in log.read_text() for log in logs):
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            raise SystemExit("ingest did not start:\n" + "\n".join(p.read_text() for p in logs))
        time.sleep(0.05)
    time.sleep(0.5)  # the SUBACKs
    fleet = FleetProcess(port, agents, windows, seed)
    engine = Store(settings).engine
    count = sa.text("SELECT count(*) FROM windows")
    cpu_before = sum(_cpu_seconds(proc.pid) for proc in procs)  # start-up not counted
    started = fleet.go()
    stored = 0
    with engine.connect() as conn:
        while stored < fleet.total and time.monotonic() - started < 600:
            time.sleep(0.1)
            stored = conn.execute(count).scalar_one()
            conn.rollback()
    elapsed = time.monotonic() - started
    engine.dispose()
    fleet.wait()
    cpu = sum(_cpu_seconds(proc.pid) for proc in procs) - cpu_before
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        proc.wait(30)
    split = {"parse": 0.0, "signatures": 0.0, "database": 0.0}
    for log in logs:
        found = re.findall(
            r"time: parse ([\d.]+) s, signatures ([\d.]+) s, database ([\d.]+) s", log.read_text()
        )
        if found:
            for name, value in zip(split, found[-1], strict=True):
                split[name] += float(value)
    return Result(label, stored, elapsed, split, cpu)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=200)
    parser.add_argument("--windows", type=int, default=100)
    parser.add_argument("--backlog-agents", type=int, default=1000)
    parser.add_argument("--backlog-windows", type=int, default=100)
    parser.add_argument("--pg", default=os.environ.get("FOOTFALL_TEST_PG_DSN", ""))
    parser.add_argument("--no-pg", action="store_true")
    parser.add_argument("--processes", default="1,2", help="ingest processes to try")
    parser.add_argument("--set", action="append", default=[], help="ingest setting NAME=VALUE")
    parser.add_argument("--only", default="", help="run only rows whose label has this text")
    args = parser.parse_args()
    EXTRA_SETTINGS.extend(args.set)
    pg = "" if args.no_pg else (args.pg or "postgresql://postgres@127.0.0.1:5432/test")
    binary = find_mosquitto()
    if binary is None:
        raise SystemExit("mosquitto is not installed (apt-get install mosquitto)")
    load_before = os.getloadavg()[0]
    root = Path(tempfile.mkdtemp(prefix="footfall-bench-ingest-"))
    certs = TestCertificates.make(root / "certs")
    results: list[Result] = []
    run = 0

    def broker_for(agents: int, seed: str) -> Mosquitto:
        nonlocal run
        run += 1
        broker = fleet_broker(binary, root / f"broker{run}", certs, make_agents(agents, seed=seed))
        broker.start()
        return broker

    def database(kind: str) -> tuple[str, str]:
        if kind == "sqlite":
            return f"sqlite:///{root / f'db{uuid.uuid4().hex[:8]}.sqlite3'}", ""
        return pg, f"bench_{uuid.uuid4().hex[:8]}"

    schemas: list[str] = []
    try:
        n = args.agents * args.windows
        for client in ("paho", "own"):
            broker = broker_for(args.agents, "bench")
            results.append(receive_only(broker, args.agents, args.windows, "bench", client))
            broker.kill()
        kinds = ["sqlite"] + (["postgresql"] if pg else [])
        for kind in kinds:
            for processes in (int(p) for p in args.processes.split(",")):
                dsn, schema = database(kind)
                schemas.append(schema)
                broker = broker_for(args.agents, "bench")
                name = "SQLite" if kind == "sqlite" else "PostgreSQL"
                label = f"ingest -> {name}, {processes} process{'es' if processes > 1 else ''}"
                results.append(
                    ingest(
                        root,
                        broker,
                        dsn,
                        schema,
                        args.agents,
                        args.windows,
                        "bench",
                        processes,
                        label,
                    )
                )
                broker.kill()
        for kind in kinds:
            processes = max(int(p) for p in args.processes.split(","))
            dsn, schema = database(kind)
            schemas.append(schema)
            broker = broker_for(args.backlog_agents, "backlog")
            name = "SQLite" if kind == "sqlite" else "PostgreSQL"
            results.append(
                ingest(
                    root,
                    broker,
                    dsn,
                    schema,
                    args.backlog_agents,
                    args.backlog_windows,
                    "backlog",
                    processes,
                    f"backlog: {args.backlog_agents} agents x {args.backlog_windows} -> {name}, "
                    f"{processes} process{'es' if processes > 1 else ''}",
                )
            )
            broker.kill()
    finally:
        if pg:
            engine = sa.create_engine(pg.replace("postgresql://", "postgresql+psycopg://", 1))
            with engine.begin() as conn:
                for schema in filter(None, schemas):
                    conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            engine.dispose()
        shutil.rmtree(root, ignore_errors=True)

    baseline = next(r for r in results if "aggregator.mqtt" in r.label)
    print(
        f"\n{n:,} messages ({args.agents} agents x {args.windows} windows), Mosquitto on "
        "loopback, QoS 1, 2 cores shared by broker, agents, ingest and database; load "
        f"average {load_before:.2f} before the runs (others' work on the machine slows every "
        "row, the receive-only baselines too)\n"
    )
    w = max(len(r.label) for r in results)
    widths = (w, 8, 7, 7, 15, 17)
    head = ("run", "messages", "seconds", "msg/s", "vs receive only", "ingest CPU µs/msg")
    print(
        "| "
        + " | ".join(
            h.ljust(n) if i == 0 else h.rjust(n)
            for i, (h, n) in enumerate(zip(head, widths, strict=True))
        )
        + " |"
    )
    print(
        "|"
        + "|".join("-" * (n + 2) if i == 0 else "-" * (n + 1) + ":" for i, n in enumerate(widths))
        + "|"
    )
    for r in results:
        cpu = f"{r.cpu_s / r.messages * 1e6:,.0f}" if r.cpu_s and r.messages else "-"
        print(
            f"| {r.label:<{w}} | {r.messages:>8,} | {r.seconds:>7.2f} | {r.rate:>7,.0f} | "
            f"{r.rate / baseline.rate:>15.2f} | {cpu:>17} |"
        )
    print("\nWhere ingest's worker spent its time (shares of parse + signatures + database):\n")
    print(f"| {'run':<{w}} | {'JSON, schema, topic':>19} | {'signatures':>10} | {'database':>8} |")
    print(f"|{'-' * (w + 2)}|{'-' * 20}:|{'-' * 11}:|{'-' * 9}:|")
    for r in results:
        if r.split:
            busy = sum(r.split.values()) or 1.0
            parse, sig, db = (r.split[k] / busy for k in ("parse", "signatures", "database"))
            print(f"| {r.label:<{w}} | {parse:>19.0%} | {sig:>10.0%} | {db:>8.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
