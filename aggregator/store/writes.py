"""The store's writes: ingest's batches of windows, roll-ups and agents' health, the
settled ranges its receipts report, refusals and the quarantine.

Writing a batch (:meth:`Store.store_batch`) is one transaction: the new windows are bulk
loaded into a temporary staging table (PostgreSQL: ``COPY``; SQLite: ``executemany``) and
moved with one ``INSERT ... SELECT ... ON CONFLICT DO NOTHING RETURNING``, so a window already
stored (a redelivery, a replay) is skipped and only the windows really inserted are added to
the roll-ups, which are upserted the same way, in key order (two processes on PostgreSQL take
row locks in the same order, so they do not deadlock each other).

The same transaction adds the batch's seqs to each agent's settled ranges (``receipts``): a
window stored, or skipped for good (a duplicate, a conflicting seq, another window for the
same start), is settled, and the agent may let it go once a receipt says so. A window refused
for its content after its signature verified (:attr:`Refusal.settles`) is settled too, in the
transaction that quarantines it (:meth:`Store.quarantine`): re-sending it cannot change the
answer. A message whose signature did not verify settles nothing. An agent's ranges
stay few (one per run of windows; a gap is a window never received), and at most
:data:`MAX_SETTLED_RANGES` are kept: beyond, the lowest are forgotten, and a window the agent
still holds there is sent again, skipped as a duplicate, and settled again.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from aggregator.config import StoreSettings
from aggregator.registry import noisy
from aggregator.rollup import (
    MAX_MEASURES,
    MEASURES,
    PEOPLE_COUNTS,
    Buckets,
    RollupDeltas,
    device_counts,
    people_counts,
    totals,
)
from aggregator.store.engine import Database
from aggregator.store.enrolment import bump_version
from aggregator.store.schema import (
    ROLLUPS,
    STAGING,
    WINDOW_COLUMNS,
    agent_days,
    agent_hours,
    agents,
    quarantine,
    receipts,
    refusals,
    site_days,
    site_hours,
    windows,
)
from aggregator.verify import Accepted

_HOURLY = {table.name: "hour_start" in table.c for table in ROLLUPS}
QUARANTINE_KEEP = 10_000  # rows: each quarantining deletes those before the newest 10,000
MAX_SETTLED_RANGES = 256  # per agent; beyond, the lowest are forgotten (module docstring)


@dataclass(slots=True)
class BatchOutcome:
    """What a batch did: the counts stored, and the messages skipped with their reason."""

    stored: list[Accepted] = field(default_factory=list)
    skipped: list[tuple[Accepted, str]] = field(default_factory=list)
    settled: set[int] = field(default_factory=set)  # agent keys whose receipt moved


class Writer(Database):
    """Ingest's writes (see the module docstring)."""

    def __init__(self, settings: StoreSettings) -> None:
        super().__init__(settings)
        self._statements = _Statements(self)
        self._seen_written: dict[int, int] = {}  # agent_key -> last_seen_at written

    def store_batch(
        self,
        accepted: Sequence[Accepted],
        refused: Mapping[tuple[str, str, str], int] | None = None,
        now: int = 0,
    ) -> BatchOutcome:
        """Store a batch of verified messages in one transaction (see the module docstring);
        ``refused`` counts (reason, site, agent) of messages refused before the store."""
        outcome = BatchOutcome()
        counts: list[Accepted] = []
        seen: dict[tuple[int, int], str] = {}  # (agent_key, seq) -> signature
        for message in accepted:
            if message.kind != "counts":
                continue
            ident = (message.agent.key, int(message.payload["seq"]))
            if ident in seen:
                same = seen[ident] == message.signature
                outcome.skipped.append((message, "duplicate" if same else "seq_conflict"))
            else:
                seen[ident] = message.signature
                counts.append(message)
        tally: dict[tuple[str, str, str], int] = dict(refused or {})
        with self.begin() as conn:
            counts = self._not_pruned(conn, counts, outcome)
            inserted = self._insert_windows(conn, counts)
            for message in counts:
                if (message.agent.key, int(message.payload["seq"])) in inserted:
                    outcome.stored.append(message)
            if len(outcome.stored) < len(counts):
                outcome.skipped.extend(self._classify(conn, counts, inserted))
            deltas = RollupDeltas.of(
                (m.agent.key, m.agent.site, m.agent.zone, m.window_start, m.payload)
                for m in outcome.stored
            )
            if deltas:
                self._upsert_rollups(conn, deltas)
                self._note_versions(conn, outcome.stored)
            self._update_agents(conn, accepted, now)
            outcome.settled = self._settle(conn, counts, now)
            for message, reason in outcome.skipped:
                who = (reason, message.agent.site, message.agent.agent)
                tally[who] = tally.get(who, 0) + 1
            if tally:
                self._count_refusals(conn, tally, now)
        return outcome

    def _not_pruned(
        self, conn: Connection, counts: list[Accepted], outcome: BatchOutcome
    ) -> list[Accepted]:
        """The windows that start at or after their agent's retention cutoff, as the database
        has it now (the verifier's registry may be older than the last prune: a replay it let
        through would be counted again); the others are skipped as ``expired``."""
        keys = sorted({m.agent.key for m in counts})
        if not keys:
            return counts
        cutoffs = {
            int(key): int(cutoff)
            for key, cutoff in conn.execute(
                sa.select(agents.c.agent_key, agents.c.pruned_before).where(
                    agents.c.agent_key.in_(keys), agents.c.pruned_before > 0
                )
            )
        }
        if not cutoffs:
            return counts
        kept = []
        for message in counts:
            if message.window_start < cutoffs.get(message.agent.key, 0):
                outcome.skipped.append((message, "expired"))
            else:
                kept.append(message)
        return kept

    def _insert_windows(self, conn: Connection, counts: Sequence[Accepted]) -> set[tuple[int, int]]:
        """Insert the windows not stored yet; the (agent_key, seq) of those inserted."""
        if not counts:
            return set()
        rows = sorted((_window_row(m) for m in counts), key=lambda row: (row[0], row[1]))
        st = self._statements
        if self.dialect == "sqlite":
            # The write transaction is exclusive (BEGIN IMMEDIATE) and new rows get rowids
            # above the largest, so the rows above it afterwards are exactly those inserted.
            before = conn.exec_driver_sql(st.sqlite_max_rowid).scalar_one()
            conn.exec_driver_sql(st.sqlite_insert_windows, rows)
            returned = conn.exec_driver_sql(st.sqlite_inserted, (before,)).all()
        else:
            self._stage(conn, STAGING["windows"], rows)
            returned = conn.execute(st.insert_windows).all()
        return {(int(key), int(seq)) for key, seq in returned}

    def _classify(
        self, conn: Connection, counts: Sequence[Accepted], inserted: set[tuple[int, int]]
    ) -> Iterable[tuple[Accepted, str]]:
        """Why the counts not inserted were skipped: the same message again, another under
        the same seq, or another window for the same start."""
        left = [m for m in counts if (m.agent.key, int(m.payload["seq"])) not in inserted]
        if self.dialect == "sqlite":
            stored_sig = {}
            for m in left:
                ident = (m.agent.key, int(m.payload["seq"]))
                sig = conn.exec_driver_sql(self._statements.sqlite_sig, ident).scalar()
                if sig is not None:
                    stored_sig[ident] = sig
        else:
            stored_sig = {
                (int(key), int(seq)): sig
                for key, seq, sig in conn.execute(self._statements.stored_sigs).all()
            }
        for message in left:
            sig = stored_sig.get((message.agent.key, int(message.payload["seq"])))
            if sig is None:
                yield message, "duplicate_window"
            elif sig == message.signature:
                yield message, "duplicate"
            else:
                yield message, "seq_conflict"

    def _settle(
        self,
        conn: Connection,
        counts: Sequence[Accepted],
        now: int,
        refused: Iterable[tuple[int, int]] = (),
    ) -> set[int]:
        """Add the counts' seqs (stored now, or skipped: settled either way) and the
        ``refused`` (agent key, seq) (verified, refused for their content: never to be stored)
        to their agents' settled ranges, the refused also to their refused ranges; the agent
        keys. Rows are locked in key order (PostgreSQL: two processes merge one after the
        other, in the same order)."""
        seqs: dict[int, list[int]] = {}
        for message in counts:
            seqs.setdefault(message.agent.key, []).append(int(message.payload["seq"]))
        bad: dict[int, list[int]] = {}
        for key, seq in refused:
            seqs.setdefault(key, []).append(seq)
            bad.setdefault(key, []).append(seq)
        if not seqs:
            return set()
        r = receipts.c
        query = sa.select(r.agent_key, r.settled, r.refused).where(r.agent_key.in_(sorted(seqs)))
        if self.dialect == "postgresql":
            query = query.order_by(r.agent_key).with_for_update()
        held = {key: (json.loads(s), json.loads(f)) for key, s, f in conn.execute(query).all()}
        rows = [
            {
                "agent_key": key,
                "settled": _ranges_text(held.get(key, ([], []))[0], seqs[key]),
                "refused": _ranges_text(held.get(key, ([], []))[1], bad.get(key, [])),
                "updated_at": now,
            }
            for key in sorted(seqs)
        ]
        insert = (postgresql if self.dialect == "postgresql" else sqlite).insert(receipts)
        conn.execute(
            insert.on_conflict_do_update(
                index_elements=[r.agent_key],
                set_={
                    "settled": insert.excluded.settled,
                    "refused": insert.excluded.refused,
                    "updated_at": insert.excluded.updated_at,
                },
            ),
            rows,
        )
        return set(seqs)

    def settled(self, keys: Iterable[int]) -> dict[int, tuple[str, str, list[tuple[int, int]]]]:
        """Agent key -> (site, agent, settled ranges), for the keys that have any."""
        a, r = agents.c, receipts.c
        with self.begin(read_only=True) as conn:
            rows = conn.execute(
                sa.select(r.agent_key, a.site_id, a.agent_id, r.settled)
                .join(agents, a.agent_key == r.agent_key)
                .where(r.agent_key.in_(sorted(keys)))
            ).all()
        return {
            key: (site, agent, [(int(lo), int(hi)) for lo, hi in json.loads(text)])
            for key, site, agent, text in rows
        }

    def _upsert_rollups(self, conn: Connection, deltas: RollupDeltas) -> None:
        for table, rows in (
            (agent_hours, totals(deltas.agent_hours)),
            (agent_days, totals(deltas.agent_days)),
            (site_hours, totals(deltas.site_hours)),
            (site_days, totals(deltas.site_days)),
        ):
            hourly = _HOURLY[table.name]
            staged = [
                (key[0], *_period(hourly, b), *sums, *maxima) for key, b, sums, maxima in rows
            ]
            if self.dialect == "sqlite":
                conn.exec_driver_sql(self._statements.sqlite_upsert_rollup[table.name], staged)
            else:
                self._stage(conn, STAGING[table.name], staged)
                conn.execute(self._statements.upsert_rollup[table.name])
        # The site's people figures are its busiest agent's, not the agents' sum: set again
        # for the hours the batch touched, then their days from those hours.
        st = self._statements
        hours = [{"s": site, "h": hour} for site, hour in sorted(deltas.site_hours)]
        conn.execute(st.busiest_hours, hours)
        days = [{"s": site, "d": day} for site, day in sorted(deltas.site_days)]
        conn.execute(st.busiest_days, days)

    def _note_versions(self, conn: Connection, stored: Sequence[Accepted]) -> None:
        """Each agent's counts schema version, from its latest window in the batch."""
        latest: dict[int, tuple[int, int]] = {}  # agent_key -> (seq, v)
        for message in stored:
            seq = int(message.payload["seq"])
            if seq > latest.get(message.agent.key, (0, 0))[0]:
                latest[message.agent.key] = (seq, int(message.payload["v"]))
        rows = [{"k": key, "v": v} for key, (_, v) in sorted(latest.items())]
        conn.execute(self._statements.update_counts_v, rows)

    def _update_agents(self, conn: Connection, accepted: Sequence[Accepted], now: int) -> None:
        statuses: list[dict[str, Any]] = []
        metas: list[dict[str, Any]] = []
        seen: dict[int, int] = {}
        changed = False
        for message in accepted:
            key = message.agent.key
            seen[key] = max(seen.get(key, 0), message.received_at)
            if message.kind == "status":
                p = message.payload
                statuses.append(
                    {
                        "k": key,
                        "state": p["state"],
                        "cause": p["cause"],
                        "at": message.window_start,
                        "pending": int(p["spool_pending"]),
                        "dropped": int(p["spool_dropped"]),
                        "last_seq": int(p["last_seq"]),
                        "count_evictions": p.get("count_evictions"),  # None: status v1
                        "estimate_evictions": p.get("estimate_evictions"),
                    }
                )
            elif message.kind == "meta":
                metas.append({"k": key, "meta": message.canonical, "at": message.received_at})
                changed |= noisy(message.payload) != message.agent.noisy
        if statuses:
            conn.execute(self._statements.update_status, statuses)
        if metas:
            conn.execute(self._statements.update_meta, metas)
        if changed:  # the verifier holds the agent to other rules now: reload the registry
            bump_version(conn)
        due = [
            {"k": key, "at": at}
            for key, at in seen.items()
            if at - self._seen_written.get(key, -(1 << 62)) >= 5
        ]
        if due:
            conn.execute(self._statements.update_seen, due)
            for row in due:
                self._seen_written[row["k"]] = row["at"]

    def _count_refusals(
        self, conn: Connection, tally: Mapping[tuple[str, str, str], int], now: int
    ) -> None:
        rows = [
            {"reason": r, "site_id": s, "agent_id": a, "count": n, "first_at": now, "last_at": now}
            for (r, s, a), n in sorted(tally.items())
        ]
        conn.execute(self._statements.count_refusals, rows)

    def _stage(self, conn: Connection, table: sa.Table, rows: Sequence[Sequence[Any]]) -> None:
        """Bulk load rows into a temporary staging table (emptied first)."""
        names = ", ".join(c.name for c in table.columns)
        if self.dialect == "postgresql":
            raw = conn.connection.driver_connection
            if raw is None:  # a pooled connection always has its driver's; never None here
                raise RuntimeError("the PostgreSQL connection has no driver connection")
            # The table is empty: ON COMMIT DELETE ROWS.
            with (
                raw.cursor() as cursor,
                cursor.copy(f"COPY {table.name} ({names}) FROM STDIN") as copy,
            ):
                for row in rows:
                    copy.write_row(row)
        else:
            conn.exec_driver_sql(f"DELETE FROM {table.name}")
            marks = ", ".join("?" for _ in table.columns)
            conn.exec_driver_sql(
                f"INSERT INTO {table.name} ({names}) VALUES ({marks})",
                [tuple(row) for row in rows],
            )

    # --- quarantine ------------------------------------------------------------------------

    def quarantine(
        self,
        rows: Sequence[Mapping[str, Any]],
        now: int,
        keep: int = QUARANTINE_KEEP,
        settle: Iterable[tuple[int, int]] = (),
    ) -> set[int]:
        """Quarantine messages (rows of the ``quarantine`` table but ``id``) and count each
        as a refusal of its reason, site and agent, in one transaction; the newest ``keep``
        rows stay. ``settle``: the (agent key, seq) of the counts among them whose signature
        verified with the enrolled key (refused for their content, :attr:`Refusal.settles`),
        settled and marked refused in the same transaction; the agent keys whose receipt
        moved."""
        tally: dict[tuple[str, str, str], int] = {}
        for row in rows:
            who = (row["reason"], row["site_id"], row["agent_id"])
            tally[who] = tally.get(who, 0) + 1
        newest = sa.select(sa.func.max(quarantine.c.id)).scalar_subquery()
        with self.begin() as conn:
            conn.execute(quarantine.insert(), list(rows))
            conn.execute(sa.delete(quarantine).where(quarantine.c.id <= newest - keep))
            self._count_refusals(conn, tally, now)
            return self._settle(conn, [], now, settle)


