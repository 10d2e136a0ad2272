"""The store's reads of agents' health (windows stored and missing, gaps, refusals, the
quarantine), its retention (:meth:`Health.prune`) and ingest's probe of the tables it writes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement

from aggregator.errors import RegistryError
from aggregator.store.engine import Database
from aggregator.store.enrolment import bump_version, check_agent, check_site
from aggregator.store.schema import (
    ROLLUPS,
    agents,
    quarantine,
    receipts,
    refusals,
    registry_state,
    windows,
)

_NEVER = 1 << 62  # a time after every window (Unix s)
SPOOL_FILLING = 12  # windows waiting in an agent's spool: an hour of 5-minute windows


@dataclass(frozen=True, slots=True)
class AgentHealth:
    """One agent's enrolment and health, as ``agents list`` shows it."""

    site: str
    agent: str
    public_key: str
    enrolled_at: int
    revoked_at: int | None
    last_seen_at: int | None
    state: str | None  # from its last status message: online / offline
    cause: str | None
    status_at: int | None
    spool_pending: int | None
    spool_dropped: int | None
    windows: int  # stored (within retention)
    first_window: int | None
    last_window: int | None
    last_seq: int | None
    missing: int  # windows the agent made that have not arrived (gaps in seq, and after)
    spool_filling: bool  # its last status said more than SPOOL_FILLING windows wait
    refused: int  # windows it sent, signed, that ingest refused for their content (settled)
    counts_v: int | None  # the counts schema of its latest window: 1 (devices only) or 2
    meta_counts_v: int | None  # what its latest meta says it sends (meta v1: counts v1)
    # Eviction rounds since the agent started, from its last status (None: status v1 or
    # none yet): its count stage's device table and its estimate stage's tables at ceiling.
    count_evictions: int | None = None
    estimate_evictions: int | None = None


def _declared_counts_v(meta: str | None) -> int | None:
    """The counts version a stored meta payload says its agent sends: its ``counts_v`` (meta
    v2), 1 for a meta v1 (its agent predates counts v2); None without a meta."""
    if meta is None:
        return None
    payload = json.loads(meta)
    return int(payload.get("counts_v", 1)) if payload.get("v", 1) >= 2 else 1


@dataclass(frozen=True, slots=True)
class Gap:
    """Windows missing between two stored windows of one agent."""

    after_seq: int
    before_seq: int
    after_window: int
    before_window: int
    missing: int


