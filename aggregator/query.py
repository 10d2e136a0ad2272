"""What merchants read: a site's counts by window, hour and day in its time zone, its busy
times, dwell, capture rate and agents' health (the API and the dashboard both ask here).

Anything over more than a day reads the roll-ups (``site_hours``, ``site_days``), never the
window table; windows are read for one site over at most :data:`MAX_WINDOW_DAYS` days.

**Suppressed counts.** Each measure comes with ``<name>_suppressed``: the windows in the period
whose value the agent suppressed (``null``: between 1 and k-1, or complementary to one that
was). The value is the sum of the published windows only, so when ``_suppressed`` is above 0
the true count is *at least* the value; the value is ``null`` when no window of the period
published it (all suppressed, or a field the agents' privacy mode does not publish).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from aggregator.errors import RegistryError
from aggregator.rollup import DWELL_BANDS, SUPPRESSIBLE, zone
from aggregator.store import NULLABLE_COLUMNS, Store, agents, site_days, site_hours, sites, windows

__all__ = [
    "MAX_WINDOW_DAYS",
    "MEASURES",
    "UNITS",
    "Counts",
    "Site",
]

MAX_WINDOW_DAYS = 7
HEATMAP_WEEKS = 4
# (measure, its roll-up sum column, the roll-up column counting windows that carried it)
_ROLLUP_SOURCES: tuple[tuple[str, str, str], ...] = (
    ("devices", "devices_sum", "windows"),
    ("devices_randomised", "devices_randomised_sum", "windows"),
    ("visitors", "visitors_sum", "windows"),
    ("passersby", "passersby_sum", "windows"),
    ("visits_ended", "visits_ended", "visits_ended_windows"),
    *((column, column, "dwell_windows") for _, column in DWELL_BANDS),
    ("people_est", "people_est_sum", "people_est_windows"),
    ("people", "people_sum", "people_windows"),
)
MEASURES: tuple[str, ...] = tuple(m for m, _, _ in _ROLLUP_SOURCES)
UNITS: dict[str, str] = {
    "windows": "windows",
    "probe_requests": "frames",
    **{m: ("visits" if m.startswith(("visits", "dwell")) else "devices") for m in MEASURES},
    **{f"{m}_suppressed": "windows" for m in MEASURES},
}
if not set(MEASURES) <= set(SUPPRESSIBLE):  # UNITS and the queries read `<measure>_suppressed`
    raise RuntimeError(f"measures without a suppressed count: {set(MEASURES) - set(SUPPRESSIBLE)}")


@dataclass(frozen=True, slots=True)
class Site:
    id: str
    name: str
    timezone: str


def _measures(row: sa.RowMapping) -> dict[str, int | None]:
    """A roll-up row's measures as the API gives them (see the module docstring)."""
    out: dict[str, int | None] = {
        "windows": row["windows"],
        "probe_requests": row["probe_requests"],
    }
    for measure, total, carried in _ROLLUP_SOURCES:
        suppressed = int(row[f"{measure}_suppressed"])
        published = int(row[carried]) - suppressed
        out[measure] = int(row[total]) if published > 0 else None
        out[f"{measure}_suppressed"] = suppressed
    return out