def _ranges_text(ranges: Sequence[Sequence[int]], seqs: Iterable[int]) -> str:
    """``ranges`` with ``seqs`` added, the newest :data:`MAX_SETTLED_RANGES` kept, as JSON."""
    return json.dumps(merge_ranges(ranges, seqs)[-MAX_SETTLED_RANGES:], separators=(",", ":"))


def merge_ranges(ranges: Sequence[Sequence[int]], seqs: Iterable[int]) -> list[list[int]]:
    """Sorted, apart, inclusive ranges ``[[lo, hi], ...]`` with ``seqs`` added (touching
    ranges joined)."""
    merged: list[list[int]] = []
    for lo, hi in sorted([*([int(x) for x in r] for r in ranges), *([s, s] for s in seqs)]):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return merged


def _period(hourly: bool, b: Buckets) -> tuple[Any, ...]:
    if hourly:
        return (b.hour_start, b.local_hour, b.utc_offset_s)
    return (b.local_day, b.day_start, b.day_hours)


def _window_row(message: Accepted) -> tuple[Any, ...]:
    """The row of a counts message, in WINDOW_COLUMNS order (int() turns a validated integral
    float into the int it is; a suppressed count is NULL with its bit in ``suppressed``, an
    absent one NULL alone)."""
    p = message.payload
    values, there = device_counts(p)
    values.append(p.get("static_excluded"))
    there.append("static_excluded" in p)
    people, heard = people_counts(p)
    suppressed = 0
    for bit, (value, present) in enumerate(zip(values, there, strict=True)):
        if value is None and present:
            suppressed |= 1 << bit
    return (
        message.agent.key,
        int(p["seq"]),
        message.window_start,
        int(p["window_s"]),
        p["epoch"],
        int(p["probe_requests"]),
        int(p["malformed"]),
        int(p["late_frames"]),
        *(None if value is None else int(value) for value in values),
        suppressed,
        message.canonical,
        message.signature,
        message.received_at,
        int(p["v"]),
        int(bool(p.get("no_data"))),
        None if "calibrated" not in p else int(p["calibrated"]),
        *people,
        sum(
            1 << bit
            for bit, (v, t) in enumerate(zip(people, heard, strict=True))
            if v is None and t
        ),
    )


