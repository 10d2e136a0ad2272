"""Fixtures for the aggregator's tests: a store on SQLite and on PostgreSQL, enrolled agents.

``store_settings`` is parametrised: every test that takes it runs once on a SQLite file and once
on PostgreSQL, in a schema of its own (``ff_test_<random>``, dropped afterwards), so that runs
in parallel or left over from before never meet. PostgreSQL comes from ``FOOTFALL_TEST_PG_DSN``
(``.ci/run`` sets it, after checking the server answers); without it those runs skip, saying
why.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import nacl.signing
import pytest
import sqlalchemy as sa

from aggregator.config import StoreSettings
from aggregator.store import Store
from firmware_agent.contract.messages import (
    AgentId,
    SiteId,
    counts_payload,
    public_key_text,
    seal,
)

PG_DSN = os.environ.get("FOOTFALL_TEST_PG_DSN", "")
NO_PG = (
    "FOOTFALL_TEST_PG_DSN is not set: the PostgreSQL runs need a server "
    "(e.g. postgresql://postgres@127.0.0.1:5432/test; .ci/run sets it)"
)


def pg_dsn() -> str:
    """The test server's DSN; skips the test when there is none."""
    if not PG_DSN:
        pytest.skip(NO_PG)
    return PG_DSN


def drop_schema(dsn: str, schema: str) -> None:
    url = dsn.replace("postgresql://", "postgresql+psycopg://", 1)
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    engine.dispose()


@pytest.fixture
def pg_schema() -> Iterator[tuple[str, str]]:
    """(DSN, a fresh schema name) on the test PostgreSQL; the schema is dropped afterwards."""
    dsn = pg_dsn()
    schema = f"ff_test_{uuid.uuid4().hex[:10]}"
    yield dsn, schema
    drop_schema(dsn, schema)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreSettings]:
    """Settings of an empty store, once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        yield StoreSettings(f"sqlite:///{tmp_path / 'aggregator.sqlite3'}")
        return
    dsn = pg_dsn()
    schema = f"ff_test_{uuid.uuid4().hex[:10]}"
    yield StoreSettings(dsn, schema)
    drop_schema(dsn, schema)


@pytest.fixture
def store(store_settings: StoreSettings) -> Iterator[Store]:
    """A migrated, empty store (SQLite, then PostgreSQL)."""
    with Store.open(store_settings) as opened:
        yield opened


class Agent:
    """An enrollable agent: ids and a signing key; seals counts as the real one does."""

    def __init__(self, site: str = "s1", agent: str = "a1") -> None:
        self.site, self.agent = site, agent
        self.key = nacl.signing.SigningKey.generate()

    @property
    def public_key(self) -> str:
        return public_key_text(self.key)

    @property
    def topic(self) -> str:
        return f"footfall/v1/{self.site}/{self.agent}/counts"

    def counts(self, seq: int, window_start: str, **fields: object) -> bytes:
        window: dict[str, object] = {
            "window_start": window_start,
            "window_s": 300,
            "probe_requests": 96,
            "malformed": 0,
            "late_frames": 0,
            "devices": 11,
            "devices_randomised": 3,
            "visitors": 8,
            "passersby": 3,
            "visits_ended": 18,
            "dwell_minutes": {"lt5": 5, "5-15": 5, "15-30": 1, "30-60": 1, "ge60": 6},
            "devices_epoch": 289,
        } | fields
        payload = counts_payload(
            SiteId(self.site), AgentId(self.agent), seq, "9f3c1a7e52b04d68", window, version=1
        )
        return seal(payload, self.key)


def refuse_seq_666(store: Store) -> None:
    """A constraint of the database's own, ``no_666``, that refuses one message (seq 666) and
    no other: what ingest must quarantine on its own while it stores the rest."""
    with store.begin() as conn:
        if store.dialect == "postgresql":
            conn.exec_driver_sql("ALTER TABLE windows ADD CONSTRAINT no_666 CHECK (seq <> 666)")
        else:
            conn.exec_driver_sql(
                "CREATE TRIGGER no_666 BEFORE INSERT ON windows WHEN NEW.seq = 666 "
                "BEGIN SELECT RAISE(ABORT, 'no_666: seq 666 refused'); END"
            )


def stored_seqs(store: Store, site: str, agent: str) -> list[int]:
    """The seqs of an agent's stored windows, in order."""
    with store.begin(read_only=True) as conn:
        return list(
            conn.execute(
                sa.text(
                    "SELECT w.seq FROM windows w JOIN agents a ON a.agent_key = w.agent_key "
                    "WHERE a.site_id = :site AND a.agent_id = :agent ORDER BY w.seq"
                ),
                {"site": site, "agent": agent},
            ).scalars()
        )
