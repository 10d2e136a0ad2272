"""Weeks of a shop's people, with ground truth: the demo's traffic.

Two forms of one model. :func:`shop_specs` gives the persons of each local day to
:mod:`firmware_agent.tools.synthetic`, which makes their phones' probe requests (addresses that
rotate; next door, a printer and a TV left on): the capture the demo's agents count
(``python -m firmware_agent.tools.shop_traffic - ...`` writes it as one pcap stream, and the
truth of each hour). :func:`shop_windows` publishes what a perfect estimator would: each
window's arrivals, passers-by, visits that ended with their length, and occupancy
(time-weighted mean and peak), exact by construction, so a test of the aggregator can hold
its figures to the truth.

The model: a shop open 09:00-19:00 Monday to Saturday and 10:00-16:00 on a quiet Sunday;
arrivals are a Poisson process whose rate follows the hour (a lunch peak at 12:30, a smaller
one at 17:30) and the weekday (Saturday busiest); stays are log-normal (median ``dwell_median_
min``), cut at closing; passers-by (people heard outside) run at ``passer_ratio`` times the
arrivals' rate from 07:00 to 21:00. A ``no_data`` span (the sensor heard nothing: radio down)
can be given; its windows carry no figures. Output depends only on the profile and the seed.
The frames' form differs in two ways (:class:`~firmware_agent.tools.synthetic.PeopleSpec`
draws it): stays are log-uniform (``dwell_median_min`` / 6 to x 6, the same median), and
passers-by walk past only while the shop is open (at ``passer_ratio`` times each hour's
arrivals), the devices next door being what the sensor hears at night.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np

from firmware_agent.contract.fields import DWELL_BANDS, DWELL_EDGES_MIN
from firmware_agent.tools.synthetic import PeopleSpec, write_people_stream

__all__ = ["ShopProfile", "main", "shop_specs", "shop_windows"]

# Relative traffic by weekday (Monday first): Saturday busiest, Sunday quiet.
_WEEKDAY = (0.8, 0.85, 0.9, 0.95, 1.1, 1.4, 0.45)


@dataclass(frozen=True, slots=True)
class ShopProfile:
    """A shop's traffic: people arriving per hour at the busiest time of an ordinary day."""

    timezone: str = "Europe/Paris"
    peak_arrivals_per_hour: float = 40.0
    dwell_median_min: float = 12.0
    passer_ratio: float = 3.0
    seed: int = 1
    no_data: tuple[int, int] | None = None  # [start, end) Unix s: the sensor heard nothing


def _open_hours(day: date) -> tuple[float, float]:
    return (10.0, 16.0) if day.weekday() == 6 else (9.0, 19.0)


def _rate(hour: float, day: date) -> float:
    """Arrivals per hour at local time ``hour`` (relative to the peak) on ``day``."""
    opens, closes = _open_hours(day)
    if not opens <= hour < closes:
        return 0.0
    lunch = math.exp(-(((hour - 12.5) / 0.9) ** 2))
    evening = 0.6 * math.exp(-(((hour - 17.5) / 0.8) ** 2))
    return (0.35 + 0.65 * max(lunch, evening)) * _WEEKDAY[day.weekday()]


def _local(day: date, hours: np.ndarray, tz: ZoneInfo) -> np.ndarray:
    midnight = datetime.combine(day, time(0), tz).timestamp()
    return midnight + hours * 3600.0


def shop_windows(
    profile: ShopProfile, first: date, days: int, window_s: int, until: int | None = None
) -> list[dict[str, Any]]:
    """The windows of ``days`` local days from ``first`` (up to ``until``, Unix s), each a
    counts v2 window body (``window_start`` as Unix s): the truth of the model."""
    tz = ZoneInfo(profile.timezone)
    rng = np.random.default_rng(profile.seed)
    start = int(datetime.combine(first, time(0), tz).timestamp())
    end = int(datetime.combine(first + timedelta(days=days), time(0), tz).timestamp())
    if until is not None:
        end = min(end, until - until % window_s)
    arrive: list[np.ndarray] = []
    leave: list[np.ndarray] = []
    passers: list[np.ndarray] = []
    grid = np.arange(0, 24, 1 / 60)  # minutes of the day, in hours
    for d in range(days):
        day = first + timedelta(days=d)
        rates = np.array([_rate(h, day) for h in grid]) * profile.peak_arrivals_per_hour / 60
        counts = rng.poisson(rates)
        at = np.repeat(grid, counts) + rng.uniform(0, 1 / 60, counts.sum())
        stay = rng.lognormal(math.log(profile.dwell_median_min), 0.8, at.size) / 60
        closes = _open_hours(day)[1]
        arrive.append(_local(day, at, tz))
        leave.append(_local(day, np.minimum(at + stay, closes + 0.25), tz))
        outside = (grid >= 7) & (grid < 21)
        walk = rng.poisson(
            outside * (0.3 + rates * profile.passer_ratio) * (1 + 0.3 * np.sin(grid))
        )
        passers.append(_local(day, np.repeat(grid, walk), tz))
    arrivals, departures = np.concatenate(arrive), np.concatenate(leave)
    passing = np.concatenate(passers)
    edges = np.arange(start, end + window_s, window_s, dtype=np.float64)
    if edges.size < 2:
        return []
    n_arrive = np.histogram(arrivals, edges)[0]
    n_pass = np.histogram(passing, edges)[0]
    n_ended = np.histogram(departures, edges)[0]
    minutes = (departures - arrivals) / 60
    band_of = np.digitize(minutes, DWELL_EDGES_MIN)
    bands = [np.histogram(departures[band_of == b], edges)[0] for b in range(len(DWELL_BANDS))]
    # Occupancy: people present, time-weighted per window (overlap of each stay), and the peak.
    order = np.argsort(np.concatenate([arrivals, departures]), kind="stable")
    times = np.concatenate([arrivals, departures])[order]
    steps = np.concatenate([np.ones(arrivals.size), -np.ones(departures.size)])[order]
    level = np.cumsum(steps)
    out = []
    for i in range(edges.size - 1):
        lo, hi = edges[i], edges[i + 1]
        body: dict[str, Any] = {"window_start": int(lo), "window_s": window_s}
        if profile.no_data is not None and profile.no_data[0] <= lo < profile.no_data[1]:
            out.append(body | {"no_data": True})
            continue
        a, b = np.searchsorted(times, lo, "right"), np.searchsorted(times, hi, "left")
        before = level[a - 1] if a else 0.0
        inside_t = np.concatenate([[lo], times[a:b], [hi]])
        inside_l = np.concatenate([[before], level[a:b]])
        mean = float(np.sum(np.diff(inside_t) * inside_l) / window_s)
        out.append(
            body
            | {
                "no_data": False,
                "arrivals": int(n_arrive[i]),
                "passersby": int(n_pass[i]),
                "visits_ended": int(n_ended[i]),
                "dwell_minutes": {band: int(bands[k][i]) for k, band in enumerate(DWELL_BANDS)},
                "occupancy_mean": round(max(mean, 0.0), 2),
                "occupancy_peak": int(max(inside_l.max(), 0)),
                "calibrated": False,
            }
        )
    return out


