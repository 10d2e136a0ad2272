"""Suppressed and absent counts: device counts may be NULL in windows, with a bit per
suppressed one; roll-ups count, per measure, the windows whose value was suppressed, and the
windows that carried the fields a privacy mode may leave out.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

NULLABLE = (
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
)
SUPPRESSIBLE = (
    "devices",
    "devices_randomised",
    "visitors",
    "passersby",
    "visits_ended",
    "dwell_lt5",
    "dwell_5_15",
    "dwell_15_30",
    "dwell_30_60",
    "dwell_ge60",
    "devices_epoch",
    "people_est",
    "people",
)
ROLLUPS = ("agent_hours", "agent_days", "site_hours", "site_days")
# Windows stored before this revision carried every field: their roll-ups had them all.
CARRIED = ("visits_ended_windows", "dwell_windows", "devices_epoch_windows")


def upgrade() -> None:
    with op.batch_alter_table("windows") as batch:
        for name in NULLABLE:
            batch.alter_column(name, existing_type=sa.BigInteger, nullable=True)
        batch.add_column(sa.Column("suppressed", sa.Integer, nullable=False, server_default="0"))
    for table in ROLLUPS:
        with op.batch_alter_table(table) as batch:
            for name in (*CARRIED, *(f"{m}_suppressed" for m in SUPPRESSIBLE)):
                batch.add_column(sa.Column(name, sa.BigInteger, nullable=False, server_default="0"))
        op.execute(f"UPDATE {table} SET " + ", ".join(f"{name} = windows" for name in CARRIED))


def downgrade() -> None:
    for table in ROLLUPS:
        with op.batch_alter_table(table) as batch:
            for name in (*CARRIED, *(f"{m}_suppressed" for m in SUPPRESSIBLE)):
                batch.drop_column(name)
    with op.batch_alter_table("windows") as batch:
        batch.drop_column("suppressed")
