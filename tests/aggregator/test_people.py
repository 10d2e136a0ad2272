"""People-level figures (counts v2) from ingest to the API's reads: v2 windows stored beside
v1 ones, roll-ups by hour, day, week and month that respect each figure's kind (sums for
arrivals and visits, time-weighted means and peaks for occupancy), no-data windows as gaps,
two agents at one site not added, and the truth of the demo's traffic model read back whole."""

from __future__ import annotations

import re
from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from aggregator.cli import main
from aggregator.config import StoreSettings
from aggregator.dashboard import change_text, templates
from aggregator.people import busy_times, figures, summary
from aggregator.query import Counts
from aggregator.store import Store
from aggregator.verify import Accepted, Verifier
from firmware_agent.contract.messages import AgentId, SiteId, utc_text
from firmware_agent.tools.shop_traffic import ShopProfile, shop_windows
from tests.support.agent_fleet import fast_seal, meta_of
from tests.support.aggregator_harness import Agent

NOW = 1_800_000_000
PARIS = ZoneInfo("Europe/Paris")


def v2_message(agent: Agent, seq: int, body: dict[str, Any]) -> bytes:
    payload = (
        {
            "kind": "counts",
            "v": 2,
            "site": SiteId(agent.site).value,
            "agent": AgentId(agent.agent).value,
            "seq": seq,
            "epoch": "9f3c1a7e52b04d68",
            "probe_requests": 10,
            "malformed": 0,
            "late_frames": 0,
            "devices": None if body.get("no_data") else 4,
            "devices_randomised": None if body.get("no_data") else 2,
        }
        | body
        | {"window_start": utc_text(body["window_start"])}
    )
    if payload["no_data"]:
        payload.pop("calibrated", None)
    return fast_seal(payload, agent.key)


def ingest(store: Store, agent: Agent, bodies: list[dict[str, Any]], first_seq: int = 1) -> None:
    verifier, registry = Verifier(65536), store.registry()
    accepted = []
    for seq, body in enumerate(bodies, first_seq):
        result = verifier.check(agent.topic, v2_message(agent, seq, body), registry, NOW)
        assert isinstance(result, Accepted), result
        accepted.append(result)
    outcome = store.store_batch(accepted, now=NOW)
    assert len(outcome.stored) == len(bodies)


def enrol(store: Store, *agents: Agent) -> None:
    store.add_site("s1", "Shop", "Europe/Paris", NOW)
    for agent in agents:
        store.add_agent("s1", agent.agent, agent.public_key, NOW)


def at(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=PARIS).timestamp())


def window(start: str, arrivals: int, mean: float, peak: int, **more: Any) -> dict[str, Any]:
    return {
        "window_start": at(start),
        "window_s": 300,
        "no_data": False,
        "arrivals": arrivals,
        "passersby": 2 * arrivals,
        "visits_ended": arrivals,
        "dwell_minutes": {"lt5": arrivals, "5-15": 0, "15-30": 0, "30-60": 0, "ge60": 0},
        "occupancy_mean": mean,
        "occupancy_peak": peak,
        "calibrated": False,
    } | more


