"""Hourly and daily roll-ups: which local hour and day a window belongs to, and what it adds.

A window counts in the **local** hour and day of its start, in its site's time zone. An hour
is keyed by the UTC instant at which it starts, so the repeated hour of an autumn
daylight-saving change is two hours (``02:00`` at +02:00, then ``02:00`` at +01:00), and a
half-hour zone's hours start at half past in UTC. A day is keyed by its local date and knows
how many hours it had: 23 on the spring change, 25 in autumn, 24 otherwise.

Roll-ups are sums, so a late window folds in like any other, whatever its order of arrival:
each new window adds its :data:`MEASURES` to four rows (agent and site, by hour and by day),
and the store upserts the added deltas in the transaction that inserts the window. Maxima
(``*_max``) are those of single windows of one agent.

**Suppressed and absent counts.** A device count is ``null`` in a window when the agent
suppressed it (its true value was between 1 and *k*-1, or it would let a reader subtract back to
one that was), and absent when the agent's privacy mode does not publish it (what each mode
omits: :data:`firmware_agent.contract.fields.CATALOGUE`; ``people_est`` and ``people`` are
optional). A roll-up sums only the published values, and counts per measure the windows whose
value was suppressed (``*_suppressed``) and, for the fields that may be absent, the windows
that carried the field at all (``*_windows``, suppressed ones included). So a reader can tell
"0" (published zeros) from "at least N, some windows suppressed" and from "not published".

**Counts v2.** A v2 window adds its people figures (arrivals, passers-by, visits ended, dwell
bands: sums, with the windows that published and suppressed each) and its occupancy (mean *
window_s in hundredths of a person-second, and the seconds: a period's mean is their quotient,
time-weighted whatever the window length; the peak as a maximum), and, when it published both
its arrivals and its passers-by, those two again (``capture_arrivals``, ``capture_passersby``:
the capture rate's terms, so that a window where one is suppressed enters neither the rate's
numerator nor its denominator alone). A no-data window adds only to
``windows`` and ``no_data_windows``. A v1 window adds 1 to ``v1_windows`` and no people. The
site rows' people sums are the busiest agent's, set by the store (``aggregator.store.BUSIEST``).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

from firmware_agent.contract import fields

__all__ = [
    "DWELL_BANDS",
    "MAX_MEASURES",
    "MEASURES",
    "PEOPLE_COLUMNS",
    "PEOPLE_COUNTS",
    "PEOPLE_FIELDS",
    "SUM_MEASURES",
    "SUPPRESSIBLE",
    "Buckets",
    "RollupDeltas",
    "buckets",
    "device_counts",
    "people_counts",
    "totals",
    "window_measures",
    "zone",
]

# The dwell bands: payload band -> column (``5-15`` -> ``dwell_5_15``).
DWELL_BANDS: tuple[tuple[str, str], ...] = tuple(
    (band, fields.column(name))
    for band, name in zip(fields.DWELL_BANDS, fields.DWELL_FIELDS, strict=True)
)
# The device counts a window may publish as null (suppressed), in the order of their
# ``*_suppressed`` measures and of the windows' columns: counts v1's counts held to k, as
# columns, but for ``static_excluded`` (the estimator's diagnostic: stored with its window,
# not rolled up).
SUPPRESSIBLE: tuple[str, ...] = tuple(
    fields.column(name) for name in fields.COUNTS_V1.counts if name != "static_excluded"
)


def _people_column(name: str) -> str:
    """A v2 people figure's column: ``people_`` before the names v1's device counts take."""
    flat = fields.column(name)
    return f"people_{flat}" if flat in SUPPRESSIBLE else flat


# Counts v2's additive people-level figures, as their window and roll-up columns name them:
# payload field (a dwell band as ``dwell_minutes.<band>``) -> column.
PEOPLE_FIELDS: tuple[tuple[str, str], ...] = tuple(
    (name, _people_column(name)) for name in fields.PEOPLE_COUNTS
)
PEOPLE_COUNTS: tuple[str, ...] = tuple(column for _, column in PEOPLE_FIELDS)
# A window's v2 people-level columns: the additive counts, the occupancy mean in hundredths of
# a person (an integer: sums stay exact) and the occupancy peak; ``people_suppressed`` has a
# bit per suppressed one in this order.
PEOPLE_COLUMNS: tuple[str, ...] = (*PEOPLE_COUNTS, "occupancy_mean_c", "occupancy_peak")

# Every roll-up row holds these, all integers, 0 by default: sums, then maxima.
SUM_MEASURES: tuple[str, ...] = (
    "windows",
    "probe_requests",
    "malformed",
    "late_frames",
    "devices_sum",
    "devices_randomised_sum",
    "visitors_sum",
    "passersby_sum",
    "visits_ended",
    *(column for _, column in DWELL_BANDS),
    "people_est_windows",
    "people_est_sum",
    "people_windows",
    "people_sum",
    "visits_ended_windows",
    "dwell_windows",
    "devices_epoch_windows",
    *(f"{name}_suppressed" for name in SUPPRESSIBLE),
    "v1_windows",
    "no_data_windows",
    "calibrated_windows",
    *(f"{name}_{part}" for name in PEOPLE_COUNTS for part in ("sum", "windows", "suppressed")),
    "occupancy_cs",
    "occupancy_s",
    "occupancy_suppressed",
    "occupancy_peak_windows",
    "occupancy_peak_suppressed",
    "capture_arrivals",
    "capture_passersby",
)
MAX_MEASURES: tuple[str, ...] = (
    "devices_max",
    "visitors_max",
    "devices_epoch_max",
    "people_est_max",
    "people_max",
    "occupancy_peak_max",
)
MEASURES = SUM_MEASURES + MAX_MEASURES
K = TypeVar("K", tuple[int, int], tuple[int, str], tuple[str, int], tuple[str, str])


@functools.cache
def zone(name: str) -> ZoneInfo:
    """The IANA zone of that name (cached)."""
    return ZoneInfo(name)


@dataclass(frozen=True, slots=True)
class Buckets:
    """The local hour and day a window starting at ``window_start`` belongs to."""

    hour_start: int  # UTC instant (Unix seconds) at which the local hour starts
    local_hour: str  # its local wall time, 'YYYY-MM-DDTHH:MM'
    utc_offset_s: int  # the zone's offset during that hour
    local_day: str  # 'YYYY-MM-DD'
    day_start: int  # UTC instant of the local midnight that starts the day
    day_hours: int  # 23, 24 or 25 (daylight-saving days)


@functools.lru_cache(maxsize=1 << 16)
def buckets(window_start: int, zone_name: str) -> Buckets:
    """The local hour and day of a window start (Unix seconds) in a zone."""
    tz = zone(zone_name)
    local = datetime.fromtimestamp(window_start, tz)
    hour = local.replace(minute=0, second=0, microsecond=0)
    offset = hour.utcoffset()
    day = local.date()
    midnight = datetime.combine(day, time(0), tz)
    next_midnight = datetime.combine(day + timedelta(days=1), time(0), tz)
    day_start = int(midnight.timestamp())
    return Buckets(
        hour_start=int(hour.timestamp()),
        local_hour=hour.strftime("%Y-%m-%dT%H:%M"),
        utc_offset_s=int(offset.total_seconds()) if offset is not None else 0,
        local_day=day.isoformat(),
        day_start=day_start,
        day_hours=round((next_midnight.timestamp() - day_start) / 3600),
    )


def device_counts(p: Mapping[str, Any]) -> tuple[list[Any], list[bool]]:
    """A (validated) counts payload's device counts in :data:`SUPPRESSIBLE` order (None when
    suppressed or absent), and whether each was there at all (so None there is suppressed).
    A v2 payload has only its device-level diagnostics here (its ``passersby``, visits and
    dwell are people: :func:`people_counts`), and a no-data window none at all."""
    if p["v"] != 1:
        heard = not p["no_data"]
        rest = len(SUPPRESSIBLE) - 2
        return [p["devices"], p["devices_randomised"], *(None,) * rest], [heard, heard] + [
            False
        ] * rest
    get = p.get
    dwell = get("dwell_minutes")
    values = [
        p["devices"],
        p["devices_randomised"],
        p["visitors"],
        p["passersby"],
        get("visits_ended"),
        *((None,) * 5 if dwell is None else (dwell[band] for band, _ in DWELL_BANDS)),
        get("devices_epoch"),
        get("people_est"),
        get("people"),
    ]
    there = [
        True,
        True,
        True,
        True,
        "visits_ended" in p,
        *((dwell is not None,) * 5),
        "devices_epoch" in p,
        "people_est" in p,
        "people" in p,
    ]
    return values, there


def people_counts(p: Mapping[str, Any]) -> tuple[list[int | None], list[bool]]:
    """A (validated) v2 payload's people-level figures in :data:`PEOPLE_COLUMNS` order (the
    occupancy mean in hundredths), None when suppressed, absent or in a no-data window, and
    whether each was published or suppressed (so None there is suppressed). Nothing for v1."""
    if p["v"] == 1:
        return [None] * len(PEOPLE_COLUMNS), [False] * len(PEOPLE_COLUMNS)
    dwell = p.get("dwell_minutes")
    mean = p.get("occupancy_mean")
    values: list[int | None] = [
        p.get("arrivals"),
        p.get("passersby"),
        p.get("visits_ended"),
        *((None,) * 5 if dwell is None else (dwell[band] for band, _ in DWELL_BANDS)),
        None if mean is None else round(mean * 100),
        p.get("occupancy_peak"),
    ]
    if p["no_data"]:
        return values, [False] * len(PEOPLE_COLUMNS)
    there = [
        "arrivals" in p,
        "passersby" in p,
        "visits_ended" in p,
        *((dwell is not None,) * 5),
        "occupancy_mean" in p,
        "occupancy_peak" in p,
    ]
    return [None if v is None else int(v) for v in values], there


def _people_measures(p: Mapping[str, Any]) -> list[int]:
    """What a payload adds to the v2 sums of :data:`SUM_MEASURES` (zeros for v1)."""
    values, there = people_counts(p)
    out = [int(p["v"] == 1), int(bool(p.get("no_data"))), int(bool(p.get("calibrated")))]
    for value, present in zip(values[:-2], there[:-2], strict=True):
        out += [value or 0, int(value is not None), int(value is None and present)]
    mean, peak = values[-2:]
    window_s = int(p["window_s"])
    out += [
        0 if mean is None else mean * window_s,
        0 if mean is None else window_s,
        int(mean is None and there[-2]),
        int(peak is not None),
        int(peak is None and there[-1]),
    ]
    arrivals, passersby = values[0], values[1]
    paired = arrivals is not None and passersby is not None
    return [*out, *((int(arrivals or 0), int(passersby or 0)) if paired else (0, 0))]


def window_measures(p: Mapping[str, Any]) -> tuple[list[int], list[int]]:
    """What one (validated) counts payload adds to each of its roll-up rows: its
    :data:`SUM_MEASURES` and its :data:`MAX_MEASURES` (a suppressed or absent count adds 0 to
    its sum and maximum, and a suppressed one 1 to its ``*_suppressed``)."""
    values, there = device_counts(p)
    n = [0 if v is None else int(v) for v in values]
    sums = [
        1,
        int(p["probe_requests"]),
        int(p["malformed"]),
        int(p["late_frames"]),
        *n[:10],
        int(there[11]),
        n[11],
        int(there[12]),
        n[12],
        int(there[4]),
        int(there[5]),
        int(there[10]),
        *(int(v is None and t) for v, t in zip(values, there, strict=True)),
        *_people_measures(p),
    ]
    peak = people_counts(p)[0][-1]
    return sums, [n[0], n[2], n[10], n[11], n[12], peak or 0]


Entry = tuple[Buckets, tuple[list[list[int]], list[list[int]]]]  # buckets, (sums, maxima)


def _add(table: dict[K, Entry], key: K, b: Buckets, add: tuple[list[int], list[int]]) -> None:
    entry = table.get(key)
    if entry is None:
        table[key] = (b, ([add[0]], [add[1]]))
    else:
        entry[1][0].append(add[0])
        entry[1][1].append(add[1])


def totals(table: Mapping[K, Entry]) -> list[tuple[K, Buckets, list[int], list[int]]]:
    """Each row's key, buckets, summed sums and greatest maxima, in key order (the order in
    which the store takes row locks)."""
    out = []
    for key in sorted(table):
        b, (sums, maxima) = table[key]
        if len(sums) == 1:
            out.append((key, b, sums[0], maxima[0]))
        else:
            summed = list(map(sum, zip(*sums, strict=True)))
            out.append((key, b, summed, list(map(max, zip(*maxima, strict=True)))))
    return out


@dataclass(slots=True)
class RollupDeltas:
    """The roll-up rows a set of new windows adds to, with what each window adds."""

    agent_hours: dict[tuple[int, int], Entry]
    agent_days: dict[tuple[int, str], Entry]
    site_hours: dict[tuple[str, int], Entry]
    site_days: dict[tuple[str, str], Entry]

    @classmethod
    def of(cls, windows: Iterable[tuple[int, str, str, int, Mapping[str, Any]]]) -> RollupDeltas:
        """From (agent key, site id, site zone, window start, payload) of new windows."""
        deltas = cls({}, {}, {}, {})
        for agent_key, site, zone_name, window_start, payload in windows:
            b = buckets(window_start, zone_name)
            measures = window_measures(payload)
            _add(deltas.agent_hours, (agent_key, b.hour_start), b, measures)
            _add(deltas.agent_days, (agent_key, b.local_day), b, measures)
            _add(deltas.site_hours, (site, b.hour_start), b, measures)
            _add(deltas.site_days, (site, b.local_day), b, measures)
        return deltas

    def __bool__(self) -> bool:
        return bool(self.agent_hours)
