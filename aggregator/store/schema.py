"""The store's tables, as SQLAlchemy Core metadata (Alembic's migrations in
``aggregator/migrations`` make and move them; ``env.py`` compares against :data:`metadata`).

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
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from aggregator.rollup import MEASURES, PEOPLE_COLUMNS, SUPPRESSIBLE

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
    # Its last status's eviction rounds (status v2; NULL from a v1 agent: 0010).
    sa.Column("count_evictions", sa.BigInteger),
    sa.Column("estimate_evictions", sa.BigInteger),
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
if WINDOW_COLUMNS[5:23] != (*COUNT_COLUMNS, *NULLABLE_COLUMNS, "suppressed"):  # writes' row order
    raise RuntimeError(f"windows' columns 5-22 are not the counts in order: {WINDOW_COLUMNS}")


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
