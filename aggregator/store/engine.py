"""The store's database: engines, transactions and migrations.

SQLAlchemy Core 2; the schema is made and moved forward by Alembic (``aggregator/migrations``),
run by :meth:`Database.migrate` at every start (and by ``footfall-aggregator migrate``) under a
lock, so several processes may start together. SQLite (WAL, ``synchronous=FULL``, every write
transaction ``BEGIN IMMEDIATE``) is the default, a file in the data directory; PostgreSQL
(psycopg 3) is chosen by a ``postgresql://`` DSN, optionally in a schema of its own.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from aggregator.config import StoreSettings, mask_dsn
from aggregator.errors import StoreError
from aggregator.store.schema import STAGING

MIGRATIONS = Path(__file__).parent.with_name("migrations")
_PG_LOCK = 0x666F6F74  # pg_advisory_xact_lock key for migrations ("foot")


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


class Database:
    """One database (see the module docstring): the base of :class:`aggregator.store.Store`."""

    def __init__(self, settings: StoreSettings) -> None:
        self.settings = settings
        self.engine = _make_engine(settings)
        self.dialect = self.engine.dialect.name
        self._read_engine = (
            _make_engine(settings, writer=False) if self.dialect == "sqlite" else self.engine
        )
        self._insert = postgresql.insert if self.dialect == "postgresql" else sqlite.insert

    @classmethod
    def open(cls, settings: StoreSettings, *, migrate: bool = True) -> Self:
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

    def __enter__(self) -> Self:
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


def _db_error(exc: sa.exc.DBAPIError) -> str:
    text = str(exc.orig).strip().splitlines()
    return text[0] if text else type(exc.orig).__name__
