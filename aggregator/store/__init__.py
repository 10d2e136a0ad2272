"""The aggregator's store: registry, windows, roll-ups and agent health, in SQLite or PostgreSQL.

:class:`Store` is one database seen through its jobs, a module each:

* :mod:`~aggregator.store.schema`: the tables (SQLAlchemy Core metadata, what Alembic's
  migrations make);
* :mod:`~aggregator.store.engine`: engines, transactions and migrations (:class:`Database`);
* :mod:`~aggregator.store.enrolment`: sites and agents with their keys (the registry);
* :mod:`~aggregator.store.writes`: ingest's batches of windows and roll-ups, the settled
  ranges its receipts report, refusals and the quarantine;
* :mod:`~aggregator.store.health`: agents' health, gaps, refusal counts, retention.

Times are Unix seconds (integers) throughout.
"""

from __future__ import annotations

from aggregator.store.engine import Database, engine_url
from aggregator.store.enrolment import Enrolment, SiteRow, check_new_site
from aggregator.store.health import SPOOL_FILLING, AgentHealth, Gap, Health
from aggregator.store.schema import (
    NULLABLE_COLUMNS,
    agent_days,
    agent_hours,
    agents,
    api_tokens,
    grants,
    login_attempts,
    metadata,
    sessions,
    site_days,
    site_hours,
    sites,
    users,
    windows,
)
from aggregator.store.writes import (
    MAX_SETTLED_RANGES,
    QUARANTINE_KEEP,
    BatchOutcome,
    Writer,
    merge_ranges,
)

__all__ = [
    "MAX_SETTLED_RANGES",
    "NULLABLE_COLUMNS",
    "QUARANTINE_KEEP",
    "SPOOL_FILLING",
    "AgentHealth",
    "BatchOutcome",
    "Database",
    "Gap",
    "SiteRow",
    "Store",
    "agent_days",
    "agent_hours",
    "agents",
    "api_tokens",
    "check_new_site",
    "engine_url",
    "grants",
    "login_attempts",
    "merge_ranges",
    "metadata",
    "sessions",
    "site_days",
    "site_hours",
    "sites",
    "users",
    "windows",
]


class Store(Enrolment, Writer, Health):
    """One database: its registry, ingest's writes, health and retention (module docstring)."""
