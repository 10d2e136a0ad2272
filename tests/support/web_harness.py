"""Fixtures for the API and dashboard tests: a store holding four weeks of two shops' counts
(stored through the store's own ingest path, signed and verified), users of every role, and
the app served by a real uvicorn on a free port.

The data are made so that a test can tell every number apart: visitors by the hour of day and
the day, passers-by a third of that; at 07:00 every window's ``visitors`` is suppressed
(null), at 08:00 every other window's is. Shop A is in Paris, shop B in New York.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path

import pytest
import uvicorn
from playwright.sync_api import Browser, sync_playwright

from aggregator.accounts import Accounts
from aggregator.app import create_app
from aggregator.config import StoreSettings, load_config
from aggregator.rollup import zone
from aggregator.serve import serve
from aggregator.store import Store
from aggregator.verify import Accepted, Verifier
from firmware_agent.contract.messages import AgentId, SiteId, counts_payload, utc_text
from tests.support.agent_fleet import fast_seal
from tests.support.aggregator_harness import Agent, drop_schema, pg_dsn
from tests.support.ports import free_port

DAY = date(2026, 11, 16)  # a Monday: the day the tests look at
FIRST = DAY - timedelta(days=27)
STEP_S = 900  # one 5-minute window every quarter of an hour (fewer rows, same shape)
PASSWORD = "correct horse battery"
SITES = {"shop-a": "Europe/Paris", "shop-b": "America/New_York"}
USERS = {  # name: (role, sites)
    "admin": ("admin", ()),
    "alice": ("merchant", ("shop-a",)),
    "bob": ("merchant", ("shop-b",)),
    "ivan": ("installer", ("shop-a",)),
}


def visitors_at(day: date, hour: int, quarter: int) -> int | None:
    """Visitors of one window: by hour and day; suppressed at 07:00, and every other window
    of 08:00."""
    if hour == 7 or (hour == 8 and quarter % 2):
        return None
    return (hour * 3 + day.day + quarter) % 40


def _messages(store: Store, agent: Agent, tz: str, first: date, last: date) -> list[Accepted]:
    registry, verifier = store.registry(), Verifier(65536)
    start = int(datetime.combine(first, datetime.min.time(), zone(tz)).timestamp())
    end = int(datetime.combine(last + timedelta(days=1), datetime.min.time(), zone(tz)).timestamp())
    out = []
    for seq, at in enumerate(range(start, end, STEP_S), 1):
        local = datetime.fromtimestamp(at, zone(tz))
        visitors = visitors_at(local.date(), local.hour, local.minute // 15)
        passersby = (local.hour + local.minute // 15) % 13
        window = {
            "window_start": utc_text(at),
            "window_s": 300,
            "probe_requests": 200 + seq % 50,
            "malformed": 0,
            "late_frames": 0,
            "devices": (visitors or 0) + passersby + 5,
            "devices_randomised": 3,
            "visitors": visitors,
            "passersby": passersby if visitors is None else passersby + 5,
            "visits_ended": 4,
            "dwell_minutes": {"lt5": 1, "5-15": 1, "15-30": None, "30-60": 1, "ge60": 0},
            "devices_epoch": 100 + seq % 288,
        }
        payload = counts_payload(
            SiteId(agent.site), AgentId(agent.agent), seq, "9f3c1a7e52b04d68", window, version=1
        )
        result = verifier.check(agent.topic, fast_seal(payload, agent.key), registry, at + 310)
        assert isinstance(result, Accepted), result
        out.append(result)
    return out


def seed(store: Store) -> None:
    """The two shops, their agents' four weeks, and the users (password :data:`PASSWORD`)."""
    now = int(time.time())
    for site, tz in SITES.items():
        store.add_site(site, f"Shop {site[-1].upper()}", tz, now)
        agent = Agent(site, "door")
        store.add_agent(site, "door", agent.public_key, now)
        messages = _messages(store, agent, tz, FIRST, DAY)
        for i in range(0, len(messages), 1000):
            store.store_batch(messages[i : i + 1000], now=now)
    accounts = Accounts(store)
    for name, (role, sites) in USERS.items():
        accounts.add_user(name, role, PASSWORD, now)
        for site in sites:
            accounts.grant(name, site)


@dataclass
class Served:
    """A seeded store and the app on it, served at ``url``."""

    store: Store
    url: str


@contextlib.contextmanager
def serve_app(store: Store) -> Iterator[str]:
    """The app on a real uvicorn in a thread; its base URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(store), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@contextlib.contextmanager
def serve_command(settings: StoreSettings, **overrides: str) -> Iterator[str]:
    """What ``footfall-aggregator serve`` runs (API and dashboard, ingest off, the settings'
    defaults but ``overrides``), on the store of ``settings``; its base URL."""
    port = free_port()
    config = load_config(
        environ={},
        overrides={
            "store.dsn": settings.dsn,
            "store.schema": settings.schema,
            "serve.port": str(port),
            "serve.ingest": "off",
        }
        | overrides,
    )
    ready, stop = threading.Event(), threading.Event()
    with Store.open(config.store) as store:
        thread = threading.Thread(
            target=serve, args=(config, store), kwargs={"ready": ready, "stop": stop}
        )
        thread.start()
        try:
            assert ready.wait(30), "the server did not start"
            yield f"http://127.0.0.1:{port}"
        finally:
            stop.set()
            thread.join(30)


@contextlib.contextmanager
def seeded_store(kind: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    """A seeded store on ``kind`` (sqlite, postgresql: a schema of its own, dropped after)."""
    schema = ""
    if kind == "sqlite":
        path: Path = tmp_path_factory.mktemp("web") / "aggregator.sqlite3"
        settings = StoreSettings(f"sqlite:///{path}")
    else:
        schema = f"ff_test_{uuid.uuid4().hex[:10]}"
        settings = StoreSettings(pg_dsn(), schema)
    with Store.open(settings) as store:
        seed(store)
        yield store
    if schema:
        drop_schema(settings.dsn, schema)


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    """A seeded store (SQLite, then PostgreSQL) and the app served on it."""
    with seeded_store(request.param, tmp_path_factory) as store, serve_app(store) as url:
        yield Served(store, url)


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's chromium for one test module. Playwright's sync API runs an event loop in this
    thread while it is open: a second one fails ('Sync API inside the asyncio loop'), and so
    does any later test's ``asyncio.run`` (the JetStream tests). So one per module, closed
    at the module's end, and defined once here (a module importing another's fixture got a
    second instance)."""
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (.ci/run installs it: apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()
