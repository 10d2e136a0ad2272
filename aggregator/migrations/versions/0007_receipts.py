"""Receipts: per agent, the seq ranges the store has settled (stored, or skipped for good as a
duplicate or a conflicting seq), from which ingest publishes the agent's signed receipt.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "receipts",
        sa.Column("agent_key", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("settled", sa.Text, nullable=False),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
        sa.ForeignKeyConstraint(["agent_key"], ["agents.agent_key"], name="fk_receipts_agent"),
    )


def downgrade() -> None:
    op.drop_table("receipts")
