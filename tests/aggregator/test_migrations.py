"""Alembic migrations: a store made at the first revision, with data in it, upgraded to the
newest keeps its data and ends with exactly the schema a store made fresh has; downgraded, it
goes back revision by revision, to nothing. On SQLite and on PostgreSQL (``store_settings``)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from aggregator.config import StoreSettings
from aggregator.query import Counts
from aggregator.store import Store
from tests.support.agent_fleet import WINDOW
from tests.support.aggregator_harness import drop_schema

FIRST = "0001"
HOUR = 1_730_000_000 - 1_730_000_000 % 3600  # 2024-10-27T03:00Z, 04:00 in Paris


def schema_of(store: Store) -> dict[str, Any]:
    """Tables, their columns (type, nullability, default), keys, unique constraints and
    indexes, as SQLAlchemy's inspection sees them; column order aside (a column added later
    comes last)."""
    with store.engine.connect() as conn:
        inspector = sa.inspect(conn)
        out: dict[str, Any] = {}
        for table in sorted(inspector.get_table_names()):
            pk = inspector.get_pk_constraint(table)
            out[table] = {
                "columns": {
                    c["name"]: (str(c["type"]), c["nullable"], c.get("default"))
                    for c in inspector.get_columns(table)
                },
                "primary key": (pk.get("name"), tuple(pk["constrained_columns"])),
                "foreign keys": sorted(
                    (
                        fk.get("name") or "",
                        tuple(fk["constrained_columns"]),
                        fk["referred_table"],
                        tuple(fk["referred_columns"]),
                    )
                    for fk in inspector.get_foreign_keys(table)
                ),
                "unique": sorted(
                    (u.get("name") or "", tuple(u["column_names"]))
                    for u in inspector.get_unique_constraints(table)
                ),
                "indexes": sorted(
                    (i.get("name") or "", tuple(map(str, i["column_names"])), i["unique"])
                    for i in inspector.get_indexes(table)
                ),
            }
    return out


@pytest.fixture
def fresh(store_settings: StoreSettings, tmp_path: Path) -> Iterator[Store]:
    """Another store, made at the newest revision, on the same kind of database."""
    if store_settings.schema:
        settings = StoreSettings(store_settings.dsn, f"ff_test_{uuid.uuid4().hex[:10]}")
    else:
        settings = StoreSettings(f"sqlite:///{tmp_path / 'fresh.sqlite3'}")
    with Store.open(settings) as store:
        yield store
    if settings.schema:
        drop_schema(settings.dsn, settings.schema)


def _fill_first_revision(store: Store) -> None:
    """A site, an agent, two windows with their roll-ups, a refusal: as revision 0001 had them."""
    tables = sa.MetaData()
    with store.begin() as conn:
        tables.reflect(conn)
        t = tables.tables
        conn.execute(
            t["sites"].insert(),
            {"id": "s1", "name": "Shop", "timezone": "Europe/Paris", "created_at": 1},
        )
        conn.execute(
            t["agents"].insert(),
            {"site_id": "s1", "agent_id": "a1", "public_key": "k" * 44, "enrolled_at": 1},
        )
        # A 0001-era row: the fleet's window as columns, its dwell bands flattened.
        counts = {key: value for key, value in WINDOW.items() if key != "dwell_minutes"} | {
            "epoch": "9f3c1a7e52b04d68",
            "visits_ended": 2,
            "devices_epoch": 40,
            "dwell_lt5": 1,
            "dwell_5_15": 1,
            "dwell_15_30": 0,
            "dwell_30_60": 0,
            "dwell_ge60": 0,
            "payload": "{}",
            "sig": "s" * 88,
            "received_at": HOUR + 600,
        }
        conn.execute(
            t["windows"].insert(),
            [
                {"agent_key": 1, "seq": seq, "window_start": HOUR + 300 * (seq - 1), **counts}
                for seq in (1, 2)
            ],
        )
        sums = {"windows": 2, "devices_sum": 22, "visitors_sum": 16, "passersby_sum": 6}
        hour = {"hour_start": HOUR, "local_hour": "2024-10-27T03:00", "utc_offset_s": 3600}
        day = {"local_day": "2024-10-27", "day_start": HOUR - 4 * 3600, "day_hours": 25}
        conn.execute(t["site_hours"].insert(), {"site_id": "s1", **hour, **sums})
        conn.execute(t["site_days"].insert(), {"site_id": "s1", **day, **sums})
        conn.execute(t["agent_hours"].insert(), {"agent_key": 1, **hour, **sums})
        conn.execute(t["agent_days"].insert(), {"agent_key": 1, **day, **sums})
        conn.execute(
            t["refusals"].insert(),
            {
                "reason": "bad_signature",
                "site_id": "s1",
                "agent_id": "a1",
                "count": 3,
                "first_at": 1,
                "last_at": 2,
            },
        )


def test_upgrading_from_the_first_revision_keeps_the_data_and_equals_a_fresh_schema(
    store_settings: StoreSettings, fresh: Store
) -> None:
    with Store.open(store_settings, migrate=False) as store:
        assert store.migrate(FIRST) == FIRST
        _fill_first_revision(store)
        head = store.migrate()
        assert head == fresh.migrate()
        assert schema_of(store) == schema_of(fresh)

        counts = Counts(store)
        site = counts.site("s1")
        (hour,) = counts.hours(site, date(2024, 10, 27), date(2024, 10, 27))
        assert hour["local"] == "2024-10-27T03:00"
        assert (hour["windows"], hour["visitors"], hour["devices"], hour["passersby"]) == (
            2,
            16,
            22,
            6,
        )
        assert hour["visitors_suppressed"] == 0
        assert hour["visits_ended"] == 0  # carried by both windows (0002): published, 0
        (health,) = store.agents("s1")
        assert (health.windows, health.last_seq, health.missing) == (2, 2, 0)
        # 0005 (counts v2): every window stored before stays, as v1; its hours say so.
        assert health.counts_v is None
        with store.begin() as conn:
            kept = conn.exec_driver_sql("SELECT count(*), min(v), max(v) FROM windows").one()
            assert tuple(kept) == (2, 1, 1)
            assert conn.exec_driver_sql("SELECT v1_windows FROM site_hours").scalar() == 2
        assert store.refusal_counts() == {("bad_signature", "s1", "a1"): 3}

        assert store.migrate(FIRST, downgrade=True) == FIRST
        with store.begin() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM windows").scalar() == 2
            assert "users" not in sa.inspect(conn).get_table_names()
        assert store.migrate("base", downgrade=True) == ""
        assert set(schema_of(store)) == {"alembic_version"}
        assert store.migrate() == head
        assert schema_of(store) == schema_of(fresh)
