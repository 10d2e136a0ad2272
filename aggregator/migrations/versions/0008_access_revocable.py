"""Access that can be taken back: API tokens expire (``expires_at``; tokens made before this
revision get 90 days from the upgrade, so none stops at once), and the login limiter counts
attempts by name and address with a backoff (``login_attempts``, replacing ``login_failures``,
whose rows are forgotten: at worst an attacker gets the free attempts once more).

Revision ID: 0008
Revises: 0004
Create Date: 2026-12-05
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0004"
branch_labels = None
depends_on = None

LEGACY_TOKEN_S = 90 * 86400


def upgrade() -> None:
    op.add_column("api_tokens", sa.Column("expires_at", sa.BigInteger))
    op.execute(
        sa.text("UPDATE api_tokens SET expires_at = :at").bindparams(
            at=int(time.time()) + LEGACY_TOKEN_S
        )
    )
    with op.batch_alter_table("api_tokens") as batch:
        batch.alter_column("expires_at", existing_type=sa.BigInteger, nullable=False)
    op.drop_table("login_failures")
    op.create_table(
        "login_attempts",
        sa.Column("key", sa.String(200), primary_key=True),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_at", sa.BigInteger, nullable=False),
        sa.Column("last_at", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_login_attempts_last_at", "login_attempts", ["last_at"])


def downgrade() -> None:
    op.drop_index("ix_login_attempts_last_at", table_name="login_attempts")
    op.drop_table("login_attempts")
    op.create_table(
        "login_failures",
        sa.Column("key", sa.String(200), primary_key=True),
        sa.Column("failures", sa.Integer, nullable=False),
        sa.Column("first_at", sa.BigInteger, nullable=False),
    )
    with op.batch_alter_table("api_tokens") as batch:
        batch.drop_column("expires_at")
