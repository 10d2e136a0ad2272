"""The aggregator's store: registry, windows, roll-ups and agent health, in SQLite or PostgreSQL.

SQLAlchemy Core 2; the schema is made and moved forward by Alembic (``aggregator/migrations``),
run by :meth:`Store.migrate` at every start (and by ``footfall-aggregator migrate``) under a
lock, so several processes may start together. SQLite (WAL, ``synchronous=FULL``, every write
transaction ``BEGIN IMMEDIATE``) is the default, a file in the data directory; PostgreSQL
(psycopg 3) is chosen by a ``postgresql://`` DSN, optionally in a schema of its own.

Tables::

    sites           id, name, timezone
    agents          agent_key, site_id, agent_id, public_key, enrolled/revoked, health
                    (last seen, status, spool), last meta, retention cutoff
    registry_state  a version bumped by every enrolment, revocation and prune
    windows         one row per stored counts message: (agent_key, seq) and
                    (agent_key, window_start) unique; every count the schema defines as a
                    column (SQL NULL when suppressed or absent; ``suppressed`` has a bit per
                    suppressed one, :data:`NULLABLE_COLUMNS` order), and the payload's
                    canonical JSON and signature as received
    agent_hours     roll-ups by agent and local hour, agent and local day, site and local
    agent_days      hour, site and local day (aggregator.rollup); they stay when retention
    site_hours      deletes the windows
    site_days       (a site row's people figures are its busiest agent's: BUSIEST)
    refusals        messages not stored, by reason, site and agent: count, first, last
                    (an agent that is not enrolled is counted as agent '', and a site
                    without an enrolled agent as site '': rows do not grow with made-up ids)
    quarantine      messages whose verification or storage failed on them alone: reason,
                    error, digest, size (the text only of verified ones), newest kept
    receipts        per agent, the seq ranges settled (stored, skipped for good, or refused
                    for their content after their signature verified), as JSON
                    ``[[lo, hi], ...]``: what ingest's signed receipts tell the agent; and
                    the refused ones apart (health: received, not missing)
    users, grants,  accounts (aggregator.accounts): users with a role, the sites granted to
    sessions,       them, browser sessions and API tokens (SHA-256 of the secret at rest,
    api_tokens,     tokens with an expiry), login attempts by name and address and by
    login_attempts  address (the limiter's backoff)

Times are Unix seconds (integers) throughout.

Writing a batch (:meth:`Store.store_batch`) is one transaction: the new windows are bulk
loaded into a temporary staging table (PostgreSQL: ``COPY``; SQLite: ``executemany``) and
moved with one ``INSERT ... SELECT ... ON CONFLICT DO NOTHING RETURNING``, so a window already
stored (a redelivery, a replay) is skipped and only the windows really inserted are added to
the roll-ups, which are upserted the same way, in key order (two processes on PostgreSQL take
row locks in the same order, so they do not deadlock each other).

The same transaction adds the batch's seqs to each agent's settled ranges (``receipts``): a
window stored, or skipped for good (a duplicate, a conflicting seq, another window for the
same start), is settled, and the agent may let it go once a receipt says so. A window refused
for its content after its signature verified (:attr:`Refusal.settles`) is settled too, in the
transaction that quarantines it (:meth:`Store.quarantine`): re-sending it cannot change the
answer. A message whose signature did not verify settles nothing. An agent's ranges
stay few (one per run of windows; a gap is a window never received), and at most
:data:`MAX_SETTLED_RANGES` are kept: beyond, the lowest are forgotten, and a window the agent
still holds there is sent again, skipped as a duplicate, and settled again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql.elements import ColumnElement

from aggregator.config import StoreSettings, mask_dsn
from aggregator.errors import RegistryError, StoreError
from aggregator.registry import AgentEntry, Registry, noisy
from aggregator.rollup import (
    MAX_MEASURES,
    MEASURES,
    PEOPLE_COLUMNS,
    PEOPLE_COUNTS,
    SUPPRESSIBLE,
    Buckets,
    RollupDeltas,
    device_counts,
    people_counts,
    totals,
)
from aggregator.verify import Accepted
from firmware_agent.contract.errors import MessageError
from firmware_agent.contract.messages import AgentId, SiteId, public_key_text, verify_key_from_text

__all__ = [
    "AgentHealth",
    "BatchOutcome",
    "Gap",
    "SiteRow",
    "Store",
    "merge_ranges",
    "metadata",
]

log = logging.getLogger("footfall.aggregator")

MIGRATIONS = Path(__file__).with_name("migrations")
_NEVER = 1 << 62  # a time after every window (Unix s)
_PG_LOCK = 0x666F6F74  # pg_advisory_xact_lock key for migrations ("foot")

metadata = sa.MetaData()

sites = sa.Table(
    "sites",
    metadata,
    sa.Column("id", sa.String(63), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("timezone", sa.String(64), nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
)

agents = sa.Table(
    "agents",
    metadata,
    sa.Column("agent_key", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("site_id", sa.String(63), sa.ForeignKey("sites.id"), nullable=False),
    sa.Column("agent_id", sa.String(63), nullable=False),
    sa.Column("public_key", sa.String(44), nullable=False),
    sa.Column("enrolled_at", sa.BigInteger, nullable=False),
    sa.Column("revoked_at", sa.BigInteger),
    sa.Column("pruned_before", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("last_seen_at", sa.BigInteger),
    sa.Column("status_state", sa.String(8)),
    sa.Column("status_cause", sa.String(16)),
    sa.Column("status_at", sa.BigInteger),
    sa.Column("spool_pending", sa.BigInteger),
    sa.Column("spool_dropped", sa.BigInteger),
    sa.Column("status_last_seq", sa.BigInteger),
    sa.Column("meta", sa.Text),
    sa.Column("meta_at", sa.BigInteger),
    sa.Column("counts_v", sa.SmallInteger),  # the schema version of its latest counts (0005)
    sa.UniqueConstraint("site_id", "agent_id", name="uq_agents_site_agent"),
)

registry_state = sa.Table(
    "registry_state",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("version", sa.BigInteger, nullable=False),
)

# Counts fields stored as columns (the roll-ups' inputs); the rest stays in `payload`.
COUNT_COLUMNS = ("probe_requests", "malformed", "late_frames")
# Device counts: NULL when suppressed (its bit set in `suppressed`) or absent (bit clear).
NULLABLE_COLUMNS = (*SUPPRESSIBLE, "static_excluded")


def _window_columns() -> list[sa.Column[Any]]:
    return [
        sa.Column("agent_key", sa.Integer, nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("window_start", sa.BigInteger, nullable=False),
        sa.Column("window_s", sa.Integer, nullable=False),
        sa.Column("epoch", sa.String(16), nullable=False),
        *(sa.Column(name, sa.BigInteger, nullable=False) for name in COUNT_COLUMNS),
        *(sa.Column(name, sa.BigInteger) for name in NULLABLE_COLUMNS),
        sa.Column("suppressed", sa.Integer, nullable=False, server_default="0"),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("sig", sa.String(88), nullable=False),
        sa.Column("received_at", sa.BigInteger, nullable=False),
        # Counts v2 (0005): the schema version, no data, calibration, the people-level figures
        # (NULL when suppressed, absent or no data; ``people_suppressed`` has a bit per
        # suppressed one, :data:`PEOPLE_COLUMNS` order). A v1 window has them NULL.
        sa.Column("v", sa.SmallInteger, nullable=False, server_default="1"),
        sa.Column("no_data", sa.SmallInteger, nullable=False, server_default="0"),
        sa.Column("calibrated", sa.SmallInteger),
        *(sa.Column(name, sa.BigInteger) for name in PEOPLE_COLUMNS),
        sa.Column("people_suppressed", sa.Integer, nullable=False, server_default="0"),
    ]


windows = sa.Table(
    "windows",
    metadata,
    *_window_columns(),
    sa.PrimaryKeyConstraint("agent_key", "seq", name="pk_windows"),
    sa.UniqueConstraint("agent_key", "window_start", name="uq_windows_agent_start"),
    sa.ForeignKeyConstraint(["agent_key"], ["agents.agent_key"], name="fk_windows_agent"),
    # A day's reads by the site page (agents' health, capture rate) from the index alone.
    sa.Index(
        "ix_windows_day_reads",
        "agent_key",
        "window_start",
        "seq",
        "window_s",
        "visitors",
        "devices",
    ),
)
WINDOW_COLUMNS = tuple(c.name for c in windows.columns)
assert WINDOW_COLUMNS[5:23] == (*COUNT_COLUMNS, *NULLABLE_COLUMNS, "suppressed")


def _measure_columns() -> list[sa.Column[Any]]:
    return [sa.Column(name, sa.BigInteger, nullable=False, server_default="0") for name in MEASURES]


def _rollup_table(name: str, key: sa.Column[Any], period: str) -> sa.Table:
    when: list[sa.Column[Any]]
    if period == "hour":
        when = [
            sa.Column("hour_start", sa.BigInteger, nullable=False),
            sa.Column("local_hour", sa.String(16), nullable=False),
            sa.Column("utc_offset_s", sa.Integer, nullable=False),
        ]
    else:
        when = [
            sa.Column("local_day", sa.String(10), nullable=False),
            sa.Column("day_start", sa.BigInteger, nullable=False),
            sa.Column("day_hours", sa.Integer, nullable=False),
        ]
    return sa.Table(
        name,
        metadata,
        key,
        *when,
        *_measure_columns(),
        sa.PrimaryKeyConstraint(key.name, when[0].name, name=f"pk_{name}"),
    )


agent_hours = _rollup_table("agent_hours", sa.Column("agent_key", sa.Integer), "hour")
agent_days = _rollup_table("agent_days", sa.Column("agent_key", sa.Integer), "day")
site_hours = _rollup_table("site_hours", sa.Column("site_id", sa.String(63)), "hour")
site_days = _rollup_table("site_days", sa.Column("site_id", sa.String(63)), "day")
ROLLUPS = (agent_hours, agent_days, site_hours, site_days)
_HOURLY = {table.name: "hour_start" in table.c for table in ROLLUPS}

refusals = sa.Table(
    "refusals",
    metadata,
    sa.Column("reason", sa.String(32), nullable=False),
    sa.Column("site_id", sa.String(63), nullable=False),
    sa.Column("agent_id", sa.String(63), nullable=False),
    sa.Column("count", sa.BigInteger, nullable=False),
    sa.Column("first_at", sa.BigInteger, nullable=False),
    sa.Column("last_at", sa.BigInteger, nullable=False),
    sa.PrimaryKeyConstraint("reason", "site_id", "agent_id", name="pk_refusals"),
)

quarantine = sa.Table(
    "quarantine",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("received_at", sa.BigInteger, nullable=False),
    sa.Column("reason", sa.String(32), nullable=False),
    sa.Column("site_id", sa.String(63), nullable=False),
    sa.Column("agent_id", sa.String(63), nullable=False),
    sa.Column("topic", sa.String(200), nullable=False),
    sa.Column("error", sa.String(500), nullable=False),
    sa.Column("size", sa.Integer, nullable=False),
    sa.Column("digest", sa.String(64), nullable=False),
    sa.Column("message", sa.Text),
)
QUARANTINE_KEEP = 10_000  # rows: each quarantining deletes those before the newest 10,000

# Accounts (aggregator.accounts): users and their roles, grants of sites, browser sessions and
# API tokens (both hashed at rest; tokens expire), login attempts by name and address.
users = sa.Table(
    "users",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("password_hash", sa.String(200), nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("disabled_at", sa.BigInteger),
    sa.UniqueConstraint("name", name="uq_users_name"),
)
grants = sa.Table(
    "grants",
    metadata,
    sa.Column("user_id", sa.Integer, nullable=False),
    sa.Column("site_id", sa.String(63), nullable=False),
    sa.PrimaryKeyConstraint("user_id", "site_id", name="pk_grants"),
    sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_grants_user"),
    sa.ForeignKeyConstraint(["site_id"], ["sites.id"], name="fk_grants_site"),
)
sessions = sa.Table(
    "sessions",
    metadata,
    sa.Column("token_hash", sa.String(64), primary_key=True),
    sa.Column("user_id", sa.Integer, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("expires_at", sa.BigInteger, nullable=False),
    sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_sessions_user"),
)
api_tokens = sa.Table(
    "api_tokens",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("user_id", sa.Integer, nullable=False),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("token_hash", sa.String(64), nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("last_used_at", sa.BigInteger),
    sa.Column("revoked_at", sa.BigInteger),
    sa.Column("expires_at", sa.BigInteger, nullable=False),
    sa.UniqueConstraint("token_hash", name="uq_api_tokens_hash"),
    sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_api_tokens_user"),
)
receipts = sa.Table(
    "receipts",
    metadata,
    sa.Column("agent_key", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("settled", sa.Text, nullable=False),
    sa.Column("updated_at", sa.BigInteger, nullable=False),
    sa.Column("refused", sa.Text, nullable=False, server_default="[]"),
    sa.ForeignKeyConstraint(["agent_key"], ["agents.agent_key"], name="fk_receipts_agent"),
)
SPOOL_FILLING = 12  # windows waiting in an agent's spool: an hour of 5-minute windows
MAX_SETTLED_RANGES = 256  # per agent; beyond, the lowest are forgotten (module docstring)

login_attempts = sa.Table(
    "login_attempts",
    metadata,
    sa.Column("key", sa.String(200), primary_key=True),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("next_at", sa.BigInteger, nullable=False),
    sa.Column("last_at", sa.BigInteger, nullable=False),
    sa.Index("ix_login_attempts_last_at", "last_at"),
)

# Per-connection temporary staging tables: the same columns, no constraints.
_staging_metadata = sa.MetaData()


def _staging(table: sa.Table) -> sa.Table:
    return sa.Table(
        f"{table.name}_in",
        _staging_metadata,
        *(sa.Column(c.name, c.type) for c in table.columns),
        prefixes=["TEMPORARY"],
        postgresql_on_commit="DELETE ROWS",
    )


STAGING = {t.name: _staging(t) for t in (windows, *ROLLUPS)}


@dataclass(frozen=True, slots=True)
class SiteRow:
    id: str
    name: str
    timezone: str
    agents: int


@dataclass(frozen=True, slots=True)
class AgentHealth:
    """One agent's enrolment and health, as ``agents list`` shows it."""

    site: str
    agent: str
    public_key: str
    enrolled_at: int
    revoked_at: int | None
    last_seen_at: int | None
    state: str | None  # from its last status message: online / offline
    cause: str | None
    status_at: int | None
    spool_pending: int | None
    spool_dropped: int | None
    windows: int  # stored (within retention)
    first_window: int | None
    last_window: int | None
    last_seq: int | None
    missing: int  # windows the agent made that have not arrived (gaps in seq, and after)
    spool_filling: bool  # its last status said more than SPOOL_FILLING windows wait
    refused: int  # windows it sent, signed, that ingest refused for their content (settled)
    counts_v: int | None  # the counts schema of its latest window: 1 (devices only) or 2


