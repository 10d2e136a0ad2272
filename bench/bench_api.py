"""Benchmark of the site page's API calls on a year of 5-minute windows of 20 agents (about 2.1
million window rows and their hourly and daily roll-ups), in SQLite and in PostgreSQL.

The data are built through the store's own write path (:meth:`Store.store_batch`: SQLite
``executemany``, PostgreSQL ``COPY`` into staging and one ``INSERT ... SELECT``; a local day of
every agent per transaction), shaped like a shop: quiet nights whose counts are suppressed
(null), busy afternoons, a window now and then that never arrived (agents' health counts it
missing). The windows are not signed (ingest checks signatures, the store does not;
``bench_ingest.py`` measures ingest). On PostgreSQL the tables are then vacuumed and analysed,
as autovacuum would have done on a running server.

Then a merchant's API token calls what the site page shows, through the real app served by
uvicorn on loopback: the day by hour and the same weekday a week before, the last 4 weeks by
day, busy times (weekday x hour), the whole page's data (dwell, capture rate and agents'
health are computed there), the agents' health of the last 24 hours, the CSV exports of what
is shown, and the page itself (HTML, with a session cookie); each on three local days (today,
a mid-year day, the latest daylight-saving change in the site's zone), ``--repeat`` times
each. Goal: p95 under 100 ms for every call.

With ``--against DIR`` (another checkout, e.g. main's in a ``git worktree``), both checkouts'
apps are served, each by uvicorn in a process of its own on the kept databases, and each call
goes to one then the other in turns (ABBA...): "before" and "after" under the same load, which
on a shared machine moves a p95 more than most changes do. Both checkouts must be at the same
migration head (each server migrates on start).

``--writing``: meanwhile a thread holds SQLite's write lock 40 ms of every 100 ms, about what a
full ingest batch takes (500 messages at ~63 µs of database each, and the commit): a reader in
WAL mode never waits for it; a call that takes it does.

Baselines, in process and in the same run: busy times from the 5-minute windows instead of
the hourly roll-ups, and agents' health counted from the day shown up to now (what the page
did before it was bounded to the day) instead of over the day.

Usage: ``python bench/bench_api.py [--agents 20 --days 365 --repeat 30] [--pg DSN | --no-pg]
[--keep] [--only sqlite|postgresql] [--against DIR] [--writing]``; PostgreSQL from ``--pg``, else
``FOOTFALL_TEST_PG_DSN``, else the local server.
``--keep`` keeps the databases (``bench/out/bench_api.sqlite3``, schema ``ff_bench_api``) and
reuses them on the next run instead of building again.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the tests' app server and schema drop

import httpx  # noqa: E402
import nacl.signing  # noqa: E402
import orjson  # noqa: E402
import sqlalchemy as sa  # noqa: E402

from aggregator.accounts import Accounts  # noqa: E402
from aggregator.api import SESSION_COOKIE  # noqa: E402
from aggregator.config import StoreSettings  # noqa: E402
from aggregator.query import HEATMAP_WEEKS, Counts, Site  # noqa: E402
from aggregator.rollup import zone  # noqa: E402
from aggregator.store import Store, agents, metadata, windows  # noqa: E402
from aggregator.verify import Accepted  # noqa: E402
from firmware_agent.contract.messages import public_key_text, utc_text  # noqa: E402
from tests.support.aggregator_harness import drop_schema  # noqa: E402
from tests.support.ports import free_port  # noqa: E402
from tests.support.web_harness import serve_app  # noqa: E402

SITE = "bench"
ZONE = "Europe/Paris"
WINDOW_S = 300
SIG = "A" * 86 + "=="  # an Ed25519 signature's length; not checked by the store
GOAL_MS = 100.0
KEPT_SCHEMA = "ff_bench_api"
# A shop's day: devices seen per 5-minute window, by local hour.
HOURLY_DEVICES = (
    2,
    1,
    1,
    1,
    1,
    2,
    4,
    9,
    16,
    22,
    30,
    36,
    42,
    40,
    34,
    38,
    46,
    52,
    44,
    30,
    18,
    9,
    4,
    3,
)


def window_payload(agent: str, seq: int, start: int, hour: int, n: int) -> dict[str, Any]:
    """One agent's counts v2 for a window starting at ``start`` (local hour ``hour``); ``n``
    varies the numbers. People figures below 3 are suppressed (null); device diagnostics
    below 5."""
    devices = HOURLY_DEVICES[hour] + n % 7
    arrivals = devices // 4
    passersby = devices - arrivals
    ended = arrivals // 2 + n % 3
    mean = round(devices * 0.6 + (n % 10) / 10, 2)

    def people(value: int) -> int | None:
        return value if value >= 3 or value == 0 else None

    return {
        "kind": "counts",
        "v": 2,
        "site": SITE,
        "agent": agent,
        "seq": seq,
        "epoch": "9f3c1a7e52b04d68",
        "window_start": utc_text(start),
        "window_s": WINDOW_S,
        "no_data": False,
        "probe_requests": devices * 9 + n % 50,
        "malformed": n % 3,
        "late_frames": 0,
        "devices": devices if devices >= 5 else None,
        "devices_randomised": devices // 2 if devices >= 10 else None,
        "arrivals": people(arrivals),
        "passersby": people(passersby),
        "visits_ended": people(ended),
        "dwell_minutes": {
            "lt5": people(ended // 3),
            "5-15": people(ended - ended // 3),
            "15-30": 0,
            "30-60": 0,
            "ge60": 0,
        },
        "occupancy_mean": mean,
        "occupancy_peak": int(mean) + 2,
        "calibrated": False,
    }


def build(
    store: Store,
    *,
    agent_count: int,
    days: int,
    last_day: date,
    now: int,
    progress: Callable[[str], None] = print,
) -> int:
    """The bench site, its agents and their windows of ``days`` local days ending with
    ``last_day`` (windows from ``now`` on are not made); the windows stored."""
    store.add_site(SITE, "Bench shop", ZONE, now)
    names = [f"a{i:02d}" for i in range(agent_count)]
    store.add_agents(
        SITE,
        {name: public_key_text(nacl.signing.SigningKey.generate()) for name in names},
        now,
    )
    entries = [store.registry().agents[(SITE, name)] for name in names]
    tz = zone(ZONE)
    first = last_day - timedelta(days=days - 1)
    seqs = [0] * agent_count
    stored = 0
    began = time.monotonic()
    for d in range(days):
        day = first + timedelta(days=d)
        start = int(datetime.combine(day, datetime.min.time(), tz).timestamp())
        end = min(
            now, int(datetime.combine(day + timedelta(days=1), datetime.min.time(), tz).timestamp())
        )
        batch = []
        for at in range(start, end, WINDOW_S):
            hour = datetime.fromtimestamp(at, tz).hour
            for i, entry in enumerate(entries):
                seqs[i] += 1
                if (seqs[i] * 7 + i) % 997 == 0:
                    continue  # a window that never arrived
                payload = window_payload(entry.agent, seqs[i], at, hour, seqs[i] + 3 * i)
                batch.append(
                    Accepted(
                        kind="counts",
                        payload=payload,
                        signature=SIG,
                        agent=entry,
                        received_at=at + WINDOW_S + 5,
                        canonical=orjson.dumps(payload, option=orjson.OPT_SORT_KEYS).decode(),
                        window_start=at,
                    )
                )
        stored += len(store.store_batch(batch, now=now).stored)
        if (d + 1) % 30 == 0 or d + 1 == days:
            took = time.monotonic() - began
            progress(
                f"  {store.dialect}: {d + 1}/{days} days, {stored:,} windows, "
                f"{took:.0f} s ({stored / took:,.0f} windows/s)"
            )
    return stored


def settle(store: Store) -> None:
    """PostgreSQL: vacuum and analyse the store's tables, as autovacuum does a running server
    (the test server runs without it); SQLite is left as it is (nothing analyses it)."""
    if store.dialect != "postgresql":
        return
    with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for table in metadata.sorted_tables:
            conn.exec_driver_sql(f"VACUUM (ANALYZE) {table.name}")


def latest_dst_change(tz_name: str, last_day: date, days: int) -> date:
    """The latest local day within ``days`` before ``last_day`` that was not 24 hours long."""
    tz = zone(tz_name)
    for back in range(days):
        day = last_day - timedelta(days=back)
        start = datetime.combine(day, datetime.min.time(), tz)
        end = datetime.combine(day + timedelta(days=1), datetime.min.time(), tz)
        if end.timestamp() - start.timestamp() != 86400:
            return day
    return last_day


@dataclass
class Timing:
    label: str
    samples_ms: list[float]
    rows: list[int]  # per date
    side: str = ""  # with --against: "before" (that checkout) or "after" (this one)

    def p(self, q: float) -> float:
        ordered = sorted(self.samples_ms)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    @property
    def ok(self) -> bool:
        return self.p(0.95) < GOAL_MS


def _rows_of(answer: httpx.Response) -> int:
    """What a call returned, in rows: a CSV's lines, a JSON list's length, a dict's lists, a
    flat dict's (the tiles') known figures."""
    assert answer.status_code == 200, f"{answer.request.url}: {answer.status_code} {answer.text}"
    if answer.headers["content-type"].startswith("text/csv"):
        return answer.text.count("\n") - 1
    if answer.headers["content-type"].startswith("text/html"):
        return answer.text.count("<tr")
    body = answer.json()
    if isinstance(body, list):
        return len(body)
    if "rows" in body:
        return len(body["rows"])
    if "visitors" in body:
        return sum(v is not None for row in body["visitors"] for v in row)
    lists = [v for v in body.values() if isinstance(v, list)]
    if lists:
        return sum(map(len, lists))
    return sum(isinstance(v, int | float) and not isinstance(v, bool) for v in body.values())


def calls(site: str, day: date) -> list[tuple[str, str]]:
    """The site page's and the overview's calls for one local day: (label, path)."""
    base = f"/api/v1/sites/{site}"
    four_weeks, year = day - timedelta(days=27), day - timedelta(days=365)
    return [
        ("people: day by hour", f"{base}/people?resolution=hour&from={day}&to={day}"),
        ("people: 4 weeks by day", f"{base}/people?resolution=day&from={four_weeks}&to={day}"),
        ("people: a year by month", f"{base}/people?resolution=month&from={year}&to={day}"),
        ("tiles", f"{base}/summary?day={day}"),
        ("page data: day", f"{base}/dashboard?day={day}"),
        ("page data: week", f"{base}/dashboard?range=week&day={day}"),
        ("page data: month", f"{base}/dashboard?range=month&day={day}"),
        ("overview (all sites)", f"/api/v1/overview?day={day}"),
        ("agents' health, 24 h", f"{base}/agents?since_hours=24"),
        ("devices: day by hour", f"{base}/counts?resolution=hour&from={day}&to={day}"),
        ("CSV: day by hour", f"{base}/people.csv?resolution=hour&from={day}&to={day}"),
        ("CSV: 4 weeks by day", f"{base}/people.csv?resolution=day&from={four_weeks}&to={day}"),
        ("site page (HTML)", f"/sites/{site}?date={day}"),
        ("site page, month (HTML)", f"/sites/{site}?range=month&date={day}"),
    ]


# The app of a checkout (argv: its root, store DSN, schema, port), as a process of its own.
SERVER = """
import sys
sys.path.insert(0, sys.argv[1])
import uvicorn
from aggregator.app import create_app
from aggregator.config import StoreSettings
from aggregator.store import Store
store = Store.open(StoreSettings(sys.argv[2], sys.argv[3]))
uvicorn.run(create_app(store), host="127.0.0.1", port=int(sys.argv[4]), log_level="warning")
"""


@contextmanager
def served_by(root: Path, settings: StoreSettings) -> Iterator[str]:
    """The app of the checkout at ``root`` on the store of ``settings``, served by uvicorn in
    a process of its own, as ``footfall-aggregator serve`` is; its base URL."""
    port = free_port()
    argv = [sys.executable, "-c", SERVER, str(root), settings.dsn, settings.schema, str(port)]
    process = subprocess.Popen(argv)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{url}/login", timeout=1)
                break
            except httpx.TransportError:
                assert process.poll() is None, f"{root}'s server exited"
                assert time.monotonic() < deadline, f"{root}'s server did not start"
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(30)


@contextmanager
def writing(store: Store) -> Iterator[None]:
    """SQLite's write lock held 40 ms of every 100 ms by a thread (ingest's full batches)."""
    stop = threading.Event()

    def hold() -> None:
        while not stop.is_set():
            with store.begin():  # BEGIN IMMEDIATE: the write lock
                time.sleep(0.04)
            time.sleep(0.06)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def time_calls(
    store: Store, days: Sequence[date], repeat: int, against: Path | None = None
) -> list[Timing]:
    """Each call of the site page, on each day, ``repeat`` times (after one unmeasured); with
    ``against``, to that checkout's server and this one's in turns."""
    accounts = Accounts(store)
    now = int(time.time())
    name = f"merchant-{uuid.uuid4().hex[:8]}"
    accounts.add_user(name, "merchant", uuid.uuid4().hex, now)
    accounts.grant(name, SITE)
    (user,) = [u for u in accounts.users() if u.name == name]
    headers = {"Authorization": f"Bearer {accounts.add_token(user, 'bench', now)}"}
    cookies = {SESSION_COOKIE: accounts.open_session(user, now, 3600)}
    timings: dict[tuple[str, str], Timing] = {}
    with contextlib.ExitStack() as stack:
        if against is None:
            urls = {"": stack.enter_context(serve_app(store))}
        else:
            urls = {
                "before": stack.enter_context(served_by(against, store.settings)),
                "after": stack.enter_context(served_by(REPO, store.settings)),
            }
        clients = {  # per side: (API client, browser client)
            side: (
                stack.enter_context(httpx.Client(base_url=url, headers=headers, timeout=60)),
                stack.enter_context(httpx.Client(base_url=url, cookies=cookies, timeout=60)),
            )
            for side, url in urls.items()
        }
        for day in days:
            for label, path in calls(SITE, day):
                page = path.startswith("/sites/")
                for side, pair in clients.items():
                    timing = timings.setdefault((label, side), Timing(label, [], [], side))
                    timing.rows.append(_rows_of(pair[page].get(path)))
                for i in range(repeat):
                    for side in list(clients)[:: 1 if i % 2 == 0 else -1]:
                        began = time.perf_counter()
                        answer = clients[side][page].get(path)
                        timings[(label, side)].samples_ms.append(
                            1000 * (time.perf_counter() - began)
                        )
                        assert answer.status_code == 200, answer.text
    return list(timings.values())


def heatmap_from_windows(store: Store, site: Site, last: date) -> list[list[float | None]]:
    """The baseline of busy times: the same means, summed from the 5-minute windows."""
    counts = Counts(store)
    first = last - timedelta(days=7 * HEATMAP_WEEKS - 1)
    start, end = counts.day_bounds(site, first, last)
    w = windows.c
    hour = (w.window_start - w.window_start % 3600).label("hour")
    query = (
        sa.select(hour, sa.func.sum(w.visitors), sa.func.count(w.visitors))
        .where(
            w.agent_key.in_(sa.select(agents.c.agent_key).where(agents.c.site_id == site.id)),
            w.window_start >= start,
            w.window_start < end,
        )
        .group_by(hour)
    )
    totals = [[0] * 24 for _ in range(7)]
    seen = [[0] * 24 for _ in range(7)]
    tz = zone(site.timezone)
    with store.begin(read_only=True) as conn:
        for at, visitors, published in conn.execute(query):
            if published:
                local = datetime.fromtimestamp(at, tz)
                totals[local.weekday()][local.hour] += int(visitors)
                seen[local.weekday()][local.hour] += 1
    return [
        [round(t / n, 1) if n else None for t, n in zip(tr, nr, strict=True)]
        for tr, nr in zip(totals, seen, strict=True)
    ]


def _ms(run: Callable[[], object], repeat: int) -> float:
    """The median time of ``run``, in ms."""
    run()
    samples = []
    for _ in range(repeat):
        began = time.perf_counter()
        run()
        samples.append(1000 * (time.perf_counter() - began))
    return statistics.median(samples)


def baselines(store: Store, day: date, repeat: int) -> list[tuple[str, float, str, float]]:
    """(what, its median ms, the baseline, the baseline's median ms), in process."""
    counts = Counts(store)
    site = counts.site(SITE)
    start, end = counts.day_bounds(site, day, day)
    return [
        (
            "busy times from roll-ups",
            _ms(lambda: counts.heatmap(site, day), repeat),
            "from the 5-minute windows",
            _ms(lambda: heatmap_from_windows(store, site, day), max(3, repeat // 10)),
        ),
        (
            "agents' health over the day",
            _ms(lambda: store.agents(SITE, since=start, until=end), repeat),
            "from the day up to now",
            _ms(lambda: store.agents(SITE, since=start), max(3, repeat // 10)),
        ),
    ]


def report(where: str, timings: Sequence[Timing], days: Sequence[date], load: str) -> str:
    dates = ", ".join(d.isoformat() for d in days)
    if timings[0].side:
        return report_pairs(where, timings, dates, load)
    out = [
        f"\n{where}: p50 / p95 / max over {len(timings[0].samples_ms)} calls each "
        f"(days {dates}; load average {load}); rows per day",
        "",
        "| call | p50 ms | p95 ms | max ms | rows | p95 < 100 ms |",
        "|---|---:|---:|---:|---|---|",
    ]
    for t in timings:
        rows = "/".join(str(r) for r in t.rows)
        verdict = "yes" if t.ok else "**no**"
        out.append(
            f"| {t.label} | {t.p(0.5):.1f} | {t.p(0.95):.1f} | {max(t.samples_ms):.1f} | "
            f"{rows} | {verdict} |"
        )
    return "\n".join(out)


def report_pairs(where: str, timings: Sequence[Timing], dates: str, load: str) -> str:
    """The table of ``--against``: each call's p50 and p95, before and after."""
    out = [
        f"\n{where}: p50 / p95 in ms over {len(timings[0].samples_ms)} calls each, before "
        f"(--against) and after (this checkout) in turns (days {dates}; load average {load})",
        "",
        "| call | before p50 | before p95 | after p50 | after p95 | after p95 < 100 ms |",
        "|---|---:|---:|---:|---:|---|",
    ]
    sides = {(t.label, t.side): t for t in timings}
    for label in dict.fromkeys(t.label for t in timings):
        before, after = sides[(label, "before")], sides[(label, "after")]
        out.append(
            f"| {label} | {before.p(0.5):.1f} | {before.p(0.95):.1f} | {after.p(0.5):.1f} | "
            f"{after.p(0.95):.1f} | {'yes' if after.ok else '**no**'} |"
        )
    return "\n".join(out)


def report_baselines(where: str, day: date, rows: Sequence[tuple[str, float, str, float]]) -> str:
    out = [
        f"\n{where}: baselines in process, {day} (median ms)",
        "",
        "| query | ms | baseline | ms | baseline / query |",
        "|---|---:|---|---:|---:|",
    ]
    for what, ms, base, base_ms in rows:
        out.append(f"| {what} | {ms:.1f} | {base} | {base_ms:.1f} | {base_ms / ms:.1f}x |")
    return "\n".join(out)


@contextmanager
def database(kind: str, pg: str, keep: bool) -> Iterator[StoreSettings]:
    """The settings of the bench's database; removed afterwards unless ``keep``."""
    if kind == "sqlite":
        folder = REPO / "bench" / "out" if keep else Path(tempfile.mkdtemp(prefix="bench_api_"))
        folder.mkdir(parents=True, exist_ok=True)
        try:
            yield StoreSettings(f"sqlite:///{folder / 'bench_api.sqlite3'}")
        finally:
            if not keep:
                shutil.rmtree(folder)
        return
    schema = KEPT_SCHEMA if keep else f"ff_bench_{uuid.uuid4().hex[:10]}"
    try:
        yield StoreSettings(pg, schema)
    finally:
        if not keep:
            drop_schema(pg, schema)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=20)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--repeat", type=int, default=30, help="calls per call and day")
    parser.add_argument(
        "--pg",
        default=os.environ.get("FOOTFALL_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test"),
    )
    parser.add_argument("--no-pg", action="store_true")
    parser.add_argument("--only", choices=("sqlite", "postgresql"), help="time one database")
    parser.add_argument("--keep", action="store_true", help="keep the databases, reuse them")
    parser.add_argument(
        "--against", type=Path, help="another checkout: time its app and this one's in turns"
    )
    parser.add_argument("--writing", action="store_true", help="SQLite: hold the write lock")
    args = parser.parse_args(argv)
    now = int(time.time())
    today = datetime.fromtimestamp(now, zone(ZONE)).date()
    mid_year = today - timedelta(days=args.days // 2)
    days = [today, mid_year, latest_dst_change(ZONE, today, args.days)]
    kinds = ["sqlite"] if args.no_pg else ["sqlite", "postgresql"]
    if args.only:
        kinds = [args.only]
    out = []
    for kind in kinds:
        with database(kind, args.pg, args.keep) as settings, Store.open(settings) as store:
            if not any(s.id == SITE for s in store.sites()):
                print(f"{kind}: building {args.days} days of {args.agents} agents ...", flush=True)
                began = time.monotonic()
                stored = build(
                    store, agent_count=args.agents, days=args.days, last_day=today, now=now
                )
                print(f"{kind}: {stored:,} windows in {time.monotonic() - began:.0f} s", flush=True)
            began = time.monotonic()
            settle(store)
            print(f"{kind}: settled in {time.monotonic() - began:.0f} s", flush=True)
            print(f"{kind}: timing the site page's calls ...", flush=True)
            load = os.getloadavg()[0]
            with writing(store) if args.writing and kind == "sqlite" else contextlib.nullcontext():
                timings = time_calls(store, days, args.repeat, args.against)
            loads = f"{load:.1f} then {os.getloadavg()[0]:.1f}"  # at the start, at the end
            out.append(report(f"{kind} ({store.where})", timings, days, loads))
            out.append(report_baselines(kind, mid_year, baselines(store, mid_year, args.repeat)))
            print(out[-2] + "\n" + out[-1], flush=True)
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
