"""Capture rate: Σ visitors / Σ devices over the windows where both were published (not a mean
of per-window ratios); a window with either suppressed is left out of both sums and counted as
left out; past retention, the same over the roll-ups' hours."""

from __future__ import annotations

from datetime import date, datetime, timedelta

import httpx

from aggregator.query import Counts
from aggregator.rollup import zone
from aggregator.store import Store
from tests.aggregator_harness import Agent
from tests.test_aggregator_store import NOW, accept, enrolled
from tests.test_api_access import token
from tests.web_harness import DAY, SITES, STEP_S, Served, visitors_at


def test_capture_rate_sums_the_windows_where_both_counts_were_published(served: Served) -> None:
    tz = zone(SITES["shop-a"])
    visitors = devices = left_out = windows = 0
    ratios = []
    at = datetime.combine(DAY, datetime.min.time(), tz)
    while at.date() == DAY:
        seen = visitors_at(DAY, at.hour, at.minute // 15)
        passersby = (at.hour + at.minute // 15) % 13
        windows += 1
        if seen is None:
            left_out += 1
        else:
            visitors += seen
            devices += seen + passersby + 5
            ratios.append(seen / (seen + passersby + 5))
        at = (at + timedelta(seconds=STEP_S)).astimezone(tz)
    assert left_out == 6  # 07:00 all four windows, 08:00 every other one
    with httpx.Client(base_url=served.url) as client:
        answer = client.get(
            "/api/v1/sites/shop-a/dashboard",
            params={"day": DAY.isoformat()},
            headers={"Authorization": f"Bearer {token(served, 'alice')}"},
        )
    assert answer.status_code == 200, answer.text
    assert answer.json()["capture"] == {
        "visitors": visitors,
        "devices": devices,
        "rate": round(visitors / devices, 3),
        "windows": windows,
        "windows_excluded": 6,
        "basis": "windows",
    }
    assert round(sum(ratios) / len(ratios), 3) != round(visitors / devices, 3)


def test_capture_rate_past_retention_leaves_out_hours_with_a_suppressed_window(
    store: Store,
) -> None:
    agent = Agent()
    enrolled(store, agent, zone="UTC")
    day = date(2024, 10, 27)  # NOW's day in UTC
    messages = [
        agent.counts(1, f"{day}T09:00:00Z", visitors=8, devices=11),
        agent.counts(2, f"{day}T09:05:00Z", visitors=None, devices=12),
        agent.counts(3, f"{day}T10:00:00Z", visitors=6, passersby=4, devices=10),
        agent.counts(4, f"{day}T10:05:00Z", visitors=7, passersby=2, devices=9),
    ]
    received = NOW + 86400  # the day after: every window has closed
    store.store_batch([accept(store, agent.topic, m, received) for m in messages], now=NOW)
    counts = Counts(store)
    site = counts.site("s1")
    assert counts.capture(site, day, day) == {
        "visitors": 21,
        "devices": 30,
        "rate": 0.7,
        "windows": 4,
        "windows_excluded": 1,
        "basis": "windows",
    }
    assert store.prune(NOW + 400 * 86400, 90) == 4
    assert counts.capture(site, day, day) == {
        "visitors": 13,
        "devices": 19,
        "rate": 0.684,
        "windows": 4,
        "windows_excluded": 2,
        "basis": "hours",
    }
    assert counts.capture(site, day + timedelta(days=1), day + timedelta(days=1)) == {
        "visitors": None,
        "devices": None,
        "rate": None,
        "windows": 0,
        "windows_excluded": 0,
        "basis": "hours",
    }