@dataclass(frozen=True, slots=True)
class Gap:
    """Windows missing between two stored windows of one agent."""

    after_seq: int
    before_seq: int
    after_window: int
    before_window: int
    missing: int


@dataclass(slots=True)
class BatchOutcome:
    """What a batch did: the counts stored, and the messages skipped with their reason."""

    stored: list[Accepted] = field(default_factory=list)
    skipped: list[tuple[Accepted, str]] = field(default_factory=list)
    settled: set[int] = field(default_factory=set)  # agent keys whose receipt moved


def engine_url(settings: StoreSettings) -> sa.URL:
    """The SQLAlchemy URL of a DSN: PostgreSQL through psycopg 3, SQLite as given."""
    dsn = settings.dsn
    for prefix in ("postgresql://", "postgres://"):
        if dsn.startswith(prefix):
            dsn = "postgresql+psycopg://" + dsn.removeprefix(prefix)
    try:
        return sa.make_url(dsn)
    except sa.exc.ArgumentError as exc:
        raise StoreError(f"store.dsn is not a database URL: {mask_dsn(settings.dsn)!r}") from exc


def _make_engine(settings: StoreSettings, *, writer: bool = True) -> Engine:
    """The engine; on SQLite, a ``writer`` begins every transaction ``IMMEDIATE`` (taking the
    write lock at once), a reader with a plain deferred ``BEGIN`` (WAL: it never waits)."""
    url = engine_url(settings)
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            path = Path(url.database)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(
                    f"cannot make the data directory {path.parent}: {exc.strerror}"
                ) from exc
        engine = sa.create_engine(url, connect_args={"timeout": 60})

        @sa.event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None  # we say BEGIN ourselves
            cursor = dbapi_connection.cursor()
            for pragma in (
                "journal_mode=WAL",
                "synchronous=FULL",
                "foreign_keys=ON",
                "temp_store=MEMORY",
            ):
                cursor.execute(f"PRAGMA {pragma}")
            for table in STAGING.values():
                cursor.execute(str(sa.schema.CreateTable(table).compile(dialect=engine.dialect)))
            cursor.close()

        @sa.event.listens_for(engine, "begin")
        def _sqlite_begin(connection: Connection) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE" if writer else "BEGIN")

        return engine
    if url.get_backend_name() != "postgresql":
        raise StoreError(f"store.dsn must be SQLite or PostgreSQL, got {url.get_backend_name()}")
    connect_args: dict[str, Any] = {"connect_timeout": 10}
    if settings.schema:
        connect_args["options"] = f"-c search_path={settings.schema}"
    engine = sa.create_engine(url, connect_args=connect_args, pool_pre_ping=True)

    @sa.event.listens_for(engine, "connect")
    def _pg_connect(dbapi_connection: Any, _record: Any) -> None:
        with dbapi_connection.cursor() as cursor:
            for table in STAGING.values():
                cursor.execute(str(sa.schema.CreateTable(table).compile(dialect=engine.dialect)))
        dbapi_connection.commit()

    return engine


