"""The fault matrix at size: every fault of ``tests/support/delivery.py`` with many thousand
windows,
PostgreSQL gone for a minute; the table of docs/aggregator.md.

Each fault runs on a rig of its own (``tests/support/delivery.py``): a Mosquitto started by the
bench,
PostgreSQL in a schema of its own (reached through a link that can play it stopped), ingest as
the real command, and ``--agents`` agents (the agent's own publisher and spool, with receipts)
making ``--windows`` windows each, ``--rate`` a second each. A row: windows the agents made,
windows stored, lost, stored twice, the seconds from the agents' start until every spool was
empty, and whether the agents' health (``agents list``) counted the missing windows right while
the fault lasted. The baseline is the same run with agents without receipts (a window leaves
the spool on the broker's PUBACK) for the broker crash while ingest is away: what receipts fix.

Usage: ``python bench/bench_delivery.py [--agents 10 --windows 1000 --rate 200]
[--outage 5 --db-outage 60] [--only TEXT] [--pg DSN]``; PostgreSQL from ``--pg``, else
``FOOTFALL_TEST_PG_DSN``, else the local server.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the rig of the tests

from aggregator.config import StoreSettings  # noqa: E402
from tests.support.aggregator_harness import drop_schema  # noqa: E402
from tests.support.delivery import (  # noqa: E402
    FAULTS,
    Rig,
    broker_killed_while_ingest_away,
    database_link,
)
from tests.support.mqtt_broker import TestCertificates, find_mosquitto  # noqa: E402

BASELINE = "broker kill -9, ingest away, agents without receipts (PUBACK)"


def run(
    fault: str,
    root: Path,
    binary: str,
    certs: TestCertificates,
    dsn: str,
    args: argparse.Namespace,
) -> str:
    schema = f"ff_bench_delivery_{uuid.uuid4().hex[:8]}"
    link = database_link(dsn)
    rig = Rig.make(
        root / uuid.uuid4().hex[:8], binary, certs, StoreSettings(dsn, schema),
        agents=args.agents, windows=args.windows, rate=args.rate, db_link=link,
        amqtt="amqtt" in fault,
    )  # fmt: skip
    started = time.monotonic()
    try:
        if fault == BASELINE:
            right = broker_killed_while_ingest_away(rig, 0, receipts=False)
            rig.agents_done(600)
            time.sleep(3)  # what the restarted broker still had would arrive now
        else:
            outage = args.db_outage if fault == "PostgreSQL stopped" else args.outage
            right = FAULTS[fault](rig, outage)
            if "agents" in rig.processes:
                rig.agents_done(1800)
        seconds = time.monotonic() - started
        outcome = rig.outcome()
    finally:
        rig.stop()
        link.close()
        drop_schema(dsn, schema)
    return outcome.row(fault, seconds) + f" {'yes' if right else 'no'} |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=10)
    parser.add_argument("--windows", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=200, help="windows a second per agent")
    parser.add_argument("--outage", type=float, default=5, help="s: ingest, agents, network")
    parser.add_argument("--db-outage", type=float, default=60, help="s: PostgreSQL stopped")
    parser.add_argument("--pg", default=os.environ.get("FOOTFALL_TEST_PG_DSN", ""))
    parser.add_argument("--only", default="", help="run only faults whose name has this text")
    args = parser.parse_args()
    binary = find_mosquitto()
    if binary is None:
        print("bench_delivery needs mosquitto (apt-get install mosquitto)", file=sys.stderr)
        return 1
    dsn = args.pg or "postgresql://postgres@127.0.0.1:5432/test"
    root = Path(tempfile.mkdtemp(prefix="footfall-bench-delivery-"))
    certs = TestCertificates.make(root / "certs")
    load = os.getloadavg()[0]
    print(
        f"{args.agents} agents x {args.windows} windows, {args.rate:g} a second each; outages "
        f"{args.outage:g} s, PostgreSQL {args.db_outage:g} s; load average {load:.1f} before "
        "the runs (others' work on the machine slows every row)\n"
    )
    print("| fault | windows sent | stored | lost | stored twice | seconds | health right |")
    print("|---|---:|---:|---:|---:|---:|---|")
    try:
        for fault in [*FAULTS, BASELINE]:
            if args.only and args.only not in fault:
                continue
            print(run(fault, root, binary, certs, dsn, args), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
