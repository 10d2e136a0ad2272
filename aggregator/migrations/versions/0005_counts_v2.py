"""Counts v2: people-level figures beside the device-level ones. Windows get the schema
version, ``no_data``, ``calibrated``, the people-level counts (arrivals, passers-by, visits
ended and dwell bands per person, occupancy mean in hundredths of a person and peak) and a
bit per suppressed one; roll-ups get their sums, the windows that published each, the
occupancy's time-weighted sum and seconds, and its peak. Every window stored before is v1:
its roll-ups count it in ``v1_windows``. Agents note the counts version of their latest
window (``counts_v``: the aggregator says which still send v1).

Revision ID: 0005
Revises: 0008
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0007"
branch_labels = None
depends_on = None

PEOPLE_COUNTS = (
    "arrivals",
    "people_passersby",
    "people_visits_ended",
    "people_dwell_lt5",
    "people_dwell_5_15",
    "people_dwell_15_30",
    "people_dwell_30_60",
    "people_dwell_ge60",
)
PEOPLE_COLUMNS = (*PEOPLE_COUNTS, "occupancy_mean_c", "occupancy_peak")
ROLLUPS = ("agent_hours", "agent_days", "site_hours", "site_days")
MEASURES = (
    "v1_windows",
    "no_data_windows",
    "calibrated_windows",
    *(f"{name}_{part}" for name in PEOPLE_COUNTS for part in ("sum", "windows", "suppressed")),
    "occupancy_cs",
    "occupancy_s",
    "occupancy_suppressed",
    "occupancy_peak_windows",
    "occupancy_peak_suppressed",
    "occupancy_peak_max",
)


def upgrade() -> None:
    # Plain ADD COLUMN (SQLite too): a batch copy of agents would break its foreign keys.
    op.add_column("agents", sa.Column("counts_v", sa.SmallInteger))
    for column in (
        sa.Column("v", sa.SmallInteger, nullable=False, server_default="1"),
        sa.Column("no_data", sa.SmallInteger, nullable=False, server_default="0"),
        sa.Column("calibrated", sa.SmallInteger),
        *(sa.Column(name, sa.BigInteger) for name in PEOPLE_COLUMNS),
        sa.Column("people_suppressed", sa.Integer, nullable=False, server_default="0"),
    ):
        op.add_column("windows", column)
    for table in ROLLUPS:
        for name in MEASURES:
            op.add_column(table, sa.Column(name, sa.BigInteger, nullable=False, server_default="0"))
        op.execute(f"UPDATE {table} SET v1_windows = windows")


def downgrade() -> None:
    for table in ROLLUPS:
        with op.batch_alter_table(table) as batch:
            for name in MEASURES:
                batch.drop_column(name)
    with op.batch_alter_table("windows") as batch:
        for name in ("v", "no_data", "calibrated", *PEOPLE_COLUMNS, "people_suppressed"):
            batch.drop_column(name)
    op.drop_column("agents", "counts_v")