_STATIC_DEVICES = 2  # next door, a printer and a TV left on: heard day and night, weakly


def shop_specs(
    profile: ShopProfile, first: date, days: int, until: int | None = None
) -> list[PeopleSpec]:
    """The persons of ``days`` local days from ``first`` (up to the hour before ``until``,
    Unix s), one spec a day: visitors arriving at the model's rate of each hour (daylight-saving
    days have 23 or 25), passers-by at ``passer_ratio`` times it, stays log-uniform around
    ``dwell_median_min``, and the printer and TV next door; the ``no_data`` span is silent.
    A day's people depend on the profile's seed and the date alone, whatever ``first``."""
    tz = ZoneInfo(profile.timezone)
    specs = []
    for d in range(days):
        day = first + timedelta(days=d)
        start = int(datetime.combine(day, time(0), tz).timestamp())
        end = int(datetime.combine(day + timedelta(days=1), time(0), tz).timestamp())
        if until is not None:
            end = min(end, until - until % 3600)
        if end <= start:
            break
        rates = []
        for hour_start in range(start, end, 3600):
            local = datetime.fromtimestamp(hour_start + 1800, tz)
            rates.append(profile.peak_arrivals_per_hour * _rate(local.hour + 0.5, local.date()))
        silent = None
        if profile.no_data is not None:
            silent = (profile.no_data[0] * 10**9, profile.no_data[1] * 10**9)
        specs.append(
            PeopleSpec(
                start_ns=start * 10**9,
                duration_s=end - start,
                rates=tuple(rates),
                passersby_per_visitor=profile.passer_ratio,
                dwell_min=(profile.dwell_median_min / 6, profile.dwell_median_min * 6),
                seed=profile.seed * 1_000_000 + day.toordinal(),
                static_devices=_STATIC_DEVICES,
                silent_ns=silent,
            )
        )
    return specs


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m firmware_agent.tools.shop_traffic OUT --first DAY --days N ...``: a shop's
    days as one pcap stream (``-``: standard output), and each hour's truth as JSON lines."""
    parser = argparse.ArgumentParser(
        prog="python -m firmware_agent.tools.shop_traffic",
        description="Write a shop's days of probe requests as one pcap stream (- for stdout).",
    )
    parser.add_argument("out")
    parser.add_argument("--first", type=date.fromisoformat, required=True, help="local day")
    parser.add_argument("--days", type=int, required=True)
    parser.add_argument("--until", type=int, help="Unix s: nothing from the hour before on")
    default = ShopProfile()
    parser.add_argument("--timezone", default=default.timezone)
    parser.add_argument("--peak", type=float, default=default.peak_arrivals_per_hour)
    parser.add_argument("--seed", type=int, default=default.seed)
    parser.add_argument("--no-data", type=int, nargs=2, metavar=("START", "END"))
    parser.add_argument("--truth", help="write each hour's truth here (JSON lines)")
    args = parser.parse_args(argv)
    profile = ShopProfile(
        timezone=args.timezone,
        peak_arrivals_per_hour=args.peak,
        seed=args.seed,
        no_data=None if args.no_data is None else (args.no_data[0], args.no_data[1]),
    )
    specs = shop_specs(profile, args.first, args.days, args.until)
    if args.out == "-":
        truths = write_people_stream(sys.stdout.buffer, specs)
    else:
        with open(args.out, "wb") as fh:
            truths = write_people_stream(fh, specs)
    if args.truth:
        with open(args.truth, "w", encoding="utf-8") as fh:
            for truth in truths:
                fh.writelines(json.dumps(hour) + "\n" for hour in truth.hourly())
    return 0


if __name__ == "__main__":
    sys.exit(main())