def _check_site(site: str) -> str:
    try:
        return SiteId(site).value
    except MessageError as exc:
        raise RegistryError(str(exc)) from exc


def _check_agent(agent: str) -> str:
    try:
        return AgentId(agent).value
    except MessageError as exc:
        raise RegistryError(str(exc)) from exc


class Store:
    """One database (see the module docstring)."""

    def __init__(self, settings: StoreSettings) -> None:
        self.settings = settings
        self.engine = _make_engine(settings)
        self.dialect = self.engine.dialect.name
        self._read_engine = (
            _make_engine(settings, writer=False) if self.dialect == "sqlite" else self.engine
        )
        self._insert = postgresql.insert if self.dialect == "postgresql" else sqlite.insert
        self._statements = _Statements(self)
        self._seen_written: dict[int, int] = {}  # agent_key -> last_seen_at written
        self.db_s = 0.0

    @classmethod
    def open(cls, settings: StoreSettings, *, migrate: bool = True) -> Store:
        """Connect, and bring the schema to the newest migration (unless ``migrate`` is off)."""
        store = cls(settings)
        try:
            if migrate:
                store.migrate()
        except BaseException:
            store.close()
            raise
        return store

    def close(self) -> None:
        self.engine.dispose()
        self._read_engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def where(self) -> str:
        """The database, for messages (password masked)."""
        text = mask_dsn(self.settings.dsn)
        return f"{text} schema {self.settings.schema}" if self.settings.schema else text

    @contextlib.contextmanager
    def begin(self, *, read_only: bool = False) -> Iterator[Connection]:
        """A transaction (``read_only``: on SQLite, one that never takes the write lock);
        database failures become :class:`StoreError` naming the DB."""
        try:
            with (self._read_engine if read_only else self.engine).begin() as conn:
                yield conn
        except sa.exc.DBAPIError as exc:
            transient = isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError)
            raise StoreError(
                f"database {self.where}: {_db_error(exc)}", transient=transient
            ) from exc

    # --- migrations ------------------------------------------------------------------------

    def migrate(self, revision: str = "head", *, downgrade: bool = False) -> str:
        """Apply every migration not yet applied (up to ``revision``; with ``downgrade``, undo
        those after it); the schema's revision afterwards."""
        from alembic import command  # noqa: PLC0415 (alembic is needed only here)
        from alembic.config import Config  # noqa: PLC0415
        from alembic.runtime.migration import MigrationContext  # noqa: PLC0415

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        with self._migration_lock(), self.begin() as conn:
            if self.dialect == "postgresql":
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_LOCK})")
                if self.settings.schema:
                    conn.exec_driver_sql(f'CREATE SCHEMA IF NOT EXISTS "{self.settings.schema}"')
            config.attributes["connection"] = conn
            (command.downgrade if downgrade else command.upgrade)(config, revision)
            current = MigrationContext.configure(conn).get_current_revision()
        return current or ""

    @contextlib.contextmanager
    def _migration_lock(self) -> Iterator[None]:
        """SQLite: a lock file beside the database (PostgreSQL locks in the transaction)."""
        url = engine_url(self.settings)
        if self.dialect != "sqlite" or not url.database or url.database == ":memory:":
            yield
            return
        with open(f"{url.database}.migrate-lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    # --- registry --------------------------------------------------------------------------

    def add_site(self, site: str, name: str, timezone: str, now: int) -> None:
        """Register a site; its time zone (IANA) decides its local hours and days."""
        site = _check_site(site)
        try:
            ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise RegistryError(
                f"time zone must be an IANA name such as 'Europe/Paris', got {timezone!r}"
            ) from exc
        with self.begin() as conn:
            exists = conn.execute(sa.select(sites.c.timezone).where(sites.c.id == site)).first()
            if exists is not None:
                raise RegistryError(f"site {site} already exists (time zone {exists[0]})")
            conn.execute(
                sites.insert().values(id=site, name=name or site, timezone=timezone, created_at=now)
            )

    def sites(self) -> list[SiteRow]:
        count = (
            sa.select(sa.func.count())
            .where(agents.c.site_id == sites.c.id)
            .scalar_subquery()
            .label("agents")
        )
        with self.begin() as conn:
            rows = conn.execute(
                sa.select(sites.c.id, sites.c.name, sites.c.timezone, count).order_by(sites.c.id)
            ).all()
        return [SiteRow(*row) for row in rows]

    def add_agent(
        self, site: str, agent: str, public_key: str, now: int, *, replace: bool = False
    ) -> None:
        """Enrol an agent with its Ed25519 public key (base64, as ``keygen`` prints it).
        ``replace`` gives an enrolled (or revoked) agent a new key and lifts a revocation."""
        site, agent = _check_site(site), _check_agent(agent)
        try:
            key_text = public_key_text(verify_key_from_text(public_key))
        except MessageError as exc:
            raise RegistryError(f"agent {site}/{agent}: {exc}") from exc
        with self.begin() as conn:
            if conn.execute(sa.select(sites.c.id).where(sites.c.id == site)).first() is None:
                raise RegistryError(
                    f"site {site} does not exist: add it first "
                    f"(footfall-aggregator sites add {site} --timezone ZONE)"
                )
            row = conn.execute(
                sa.select(agents.c.agent_key, agents.c.revoked_at).where(
                    agents.c.site_id == site, agents.c.agent_id == agent
                )
            ).first()
            if row is None:
                conn.execute(
                    agents.insert().values(
                        site_id=site, agent_id=agent, public_key=key_text, enrolled_at=now
                    )
                )
            elif not replace:
                state = "revoked" if row.revoked_at is not None else "enrolled"
                raise RegistryError(
                    f"agent {site}/{agent} is already {state}; --replace enrols the new key"
                    + (" and lifts the revocation" if row.revoked_at is not None else "")
                )
            else:
                conn.execute(
                    agents.update()
                    .where(agents.c.agent_key == row.agent_key)
                    .values(public_key=key_text, enrolled_at=now, revoked_at=None)
                )
            self._bump(conn)

    def add_agents(self, site: str, keys: Mapping[str, str], now: int) -> None:
        """Enrol many new agents of one site at once: agent id -> public key (an installer's
        list; one transaction)."""
        site = _check_site(site)
        rows = []
        for agent, public_key in keys.items():
            try:
                key_text = public_key_text(verify_key_from_text(public_key))
            except MessageError as exc:
                raise RegistryError(f"agent {site}/{agent}: {exc}") from exc
            rows.append(
                {
                    "site_id": site,
                    "agent_id": _check_agent(agent),
                    "public_key": key_text,
                    "enrolled_at": now,
                }
            )
        try:
            with self.begin() as conn:
                conn.execute(agents.insert(), rows)
                self._bump(conn)
        except StoreError as exc:
            raise RegistryError(
                f"cannot enrol {len(rows)} agents of site {site} (is the site there, and are "
                f"they new?): {exc}"
            ) from exc

    def revoke_agent(self, site: str, agent: str, now: int) -> None:
        """Refuse the agent's messages from now on (its stored windows stay)."""
        site, agent = _check_site(site), _check_agent(agent)
        with self.begin() as conn:
            done = conn.execute(
                agents.update()
                .where(
                    agents.c.site_id == site,
                    agents.c.agent_id == agent,
                    agents.c.revoked_at.is_(None),
                )
                .values(revoked_at=now)
            )
            if done.rowcount == 0:
                known = conn.execute(
                    sa.select(agents.c.revoked_at).where(
                        agents.c.site_id == site, agents.c.agent_id == agent
                    )
                ).first()
                if known is None:
                    raise RegistryError(f"agent {site}/{agent} is not enrolled")
                raise RegistryError(f"agent {site}/{agent} is already revoked")
            self._bump(conn)

    def _bump(self, conn: Connection) -> None:
        conn.execute(registry_state.update().values(version=registry_state.c.version + 1))

    def registry_version(self) -> int:
        with self.begin() as conn:
            return int(conn.execute(sa.select(registry_state.c.version)).scalar_one())

    def registry(self) -> Registry:
        """Every enrolled agent (revoked ones too: their messages are refused by name)."""
        with self.begin() as conn:
            version = int(conn.execute(sa.select(registry_state.c.version)).scalar_one())
            rows = conn.execute(
                sa.select(
                    agents.c.agent_key,
                    agents.c.site_id,
                    agents.c.agent_id,
                    agents.c.public_key,
                    agents.c.revoked_at,
                    agents.c.pruned_before,
                    agents.c.meta,
                    sites.c.timezone,
                ).join_from(agents, sites, agents.c.site_id == sites.c.id)
            ).all()
        entries = {
            (row.site_id, row.agent_id): AgentEntry(
                key=row.agent_key,
                site=row.site_id,
                agent=row.agent_id,
                verify_key=verify_key_from_text(row.public_key),
                revoked=row.revoked_at is not None,
                zone=row.timezone,
                pruned_before=row.pruned_before,
                noisy=noisy(json.loads(row.meta) if row.meta else None),
            )
            for row in rows
        }
        return Registry(version, entries)

    # --- ingest ----------------------------------------------------------------------------

    def store_batch(
        self,
        accepted: Sequence[Accepted],
        refused: Mapping[tuple[str, str, str], int] | None = None,
        now: int = 0,
    ) -> BatchOutcome:
        """Store a batch of verified messages in one transaction (see the module docstring);
        ``refused`` counts (reason, site, agent) of messages refused before the store."""
        outcome = BatchOutcome()
        counts: list[Accepted] = []
        seen: dict[tuple[int, int], str] = {}  # (agent_key, seq) -> signature
        for message in accepted:
            if message.kind != "counts":
                continue
            ident = (message.agent.key, int(message.payload["seq"]))
            if ident in seen:
                same = seen[ident] == message.signature
                outcome.skipped.append((message, "duplicate" if same else "seq_conflict"))
            else:
                seen[ident] = message.signature
                counts.append(message)
        tally: dict[tuple[str, str, str], int] = dict(refused or {})
        with self.begin() as conn:
            counts = self._not_pruned(conn, counts, outcome)
            inserted = self._insert_windows(conn, counts)
            for message in counts:
                if (message.agent.key, int(message.payload["seq"])) in inserted:
                    outcome.stored.append(message)
            if len(outcome.stored) < len(counts):
                outcome.skipped.extend(self._classify(conn, counts, inserted))
            deltas = RollupDeltas.of(
                (m.agent.key, m.agent.site, m.agent.zone, m.window_start, m.payload)
                for m in outcome.stored
            )
            if deltas:
                self._upsert_rollups(conn, deltas)
                self._note_versions(conn, outcome.stored)
            self._update_agents(conn, accepted, now)
            outcome.settled = self._settle(conn, counts, now)
            for message, reason in outcome.skipped:
                who = (reason, message.agent.site, message.agent.agent)
                tally[who] = tally.get(who, 0) + 1
            if tally:
                self._count_refusals(conn, tally, now)
        return outcome

    def _not_pruned(
        self, conn: Connection, counts: list[Accepted], outcome: BatchOutcome
    ) -> list[Accepted]:
        """The windows that start at or after their agent's retention cutoff, as the database
        has it now (the verifier's registry may be older than the last prune: a replay it let
        through would be counted again); the others are skipped as ``expired``."""
        keys = sorted({m.agent.key for m in counts})
        if not keys:
            return counts
        cutoffs = {
            int(key): int(cutoff)
            for key, cutoff in conn.execute(
                sa.select(agents.c.agent_key, agents.c.pruned_before).where(
                    agents.c.agent_key.in_(keys), agents.c.pruned_before > 0
                )
            )
        }
        if not cutoffs:
            return counts
        kept = []
        for message in counts:
            if message.window_start < cutoffs.get(message.agent.key, 0):
                outcome.skipped.append((message, "expired"))
            else:
                kept.append(message)
        return kept

    def _insert_windows(self, conn: Connection, counts: Sequence[Accepted]) -> set[tuple[int, int]]:
        """Insert the windows not stored yet; the (agent_key, seq) of those inserted."""
        if not counts:
            return set()
        rows = sorted((_window_row(m) for m in counts), key=lambda row: (row[0], row[1]))
        st = self._statements
        if self.dialect == "sqlite":
            # The write transaction is exclusive (BEGIN IMMEDIATE) and new rows get rowids
            # above the largest, so the rows above it afterwards are exactly those inserted.
            before = conn.exec_driver_sql(st.sqlite_max_rowid).scalar_one()
            conn.exec_driver_sql(st.sqlite_insert_windows, rows)
            returned = conn.exec_driver_sql(st.sqlite_inserted, (before,)).all()
        else:
            self._stage(conn, STAGING["windows"], rows)
            returned = conn.execute(st.insert_windows).all()
        return {(int(key), int(seq)) for key, seq in returned}

    def _classify(
        self, conn: Connection, counts: Sequence[Accepted], inserted: set[tuple[int, int]]
    ) -> Iterable[tuple[Accepted, str]]:
        """Why the counts not inserted were skipped: the same message again, another under
        the same seq, or another window for the same start."""
        left = [m for m in counts if (m.agent.key, int(m.payload["seq"])) not in inserted]
        if self.dialect == "sqlite":
            stored_sig = {}
            for m in left:
                ident = (m.agent.key, int(m.payload["seq"]))
                sig = conn.exec_driver_sql(self._statements.sqlite_sig, ident).scalar()
                if sig is not None:
                    stored_sig[ident] = sig
        else:
            stored_sig = {
                (int(key), int(seq)): sig
                for key, seq, sig in conn.execute(self._statements.stored_sigs).all()
            }
        for message in left:
            sig = stored_sig.get((message.agent.key, int(message.payload["seq"])))
            if sig is None:
                yield message, "duplicate_window"
            elif sig == message.signature:
                yield message, "duplicate"
            else:
                yield message, "seq_conflict"

    def _settle(
        self,
        conn: Connection,
        counts: Sequence[Accepted],
        now: int,
        refused: Iterable[tuple[int, int]] = (),
    ) -> set[int]:
        """Add the counts' seqs (stored now, or skipped: settled either way) and the
        ``refused`` (agent key, seq) (verified, refused for their content: never to be stored)
        to their agents' settled ranges, the refused also to their refused ranges; the agent
        keys. Rows are locked in key order (PostgreSQL: two processes merge one after the
        other, in the same order)."""
        seqs: dict[int, list[int]] = {}
        for message in counts:
            seqs.setdefault(message.agent.key, []).append(int(message.payload["seq"]))
        bad: dict[int, list[int]] = {}
        for key, seq in refused:
            seqs.setdefault(key, []).append(seq)
            bad.setdefault(key, []).append(seq)
        if not seqs:
            return set()
        r = receipts.c
        query = sa.select(r.agent_key, r.settled, r.refused).where(r.agent_key.in_(sorted(seqs)))
        if self.dialect == "postgresql":
            query = query.order_by(r.agent_key).with_for_update()
        held = {key: (json.loads(s), json.loads(f)) for key, s, f in conn.execute(query).all()}
        rows = [
            {
                "agent_key": key,
                "settled": _ranges_text(held.get(key, ([], []))[0], seqs[key]),
                "refused": _ranges_text(held.get(key, ([], []))[1], bad.get(key, [])),
                "updated_at": now,
            }
            for key in sorted(seqs)
        ]
        insert = (postgresql if self.dialect == "postgresql" else sqlite).insert(receipts)
        conn.execute(
            insert.on_conflict_do_update(
                index_elements=[r.agent_key],
                set_={
                    "settled": insert.excluded.settled,
                    "refused": insert.excluded.refused,
                    "updated_at": insert.excluded.updated_at,
                },
            ),
            rows,
        )
        return set(seqs)

    def settled(self, keys: Iterable[int]) -> dict[int, tuple[str, str, list[tuple[int, int]]]]:
        """Agent key -> (site, agent, settled ranges), for the keys that have any."""
        a, r = agents.c, receipts.c
        with self.begin(read_only=True) as conn:
            rows = conn.execute(
                sa.select(r.agent_key, a.site_id, a.agent_id, r.settled)
                .join(agents, a.agent_key == r.agent_key)
                .where(r.agent_key.in_(sorted(keys)))
            ).all()
        return {
            key: (site, agent, [(int(lo), int(hi)) for lo, hi in json.loads(text)])
            for key, site, agent, text in rows
        }

    def _upsert_rollups(self, conn: Connection, deltas: RollupDeltas) -> None:
        for table, rows in (
            (agent_hours, totals(deltas.agent_hours)),
            (agent_days, totals(deltas.agent_days)),
            (site_hours, totals(deltas.site_hours)),
            (site_days, totals(deltas.site_days)),
        ):
            hourly = _HOURLY[table.name]
            staged = [
                (key[0], *_period(hourly, b), *sums, *maxima) for key, b, sums, maxima in rows
            ]
            if self.dialect == "sqlite":
                conn.exec_driver_sql(self._statements.sqlite_upsert_rollup[table.name], staged)
            else:
                self._stage(conn, STAGING[table.name], staged)
                conn.execute(self._statements.upsert_rollup[table.name])
        # The site's people figures are its busiest agent's, not the agents' sum: set again
        # for the hours the batch touched, then their days from those hours.
        st = self._statements
        hours = [{"s": site, "h": hour} for site, hour in sorted(deltas.site_hours)]
        conn.execute(st.busiest_hours, hours)
        days = [{"s": site, "d": day} for site, day in sorted(deltas.site_days)]
        conn.execute(st.busiest_days, days)

    def _note_versions(self, conn: Connection, stored: Sequence[Accepted]) -> None:
        """Each agent's counts schema version, from its latest window in the batch."""
        latest: dict[int, tuple[int, int]] = {}  # agent_key -> (seq, v)
        for message in stored:
            seq = int(message.payload["seq"])
            if seq > latest.get(message.agent.key, (0, 0))[0]:
                latest[message.agent.key] = (seq, int(message.payload["v"]))
        rows = [{"k": key, "v": v} for key, (_, v) in sorted(latest.items())]
        conn.execute(self._statements.update_counts_v, rows)

    def _update_agents(self, conn: Connection, accepted: Sequence[Accepted], now: int) -> None:
        statuses: list[dict[str, Any]] = []
        metas: list[dict[str, Any]] = []
        seen: dict[int, int] = {}
        changed = False
        for message in accepted:
            key = message.agent.key
            seen[key] = max(seen.get(key, 0), message.received_at)
            if message.kind == "status":
                p = message.payload
                statuses.append(
                    {
                        "k": key,
                        "state": p["state"],
                        "cause": p["cause"],
                        "at": message.window_start,
                        "pending": int(p["spool_pending"]),
                        "dropped": int(p["spool_dropped"]),
                        "last_seq": int(p["last_seq"]),
                    }
                )
            elif message.kind == "meta":
                metas.append({"k": key, "meta": message.canonical, "at": message.received_at})
                changed |= noisy(message.payload) != message.agent.noisy
        if statuses:
            conn.execute(self._statements.update_status, statuses)
        if metas:
            conn.execute(self._statements.update_meta, metas)
        if changed:  # the verifier holds the agent to other rules now: reload the registry
            self._bump(conn)
        due = [
            {"k": key, "at": at}
            for key, at in seen.items()
            if at - self._seen_written.get(key, -(1 << 62)) >= 5
        ]
        if due:
            conn.execute(self._statements.update_seen, due)
            for row in due:
                self._seen_written[row["k"]] = row["at"]

    def _count_refusals(
        self, conn: Connection, tally: Mapping[tuple[str, str, str], int], now: int
    ) -> None:
        rows = [
            {"reason": r, "site_id": s, "agent_id": a, "count": n, "first_at": now, "last_at": now}
            for (r, s, a), n in sorted(tally.items())
        ]
        conn.execute(self._statements.count_refusals, rows)

    def _stage(self, conn: Connection, table: sa.Table, rows: Sequence[Sequence[Any]]) -> None:
        """Bulk load rows into a temporary staging table (emptied first)."""
        names = ", ".join(c.name for c in table.columns)
        if self.dialect == "postgresql":
            raw = conn.connection.driver_connection
            assert raw is not None
            # The table is empty: ON COMMIT DELETE ROWS.
            with (
                raw.cursor() as cursor,
                cursor.copy(f"COPY {table.name} ({names}) FROM STDIN") as copy,
            ):
                for row in rows:
                    copy.write_row(row)
        else:
            conn.exec_driver_sql(f"DELETE FROM {table.name}")
            marks = ", ".join("?" for _ in table.columns)
            conn.exec_driver_sql(
                f"INSERT INTO {table.name} ({names}) VALUES ({marks})",
                [tuple(row) for row in rows],
            )

    # --- retention -------------------------------------------------------------------------

    def prune(self, now: int, retention_days: int) -> int:
        """Delete windows that started more than ``retention_days`` ago (roll-ups stay); the
        number deleted. The cutoff is remembered per agent whose windows it deleted, so a
        replay of one is refused (verify: ``expired``), and by window time only: a current
        window is never older than it."""
        if retention_days <= 0:
            return 0
        cutoff = now - retention_days * 86400
        old = windows.c.window_start < cutoff
        with self.begin() as conn:
            touched = sa.select(windows.c.agent_key).where(old).distinct()
            conn.execute(
                agents.update()
                .where(agents.c.agent_key.in_(touched), agents.c.pruned_before < cutoff)
                .values(pruned_before=cutoff)
            )
            deleted = conn.execute(sa.delete(windows).where(old)).rowcount
            if deleted:
                self._bump(conn)
        return deleted

    # --- quarantine ------------------------------------------------------------------------

    def quarantine(
        self,
        rows: Sequence[Mapping[str, Any]],
        now: int,
        keep: int = QUARANTINE_KEEP,
        settle: Iterable[tuple[int, int]] = (),
    ) -> set[int]:
        """Quarantine messages (rows of the ``quarantine`` table but ``id``) and count each
        as a refusal of its reason, site and agent, in one transaction; the newest ``keep``
        rows stay. ``settle``: the (agent key, seq) of the counts among them whose signature
        verified with the enrolled key (refused for their content, :attr:`Refusal.settles`),
        settled and marked refused in the same transaction; the agent keys whose receipt
        moved."""
        tally: dict[tuple[str, str, str], int] = {}
        for row in rows:
            who = (row["reason"], row["site_id"], row["agent_id"])
            tally[who] = tally.get(who, 0) + 1
        newest = sa.select(sa.func.max(quarantine.c.id)).scalar_subquery()
        with self.begin() as conn:
            conn.execute(quarantine.insert(), list(rows))
            conn.execute(sa.delete(quarantine).where(quarantine.c.id <= newest - keep))
            self._count_refusals(conn, tally, now)
            return self._settle(conn, [], now, settle)

    def quarantined(self) -> list[dict[str, Any]]:
        """Every quarantined message, oldest first."""
        with self.begin(read_only=True) as conn:
            rows = conn.execute(sa.select(quarantine).order_by(quarantine.c.id)).mappings().all()
        return [dict(row) for row in rows]

    def probe(self) -> None:
        """Read every table ingest writes (no rows): raises :class:`StoreError` when the
        database, not a message, is at fault."""
        with self.begin(read_only=True) as conn:
            for table in (
                windows,
                agents,
                registry_state,
                refusals,
                quarantine,
                receipts,
                *ROLLUPS,
            ):
                conn.execute(sa.select(sa.literal(1)).select_from(table).where(sa.false()))

    # --- health ----------------------------------------------------------------------------

    def _gaps(self, scope: ColumnElement[bool]) -> sa.Subquery:
        """Per stored window (in ``scope``) after an agent's first: how many windows are
        missing before it."""
        w = windows.c
        # Each lag once, in a subquery (named twice in one select, it is computed twice).
        lagged = (
            sa.select(
                w.agent_key,
                w.seq,
                w.window_start,
                w.window_s,
                sa.func.lag(w.seq)
                .over(partition_by=w.agent_key, order_by=w.seq)
                .label("after_seq"),
                sa.func.lag(w.window_start)
                .over(partition_by=w.agent_key, order_by=w.seq)
                .label("after_window"),
            )
            .where(scope)
            .subquery()
        )
        g = lagged.c
        by_seq = g.seq - g.after_seq - 1
        by_time = (g.window_start - g.after_window) // g.window_s - 1
        return sa.select(
            g.agent_key,
            g.after_seq,
            g.seq.label("before_seq"),
            g.after_window,
            g.window_start.label("before_window"),
            self._least(by_seq, by_time).label("missing"),
        ).subquery()

    def _least(self, a: ColumnElement[Any], b: ColumnElement[Any]) -> ColumnElement[Any]:
        return sa.func.least(a, b) if self.dialect == "postgresql" else sa.func.min(a, b)

    def agents(
        self, site: str | None = None, since: int | None = None, until: int | None = None
    ) -> list[AgentHealth]:
        """Every agent (of one site), with its health; with ``since`` (and ``until``, Unix s),
        the windows stored and missing count only those from then on (and before then): a
        quick look at a big store.

        Missing windows are the gaps in an agent's stored seqs, and (but with ``until``) those
        after its last stored one up to the ``last_seq`` of its last status: windows it made
        that have not arrived, lost or still on the way (an agent with receipts sends them
        again); but not those ingest refused for their content after their signature verified
        (received, settled, never to be stored: ``refused`` counts them, whatever the bounds,
        and ``footfall-aggregator quarantine`` shows them). ``spool_filling``: its last status
        said more than :data:`SPOOL_FILLING` windows wait in its spool (the aggregator does
        not store them, or the agent cannot reach the broker)."""
        a = agents.c
        scope: ColumnElement[bool] = sa.true()
        listed = sa.select(
            a.agent_key,
            a.site_id,
            a.agent_id,
            a.public_key,
            a.enrolled_at,
            a.revoked_at,
            a.last_seen_at,
            a.status_state,
            a.status_cause,
            a.status_at,
            a.spool_pending,
            a.spool_dropped,
            a.status_last_seq,
            a.counts_v,
        ).order_by(a.site_id, a.agent_id)
        if site is not None:
            listed = listed.where(a.site_id == site)
            scope &= windows.c.agent_key.in_(sa.select(a.agent_key).where(a.site_id == site))
        if since is not None or until is not None:
            # Both bounds, always: given one, SQLite's planner reads every window of an agent
            # in primary key order instead of the (agent, window start) index's range.
            scope &= windows.c.window_start >= (since or 0)
            scope &= windows.c.window_start < (_NEVER if until is None else until)
        # The windows' figures by agent in a query of their own, not joined to the agents: a
        # planner that thinks a site has one agent (PostgreSQL never analyses a table that
        # small) would compute them again for every agent.
        w = windows.c
        stored = (
            sa.select(
                w.agent_key,
                sa.func.count(),
                sa.func.min(w.window_start),
                sa.func.max(w.window_start),
                sa.func.max(w.seq),
                sa.func.min(w.seq),
            )
            .where(scope)
            .group_by(w.agent_key)
        )
        with self.begin(read_only=True) as conn:
            rows = conn.execute(listed).all()
            figures = {row[0]: row[1:] for row in conn.execute(stored)}
            # Only an agent with a seq not stored between its first and its last (in scope)
            # can miss windows between them: the gaps (a LAG over every window in scope) are
            # read for those agents alone (for all 20 agents of a day: 55-77 ms, most of the
            # site page's time).
            holed = sorted(
                key for key, (count, _, _, last, first) in figures.items() if last - first >= count
            )
            gapped: dict[int, int] = {}
            if holed:
                gaps = self._gaps(scope & w.agent_key.in_(holed))
                lost = sa.func.sum(sa.case((gaps.c.missing > 0, gaps.c.missing), else_=0))
                query = sa.select(gaps.c.agent_key, lost).group_by(gaps.c.agent_key)
                gapped = {key: int(missing) for key, missing in conn.execute(query)}
            refused = {
                key: json.loads(text)
                for key, text in conn.execute(sa.select(receipts.c.agent_key, receipts.c.refused))
            }
        out = []
        for row in rows:
            count, first, last, last_seq, first_seq = figures.get(
                row.agent_key, (0, None, None, None, None)
            )
            missing = gapped.get(row.agent_key, 0)
            made = row.status_last_seq  # the newest window the agent says it made
            if last_seq is not None:
                if made is not None and until is None:
                    missing += max(0, made - last_seq)
                    upper = max(last_seq, made)
                else:
                    upper = last_seq
                # Refused windows were received: not missing (they lie in the gaps counted).
                missing -= _within(refused.get(row.agent_key, []), first_seq + 1, upper)
            out.append(
                AgentHealth(
                    site=row.site_id,
                    agent=row.agent_id,
                    public_key=row.public_key,
                    enrolled_at=row.enrolled_at,
                    revoked_at=row.revoked_at,
                    last_seen_at=row.last_seen_at,
                    state=row.status_state,
                    cause=row.status_cause,
                    status_at=row.status_at,
                    spool_pending=row.spool_pending,
                    spool_dropped=row.spool_dropped,
                    windows=int(count),
                    first_window=first,
                    last_window=last,
                    last_seq=last_seq,
                    missing=max(0, missing),
                    spool_filling=(row.spool_pending or 0) > SPOOL_FILLING,
                    refused=sum(hi - lo + 1 for lo, hi in refused.get(row.agent_key, [])),
                    counts_v=row.counts_v,
                )
            )
        return out

    def gaps(self, site: str, agent: str, limit: int = 50) -> list[Gap]:
        """The latest gaps in an agent's windows, newest first."""
        site, agent = _check_site(site), _check_agent(agent)
        gaps = self._gaps(sa.true())
        with self.begin() as conn:
            key = conn.execute(
                sa.select(agents.c.agent_key).where(
                    agents.c.site_id == site, agents.c.agent_id == agent
                )
            ).scalar()
            if key is None:
                raise RegistryError(f"agent {site}/{agent} is not enrolled")
            rows = conn.execute(
                sa.select(
                    gaps.c.after_seq,
                    gaps.c.before_seq,
                    gaps.c.after_window,
                    gaps.c.before_window,
                    gaps.c.missing,
                )
                .where(gaps.c.agent_key == key, gaps.c.missing > 0)
                .order_by(gaps.c.before_seq.desc())
                .limit(limit)
            ).all()
        return [Gap(*(int(v) for v in row)) for row in rows]

    def refusal_counts(self) -> dict[tuple[str, str, str], int]:
        """Messages not stored so far: (reason, site, agent) -> count."""
        with self.begin() as conn:
            rows = conn.execute(
                sa.select(
                    refusals.c.reason, refusals.c.site_id, refusals.c.agent_id, refusals.c.count
                )
            ).all()
        return {(r, s, a): int(n) for r, s, a, n in rows}


def _within(ranges: Sequence[Sequence[int]], lo: int, hi: int) -> int:
    """How many seqs of ``ranges`` lie in [lo, hi]."""
    return sum(max(0, min(hi, b) - max(lo, a) + 1) for a, b in ranges)


def _ranges_text(ranges: Sequence[Sequence[int]], seqs: Iterable[int]) -> str:
    """``ranges`` with ``seqs`` added, the newest :data:`MAX_SETTLED_RANGES` kept, as JSON."""
    return json.dumps(merge_ranges(ranges, seqs)[-MAX_SETTLED_RANGES:], separators=(",", ":"))


def merge_ranges(ranges: Sequence[Sequence[int]], seqs: Iterable[int]) -> list[list[int]]:
    """Sorted, apart, inclusive ranges ``[[lo, hi], ...]`` with ``seqs`` added (touching
    ranges joined)."""
    merged: list[list[int]] = []
    for lo, hi in sorted([*([int(x) for x in r] for r in ranges), *([s, s] for s in seqs)]):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return merged


def _period(hourly: bool, b: Buckets) -> tuple[Any, ...]:
    if hourly:
        return (b.hour_start, b.local_hour, b.utc_offset_s)
    return (b.local_day, b.day_start, b.day_hours)


def _window_row(message: Accepted) -> tuple[Any, ...]:
    """The row of a counts message, in WINDOW_COLUMNS order (int() turns a validated integral
    float into the int it is; a suppressed count is NULL with its bit in ``suppressed``, an
    absent one NULL alone)."""
    p = message.payload
    values, there = device_counts(p)
    values.append(p.get("static_excluded"))
    there.append("static_excluded" in p)
    people, heard = people_counts(p)
    suppressed = 0
    for bit, (value, present) in enumerate(zip(values, there, strict=True)):
        if value is None and present:
            suppressed |= 1 << bit
    return (
        message.agent.key,
        int(p["seq"]),
        message.window_start,
        int(p["window_s"]),
        p["epoch"],
        int(p["probe_requests"]),
        int(p["malformed"]),
        int(p["late_frames"]),
        *(None if value is None else int(value) for value in values),
        suppressed,
        message.canonical,
        message.signature,
        message.received_at,
        int(p["v"]),
        int(bool(p.get("no_data"))),
        None if "calibrated" not in p else int(p["calibrated"]),
        *people,
        sum(
            1 << bit
            for bit, (v, t) in enumerate(zip(people, heard, strict=True))
            if v is None and t
        ),
    )


def _db_error(exc: sa.exc.DBAPIError) -> str:
    text = str(exc.orig).strip().splitlines()
    return text[0] if text else type(exc.orig).__name__


def _positional_insert(table: sa.Table, conflict: str) -> str:
    """INSERT of every column of a table, by position (SQLite's executemany, no SQLAlchemy
    parameter processing on the hot path)."""
    names = ", ".join(c.name for c in table.columns)
    marks = ", ".join("?" for _ in table.columns)
    return f"INSERT INTO {table.name} ({names}) VALUES ({marks}) {conflict}"


# The site roll-ups' people figures that are the busiest agent's (aggregator/people.py): each
# additive figure's sum, and the occupancy's time-weighted sum and seconds. The rest of a site
# row sums its agents' (windows, published and suppressed windows) or takes their greatest
# (occupancy peak), as every roll-up does.
BUSIEST = (*(f"{name}_sum" for name in PEOPLE_COUNTS), "occupancy_cs", "occupancy_s")


def _busiest_statements() -> tuple[sa.Update, sa.Update]:
    """UPDATEs that set :data:`BUSIEST` of a site hour (bind ``s``, ``h``) from its agents'
    hours, and of a site day (``s``, ``d``) from its site hours."""
    a, h, d = agent_hours.c, site_hours.c, site_days.c
    # The site by its bound id: correlated to the UPDATE's site_hours instead, the IN subquery
    # put site_hours in its own FROM and took every site's agents (a site read the busiest
    # agent of any site: another merchant's figures).
    of_site = a.agent_key.in_(
        sa.select(agents.c.agent_key).where(agents.c.site_id == sa.bindparam("s"))
    )
    mean = sa.case((a.occupancy_s > 0, a.occupancy_cs * 1.0 / a.occupancy_s), else_=0)
    longest = sa.func.max(a.occupancy_s)
    busiest: list[Any] = [sa.func.coalesce(sa.func.max(a[n]), 0) for n in BUSIEST[:-2]]
    busiest += [
        sa.func.coalesce(sa.cast(sa.func.round(sa.func.max(mean) * longest), sa.BigInteger), 0),
        sa.func.coalesce(longest, 0),
    ]
    hours = (
        site_hours.update()
        .where(h.site_id == sa.bindparam("s"), h.hour_start == sa.bindparam("h"))
        .values(
            {
                h[n]: sa.select(value)
                .where(of_site, a.hour_start == h.hour_start)
                .scalar_subquery()
                for n, value in zip(BUSIEST, busiest, strict=True)
            }
        )
    )
    in_day = (
        (site_hours.c.site_id == d.site_id)
        & (site_hours.c.hour_start >= d.day_start)
        & (site_hours.c.hour_start < d.day_start + d.day_hours * 3600)
    )
    days = (
        site_days.update()
        .where(d.site_id == sa.bindparam("s"), d.local_day == sa.bindparam("d"))
        .values(
            {
                d[n]: sa.select(sa.func.coalesce(sa.func.sum(site_hours.c[n]), 0))
                .where(in_day)
                .scalar_subquery()
                for n in BUSIEST
            }
        )
    )
    return hours, days


class _Statements:
    """The store's write statements, built once per dialect."""

    def __init__(self, store: Store) -> None:
        insert = store._insert
        staged = STAGING["windows"]
        self.insert_windows = (
            insert(windows)
            .from_select(
                list(WINDOW_COLUMNS),
                sa.select(*(staged.c[name] for name in WINDOW_COLUMNS))
                .where(sa.true())
                .order_by(staged.c.agent_key, staged.c.seq),
            )
            .on_conflict_do_nothing()
            .returning(windows.c.agent_key, windows.c.seq)
        )
        self.stored_sigs = sa.select(windows.c.agent_key, windows.c.seq, windows.c.sig).join(
            staged,
            (staged.c.agent_key == windows.c.agent_key) & (staged.c.seq == windows.c.seq),
        )
        greatest = sa.func.greatest if store.dialect == "postgresql" else sa.func.max
        self.upsert_rollup: dict[str, Any] = {}
        for table in ROLLUPS:
            source = STAGING[table.name]
            keys = [c.name for c in table.primary_key.columns]
            names = [c.name for c in table.columns]
            statement = insert(table).from_select(
                names,
                sa.select(*(source.c[n] for n in names))
                .where(sa.true())
                .order_by(*(source.c[k] for k in keys)),
            )
            excluded = statement.excluded
            self.upsert_rollup[table.name] = statement.on_conflict_do_update(
                index_elements=keys,
                set_={
                    m: (
                        greatest(table.c[m], excluded[m])
                        if m in MAX_MEASURES
                        else table.c[m] + excluded[m]
                    )
                    for m in MEASURES
                },
            )
        self.busiest_hours, self.busiest_days = _busiest_statements()
        self.sqlite_max_rowid = "SELECT coalesce(max(rowid), 0) FROM windows"
        self.sqlite_insert_windows = _positional_insert(windows, "ON CONFLICT DO NOTHING")
        self.sqlite_inserted = "SELECT agent_key, seq FROM windows WHERE rowid > ?"
        self.sqlite_sig = "SELECT sig FROM windows WHERE agent_key = ? AND seq = ?"
        self.sqlite_upsert_rollup: dict[str, str] = {}
        for table in ROLLUPS:
            conflict = ", ".join(c.name for c in table.primary_key.columns)
            updates = ", ".join(
                f"{m} = max({m}, excluded.{m})"
                if m in MAX_MEASURES
                else f"{m} = {m} + excluded.{m}"
                for m in MEASURES
            )
            self.sqlite_upsert_rollup[table.name] = _positional_insert(
                table, f"ON CONFLICT ({conflict}) DO UPDATE SET {updates}"
            )
        a = agents.c
        self.update_status = (
            agents.update()
            .where(
                a.agent_key == sa.bindparam("k"),
                sa.or_(a.status_at.is_(None), a.status_at <= sa.bindparam("at")),
            )
            .values(
                status_state=sa.bindparam("state"),
                status_cause=sa.bindparam("cause"),
                status_at=sa.bindparam("at"),
                spool_pending=sa.bindparam("pending"),
                spool_dropped=sa.bindparam("dropped"),
                status_last_seq=sa.bindparam("last_seq"),
            )
        )
        self.update_counts_v = (
            agents.update()
            .where(a.agent_key == sa.bindparam("k"))
            .values(counts_v=sa.bindparam("v"))
        )
        self.update_meta = (
            agents.update()
            .where(a.agent_key == sa.bindparam("k"))
            .values(meta=sa.bindparam("meta"), meta_at=sa.bindparam("at"))
        )
        self.update_seen = (
            agents.update()
            .where(
                a.agent_key == sa.bindparam("k"),
                sa.or_(a.last_seen_at.is_(None), a.last_seen_at < sa.bindparam("at")),
            )
            .values(last_seen_at=sa.bindparam("at"))
        )
        refused = insert(refusals)
        self.count_refusals = refused.on_conflict_do_update(
            index_elements=["reason", "site_id", "agent_id"],
            set_={
                "count": refusals.c.count + refused.excluded["count"],
                "last_at": refused.excluded.last_at,
            },
        )