def _positional_insert(table: sa.Table, conflict: str) -> str:
    """INSERT of every column of a table, by position (SQLite's executemany, no SQLAlchemy
    parameter processing on the hot path)."""
    names = ", ".join(c.name for c in table.columns)
    marks = ", ".join("?" for _ in table.columns)
    return f"INSERT INTO {table.name} ({names}) VALUES ({marks}) {conflict}"


# The site roll-ups' people figures that are the busiest agent's (aggregator/people.py): each
# additive figure's sum, the capture rate's two terms, and the occupancy's time-weighted sum
# and seconds. The rest of a site row sums its agents' (windows, published and suppressed
# windows) or takes their greatest (occupancy peak), as every roll-up does.
BUSIEST = (
    *(f"{name}_sum" for name in PEOPLE_COUNTS),
    "capture_arrivals",
    "capture_passersby",
    "occupancy_cs",
    "occupancy_s",
)


def _busiest_statements() -> tuple[sa.Update, sa.Update]:
    """UPDATEs that set :data:`BUSIEST` of a site hour (bind ``s``, ``h``) from its agents'
    hours, and of a site day (``s``, ``d``) from its site hours."""
    a, h, d = agent_hours.c, site_hours.c, site_days.c
    # The site by its bound id: correlated to the UPDATE's site_hours instead, the IN subquery
    # put site_hours in its own FROM and took every site's agents (a site read the busiest
    # agent of any site: another merchant's figures).
    of_site = a.agent_key.in_(
        sa.select(agents.c.agent_key).where(agents.c.site_id == sa.bindparam("s"))
    )
    mean = sa.case((a.occupancy_s > 0, a.occupancy_cs * 1.0 / a.occupancy_s), else_=0)
    longest = sa.func.max(a.occupancy_s)
    busiest: list[Any] = [sa.func.coalesce(sa.func.max(a[n]), 0) for n in BUSIEST[:-2]]
    busiest += [
        sa.func.coalesce(sa.cast(sa.func.round(sa.func.max(mean) * longest), sa.BigInteger), 0),
        sa.func.coalesce(longest, 0),
    ]
    hours = (
        site_hours.update()
        .where(h.site_id == sa.bindparam("s"), h.hour_start == sa.bindparam("h"))
        .values(
            {
                h[n]: sa.select(value)
                .where(of_site, a.hour_start == h.hour_start)
                .scalar_subquery()
                for n, value in zip(BUSIEST, busiest, strict=True)
            }
        )
    )
    in_day = (
        (site_hours.c.site_id == d.site_id)
        & (site_hours.c.hour_start >= d.day_start)
        & (site_hours.c.hour_start < d.day_start + d.day_hours * 3600)
    )
    days = (
        site_days.update()
        .where(d.site_id == sa.bindparam("s"), d.local_day == sa.bindparam("d"))
        .values(
            {
                d[n]: sa.select(sa.func.coalesce(sa.func.sum(site_hours.c[n]), 0))
                .where(in_day)
                .scalar_subquery()
                for n in BUSIEST
            }
        )
    )
    return hours, days