@pytest.mark.parametrize("store_settings", ["sqlite", "postgresql"], indirect=True)
def test_v2_figures_roll_up_by_their_kind_and_no_data_is_a_gap(store: Store) -> None:
    agent = Agent("s1", "a1")
    enrol(store, agent)
    bodies = [
        window("2026-12-01T10:00", 3, 2.5, 4),
        window("2026-12-01T10:05", 1, 1.5, 2),
        window("2026-12-01T11:00", 2, 4.0, 7),  # its arrivals suppressed below
        {"window_start": at("2026-12-01T12:00"), "window_s": 300, "no_data": True},
        window("2026-12-08T10:00", 5, 3.0, 5),
    ]
    bodies[2]["arrivals"] = None
    ingest(store, agent, bodies)
    site = Counts(store).site("s1")
    with store.begin(read_only=True) as conn:
        hours = figures(conn, site, date(2026, 12, 1), date(2026, 12, 1), "hour")
        days = figures(conn, site, date(2026, 12, 1), date(2026, 12, 8), "day")
        weeks = figures(conn, site, date(2026, 11, 30), date(2026, 12, 13), "week")
        months = figures(conn, site, date(2026, 12, 1), date(2026, 12, 31), "month")
        tiles = summary(conn, site, date(2026, 12, 8), NOW)
    ten, eleven, noon = hours
    assert (ten["local"], ten["arrivals"], ten["occupancy_mean"], ten["occupancy_peak"]) == (
        "2026-12-01T10:00",
        4,
        2.0,  # (2.5 * 300 + 1.5 * 300) / 600: a mean, never a sum
        4,
    )
    assert (ten["passersby"], ten["dwell_lt5"], ten["visits_ended"]) == (8, 4, 4)
    assert (eleven["arrivals"], eleven["arrivals_suppressed"]) == (None, 1)
    assert eleven["occupancy_mean"] == 4.0
    assert noon["no_data"] and noon["arrivals"] is None and noon["occupancy_mean"] is None
    assert [(d["local"], d["arrivals"]) for d in days] == [("2026-12-01", 4), ("2026-12-08", 5)]
    assert days[0]["occupancy_peak"] == 7 and days[0]["arrivals_suppressed"] == 1
    assert [(w["local"], w["arrivals"]) for w in weeks] == [("2026-11-30", 4), ("2026-12-07", 5)]
    assert [(m["local"], m["arrivals"]) for m in months] == [("2026-12", 9)]
    assert (tiles["arrivals"], tiles["arrivals_week_before"], tiles["change_pct"]) == (5, 4, 25.0)
    assert tiles["peak_hour"] == "10:00" and tiles["capture_rate"] == round(5 / 15, 3)
    (health,) = store.agents("s1")
    assert health.counts_v == 2


CAPTURE = "SELECT capture_arrivals, capture_passersby FROM {} ORDER BY 1, 2"


@pytest.mark.parametrize("store_settings", ["sqlite", "postgresql"], indirect=True)
def test_the_capture_rate_pairs_arrivals_and_passersby_window_by_window(store: Store) -> None:
    """A window whose arrivals or passers-by are suppressed is in neither term of the capture
    rate; the migration that adds the terms fills them from the stored windows as ingest does."""
    agent = Agent("s1", "a1")
    enrol(store, agent)
    bodies = [
        window("2026-12-01T10:00", 6, 3.0, 5),  # 6 of 18 came in
        window("2026-12-01T10:05", 10, 3.0, 5, passersby=None),  # passers-by suppressed
        window("2026-12-01T10:10", 0, 3.0, 5, passersby=9),  # arrivals suppressed below
        window("2026-12-01T11:00", 0, 0.0, 0),  # nobody heard
    ]
    bodies[2]["arrivals"] = None
    ingest(store, agent, bodies)
    site = Counts(store).site("s1")
    with store.begin(read_only=True) as conn:
        ten, eleven = figures(conn, site, date(2026, 12, 1), date(2026, 12, 1), "hour")
        (day,) = figures(conn, site, date(2026, 12, 1), date(2026, 12, 1), "day")
        tiles = summary(conn, site, date(2026, 12, 1), NOW)
    # Not (6 + 10) / (6 + 10 + 12 + 9): the suppressed figures' partners stay out.
    assert (ten["arrivals"], ten["passersby"]) == (16, 21)
    assert ten["capture_rate"] == day["capture_rate"] == tiles["capture_rate"] == round(6 / 18, 3)
    assert eleven["capture_rate"] is None
    tables = ("agent_hours", "agent_days", "site_hours", "site_days")
    with store.begin(read_only=True) as conn:
        live = {t: conn.exec_driver_sql(CAPTURE.format(t)).all() for t in tables}
    assert live["site_days"] == [(6, 12)]
    assert store.migrate("0009", downgrade=True) == "0009"
    assert store.migrate() == "0011"
    with store.begin(read_only=True) as conn:
        assert {t: conn.exec_driver_sql(CAPTURE.format(t)).all() for t in tables} == live


