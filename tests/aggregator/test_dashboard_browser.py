"""The dashboard as a person uses it, in Debian's chromium (headless, driven by Playwright):
sign in, see the charts drawn from the stored counts (the numbers uPlot holds equal the API's),
change the date, download the CSV, sign out, fail to open another merchant's site; on a
phone's screen too. A screenshot of the site page is written as an artefact
(``FOOTFALL_ARTEFACTS``, else pytest's temporary directory)."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page

from tests.support.web_harness import DAY, PASSWORD, Served


@pytest.fixture
def artefacts(tmp_path: Path) -> Path:
    where = Path(os.environ.get("FOOTFALL_ARTEFACTS", tmp_path))
    where.mkdir(parents=True, exist_ok=True)
    return where


def sign_in(page: Page, url: str, name: str) -> None:
    page.goto(f"{url}/sites/shop-a")
    assert page.url == f"{url}/login?next=%2Fsites%2Fshop-a"  # not signed in: the login page
    page.fill("input[name=name]", name)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{url}/sites/shop-a")  # and back to the page asked for


def by_hour(rows: list[dict[str, Any]], measure: str) -> list[int | None]:
    out: list[int | None] = [None] * 24
    for row in rows:
        out[int(row["local"][11:13])] = row[measure]
    return out


@pytest.mark.parametrize("served", ["sqlite"], indirect=True)
def test_a_merchant_reads_their_day_downloads_it_and_signs_out(
    served: Served, browser: Browser, artefacts: Path
) -> None:
    context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    sign_in(page, served.url, "alice")
    page.goto(f"{served.url}/")  # the user's sites, then one of them
    page.click("text=Shop A")
    page.wait_for_selector("body[data-charts-ready='1']")

    # Change the date with the picker, as a person would.
    page.fill("#date", DAY.isoformat())
    page.click("#date-form button[type=submit]")
    page.wait_for_url(f"**/sites/shop-a?range=day&date={DAY}**")
    page.wait_for_selector("body[data-charts-ready='1']")

    # These agents send device counts only (v1): no figure on the page claims people.
    api = page.request.get(f"{served.url}/api/v1/sites/shop-a/dashboard?day={DAY}").json()
    assert {row["arrivals"] for row in api["rows"]} == {None}
    drawn = page.evaluate("() => footfallCharts.people.data[1]")
    assert drawn == [None] * 24  # gaps, never zeros
    assert page.inner_text("#tile-visitors").strip() == "—"
    assert "devices only (v1)" in page.inner_text("#agents")
    assert "door" in page.inner_text("#agents")
    heads = page.eval_on_selector_all("#agents th", "cells => cells.map(c => c.innerText)")
    assert heads[-4:] == ["Missing", "Refused", "In its spool", "Sends"]
    door = page.eval_on_selector_all(
        "#agents tr[data-agent=door] td", "cells => cells.map(c => c.innerText)"
    )
    assert door[-3:-1] == ["0", "—"]  # nothing refused; no status from it yet
    page.screenshot(path=str(artefacts / "dashboard-site.png"), full_page=True)

    devices = page.request.get(
        f"{served.url}/api/v1/sites/shop-a/counts?resolution=hour&from={DAY}&to={DAY}"
    ).json()["rows"]
    with page.expect_download() as download:
        page.click("#csv-devices")
    rows = list(csv.reader(io.StringIO(Path(download.value.path()).read_text())))
    assert rows[0][0] == "hour (Europe/Paris)" and len(rows) == 25
    column = rows[0].index("visitors (devices)")
    assert [r[column] for r in rows[1:]] == [
        "" if v is None else str(v) for v in by_hour(devices, "visitors")
    ]

    page.click("#logout")
    page.wait_for_url(f"{served.url}/login")
    page.goto(f"{served.url}/sites/shop-a?date={DAY}")
    assert page.url.startswith(f"{served.url}/login?next=")
    assert errors == []
    context.close()


@pytest.mark.parametrize("served", ["sqlite"], indirect=True)
def test_another_merchant_cannot_open_the_site_and_a_phone_reads_the_page(
    served: Served, browser: Browser
) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    page = context.new_page()
    sign_in(page, served.url, "bob")
    answer = page.goto(f"{served.url}/sites/shop-a?date={DAY}")
    assert answer is not None and answer.status == 404
    assert "site shop-a does not exist" in page.inner_text("main")
    page.goto(f"{served.url}/sites/shop-b?date={DAY}")
    page.wait_for_selector("body[data-charts-ready='1']")
    overflow = page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0  # nothing wider than the phone (the heatmap scrolls in its box)
    context.close()
