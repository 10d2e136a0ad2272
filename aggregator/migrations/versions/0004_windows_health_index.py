"""An index that answers a site page's reads of one day's windows by itself: agents' health
(seq, start and length, for the missing windows) and the capture rate (visitors, devices), by
agent and window start.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

COLUMNS = ["agent_key", "window_start", "seq", "window_s", "visitors", "devices"]


def upgrade() -> None:
    op.create_index("ix_windows_day_reads", "windows", COLUMNS)


def downgrade() -> None:
    op.drop_index("ix_windows_day_reads", table_name="windows")
