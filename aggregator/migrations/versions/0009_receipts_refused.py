"""Receipts: per agent, also the seq ranges refused after their signature verified (a window
whose content ingest refuses: settled, so the agent lets it go; never stored), so health can
tell a refused window from a missing one.

Revision ID: 0009
Revises: 0005
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("receipts", sa.Column("refused", sa.Text, nullable=False, server_default="[]"))


def downgrade() -> None:
    with op.batch_alter_table("receipts") as batch:
        batch.drop_column("refused")