class Health(Database):
    """Agents' health and the retention (see the module docstring)."""

    def prune(self, now: int, retention_days: int) -> int:
        """Delete windows that started more than ``retention_days`` ago (roll-ups stay); the
        number deleted. The cutoff is remembered per agent whose windows it deleted, so a
        replay of one is refused (verify: ``expired``), and by window time only: a current
        window is never older than it."""
        if retention_days <= 0:
            return 0
        cutoff = now - retention_days * 86400
        old = windows.c.window_start < cutoff
        with self.begin() as conn:
            touched = sa.select(windows.c.agent_key).where(old).distinct()
            conn.execute(
                agents.update()
                .where(agents.c.agent_key.in_(touched), agents.c.pruned_before < cutoff)
                .values(pruned_before=cutoff)
            )
            deleted = conn.execute(sa.delete(windows).where(old)).rowcount
            if deleted:
                bump_version(conn)
        return deleted

    def quarantined(self) -> list[dict[str, Any]]:
        """Every quarantined message, oldest first."""
        with self.begin(read_only=True) as conn:
            rows = conn.execute(sa.select(quarantine).order_by(quarantine.c.id)).mappings().all()
        return [dict(row) for row in rows]

    def probe(self) -> None:
        """Read every table ingest writes (no rows): raises :class:`StoreError` when the
        database, not a message, is at fault."""
        with self.begin(read_only=True) as conn:
            for table in (
                windows,
                agents,
                registry_state,
                refusals,
                quarantine,
                receipts,
                *ROLLUPS,
            ):
                conn.execute(sa.select(sa.literal(1)).select_from(table).where(sa.false()))

    # --- health ----------------------------------------------------------------------------

    def _gaps(self, scope: ColumnElement[bool]) -> sa.Subquery:
        """Per stored window (in ``scope``) after an agent's first: how many windows are
        missing before it."""
        w = windows.c
        # Each lag once, in a subquery (named twice in one select, it is computed twice).
        lagged = (
            sa.select(
                w.agent_key,
                w.seq,
                w.window_start,
                w.window_s,
                sa.func.lag(w.seq)
                .over(partition_by=w.agent_key, order_by=w.seq)
                .label("after_seq"),
                sa.func.lag(w.window_start)
                .over(partition_by=w.agent_key, order_by=w.seq)
                .label("after_window"),
            )
            .where(scope)
            .subquery()
        )
        g = lagged.c
        by_seq = g.seq - g.after_seq - 1
        by_time = (g.window_start - g.after_window) // g.window_s - 1
        return sa.select(
            g.agent_key,
            g.after_seq,
            g.seq.label("before_seq"),
            g.after_window,
            g.window_start.label("before_window"),
            self._least(by_seq, by_time).label("missing"),
        ).subquery()

    def _least(self, a: ColumnElement[Any], b: ColumnElement[Any]) -> ColumnElement[Any]:
        return sa.func.least(a, b) if self.dialect == "postgresql" else sa.func.min(a, b)

    def agents(
        self,
        site: str | None = None,
        since: int | None = None,
        until: int | None = None,
        conn: Connection | None = None,
    ) -> list[AgentHealth]:
        """Every agent (of one site), with its health; with ``since`` (and ``until``, Unix s),
        the windows stored and missing count only those from then on (and before then): a
        quick look at a big store. Read in ``conn``'s transaction when given (the site page's
        other reads' one), else in a read-only one of its own.

        Missing windows are the gaps in an agent's stored seqs, and (but with ``until``) those
        after its last stored one up to the ``last_seq`` of its last status: windows it made
        that have not arrived, lost or still on the way (an agent with receipts sends them
        again); but not those ingest refused for their content after their signature verified
        (received, settled, never to be stored: ``refused`` counts them, whatever the bounds,
        and ``footfall-aggregator quarantine`` shows them). ``spool_filling``: its last status
        said more than :data:`SPOOL_FILLING` windows wait in its spool (the aggregator does
        not store them, or the agent cannot reach the broker)."""
        if conn is None:
            with self.begin(read_only=True) as own:
                return self.agents(site, since, until, own)
        a = agents.c
        scope: ColumnElement[bool] = sa.true()
        listed = sa.select(
            a.agent_key,
            a.site_id,
            a.agent_id,
            a.public_key,
            a.enrolled_at,
            a.revoked_at,
            a.last_seen_at,
            a.status_state,
            a.status_cause,
            a.status_at,
            a.spool_pending,
            a.spool_dropped,
            a.status_last_seq,
            a.counts_v,
            a.meta,
            a.count_evictions,
            a.estimate_evictions,
        ).order_by(a.site_id, a.agent_id)
        refusals_read = sa.select(receipts.c.agent_key, receipts.c.refused)
        if site is not None:
            keys = sa.select(a.agent_key).where(a.site_id == site)
            listed = listed.where(a.site_id == site)
            scope &= windows.c.agent_key.in_(keys)
            refusals_read = refusals_read.where(receipts.c.agent_key.in_(keys))
        if since is not None or until is not None:
            # Both bounds, always: given one, SQLite's planner reads every window of an agent
            # in primary key order instead of the (agent, window start) index's range.
            scope &= windows.c.window_start >= (since or 0)
            scope &= windows.c.window_start < (_NEVER if until is None else until)
        # The windows' figures by agent in a query of their own, not joined to the agents: a
        # planner that thinks a site has one agent (PostgreSQL never analyses a table that
        # small) would compute them again for every agent.
        w = windows.c
        stored = (
            sa.select(
                w.agent_key,
                sa.func.count(),
                sa.func.min(w.window_start),
                sa.func.max(w.window_start),
                sa.func.max(w.seq),
                sa.func.min(w.seq),
            )
            .where(scope)
            .group_by(w.agent_key)
        )
        rows = conn.execute(listed).all()
        figures = {row[0]: row[1:] for row in conn.execute(stored)}
        # Only an agent with a seq not stored between its first and its last (in scope)
        # can miss windows between them: the gaps (a LAG over every window in scope) are
        # read for those agents alone (for all 20 agents of a day: 55-77 ms, most of the
        # site page's time).
        holed = sorted(
            key for key, (count, _, _, last, first) in figures.items() if last - first >= count
        )
        gapped: dict[int, int] = {}
        if holed:
            gaps = self._gaps(scope & w.agent_key.in_(holed))
            lost = sa.func.sum(sa.case((gaps.c.missing > 0, gaps.c.missing), else_=0))
            query = sa.select(gaps.c.agent_key, lost).group_by(gaps.c.agent_key)
            gapped = {key: int(missing) for key, missing in conn.execute(query)}
        refused = {key: json.loads(text) for key, text in conn.execute(refusals_read)}
        out = []
        for row in rows:
            count, first, last, last_seq, first_seq = figures.get(
                row.agent_key, (0, None, None, None, None)
            )
            missing = gapped.get(row.agent_key, 0)
            made = row.status_last_seq  # the newest window the agent says it made
            if last_seq is not None:
                if made is not None and until is None:
                    missing += max(0, made - last_seq)
                    upper = max(last_seq, made)
                else:
                    upper = last_seq
                # Refused windows were received: not missing (they lie in the gaps counted).
                missing -= _within(refused.get(row.agent_key, []), first_seq + 1, upper)
            out.append(
                AgentHealth(
                    site=row.site_id,
                    agent=row.agent_id,
                    public_key=row.public_key,
                    enrolled_at=row.enrolled_at,
                    revoked_at=row.revoked_at,
                    last_seen_at=row.last_seen_at,
                    state=row.status_state,
                    cause=row.status_cause,
                    status_at=row.status_at,
                    spool_pending=row.spool_pending,
                    spool_dropped=row.spool_dropped,
                    windows=int(count),
                    first_window=first,
                    last_window=last,
                    last_seq=last_seq,
                    missing=max(0, missing),
                    spool_filling=(row.spool_pending or 0) > SPOOL_FILLING,
                    refused=sum(hi - lo + 1 for lo, hi in refused.get(row.agent_key, [])),
                    counts_v=row.counts_v,
                    meta_counts_v=_declared_counts_v(row.meta),
                    count_evictions=row.count_evictions,
                    estimate_evictions=row.estimate_evictions,
                )
            )
        return out

    def gaps(self, site: str, agent: str, limit: int = 50) -> list[Gap]:
        """The latest gaps in an agent's windows, newest first."""
        site, agent = check_site(site), check_agent(agent)
        gaps = self._gaps(sa.true())
        with self.begin() as conn:
            key = conn.execute(
                sa.select(agents.c.agent_key).where(
                    agents.c.site_id == site, agents.c.agent_id == agent
                )
            ).scalar()
            if key is None:
                raise RegistryError(f"agent {site}/{agent} is not enrolled")
            rows = conn.execute(
                sa.select(
                    gaps.c.after_seq,
                    gaps.c.before_seq,
                    gaps.c.after_window,
                    gaps.c.before_window,
                    gaps.c.missing,
                )
                .where(gaps.c.agent_key == key, gaps.c.missing > 0)
                .order_by(gaps.c.before_seq.desc())
                .limit(limit)
            ).all()
        return [Gap(*(int(v) for v in row)) for row in rows]

    def refusal_counts(self) -> dict[tuple[str, str, str], int]:
        """Messages not stored so far: (reason, site, agent) -> count."""
        with self.begin() as conn:
            rows = conn.execute(
                sa.select(
                    refusals.c.reason, refusals.c.site_id, refusals.c.agent_id, refusals.c.count
                )
            ).all()
        return {(r, s, a): int(n) for r, s, a, n in rows}


def _within(ranges: Sequence[Sequence[int]], lo: int, hi: int) -> int:
    """How many seqs of ``ranges`` lie in [lo, hi]."""
    return sum(max(0, min(hi, b) - max(lo, a) + 1) for a, b in ranges)