class _Statements:
    """The store's write statements, built once per dialect."""

    def __init__(self, store: Database) -> None:
        insert = store._insert
        staged = STAGING["windows"]
        self.insert_windows = (
            insert(windows)
            .from_select(
                list(WINDOW_COLUMNS),
                sa.select(*(staged.c[name] for name in WINDOW_COLUMNS))
                .where(sa.true())
                .order_by(staged.c.agent_key, staged.c.seq),
            )
            .on_conflict_do_nothing()
            .returning(windows.c.agent_key, windows.c.seq)
        )
        self.stored_sigs = sa.select(windows.c.agent_key, windows.c.seq, windows.c.sig).join(
            staged,
            (staged.c.agent_key == windows.c.agent_key) & (staged.c.seq == windows.c.seq),
        )
        greatest = sa.func.greatest if store.dialect == "postgresql" else sa.func.max
        self.upsert_rollup: dict[str, Any] = {}
        for table in ROLLUPS:
            source = STAGING[table.name]
            keys = [c.name for c in table.primary_key.columns]
            names = [c.name for c in table.columns]
            statement = insert(table).from_select(
                names,
                sa.select(*(source.c[n] for n in names))
                .where(sa.true())
                .order_by(*(source.c[k] for k in keys)),
            )
            excluded = statement.excluded
            self.upsert_rollup[table.name] = statement.on_conflict_do_update(
                index_elements=keys,
                set_={
                    m: (
                        greatest(table.c[m], excluded[m])
                        if m in MAX_MEASURES
                        else table.c[m] + excluded[m]
                    )
                    for m in MEASURES
                },
            )
        self.busiest_hours, self.busiest_days = _busiest_statements()
        self.sqlite_max_rowid = "SELECT coalesce(max(rowid), 0) FROM windows"
        self.sqlite_insert_windows = _positional_insert(windows, "ON CONFLICT DO NOTHING")
        self.sqlite_inserted = "SELECT agent_key, seq FROM windows WHERE rowid > ?"
        self.sqlite_sig = "SELECT sig FROM windows WHERE agent_key = ? AND seq = ?"
        self.sqlite_upsert_rollup: dict[str, str] = {}
        for table in ROLLUPS:
            conflict = ", ".join(c.name for c in table.primary_key.columns)
            updates = ", ".join(
                f"{m} = max({m}, excluded.{m})"
                if m in MAX_MEASURES
                else f"{m} = {m} + excluded.{m}"
                for m in MEASURES
            )
            self.sqlite_upsert_rollup[table.name] = _positional_insert(
                table, f"ON CONFLICT ({conflict}) DO UPDATE SET {updates}"
            )
        a = agents.c
        self.update_status = (
            agents.update()
            .where(
                a.agent_key == sa.bindparam("k"),
                sa.or_(a.status_at.is_(None), a.status_at <= sa.bindparam("at")),
            )
            .values(
                status_state=sa.bindparam("state"),
                status_cause=sa.bindparam("cause"),
                status_at=sa.bindparam("at"),
                spool_pending=sa.bindparam("pending"),
                spool_dropped=sa.bindparam("dropped"),
                status_last_seq=sa.bindparam("last_seq"),
                count_evictions=sa.bindparam("count_evictions"),
                estimate_evictions=sa.bindparam("estimate_evictions"),
            )
        )
        self.update_counts_v = (
            agents.update()
            .where(a.agent_key == sa.bindparam("k"))
            .values(counts_v=sa.bindparam("v"))
        )
        self.update_meta = (
            agents.update()
            .where(a.agent_key == sa.bindparam("k"))
            .values(meta=sa.bindparam("meta"), meta_at=sa.bindparam("at"))
        )
        self.update_seen = (
            agents.update()
            .where(
                a.agent_key == sa.bindparam("k"),
                sa.or_(a.last_seen_at.is_(None), a.last_seen_at < sa.bindparam("at")),
            )
            .values(last_seen_at=sa.bindparam("at"))
        )
        refused = insert(refusals)
        self.count_refusals = refused.on_conflict_do_update(
            index_elements=["reason", "site_id", "agent_id"],
            set_={
                "count": refusals.c.count + refused.excluded["count"],
                "last_at": refused.excluded.last_at,
            },
        )
