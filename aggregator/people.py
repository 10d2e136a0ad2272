"""People-level figures (counts v2) as a merchant reads them: by hour, day, week or month in
the site's time zone, a day's headline tiles, and one row per site for the overview.

**Kinds.** Arrivals, passers-by, visits ended and the dwell bands are additive: a period's
value is the sum of its windows'. Occupancy is a level: a period's mean is the time-weighted
mean of its windows' means (Σ mean * window_s / Σ window_s), its peak the greatest window peak;
neither is ever summed.

**Several agents at one site.** Two agents may hear the same person, so their figures are not
added: in each local hour, each figure of the site is the greatest of its agents' (the busiest
agent's arrivals, occupancy mean and peak). A day, week or month is then the sum (or mean, or
peak) of those hours. The store keeps these in the site roll-ups as it ingests (it sets them
again from the agents' hours for each hour a batch touches), so a read is one row per hour or
day, whatever the number of agents. With one agent per site, as most shops have, this is that
agent's figure; with agents that cover separate areas it undercounts (``docs/aggregator.md``).

**Gaps and suppression.** A figure is ``null`` when no window of the period published it, and
``<figure>_suppressed`` counts the windows that suppressed it (the value is then a lower bound).
The capture rate (the share of the people heard who came in: arrivals / (arrivals +
passers-by)) is taken over the windows that published both, so a window where one of them is
suppressed is in neither its numerator nor its denominator; ``null`` without such a window
or without anyone heard in them.
A period whose v2 windows all had no data (the sensor heard nothing) is a gap: ``no_data`` is
true and every figure is ``null``, never 0. v1 windows carry no people: they count in
``v1_windows`` only (their device-level figures are diagnostics, :mod:`aggregator.query`).

Everything here reads the site roll-ups (``site_hours``, ``site_days``): a month is at most
744 hours or 31 days, whatever the window length and the number of agents.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from datetime import date, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from aggregator.query import Counts, Site
from aggregator.rollup import DWELL_BANDS, PEOPLE_COUNTS, PEOPLE_FIELDS, zone
from aggregator.store import site_days, site_hours
from firmware_agent.contract import fields

__all__ = [
    "FIGURES",
    "PEOPLE_UNITS",
    "RESOLUTIONS",
    "busy_times",
    "figures",
    "group",
    "hours_of",
    "overview_row",
    "summary",
]

RESOLUTIONS = ("hour", "day", "week", "month")
# The figures of a row, as the API names them (column of the roll-ups -> name).
_NAMES: dict[str, str] = {table: fields.column(name) for name, table in PEOPLE_FIELDS}
FIGURES: tuple[str, ...] = (*_NAMES.values(), *fields.LEVELS)
PEOPLE_UNITS: dict[str, str] = {
    **{name: "visits" if name.startswith(("visits", "dwell")) else "people" for name in FIGURES},
    **{f"{name}_suppressed": "windows" for name in FIGURES},
    "windows": "windows",
    "v1_windows": "windows",
    "no_data_windows": "windows",
    "capture_rate": "share of people heard",
}
# Dwell bands' bounds in minutes, for the median.
# (the last band, an hour or more, taken as up to two hours).
_BAND_MINUTES = {
    name: bounds
    for (_, name), bounds in zip(
        DWELL_BANDS, itertools.pairwise((0, *fields.DWELL_EDGES_MIN, 120)), strict=True
    )
}


def _query(site: Site, first: date, last: date, by: str) -> sa.Select[Any]:
    """The site's hours (``by`` 'hour') or days ('day') from the local day ``first`` to
    ``last``, labelled as :func:`_row` reads them (a day's label: its midnight)."""
    t = site_hours if by == "hour" else site_days
    c = t.c
    label: sa.ColumnElement[Any]
    if by == "hour":
        start, end = Counts.day_bounds(site, first, last)
        label, scope = c.local_hour, (c.hour_start >= start) & (c.hour_start < end)
        order = c.hour_start
    else:
        label = c.local_day + "T00:00"
        scope = (c.local_day >= first.isoformat()) & (c.local_day <= last.isoformat())
        order = c.local_day
    columns: list[Any] = [
        label.label("local_hour"),
        c.windows,
        c.v1_windows,
        c.no_data_windows,
    ]
    for column in PEOPLE_COUNTS:
        columns += [
            c[f"{column}_sum"].label(column),
            c[f"{column}_windows"].label(f"{column}_published"),
            c[f"{column}_suppressed"],
        ]
    columns += [
        sa.case((c.occupancy_s > 0, c.occupancy_cs * 1.0 / c.occupancy_s)).label(
            "occupancy_mean_c"
        ),
        c.occupancy_s,
        c.occupancy_suppressed.label("occupancy_mean_suppressed"),
        c.occupancy_peak_max.label("occupancy_peak"),
        c.occupancy_peak_windows.label("occupancy_peak_published"),
        c.occupancy_peak_suppressed,
        c.capture_arrivals,
        c.capture_passersby,
    ]
    return sa.select(*columns).where(c.site_id == site.id, scope).order_by(order)


def _period_key(resolution: str) -> Callable[[str], str]:
    """A local hour ('YYYY-MM-DDTHH:MM') -> the key of its period ("range": all in one)."""
    if resolution == "range":
        return lambda local: "range"
    if resolution == "hour":
        return lambda local: local
    if resolution == "day":
        return lambda local: local[:10]
    if resolution == "month":
        return lambda local: local[:7]

    def week(local: str) -> str:  # the Monday that starts the local week
        day = date.fromisoformat(local[:10])
        return (day - timedelta(days=day.weekday())).isoformat()

    return week


def _row(local: str, hours: Sequence[sa.RowMapping]) -> dict[str, Any]:
    """One period's figures from its hours (see the module docstring)."""
    out: dict[str, Any] = {
        "local": local,
        "windows": sum(int(h["windows"]) for h in hours),
        "v1_windows": sum(int(h["v1_windows"]) for h in hours),
        "no_data_windows": sum(int(h["no_data_windows"]) for h in hours),
    }
    for column, name in _NAMES.items():
        published = [h for h in hours if h[f"{column}_published"]]
        out[name] = sum(int(h[column]) for h in published) if published else None
        out[f"{name}_suppressed"] = sum(int(h[f"{column}_suppressed"]) for h in hours)
    timed = [h for h in hours if h["occupancy_s"]]
    seconds = sum(int(h["occupancy_s"]) for h in timed)
    out["occupancy_mean"] = (
        round(sum(float(h["occupancy_mean_c"]) * int(h["occupancy_s"]) for h in timed) / seconds)
        / 100
        if seconds
        else None
    )
    out["occupancy_mean_suppressed"] = sum(int(h["occupancy_mean_suppressed"]) for h in hours)
    peaks = [int(h["occupancy_peak"]) for h in hours if h["occupancy_peak_published"]]
    out["occupancy_peak"] = max(peaks) if peaks else None
    out["occupancy_peak_suppressed"] = sum(int(h["occupancy_peak_suppressed"]) for h in hours)
    v2 = out["windows"] - out["v1_windows"]
    out["no_data"] = v2 > 0 and out["no_data_windows"] == v2
    came = sum(int(h["capture_arrivals"]) for h in hours)
    heard = came + sum(int(h["capture_passersby"]) for h in hours)
    out["capture_rate"] = round(came / heard, 3) if heard else None
    return out


def hours_of(
    conn: Connection, site: Site, first: date, last: date, by: str = "hour"
) -> list[sa.RowMapping]:
    """The site's hours (or days: ``by`` 'day') from the local day ``first`` to ``last``: the
    input of :func:`group`."""
    return list(conn.execute(_query(site, first, last, by)).mappings().all())


def group(
    hours: Sequence[sa.RowMapping], resolution: str, until: str | None = None
) -> list[dict[str, Any]]:
    """One row per period of ``hours`` (hour, day, week or month, local); a week is keyed by
    its Monday, a month by 'YYYY-MM'; ``range``: one row for them all (keyed 'range'), none
    without hours. With ``until`` ('HH:MM'), only the hours of each day before that time."""
    if until is not None:
        hours = [h for h in hours if h["local_hour"][11:] < until]
    key = _period_key(resolution)
    periods: dict[str, list[sa.RowMapping]] = {}
    for hour in hours:
        periods.setdefault(key(hour["local_hour"]), []).append(hour)
    return [_row(local, rows) for local, rows in periods.items()]


def figures(
    conn: Connection, site: Site, first: date, last: date, resolution: str
) -> list[dict[str, Any]]:
    """The site's periods (:func:`group`) from the local day ``first`` to ``last``: read from
    its hours for hours, from its days otherwise."""
    by = "hour" if resolution == "hour" else "day"
    return group(hours_of(conn, site, first, last, by), resolution)


def busy_times(conn: Connection, site: Site, last: date) -> list[list[float | None]]:
    """Mean arrivals per weekday (0 = Monday) and local hour over the 4 weeks to ``last``;
    ``None`` where no hour published them."""
    h = site_hours.c
    start, end = Counts.day_bounds(site, last - timedelta(days=27), last)
    # Summed by the database: 168 rows instead of 672. An hour's local wall time is its start
    # plus its offset (whole hours, even in a half-hour zone); 1970-01-01 was a Thursday (3).
    local = h.hour_start + h.utc_offset_s
    weekday = ((local // 86400 + 3) % 7).label("weekday")
    hour = (local % 86400 // 3600).label("hour")
    query = (
        sa.select(weekday, hour, sa.func.sum(h.arrivals_sum), sa.func.count())
        .where(
            h.site_id == site.id, h.hour_start >= start, h.hour_start < end, h.arrivals_windows > 0
        )
        .group_by(weekday, hour)
    )
    sums = [[0] * 24 for _ in range(7)]
    seen = [[0] * 24 for _ in range(7)]
    for day, hour_of_day, arrivals, hours in conn.execute(query):
        sums[day][hour_of_day] = int(arrivals)
        seen[day][hour_of_day] = int(hours)
    return [
        [round(t / n, 1) if n else None for t, n in zip(tr, nr, strict=True)]
        for tr, nr in zip(sums, seen, strict=True)
    ]


def median_dwell(row: dict[str, Any]) -> float | None:
    """The median visit length in minutes, interpolated within its dwell band (the bands'
    visits spread evenly; the last band read as 60-120 minutes); ``None`` without visits."""
    counts = [(row[name] or 0, _BAND_MINUTES[name]) for _, name in DWELL_BANDS]
    total = sum(n for n, _ in counts)
    if not total:
        return None
    half, seen = total / 2, 0
    for n, (low, high) in counts:
        if n and seen + n >= half:
            return round(low + (high - low) * (half - seen) / n, 1)
        seen += n
    return None  # unreachable: the bands hold every visit


def summary(
    conn: Connection,
    site: Site,
    day: date,
    now: int,
    read: tuple[Sequence[sa.RowMapping], Sequence[sa.RowMapping]] | None = None,
) -> dict[str, Any]:
    """A day's headline tiles: visitors (arrivals) so far, against the same weekday a week
    before up to the same local time, people in the shop now (the latest hour's occupancy),
    the peak hour by arrivals, the median dwell and the capture rate. ``read``: the day's
    hours and those of the same weekday a week before (:func:`hours_of`), when the caller has
    read them already (the site page's day range: two reads fewer)."""
    local_now = datetime.fromtimestamp(now, zone(site.timezone))
    # "So far" only for today; a past day is compared whole.
    until = f"{local_now.hour + 1:02d}:00" if day == local_now.date() else None
    if read is None:
        week_before = day - timedelta(days=7)
        read = hours_of(conn, site, day, day), hours_of(conn, site, week_before, week_before)
    raw, raw_before = read
    hours = group(raw, "hour")
    total = next(iter(group(raw, "range")), None)
    before = next(iter(group(raw_before, "range", until)), None)
    arrivals = None if total is None else total["arrivals"]
    previous = None if before is None else before["arrivals"]
    change = (
        round(100 * (arrivals - previous) / previous, 1)
        if arrivals is not None and previous
        else None
    )
    busiest = max(
        (h for h in hours if h["arrivals"] is not None), key=lambda h: h["arrivals"], default=None
    )
    latest = next((h for h in reversed(hours) if h["occupancy_mean"] is not None), None)
    return {
        "date": day.isoformat(),
        "arrivals": arrivals,
        "arrivals_suppressed": sum(h["arrivals_suppressed"] for h in hours),
        "arrivals_week_before": previous,
        "change_pct": change,
        "compared_until": until,
        "occupancy_now": None if latest is None else latest["occupancy_mean"],
        "occupancy_at": None if latest is None else latest["local"],
        "occupancy_peak": None if total is None else total["occupancy_peak"],
        "peak_hour": None if busiest is None else busiest["local"][11:],
        "peak_hour_arrivals": None if busiest is None else busiest["arrivals"],
        "median_dwell_minutes": None if total is None else median_dwell(total),
        "visits_ended": None if total is None else total["visits_ended"],
        "capture_rate": None if total is None else total["capture_rate"],
        "passersby": None if total is None else total["passersby"],
        "hours": len(hours),
        "v1_windows": sum(h["v1_windows"] for h in hours),
    }


def overview_row(conn: Connection, site: Site, day: date, now: int) -> dict[str, Any]:
    """One site's row of the overview: its day's tiles and the 7 days to ``day`` against the
    7 before."""
    week = figures(conn, site, day - timedelta(days=13), day, "day")
    split = (day - timedelta(days=6)).isoformat()

    def arrivals(rows: list[dict[str, Any]]) -> int | None:
        values = [r["arrivals"] for r in rows if r["arrivals"] is not None]
        return sum(values) if values else None

    this_week = arrivals([r for r in week if r["local"] >= split])
    last_week = arrivals([r for r in week if r["local"] < split])
    tiles = summary(conn, site, day, now)
    return {
        "site": site.id,
        "name": site.name,
        "timezone": site.timezone,
        **{k: tiles[k] for k in ("arrivals", "change_pct", "occupancy_now", "capture_rate")},
        "median_dwell_minutes": tiles["median_dwell_minutes"],
        "arrivals_7d": this_week,
        "arrivals_7d_before": last_week,
        "change_7d_pct": (
            round(100 * (this_week - last_week) / last_week, 1)
            if this_week is not None and last_week
            else None
        ),
    }
