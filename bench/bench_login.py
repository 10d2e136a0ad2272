"""The login limiter under attack, through the real server (``footfall-aggregator serve``'s
uvicorn, ingest off) on SQLite and PostgreSQL: how many passwords it checks.

Rows, each on a fresh store with one merchant:

* ``N at once``: N wrong passwords for the merchant sent at the same instant (N threads, one
  connection each, released by a barrier): passwords checked (answer 401) and refused unchecked
  (429). The limit is 5 per name and address.
* ``varying X-Forwarded-For``: 30 wrong passwords, one at a time, each for another name and with
  another ``X-Forwarded-For`` from 127.0.0.1, at the default settings: passwords checked (the
  address's limit is 20, if the header is not believed).
* ``owner after 5 wrong elsewhere``: behind a proxy at 127.0.0.1 that is believed
  (``serve.forwarded_allow_ips = 127.0.0.1``), 5 wrong passwords from 203.0.113.66, then the
  owner's right one from 198.51.100.7: the owner's answer (303: signed in; 429: locked out).

The baseline is the same run against the code before the limiter counted atomically: run this
script from that checkout (it uses only what both have). Usage: ``python bench/bench_login.py
[--tries 20,100,200] [--pg DSN | --no-pg]``; PostgreSQL from ``--pg``, else
``FOOTFALL_TEST_PG_DSN``, else the local server.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the tests' server and schema drop

import httpx  # noqa: E402

from aggregator.accounts import Accounts  # noqa: E402
from aggregator.config import StoreSettings  # noqa: E402
from aggregator.store import Store  # noqa: E402
from tests.support.aggregator_harness import drop_schema  # noqa: E402
from tests.support.web_harness import PASSWORD, serve_command  # noqa: E402

WRONG = "not the password"


@contextlib.contextmanager
def serving(dsn: str, schema: str, **overrides: str) -> Iterator[str]:
    """A fresh store with the merchant 'owner', served; its URL."""
    settings = StoreSettings(dsn, schema)
    with Store.open(settings) as store:
        Accounts(store).add_user("owner", "merchant", PASSWORD, int(time.time()))
    with serve_command(settings, **overrides) as url:
        yield url


def login(url: str, name: str, password: str = WRONG, forwarded_for: str = "") -> int:
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
    with httpx.Client(base_url=url, cookies={"footfall_csrf": "c"}, timeout=120) as client:
        return client.post(
            "/login", data={"name": name, "password": password, "csrf": "c"}, headers=headers
        ).status_code


def at_once(url: str, tries: int) -> tuple[int, int, float]:
    start = threading.Barrier(tries)

    def attempt(_: int) -> int:
        start.wait()
        return login(url, "owner")

    began = time.perf_counter()
    with ThreadPoolExecutor(tries) as pool:
        statuses = list(pool.map(attempt, range(tries)))
    return statuses.count(401), statuses.count(429), time.perf_counter() - began


@contextlib.contextmanager
def database(kind: str, pg: str) -> Iterator[tuple[str, str]]:
    if kind == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            yield f"sqlite:///{tmp}/bench_login.sqlite3", ""
        return
    schema = f"ff_bench_login_{uuid.uuid4().hex[:8]}"
    try:
        yield pg, schema
    finally:
        drop_schema(pg, schema)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tries", default="20,100,200", help="simultaneous tries per row")
    parser.add_argument("--pg", default=os.environ.get("FOOTFALL_TEST_PG_DSN", ""))
    parser.add_argument("--no-pg", action="store_true")
    args = parser.parse_args()
    pg = args.pg or "postgresql://postgres@127.0.0.1:5432/test"
    kinds = ["sqlite"] if args.no_pg else ["sqlite", "postgresql"]
    print("| database | row | checked (401) | refused unchecked (429) / owner's answer | s |")
    print("|---|---|---:|---:|---:|")
    for kind in kinds:
        for tries in map(int, args.tries.split(",")):
            with database(kind, pg) as (dsn, schema), serving(dsn, schema) as url:
                checked, refused, took = at_once(url, tries)
            print(f"| {kind} | {tries} at once | {checked} | {refused} | {took:.1f} |")
        with database(kind, pg) as (dsn, schema), serving(dsn, schema) as url:
            began = time.perf_counter()
            statuses = [login(url, f"name{i}", WRONG, f"198.51.100.{i}") for i in range(30)]
            took = time.perf_counter() - began
        print(
            f"| {kind} | varying X-Forwarded-For, 30 names | {statuses.count(401)} | "
            f"{statuses.count(429)} | {took:.1f} |"
        )
        proxy = {"serve.forwarded_allow_ips": "127.0.0.1"}
        with database(kind, pg) as (dsn, schema), serving(dsn, schema, **proxy) as url:
            began = time.perf_counter()
            wrong = [login(url, "owner", WRONG, "203.0.113.66") for _ in range(5)]
            owner = login(url, "owner", PASSWORD, "198.51.100.7")
            took = time.perf_counter() - began
        print(
            f"| {kind} | owner after 5 wrong elsewhere | {wrong.count(401)} | {owner} | "
            f"{took:.1f} |"
        )


if __name__ == "__main__":
    main()
