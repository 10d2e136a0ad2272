"""Retention by window time, not seq; the quarantine of messages ingest could not handle.

``agents.pruned_through_seq`` (the largest seq among an agent's deleted windows, whatever
their date) becomes ``agents.pruned_before``: the retention cutoff up to which the agent's
windows were deleted. A 1970-dated window with a large seq, once deleted, made every current
window with a lower seq "expired" (issue 16); a cutoff in time cannot. For an agent that had
windows deleted, the cutoff is taken as its oldest window still stored, or, if none is, the
end of its latest hour in the roll-ups: nothing the roll-ups already count can come back.

``quarantine``: one row per message whose verification or storage failed on that message
alone (aggregator.ingest), with the reason, an error in words, and the message's digest and
size; its text only when it verified (signed by its enrolled agent, valid against its schema).

Revision ID: 0006
Revises: 0008
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0008"  # the newest on this branch when it merged main (0008 revises 0004)
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ALTER TABLE (SQLite 3.35+ drops a column): a batch copy of agents would drop the
    # table the windows' foreign key names.
    op.add_column(
        "agents", sa.Column("pruned_before", sa.BigInteger, nullable=False, server_default="0")
    )
    op.execute(
        """
        UPDATE agents SET pruned_before = coalesce(
            (SELECT min(w.window_start) FROM windows w WHERE w.agent_key = agents.agent_key),
            (SELECT max(h.hour_start) + 3600 FROM agent_hours h
             WHERE h.agent_key = agents.agent_key),
            0)
        WHERE pruned_through_seq > 0
        """
    )
    op.execute("ALTER TABLE agents DROP COLUMN pruned_through_seq")
    op.create_table(
        "quarantine",
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


def downgrade() -> None:
    op.drop_table("quarantine")
    op.add_column(
        "agents",
        sa.Column("pruned_through_seq", sa.BigInteger, nullable=False, server_default="0"),
    )
    op.execute(
        """
        UPDATE agents SET pruned_through_seq = coalesce(
            (SELECT min(w.seq) - 1 FROM windows w WHERE w.agent_key = agents.agent_key), 0)
        WHERE pruned_before > 0
        """
    )
    op.execute("ALTER TABLE agents DROP COLUMN pruned_before")