@pytest.mark.parametrize("store_settings", ["sqlite"], indirect=True)
def test_the_agents_that_still_send_v1_are_named_before_their_first_window(
    store: Store, store_settings: StoreSettings, capsys: pytest.CaptureFixture[str]
) -> None:
    """An agent says in its meta which counts it sends (meta v2's ``counts_v``; a meta v1
    comes from an agent that predates people figures): the health, the agents table and
    ``agents list`` say so before its first window, and its windows' version after."""
    old, new, counting = Agent("s1", "old"), Agent("s1", "new"), Agent("s1", "counting")
    enrol(store, old, new, counting)
    v1 = {k: v for k, v in meta_of("s1", "old").items() if k != "counts_v"} | {"v": 1}
    v1["thresholds"] = {k: v for k, v in dict(v1["thresholds"]).items() if k != "presence_hold_s"}
    v1["privacy"] = {k: v for k, v in dict(v1["privacy"]).items() if k != "published"}
    verifier, registry = Verifier(65536), store.registry()
    metas = [
        verifier.check(f"footfall/v1/s1/{a.agent}/meta", fast_seal(m, a.key), registry, NOW)
        for a, m in ((old, v1), (new, meta_of("s1", "new")))
    ]
    assert all(isinstance(m, Accepted) for m in metas), metas
    store.store_batch([m for m in metas if isinstance(m, Accepted)], now=NOW)
    ingest(store, counting, [window("2026-12-01T10:00", 6, 3.0, 5)])
    sends = {a.agent: (a.counts_v, a.meta_counts_v) for a in store.agents("s1")}
    assert sends == {"old": (None, 1), "new": (None, 2), "counting": (2, None)}
    assert main(["agents", "list", "--set", f"store.dsn={store_settings.dsn}"]) == 0
    rows = {line.split()[1]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["old"].endswith("devices v1 (meta): upgrade it")
    assert rows["new"].endswith("people v2 (meta)") and rows["counting"].endswith("people v2")
    page = templates.env.get_template("agents_table.html")
    html = page.render(agents=store.agents("s1"), day="2026-12-01")
    cells = dict(re.findall(r'data-agent="(\w+)">.*?<td class="sends">(.*?)</td>', html, re.S))
    assert "devices only (v1): upgrade it" in cells["old"] and "its meta says" in cells["old"]
    assert cells["counting"] == "people (v2)"


def test_two_agents_hearing_the_same_people_are_not_added(store: Store) -> None:
    door, till = Agent("s1", "door"), Agent("s1", "till")
    enrol(store, door, till)
    ingest(store, door, [window("2026-12-01T10:00", 6, 3.0, 5)])
    ingest(store, till, [window("2026-12-01T10:00", 4, 5.0, 6)])
    site = Counts(store).site("s1")
    with store.begin(read_only=True) as conn:
        (hour,) = figures(conn, site, date(2026, 12, 1), date(2026, 12, 1), "hour")
    assert (hour["arrivals"], hour["occupancy_mean"], hour["occupancy_peak"]) == (6, 5.0, 6)
    assert hour["windows"] == 2


def test_a_sites_figures_are_its_own_agents_never_another_sites(store: Store) -> None:
    """Two merchants' sites with agents of the same name in the same hour: each site reads
    its own agent (the busiest-agent rule once took the busiest agent of any site)."""
    big, small = Agent("s1", "door"), Agent("s2", "door")
    enrol(store, big)
    store.add_site("s2", "Kiosk", "Europe/Paris", NOW)
    store.add_agent("s2", "door", small.public_key, NOW)
    ingest(store, big, [window("2026-12-01T10:00", 9, 7.0, 8)])
    ingest(store, small, [window("2026-12-01T10:00", 2, 1.0, 2)])
    counts, day = Counts(store), date(2026, 12, 1)
    with store.begin(read_only=True) as conn:
        (kiosk,) = figures(conn, counts.site("s2"), day, day, "hour")
        (shop,) = figures(conn, counts.site("s1"), day, day, "day")
    assert (kiosk["arrivals"], kiosk["occupancy_mean"], kiosk["occupancy_peak"]) == (2, 1.0, 2)
    assert (shop["arrivals"], shop["occupancy_mean"], shop["occupancy_peak"]) == (9, 7.0, 8)


def test_the_traffic_models_truth_reads_back_whole(store: Store) -> None:
    agent = Agent("s1", "a1")
    enrol(store, agent)
    profile = ShopProfile(seed=7)
    bodies = shop_windows(profile, date(2026, 11, 2), 7, 300)
    ingest(store, agent, bodies)
    site = Counts(store).site("s1")
    with store.begin(read_only=True) as conn:
        days = figures(conn, site, date(2026, 11, 2), date(2026, 11, 8), "day")
        (week,) = figures(conn, site, date(2026, 11, 2), date(2026, 11, 8), "week")
    truth = sum(b["arrivals"] for b in bodies)
    assert sum(d["arrivals"] for d in days) == week["arrivals"] == truth
    sunday, saturday = days[-1]["arrivals"], days[-2]["arrivals"]
    assert sunday < saturday / 2  # a quiet Sunday


def test_hourly_windows_and_5_minute_windows_of_the_same_people_read_the_same(
    store: Store,
) -> None:
    """Additivity is structural: the same traffic published as 5-minute and as hourly windows
    (two sites) gives the same arrivals, passers-by and dwell per hour, day and week, and
    occupancy means within rounding (each window's mean has 2 decimals, and so has the
    period's: 0.005 from each side, and at most 0.005 from the windows' own rounding), and the
    same peaks (the hour's greatest instant is one of its 5-minute windows')."""
    store.add_site("s5", "Five", "Europe/Paris", NOW)
    store.add_site("s60", "Sixty", "Europe/Paris", NOW)
    five, sixty = Agent("s5", "a"), Agent("s60", "a")
    store.add_agent("s5", "a", five.public_key, NOW)
    store.add_agent("s60", "a", sixty.public_key, NOW)
    profile = ShopProfile(seed=3)
    ingest(store, five, shop_windows(profile, date(2026, 11, 2), 3, 300))
    ingest(store, sixty, shop_windows(profile, date(2026, 11, 2), 3, 3600))
    counts = Counts(store)
    with store.begin(read_only=True) as conn:
        for resolution in ("hour", "day", "week"):
            a, b = (
                figures(conn, counts.site(s), date(2026, 11, 2), date(2026, 11, 4), resolution)
                for s in ("s5", "s60")
            )
            assert [r["local"] for r in a] == [r["local"] for r in b]
            for x, y in zip(a, b, strict=True):
                for name in ("arrivals", "passersby", "visits_ended", "dwell_lt5", "dwell_ge60"):
                    assert x[name] == y[name], (resolution, x["local"], name)
                assert abs(x["occupancy_mean"] - y["occupancy_mean"]) <= 0.015 + 1e-9
                assert x["occupancy_peak"] == y["occupancy_peak"]


def test_busy_times_are_each_weekday_and_local_hours_mean_across_a_clock_change(
    store: Store,
) -> None:
    """The database groups the hours by local weekday and hour (from each hour's start and
    offset): in a half-hour zone, over 4 weeks with a daylight-saving change, the means equal
    those of the hours' own local labels."""
    agent = Agent("s1", "a1")
    store.add_site("s1", "Shop", "Australia/Adelaide", NOW)  # +09:30, +10:30 from 4 October
    store.add_agent("s1", agent.agent, agent.public_key, NOW)
    last = date(2026, 10, 18)
    start = int(datetime(2026, 9, 20, 12, tzinfo=ZoneInfo("UTC")).timestamp())
    bodies = [
        window("2026-01-01T00:00", (i * 5) % 11, 1.0, 2)
        | {"window_start": start + 3600 * i, "window_s": 3600}
        for i in range(28 * 24)
    ]
    ingest(store, agent, bodies)
    site = Counts(store).site("s1")
    with store.begin(read_only=True) as conn:
        busy = busy_times(conn, site, last)
        hours = figures(conn, site, date(2026, 9, 21), last, "hour")
    sums: dict[tuple[int, int], list[int]] = {}
    for hour in hours:
        day = date.fromisoformat(hour["local"][:10]).weekday()
        sums.setdefault((day, int(hour["local"][11:13])), []).append(hour["arrivals"])
    assert busy == [
        [round(sum(v) / len(v), 1) if (v := sums.get((d, h))) else None for h in range(24)]
        for d in range(7)
    ]
    assert (len(sums[(0, 2)]), len(sums[(6, 2)])) == (4, 3)  # 4 October had no 02:00


@pytest.mark.parametrize(
    ("pct", "shown"),
    [
        (None, "—"),
        (-0.44, "0 %"),
        (0.0, "0 %"),
        (12.6, "+13 %"),
        (-3.2, "-3 %"),
        (-100.0, "-100 %"),
    ],
)
def test_a_change_is_shown_in_whole_per_cent_and_never_as_minus_zero(
    pct: float | None, shown: str
) -> None:
    """The demo's last day had 227 visitors against 228 the week before: "-0 %" on the tile."""
    assert change_text(pct) == shown
