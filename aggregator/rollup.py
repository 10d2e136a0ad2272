"""Hourly and daily roll-ups: which local hour and day a window belongs to, and what it adds.

A window counts in the **local** hour and day of its start, in its site's time zone. An hour
is keyed by the UTC instant at which it starts, so the repeated hour of an autumn
daylight-saving change is two hours (``02:00`` at +02:00, then ``02:00`` at +01:00), and a
half-hour zone's hours start at half past in UTC. A day is keyed by its local date and knows
how many hours it had: 23 on the spring change, 25 in autumn, 24 otherwise.

Roll-ups are sums, so a late window folds in like any other, whatever its order of arrival:
each new window adds its :data:`MEASURES` to four rows (agent and site, by hour and by day),
and the store upserts the added deltas in the transaction that inserts the window. Maxima
(``*_max``) are those of single windows of one agent; ``people_est_*`` and ``people_*`` cover
only the windows that carry those optional fields (``*_windows`` says how many).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

__all__ = [
    "MAX_MEASURES",
    "MEASURES",
    "SUM_MEASURES",
    "Buckets",
    "RollupDeltas",
    "buckets",
    "totals",
    "window_measures",
    "zone",
]

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
    "dwell_lt5",
    "dwell_5_15",
    "dwell_15_30",
    "dwell_30_60",
    "dwell_ge60",
    "people_est_windows",
    "people_est_sum",
    "people_windows",
    "people_sum",
)
MAX_MEASURES: tuple[str, ...] = (
    "devices_max",
    "visitors_max",
    "devices_epoch_max",
    "people_est_max",
    "people_max",
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


def window_measures(p: Mapping[str, Any]) -> tuple[list[int], list[int]]:
    """What one (validated) counts payload adds to each of its roll-up rows: its
    :data:`SUM_MEASURES` and its :data:`MAX_MEASURES`."""
    dwell = p["dwell_minutes"]
    est, people = p.get("people_est"), p.get("people")
    devices, visitors = int(p["devices"]), int(p["visitors"])
    est_n = 0 if est is None else int(est)
    people_n = 0 if people is None else int(people)
    sums = [
        1,
        int(p["probe_requests"]),
        int(p["malformed"]),
        int(p["late_frames"]),
        devices,
        int(p["devices_randomised"]),
        visitors,
        int(p["passersby"]),
        int(p["visits_ended"]),
        int(dwell["lt5"]),
        int(dwell["5-15"]),
        int(dwell["15-30"]),
        int(dwell["30-60"]),
        int(dwell["ge60"]),
        0 if est is None else 1,
        est_n,
        0 if people is None else 1,
        people_n,
    ]
    return sums, [devices, visitors, int(p["devices_epoch"]), est_n, people_n]


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


def measures_dict(sums: list[int], maxima: list[int]) -> dict[str, int]:
    """Measures by name."""
    return dict(zip(MEASURES, sums + maxima, strict=True))