class Counts:
    """Reads of a store for one site at a time (the caller has checked the site is theirs)."""

    def __init__(self, store: Store, conn: Connection | None = None) -> None:
        self.store = store
        self._conn = conn

    @contextlib.contextmanager
    def _reading(self) -> Iterator[Connection]:
        """The connection of :meth:`reading`, or a read-only transaction of its own."""
        if self._conn is not None:
            yield self._conn
            return
        with self.store.begin(read_only=True) as conn:
            yield conn

    @contextlib.contextmanager
    def reading(self) -> Iterator[Counts]:
        """Counts that make all their reads in one read-only transaction (one snapshot, one
        connection: a page's dozen reads without a dozen round trips to begin and end)."""
        with self.store.begin(read_only=True) as conn:
            yield Counts(self.store, conn)

    def site(self, site_id: str) -> Site:
        with self._reading() as conn:
            row = conn.execute(
                sa.select(sites.c.id, sites.c.name, sites.c.timezone).where(sites.c.id == site_id)
            ).first()
        if row is None:
            raise RegistryError(f"site {site_id} does not exist")
        return Site(*row)

    def sites(self, only: Iterable[str] | None = None) -> list[Site]:
        """Every site, or those of ``only``."""
        query = sa.select(sites.c.id, sites.c.name, sites.c.timezone).order_by(sites.c.id)
        if only is not None:
            query = query.where(sites.c.id.in_(list(only)))
        with self._reading() as conn:
            return [Site(*row) for row in conn.execute(query)]

    def first_day(self, site: Site) -> str | None:
        """The local day of the site's first stored hour (roll-ups outlive retention)."""
        with self._reading() as conn:
            first: str | None = conn.execute(
                sa.select(sa.func.min(site_days.c.local_day)).where(site_days.c.site_id == site.id)
            ).scalar()
        return first

    @staticmethod
    def day_bounds(site: Site, first: date, last: date) -> tuple[int, int]:
        """The UTC instants (Unix s) of the local midnights starting ``first`` and ending
        ``last``."""
        tz = zone(site.timezone)
        start = datetime.combine(first, time(0), tz)
        end = datetime.combine(last + timedelta(days=1), time(0), tz)
        return int(start.timestamp()), int(end.timestamp())

    def hours(self, site: Site, first: date, last: date) -> list[dict[str, Any]]:
        """One row per local hour with data, from ``first`` to ``last`` (local days)."""
        start, end = self.day_bounds(site, first, last)
        h = site_hours.c
        query = (
            sa.select(site_hours)
            .where(h.site_id == site.id, h.hour_start >= start, h.hour_start < end)
            .order_by(h.hour_start)
        )
        with self._reading() as conn:
            rows = conn.execute(query).mappings().all()
        return [
            {
                "start": _iso(row["hour_start"], row["utc_offset_s"]),
                "local": row["local_hour"],
                **_measures(row),
            }
            for row in rows
        ]

    def days(self, site: Site, first: date, last: date) -> list[dict[str, Any]]:
        """One row per local day with data, from ``first`` to ``last``."""
        d = site_days.c
        query = (
            sa.select(site_days)
            .where(
                d.site_id == site.id,
                d.local_day >= first.isoformat(),
                d.local_day <= last.isoformat(),
            )
            .order_by(d.local_day)
        )
        with self._reading() as conn:
            rows = conn.execute(query).mappings().all()
        return [
            {"local": row["local_day"], "hours": row["day_hours"], **_measures(row)} for row in rows
        ]

    def windows(self, site: Site, first: date, last: date) -> list[dict[str, Any]]:
        """One row per window start with data (every agent of the site summed), from
        ``first`` to ``last``: at most :data:`MAX_WINDOW_DAYS` days."""
        if (last - first).days >= MAX_WINDOW_DAYS:
            raise ValueError(
                f"windows: at most {MAX_WINDOW_DAYS} days at a time, got "
                f"{(last - first).days + 1} (use hours or days)"
            )
        start, end = self.day_bounds(site, first, last)
        w = windows.c
        columns: list[Any] = [
            w.window_start,
            sa.func.count().label("windows"),
            sa.func.sum(w.probe_requests).label("probe_requests"),
        ]
        for measure in MEASURES:
            bit = 1 << NULLABLE_COLUMNS.index(measure)
            columns += [
                sa.func.sum(w[measure]).label(measure),
                sa.func.sum(sa.case((w.suppressed.op("&")(bit) != 0, 1), else_=0)).label(
                    f"{measure}_suppressed"
                ),
            ]
        query = (
            sa.select(*columns)
            .where(
                w.agent_key.in_(sa.select(agents.c.agent_key).where(agents.c.site_id == site.id)),
                w.window_start >= start,
                w.window_start < end,
            )
            .group_by(w.window_start)
            .order_by(w.window_start)
        )
        tz = zone(site.timezone)
        with self._reading() as conn:
            rows = conn.execute(query).mappings().all()
        return [
            {
                "start": datetime.fromtimestamp(row["window_start"], tz).isoformat(),
                "local": datetime.fromtimestamp(row["window_start"], tz).strftime("%Y-%m-%dT%H:%M"),
                **{
                    k: (None if v is None else int(v))
                    for k, v in row.items()
                    if k != "window_start"
                },
            }
            for row in rows
        ]

    def heatmap(self, site: Site, last: date) -> dict[str, Any]:
        """Busy times: mean visitors per weekday (0 = Monday) and local hour over the
        :data:`HEATMAP_WEEKS` weeks that end with ``last``; ``null`` where no hour had data."""
        first = last - timedelta(days=7 * HEATMAP_WEEKS - 1)
        totals = [[0] * 24 for _ in range(7)]
        seen = [[0] * 24 for _ in range(7)]
        suppressed = [[0] * 24 for _ in range(7)]
        start, end = self.day_bounds(site, first, last)
        h = site_hours.c
        query = sa.select(h.local_hour, h.windows, h.visitors_sum, h.visitors_suppressed).where(
            h.site_id == site.id, h.hour_start >= start, h.hour_start < end
        )
        with self._reading() as conn:
            rows = conn.execute(query).all()
        for local, stored, visitors, hidden in rows:
            day, hour = date.fromisoformat(local[:10]).weekday(), int(local[11:13])
            if stored > hidden:  # some window published its visitors
                totals[day][hour] += visitors
                seen[day][hour] += 1
            suppressed[day][hour] += hidden
        return {
            "first": first.isoformat(),
            "last": last.isoformat(),
            "visitors": [
                [round(t / n, 1) if n else None for t, n in zip(tr, nr, strict=True)]
                for tr, nr in zip(totals, seen, strict=True)
            ],
            "visitors_suppressed": suppressed,
        }


def _iso(unix_s: int, offset_s: int) -> str:
    return datetime.fromtimestamp(unix_s, timezone(timedelta(seconds=offset_s))).isoformat()
