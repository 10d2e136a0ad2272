"""The dashboard on the demo's data, in Debian's chromium (Playwright), as a shop owner reads
it: the tiles equal the API's figures; an hour's visitors on the page equal that hour's
arrivals in the API and in the CSV; week and month views total what the API's weeks and
months hold; the multi-site overview sorts; nothing is cut off at 390 px. One demo run
(``footfall-aggregator demo``: broker, ingest, five weeks of two shops counted by their agents)
serves every test: the session's (tests/support/demo.py), which test_demo.py asks too.
Screenshots go to ``FOOTFALL_ARTEFACTS`` (else pytest's temporary directory); with
``FOOTFALL_README_IMAGE=1`` the desktop one also replaces ``docs/dashboard.png``."""

from __future__ import annotations

import csv
import io
import os
from calendar import monthrange
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page

from aggregator.dashboard import change_text
from tests.support.demo import Demo as RunningDemo

# The session's five-week demo (Mosquitto), the dashboard in Chromium.
pytestmark = [pytest.mark.broker, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Demo:
    url: str
    password: str
    day: str  # the latest local day of the first shop (today, so far)

    def days_back(self, days: int) -> str:
        return (date.fromisoformat(self.day) - timedelta(days=days)).isoformat()


@pytest.fixture(scope="module")
def demo(mosquitto_demo: RunningDemo) -> Demo:
    url = mosquitto_demo.url
    return Demo(url, mosquitto_demo.password, url.split("date=")[1])


@pytest.fixture
def artefacts(tmp_path: Path) -> Path:
    where = Path(os.environ.get("FOOTFALL_ARTEFACTS", tmp_path))
    where.mkdir(parents=True, exist_ok=True)
    return where


def signed_in(browser: Browser, demo: Demo, width: int) -> Page:
    context = browser.new_context(
        viewport={"width": width, "height": 900}, accept_downloads=True, is_mobile=width < 500
    )
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(demo.url)
    page.fill("input[name=name]", "demo")
    page.fill("input[name=password]", demo.password)
    page.click("button[type=submit]")
    page.wait_for_url(demo.url)  # the printed link survives the login
    page.errors = errors  # type: ignore[attr-defined]
    return page


def drawn_at(page: Page, url: str) -> None:
    """Open a dashboard page and wait until its charts are drawn."""
    page.goto(url)
    page.wait_for_selector("body[data-charts-ready='1']")


def text(page: Page, selector: str) -> str:
    return page.inner_text(selector).strip()


def shown(value: int, suppressed: int) -> str:
    """A count as the page writes it: a lower bound when some window suppressed it (the
    shops' agents suppress counts from 1 to 4, as every agent does)."""
    return f"≥ {value}" if suppressed else str(value)


def test_tiles_and_an_hours_visitors_equal_the_api_and_the_csv(
    browser: Browser,
    demo: Demo,
    artefacts: Path,
) -> None:
    page = signed_in(browser, demo, 1280)
    base = demo.url.split("/sites/")[0]
    day = demo.days_back(1)  # the last whole day
    drawn_at(page, f"{base}/sites/high-street?date={day}")
    if os.environ.get("FOOTFALL_README_IMAGE"):
        page.screenshot(path=str(REPO / "docs" / "dashboard.png"), full_page=False)
    tiles = page.request.get(f"{base}/api/v1/sites/high-street/summary?day={day}").json()
    assert text(page, "#tile-visitors") == shown(tiles["arrivals"], tiles["arrivals_suppressed"])
    if tiles["arrivals_suppressed"]:  # explained in one line
        assert "≥ marks a lower bound: " in text(page, "main")
    assert text(page, "#tile-peak") == tiles["peak_hour"]
    assert text(page, "#tile-capture") == f"{100 * tiles['capture_rate']:.0f} %"
    assert text(page, "#tile-dwell") == f"{tiles['median_dwell_minutes']:.0f}"
    assert text(page, "#tile-change") == change_text(tiles["change_pct"])

    people = page.request.get(
        f"{base}/api/v1/sites/high-street/people?from={day}&to={day}&resolution=hour"
    ).json()
    noon = next(r for r in people["rows"] if r["local"].endswith("T12:00"))
    drawn = page.evaluate("() => footfallCharts.people.data[1][12]")
    page.click("#people-table-toggle")
    cell = page.inner_text(f"#people-table tr[data-local='{noon['local']}'] td:nth-child(2)")
    with page.expect_download() as download:
        page.click("#csv-people")
    rows = list(csv.reader(io.StringIO(Path(download.value.path()).read_text())))
    column = rows[0].index("arrivals (people)")
    in_csv = next(r[column] for r in rows[1:] if r[0] == noon["local"])
    assert noon["arrivals_suppressed"] == 0
    assert drawn == int(cell) == int(in_csv) == noon["arrivals"] > 0
    page.screenshot(path=str(artefacts / "demo-day.png"), full_page=True)
    assert page.errors == []  # type: ignore[attr-defined]
    page.context.close()


@pytest.mark.parametrize("view", ["week", "month"])
def test_week_and_month_views_total_the_apis_periods(
    browser: Browser,
    demo: Demo,
    artefacts: Path,
    view: str,
) -> None:
    page = signed_in(browser, demo, 1280)
    base = demo.url.split("/sites/")[0]
    day = demo.days_back(17)
    drawn_at(page, f"{base}/sites/station?range={view}&date={day}")
    data = page.request.get(f"{base}/api/v1/sites/station/dashboard?range={view}&day={day}").json()
    periods = page.request.get(
        f"{base}/api/v1/sites/station/people?from={data['first']}&to={data['last']}"
        f"&resolution={view}"
    ).json()["rows"]
    (period,) = periods
    assert text(page, "#total-arrivals") == shown(period["arrivals"], period["arrivals_suppressed"])
    drawn = page.evaluate("() => footfallCharts.people.data[1]")
    first = date.fromisoformat(data["first"])
    assert len(drawn) == (7 if view == "week" else monthrange(first.year, first.month)[1])
    assert sum(v for v in drawn if v is not None) == period["arrivals"]
    page.screenshot(path=str(artefacts / f"demo-{view}.png"), full_page=True)
    page.context.close()


def test_a_custom_range_is_compared_with_as_many_days_before_it(
    browser: Browser,
    demo: Demo,
    artefacts: Path,
) -> None:
    page = signed_in(browser, demo, 1280)
    base = demo.url.split("/sites/")[0]
    first, last = demo.days_back(12), demo.days_back(3)  # ten days
    drawn_at(page, f"{base}/sites/high-street?range=custom&from={first}&to={last}")
    data = page.request.get(
        f"{base}/api/v1/sites/high-street/dashboard?range=custom&from={first}&to={last}"
    ).json()
    assert (data["first"], data["last"], data["resolution"]) == (first, last, "day")
    assert (data["previous_first"], data["previous_last"]) == (
        demo.days_back(22),
        demo.days_back(13),
    )
    days = page.request.get(
        f"{base}/api/v1/sites/high-street/people?from={first}&to={last}&resolution=day"
    ).json()["rows"]
    total, before = data["total"], data["previous_total"]
    assert len(days) == 10 and total["arrivals"] == sum(d["arrivals"] for d in days) > 0
    assert text(page, "#total-arrivals") == shown(total["arrivals"], total["arrivals_suppressed"])
    assert page.evaluate("() => footfallCharts.people.data[1].length") == 10
    assert before[
        "arrivals"
    ] > 0 and f"before: {shown(before['arrivals'], before['arrivals_suppressed'])}" in (
        text(page, "#range-total")
    )
    page.screenshot(path=str(artefacts / "demo-custom.png"), full_page=True)
    page.context.close()


def test_an_outage_is_a_gap_a_week_of_one_day_reads_right_and_axes_start_at_zero(
    browser: Browser,
    demo: Demo,
    artefacts: Path,
) -> None:
    page = signed_in(browser, demo, 1280)
    base = demo.url.split("/sites/")[0]
    # The station's sensor was down three hours one afternoon: those hours are no data, drawn
    # as gaps (null), never as an empty shop.
    days = page.request.get(
        f"{base}/api/v1/sites/station/people?from={demo.days_back(34)}&to={demo.day}&resolution=day"
    ).json()["rows"]
    (outage,) = [d["local"] for d in days if d["no_data_windows"]]
    drawn_at(page, f"{base}/sites/station?date={outage}")
    hours = page.request.get(
        f"{base}/api/v1/sites/station/people?from={outage}&to={outage}&resolution=hour"
    ).json()["rows"]
    gaps = [int(h["local"][11:13]) for h in hours if h["no_data"]]
    assert gaps == [14, 15, 16]
    for name, line in (("people", 1), ("occupancy", 1), ("occupancy", 2)):
        drawn = page.evaluate(f"() => footfallCharts.{name}.data[{line}]")
        assert [drawn[h] for h in gaps] == [None] * 3 and drawn[13] is not None, name
        assert page.evaluate(f"() => footfallCharts.{name}.scales.y.min") == 0, name
    assert "Gaps are periods without data" in text(page, "main")
    page.screenshot(path=str(artefacts / "demo-outage.png"), full_page=True)
    # The bundled capture's shop has one day of windows: its week is that day and six empty
    # ones, and the page says nothing of retention.
    drawn_at(page, f"{base}/sites/demo-shop?range=week&date=2024-03-05")
    drawn = page.evaluate("() => footfallCharts.people.data[1]")
    assert len(drawn) == 7 and sum(v is not None for v in drawn) == 1
    assert "retention" not in text(page, "main") and "≥ 0" not in text(page, "main")
    page.context.close()


def test_the_overview_sorts_and_a_phone_reads_every_page(
    browser: Browser,
    demo: Demo,
    artefacts: Path,
) -> None:
    page = signed_in(browser, demo, 390)
    base = demo.url.split("/sites/")[0]
    page.goto(base + "/")
    sites = page.eval_on_selector_all("#overview tbody tr", "rows => rows.map(r => r.dataset.site)")
    assert sorted(sites) == ["demo-shop", "high-street", "station"]
    page.click("#overview th[data-key='arrivals_7d'] button")
    ordered = page.eval_on_selector_all(
        "#overview tbody tr", "rows => rows.map(r => r.dataset.site)"
    )
    assert ordered[:2] == ["high-street", "station"]  # the bigger shop first
    month = f"/sites/station?range=month&date={demo.days_back(17)}"
    for path in ("/", "/sites/high-street", month):
        page.goto(base + path)
        overflow = page.evaluate(
            "() => document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0, path
    page.screenshot(path=str(artefacts / "demo-phone.png"), full_page=True)
    page.context.close()


def test_a_day_before_the_first_window_and_the_api_docs_page(
    browser: Browser,
    demo: Demo,
    artefacts: Path,
) -> None:
    page = signed_in(browser, demo, 1280)
    base = demo.url.split("/sites/")[0]
    drawn_at(page, f"{base}/sites/high-street?date={demo.days_back(60)}")
    assert "first window is on" in text(page, "#empty")
    assert text(page, "#tile-visitors") == "—" and text(page, "#tile-dwell") == "—"
    assert "retention" not in page.inner_text("main") and "≥ 0" not in page.inner_text("main")

    outside: list[str] = []
    page.on("request", lambda r: None if r.url.startswith(base) else outside.append(r.url))
    answer = page.goto(f"{base}/api/v1/docs")
    assert answer is not None and "script-src 'self';" in answer.headers["content-security-policy"]
    assert "unsafe" not in answer.headers["content-security-policy"]
    page.wait_for_selector(".opblock", timeout=20_000)
    operations = page.eval_on_selector_all(
        ".opblock-summary-path", "els => els.map(e => e.innerText.trim())"
    )
    assert "/api/v1/sites/{site_id}/people" in operations and len(operations) >= 12
    assert outside == []  # nothing from a CDN
    page.screenshot(path=str(artefacts / "api-docs.png"), full_page=False)
    page.context.close()
