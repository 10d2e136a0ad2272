"""The capture rate's terms: roll-ups get the arrivals and the passers-by of the windows that
published both (``capture_arrivals``, ``capture_passersby``), so that a window where one of
them is suppressed enters neither the rate's numerator nor its denominator alone. They are
filled from the windows the store holds: an agent's hour or day from its windows, a site's
hour as the busiest agent's (each the greatest over the site's agents, as the other people
figures), a site's day as the sum of its hours. Hours whose windows retention has deleted keep
0 for both (they add nothing to a rate).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

ROLLUPS = ("agent_hours", "agent_days", "site_hours", "site_days")
TERMS = {"capture_arrivals": "arrivals", "capture_passersby": "people_passersby"}
PAIRED = "w.arrivals IS NOT NULL AND w.people_passersby IS NOT NULL"


def upgrade() -> None:
    for table in ROLLUPS:
        for name in TERMS:
            op.add_column(table, sa.Column(name, sa.BigInteger, nullable=False, server_default="0"))
    for name, column in TERMS.items():
        op.execute(
            f"UPDATE agent_hours SET {name} = (SELECT coalesce(sum(w.{column}), 0) FROM windows w"
            f" WHERE w.agent_key = agent_hours.agent_key"
            f" AND w.window_start >= agent_hours.hour_start"
            f" AND w.window_start < agent_hours.hour_start + 3600 AND {PAIRED})"
        )
        op.execute(
            f"UPDATE agent_days SET {name} = (SELECT coalesce(sum(w.{column}), 0) FROM windows w"
            f" WHERE w.agent_key = agent_days.agent_key AND w.window_start >= agent_days.day_start"
            f" AND w.window_start < agent_days.day_start + agent_days.day_hours * 3600"
            f" AND {PAIRED})"
        )
        op.execute(
            f"UPDATE site_hours SET {name} = (SELECT coalesce(max(h.{name}), 0) FROM agent_hours h"
            f" JOIN agents a ON a.agent_key = h.agent_key WHERE a.site_id = site_hours.site_id"
            f" AND h.hour_start = site_hours.hour_start)"
        )
        op.execute(
            f"UPDATE site_days SET {name} = (SELECT coalesce(sum(h.{name}), 0) FROM site_hours h"
            f" WHERE h.site_id = site_days.site_id AND h.hour_start >= site_days.day_start"
            f" AND h.hour_start < site_days.day_start + site_days.day_hours * 3600)"
        )


def downgrade() -> None:
    for table in ROLLUPS:
        with op.batch_alter_table(table) as batch:
            for name in TERMS:
                batch.drop_column(name)
