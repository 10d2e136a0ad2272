"""The first schema: registry, windows, roll-ups, refusals.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

MEASURES = (
    "windows",
    "probe_requests",
    "malformed",
    "late_frames",
    "devices_sum",
    "devices_max",
    "devices_randomised_sum",
    "visitors_sum",
    "visitors_max",
    "passersby_sum",
    "visits_ended",
    "dwell_lt5",
    "dwell_5_15",
    "dwell_15_30",
    "dwell_30_60",
    "dwell_ge60",
    "devices_epoch_max",
    "people_est_windows",
    "people_est_sum",
    "people_est_max",
    "people_windows",
    "people_sum",
    "people_max",
)


def _measures() -> list[sa.Column]:  # type: ignore[type-arg]
    return [sa.Column(m, sa.BigInteger, nullable=False, server_default="0") for m in MEASURES]


def _hour() -> list[sa.Column]:  # type: ignore[type-arg]
    return [
        sa.Column("hour_start", sa.BigInteger, nullable=False),
        sa.Column("local_hour", sa.String(16), nullable=False),
        sa.Column("utc_offset_s", sa.Integer, nullable=False),
    ]


def _day() -> list[sa.Column]:  # type: ignore[type-arg]
    return [
        sa.Column("local_day", sa.String(10), nullable=False),
        sa.Column("day_start", sa.BigInteger, nullable=False),
        sa.Column("day_hours", sa.Integer, nullable=False),
    ]


def upgrade() -> None:
    op.create_table(
        "sites",
        sa.Column("id", sa.String(63), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("timezone", sa.String(64), nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "agents",
        sa.Column("agent_key", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("site_id", sa.String(63), sa.ForeignKey("sites.id"), nullable=False),
        sa.Column("agent_id", sa.String(63), nullable=False),
        sa.Column("public_key", sa.String(44), nullable=False),
        sa.Column("enrolled_at", sa.BigInteger, nullable=False),
        sa.Column("revoked_at", sa.BigInteger),
        sa.Column("pruned_through_seq", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("last_seen_at", sa.BigInteger),
        sa.Column("status_state", sa.String(8)),
        sa.Column("status_cause", sa.String(16)),
        sa.Column("status_at", sa.BigInteger),
        sa.Column("spool_pending", sa.BigInteger),
        sa.Column("spool_dropped", sa.BigInteger),
        sa.Column("status_last_seq", sa.BigInteger),
        sa.Column("meta", sa.Text),
        sa.Column("meta_at", sa.BigInteger),
        sa.UniqueConstraint("site_id", "agent_id", name="uq_agents_site_agent"),
    )
    registry_state = op.create_table(
        "registry_state",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("version", sa.BigInteger, nullable=False),
    )
    op.bulk_insert(registry_state, [{"id": 1, "version": 0}])
    counts = [
        "probe_requests",
        "malformed",
        "late_frames",
        "devices",
        "devices_randomised",
        "visitors",
        "passersby",
        "visits_ended",
        "devices_epoch",
        "dwell_lt5",
        "dwell_5_15",
        "dwell_15_30",
        "dwell_30_60",
        "dwell_ge60",
    ]
    op.create_table(
        "windows",
        sa.Column("agent_key", sa.Integer, nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("window_start", sa.BigInteger, nullable=False),
        sa.Column("window_s", sa.Integer, nullable=False),
        sa.Column("epoch", sa.String(16), nullable=False),
        *(sa.Column(name, sa.BigInteger, nullable=False) for name in counts),
        sa.Column("people_est", sa.BigInteger),
        sa.Column("static_excluded", sa.BigInteger),
        sa.Column("people", sa.BigInteger),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("sig", sa.String(88), nullable=False),
        sa.Column("received_at", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("agent_key", "seq", name="pk_windows"),
        sa.UniqueConstraint("agent_key", "window_start", name="uq_windows_agent_start"),
        sa.ForeignKeyConstraint(["agent_key"], ["agents.agent_key"], name="fk_windows_agent"),
    )
    for name, key, when in (
        ("agent_hours", sa.Column("agent_key", sa.Integer), _hour()),
        ("agent_days", sa.Column("agent_key", sa.Integer), _day()),
        ("site_hours", sa.Column("site_id", sa.String(63)), _hour()),
        ("site_days", sa.Column("site_id", sa.String(63)), _day()),
    ):
        op.create_table(
            name,
            key,
            *when,
            *_measures(),
            sa.PrimaryKeyConstraint(key.name, when[0].name, name=f"pk_{name}"),
        )
    op.create_table(
        "refusals",
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("site_id", sa.String(63), nullable=False),
        sa.Column("agent_id", sa.String(63), nullable=False),
        sa.Column("count", sa.BigInteger, nullable=False),
        sa.Column("first_at", sa.BigInteger, nullable=False),
        sa.Column("last_at", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("reason", "site_id", "agent_id", name="pk_refusals"),
    )


def downgrade() -> None:
    for name in (
        "refusals",
        "site_days",
        "site_hours",
        "agent_days",
        "agent_hours",
        "windows",
        "registry_state",
        "agents",
        "sites",
    ):
        op.drop_table(name)
