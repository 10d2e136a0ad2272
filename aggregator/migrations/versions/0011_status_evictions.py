"""Status v2: agents note the eviction rounds of their last status (the count stage's device
table and the estimate stage's tables, since the agent started); NULL while an agent sends
status v1.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

COLUMNS = ("count_evictions", "estimate_evictions")


def upgrade() -> None:
    for name in COLUMNS:
        op.add_column("agents", sa.Column(name, sa.BigInteger))


def downgrade() -> None:
    for name in COLUMNS:  # not a batch: SQLite would copy agents, which windows reference
        op.drop_column("agents", name)
