"""Benchmark: sustained ingest through a 3-node NATS JetStream cluster against the Mosquitto
path, in the same run, into PostgreSQL.

Each row is :func:`bench_ingest.ingest`: the agents are a :class:`tests.support.agent_fleet.Fleet`
in a
process of its own (one MQTT 3.1.1 connection per simulated agent, real Ed25519-signed counts
at QoS 1), ingest is the real ``footfall-aggregator ingest`` with 1, 2 and 4 processes, and a
run counts from the fleet's first message to the last window committed.

* ``Mosquitto``: one Mosquitto, a shared subscription (``ingest.share_group``);
* ``JetStream``: a fresh 3-node cluster (tests/support/nats_cluster.py) per row, the agents on node
  1's MQTT listener, ingest with ``broker.kind = "jetstream"`` and streams of 3 replicas: each
  window is written by the leader and copied to two followers before the consumer hands it on.

Everything runs on one machine (2 cores shared by the brokers, the agents, ingest and
PostgreSQL, and by other people's work): the numbers compare the paths, they do not size a
production cluster.

Usage: ``python bench/bench_jetstream.py [--agents 1000 --windows 20 --processes 1,2,4]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

import sqlalchemy as sa
from bench_ingest import Result, ingest  # puts the repository on sys.path

from tests.support.agent_fleet import fleet_broker, make_agents
from tests.support.mqtt_broker import TestCertificates, find_mosquitto
from tests.support.nats_cluster import AGGREGATOR, NatsCluster, Ports


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--processes", default="1,2,4")
    parser.add_argument("--pg", default=os.environ.get("FOOTFALL_TEST_PG_DSN", ""))
    args = parser.parse_args()
    pg = args.pg or "postgresql://postgres@127.0.0.1:5432/test"
    binary = find_mosquitto()
    if binary is None:
        raise SystemExit("mosquitto is not installed (apt-get install mosquitto)")
    load_before = os.getloadavg()[0]
    root = Path(tempfile.mkdtemp(prefix="footfall-bench-jetstream-"))
    certs = TestCertificates.make(root / "certs")
    agents = make_agents(args.agents, seed="bench")
    ports = Ports()
    results: list[tuple[str, int, Result]] = []
    schemas: list[str] = []
    try:
        for processes in (int(p) for p in args.processes.split(",")):
            for kind in ("Mosquitto", "JetStream"):
                schema = f"bench_{uuid.uuid4().hex[:8]}"
                schemas.append(schema)
                run = root / f"{kind}-{processes}"
                plural = "es" if processes > 1 else ""
                label = f"{kind}, {processes} ingest process{plural}"
                if kind == "Mosquitto":
                    broker = fleet_broker(binary, run, certs, agents)
                    broker.start()
                    try:
                        result = ingest(
                            root, broker, pg, schema, args.agents, args.windows, "bench",
                            processes, label,
                        )  # fmt: skip
                    finally:
                        broker.kill()
                else:
                    cluster = NatsCluster(run, agents, ports)
                    cluster.start()
                    toml = (
                        f'[broker]\nkind = "jetstream"\nservers = "{cluster.servers}"\n'
                        f'username = "{AGGREGATOR[0]}"\npassword = "{AGGREGATOR[1]}"\n'
                        "stream_replicas = 3\n"
                    )
                    try:
                        result = ingest(
                            root, (toml, cluster.mqtt_ports[0]), pg, schema, args.agents,
                            args.windows, "bench", processes, label,
                            ready="consuming FOOTFALL_COUNTS",
                        )  # fmt: skip
                    finally:
                        cluster.stop()
                results.append((kind, processes, result))
                print(f"{label}: {result.rate:,.0f} msg/s", file=sys.stderr)
    finally:
        engine = sa.create_engine(pg.replace("postgresql://", "postgresql+psycopg://", 1))
        with engine.begin() as conn:
            for schema in schemas:
                conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        engine.dispose()
        shutil.rmtree(root, ignore_errors=True)

    n = args.agents * args.windows
    print(
        f"\n{n:,} signed windows ({args.agents:,} agents x {args.windows}), MQTT 3.1.1 QoS 1 "
        "from the agents, PostgreSQL; 2 cores shared by brokers, agents, ingest and database, "
        f"and by other engineers' work (load average {load_before:.2f} before the runs)\n"
    )
    print("| ingest processes | Mosquitto msg/s | JetStream (3 nodes, R3) msg/s | ratio |")
    print("|---:|---:|---:|---:|")
    for processes in sorted({p for _, p, _ in results}):
        row = {kind: r for kind, p, r in results if p == processes}
        mosq, js = row["Mosquitto"].rate, row["JetStream"].rate
        print(f"| {processes} | {mosq:,.0f} | {js:,.0f} | {js / mosq:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
