"""How big PostgreSQL's tables get, per row, and how fast the store writes: the measured input
of docs/aggregator.md's scale table.

Stores a day of windows (288 per agent) of simulated agents (tests/support/agent_fleet.py: real
signed
counts, verified by the aggregator's own verifier) with :meth:`Store.store_batch`, 500 per
transaction as ingest does, in a schema of its own (dropped afterwards); then prints the rows
and the bytes per row of ``windows`` and the roll-ups, as written and after ``VACUUM FULL``
(a roll-up row is updated by every window of its hour or day: dead versions until vacuum).

Usage: ``python bench/bench_store_size.py [--agents 200] [--pg DSN]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the fleet of the tests

import sqlalchemy as sa  # noqa: E402

from aggregator.config import StoreSettings  # noqa: E402
from aggregator.store import Store  # noqa: E402
from aggregator.verify import Accepted, Verifier  # noqa: E402
from tests.support.agent_fleet import START, fleet_messages, make_agents  # noqa: E402

TABLES = ("windows", "agent_hours", "agent_days", "site_hours", "site_days")


def sizes(store: Store, schema: str) -> dict[str, tuple[int, int]]:
    """(rows, bytes with indexes) per table."""
    out = {}
    with store.engine.connect() as conn:
        for table in TABLES:
            name = f'"{schema}".{table}'
            rows = conn.execute(sa.text(f"SELECT count(*) FROM {name}")).scalar_one()
            size = conn.execute(sa.text(f"SELECT pg_total_relation_size('{name}')")).scalar_one()
            out[table] = (int(rows), int(size))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=200)
    parser.add_argument("--pg", default=os.environ.get("FOOTFALL_TEST_PG_DSN", ""))
    args = parser.parse_args()
    dsn = args.pg or "postgresql://postgres@127.0.0.1:5432/test"
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    agents = make_agents(args.agents, "s1", seed="size")
    fleet_messages(agents, 288)
    settings = StoreSettings(dsn, schema, 0)
    try:
        with Store.open(settings) as store:
            store.add_site("s1", "bench", "Europe/Paris", 0)
            store.add_agents("s1", {a.agent: a.public_key for a in agents}, 0)
            registry, verifier = store.registry(), Verifier(65536)
            checked = [
                verifier.check(a.topic, m, registry, START + 2 * 86400)
                for i in range(288)
                for a in agents
                for m in (a.messages[i],)
            ]
            accepted = [c for c in checked if isinstance(c, Accepted)]
            assert len(accepted) == len(checked), "the verifier refused a simulated window"
            started = time.perf_counter()
            for i in range(0, len(accepted), 500):
                store.store_batch(accepted[i : i + 500], Counter(), int(time.time()))
            elapsed = time.perf_counter() - started
            written = sizes(store, schema)
            with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                for table in TABLES:
                    conn.exec_driver_sql(f'VACUUM FULL "{schema}".{table}')
            vacuumed = sizes(store, schema)
    finally:
        engine = sa.create_engine(dsn.replace("postgresql://", "postgresql+psycopg://", 1))
        with engine.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        engine.dispose()
    print(
        f"\n{len(accepted):,} windows ({args.agents} agents x 288, one day) stored in "
        f"{elapsed:.1f} s: {len(accepted) / elapsed:,.0f} windows/s, one process, 500 per "
        f"transaction; load average {os.getloadavg()[0]:.2f}\n"
    )
    print("| table | rows | bytes per row as written | after VACUUM FULL |")
    print("|---|---:|---:|---:|")
    for table in TABLES:
        rows, size = written[table]
        print(f"| {table} | {rows:,} | {size / rows:,.0f} | {vacuumed[table][1] / rows:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
