"""The API: one error shape, who sees what (every endpoint tried with another tenant's ids),
API tokens, counts that equal the windows stored, CSV with units. Against a real uvicorn
serving a seeded store, on SQLite and on PostgreSQL (``served``)."""

from __future__ import annotations

import csv
import io
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime, timedelta

import httpx
import pytest
import sqlalchemy as sa

from aggregator.rollup import zone
from aggregator.store import api_tokens, sessions, users
from tests.support.web_harness import DAY, PASSWORD, STEP_S, Served, visitors_at


def token(served: Served, name: str) -> str:
    from aggregator.accounts import Accounts  # noqa: PLC0415

    accounts = Accounts(served.store)
    return accounts.add_token(accounts.user(name), f"test {name}", int(time.time()))


_OPEN: list[httpx.Client] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().close()


def browser(served: Served, **headers: str) -> httpx.Client:
    """An HTTP client of the served app, closed after the test."""
    opened = httpx.Client(base_url=served.url, headers=headers)
    _OPEN.append(opened)
    return opened


def client(served: Served, name: str) -> httpx.Client:
    return browser(served, Authorization=f"Bearer {token(served, name)}")


def test_every_error_has_one_shape_naming_the_field(served: Served) -> None:
    anonymous = browser(served)
    answer = anonymous.get("/api/v1/sites")
    assert answer.status_code == 401
    assert answer.json() == {
        "error": {
            "status": 401,
            "code": "unauthorized",
            "message": "sign in, or send an API token (Authorization: Bearer fft_…)",
            "field": None,
        }
    }
    alice = client(served, "alice")
    cases = {
        "/api/v1/sites/shop-a/counts?from=2026-13-01": (422, "invalid", "from"),
        "/api/v1/sites/shop-a/counts?resolution=minute": (422, "invalid", "resolution"),
        "/api/v1/sites/shop-a/counts?from=2026-11-16&to=2026-11-01": (422, "invalid", "from"),
        "/api/v1/sites/shop-a/counts?resolution=window&from=2026-11-01&to=2026-11-16": (
            422,
            "invalid",
            "from",
        ),
        "/api/v1/sites/Shop%20A": (422, "invalid", "site_id"),
        "/api/v1/sites/shop-z": (404, "not_found", "site_id"),
        "/api/v1/nowhere": (404, "not_found", None),
    }
    for path, (status, code, field) in cases.items():
        answer = alice.get(path)
        body = answer.json()
        assert answer.status_code == status, path
        assert set(body) == {"error"} and set(body["error"]) == {
            "status",
            "code",
            "message",
            "field",
        }
        assert (body["error"]["status"], body["error"]["code"], body["error"]["field"]) == (
            status,
            code,
            field,
        ), path
    assert alice.delete("/api/v1/sites").json()["error"]["code"] == "method_not_allowed"
    bad = browser(served, Authorization="Bearer fft_nope").get("/api/v1/sites")
    assert bad.json()["error"] == {
        "status": 401,
        "code": "unauthorized",
        "message": "the API token is unknown, expired or revoked",
        "field": "Authorization",
    }


def _site_paths(served: Served) -> list[tuple[str, str]]:
    spec = browser(served).get("/api/v1/openapi.json").json()
    return [
        (method.upper(), path)
        for path, operations in spec["paths"].items()
        if "{site_id}" in path
        for method in operations
    ]


def test_a_merchant_never_reaches_another_merchants_site_by_any_endpoint(served: Served) -> None:
    paths = _site_paths(served)
    assert len(paths) >= 7  # site, agents (get, post), counts, csv, heatmap, dashboard
    bob, alice, ivan = client(served, "bob"), client(served, "alice"), client(served, "ivan")
    body = {"agent": "intruder", "public_key": "A" * 43 + "="}
    for method, path in paths:
        url = path.replace("{site_id}", "shop-a") + "?from=2026-11-16&to=2026-11-16"
        answer = bob.request(method, url, json=body if method == "POST" else None)
        assert answer.status_code == 404, (method, path)
        assert answer.json()["error"]["message"] == "site shop-a does not exist"
        if method == "GET":
            assert alice.request(method, url).status_code == 200, path
            counts = "/agents" not in path and path != "/api/v1/sites/{site_id}"
            assert ivan.request(method, url).status_code == (403 if counts else 200), path
    assert [s["id"] for s in bob.get("/api/v1/sites").json()] == ["shop-b"]
    assert [s["id"] for s in client(served, "admin").get("/api/v1/sites").json()] == [
        "shop-a",
        "shop-b",
    ]
    # The pages too: another merchant's site is not there.
    page = _signed_in(served, "bob").get("/sites/shop-a")
    assert page.status_code == 404 and "shop-a does not exist" in page.text


def _signed_in(served: Served, name: str) -> httpx.Client:
    signed = browser(served)
    csrf = signed.get("/login").cookies["footfall_csrf"]
    answer = signed.post("/login", data={"name": name, "password": PASSWORD, "csrf": csrf})
    assert answer.status_code == 303, answer.text
    return signed


def test_counts_by_hour_equal_the_windows_and_suppressed_hours_say_so(served: Served) -> None:
    alice = client(served, "alice")
    body = alice.get(f"/api/v1/sites/shop-a/counts?from={DAY}&to={DAY}&resolution=hour").json()
    rows = {int(r["local"][11:13]): r for r in body["rows"]}
    assert len(rows) == 24 and body["timezone"] == "Europe/Paris"
    for hour, row in rows.items():
        values = [visitors_at(DAY, hour, q) for q in range(4)]
        published = [v for v in values if v is not None]
        assert row["windows"] == 4
        assert row["visitors_suppressed"] == values.count(None)
        assert row["visitors"] == (sum(published) if published else None)
        assert row["dwell_15_30"] is None and row["dwell_15_30_suppressed"] == 4
    assert rows[7]["visitors"] is None and rows[7]["visitors_suppressed"] == 4
    assert rows[8]["visitors_suppressed"] == 2 and rows[8]["visitors"] is not None
    assert body["units"]["visitors"] == "devices"
    assert body["units"]["visitors_suppressed"] == "windows"

    windows = alice.get(
        f"/api/v1/sites/shop-a/counts?from={DAY}&to={DAY}&resolution=window"
    ).json()["rows"]
    assert len(windows) == 86400 // STEP_S
    by_hour: defaultdict[int, int] = defaultdict(int)
    for w in windows:
        start = datetime.fromisoformat(w["start"])
        assert start.utcoffset() == timedelta(hours=1)  # Paris in November
        by_hour[start.hour] += w["visitors"] or 0
    assert dict(by_hour) == {h: r["visitors"] or 0 for h, r in rows.items()}

    days = alice.get(
        f"/api/v1/sites/shop-a/counts?from={DAY - timedelta(days=27)}&to={DAY}&resolution=day"
    ).json()["rows"]
    assert len(days) == 28 and days[-1]["visitors"] == sum(
        r["visitors"] or 0 for r in rows.values()
    )
    assert days[-1]["visitors_suppressed"] == 6


def test_csv_has_units_in_its_header_and_the_json_rows(served: Served) -> None:
    alice = client(served, "alice")
    query = f"from={DAY}&to={DAY}&resolution=hour"
    answer = alice.get(f"/api/v1/sites/shop-a/counts.csv?{query}")
    assert answer.headers["content-type"].startswith("text/csv")
    assert "attachment" in answer.headers["content-disposition"]
    table = list(csv.reader(io.StringIO(answer.text)))
    header, rows = table[0], table[1:]
    assert header[:4] == [
        "hour (Europe/Paris)",
        "windows (windows)",
        "probe_requests (frames)",
        "devices (devices)",
    ]
    assert "visitors_suppressed (windows)" in header and "dwell_lt5 (visits)" in header
    json_rows = alice.get(f"/api/v1/sites/shop-a/counts?{query}").json()["rows"]
    column = header.index("visitors (devices)")
    assert [r[0] for r in rows] == [r["local"] for r in json_rows]
    assert [r[column] for r in rows] == [
        "" if r["visitors"] is None else str(r["visitors"]) for r in json_rows
    ]


def test_tokens_and_sessions_are_hashed_at_rest_and_a_revoked_token_is_refused(
    served: Served,
) -> None:
    secret = token(served, "alice")
    api = browser(served, Authorization=f"Bearer {secret}")
    assert api.get("/api/v1/me").json() == {
        "name": "alice",
        "role": "merchant",
        "sites": ["shop-a"],
    }
    page = _signed_in(served, "alice")
    cookie = page.cookies["footfall_session"]
    with served.store.engine.connect() as conn:
        stored = " ".join(
            str(v)
            for table in (api_tokens, sessions, users)
            for row in conn.execute(sa.select(table))
            for v in row
        )
    assert secret not in stored and cookie not in stored and PASSWORD not in stored
    assert "$argon2id$" in stored
    # Revoke through the account page's form (CSRF checked), as a person would.
    from aggregator.accounts import Accounts  # noqa: PLC0415

    token_id = Accounts(served.store).tokens("alice")[-1].id
    forged = page.post(f"/account/tokens/{token_id}/revoke", data={"csrf": "forged"})
    assert forged.status_code == 403
    assert api.get("/api/v1/me").status_code == 200
    revoked = page.post(
        f"/account/tokens/{token_id}/revoke", data={"csrf": page.cookies["footfall_csrf"]}
    )
    assert revoked.status_code == 303
    assert api.get("/api/v1/me").status_code == 401


def test_sign_in_cookies_csrf_rate_limit_and_sign_out(served: Served) -> None:
    from aggregator.accounts import Accounts  # noqa: PLC0415

    Accounts(served.store).add_user("target", "merchant", PASSWORD, 0)
    guesser = browser(served)
    csrf = guesser.get("/login").cookies["footfall_csrf"]
    no_csrf = guesser.post("/login", data={"name": "target", "password": PASSWORD})
    assert no_csrf.status_code == 403
    for _ in range(5):
        wrong = guesser.post(
            "/login", data={"name": "target", "password": "guess" * 3, "csrf": csrf}
        )
        assert wrong.status_code == 401 and "wrong user name or password" in wrong.text
    limited = guesser.post("/login", data={"name": "target", "password": PASSWORD, "csrf": csrf})
    assert limited.status_code == 429 and "too many failed logins" in limited.text

    signed = browser(served)
    csrf = signed.get("/login").cookies["footfall_csrf"]
    answer = signed.post("/login", data={"name": "alice", "password": PASSWORD, "csrf": csrf})
    set_cookie = answer.headers["set-cookie"].lower()
    assert "footfall_session=" in set_cookie
    assert "httponly" in set_cookie and "samesite=lax" in set_cookie
    assert "secure" not in set_cookie  # plain http here; Secure under TLS
    page = signed.get("/")
    assert "Shop A" in page.text and "Shop B" not in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    # The session works for the API too, and a state change needs the CSRF header.
    assert signed.get("/api/v1/me").json()["name"] == "alice"
    body = {"agent": "x1", "public_key": "A" * 43 + "="}
    assert signed.post("/api/v1/sites/shop-a/agents", json=body).status_code == 403
    assert signed.post("/logout", data={"csrf": "stale"}).status_code == 403
    out = signed.post("/logout", data={"csrf": signed.cookies["footfall_csrf"]})
    assert out.status_code == 303 and out.headers["location"] == "/login"
    assert signed.get("/", follow_redirects=False).headers["location"] == "/login"
    assert signed.get("/api/v1/me").status_code == 401


def test_a_link_to_a_page_survives_signing_in_and_only_to_this_server(served: Served) -> None:
    link = f"/sites/shop-a?date={DAY}"
    visitor = browser(served)
    asked = visitor.get(link, follow_redirects=False)
    assert asked.status_code == 303
    assert asked.headers["location"] == f"/login?next=%2Fsites%2Fshop-a%3Fdate%3D{DAY}"
    form = visitor.get(asked.headers["location"])
    assert f'name="next" value="{link}"' in form.text
    csrf = visitor.cookies["footfall_csrf"]
    data = {"name": "alice", "password": PASSWORD, "csrf": csrf}
    wrong = visitor.post("/login", data=data | {"password": "wrong" * 3, "next": link})
    assert wrong.status_code == 401 and f'name="next" value="{link}"' in wrong.text
    signed = visitor.post("/login", data=data | {"next": link})
    assert (signed.status_code, signed.headers["location"]) == (303, link)
    assert visitor.get(link).status_code == 200
    # Elsewhere: another host (//host, /\host, a URL), or nothing: the user's sites.
    for elsewhere in ("//evil.example/x", "/\\evil.example", "https://evil.example/", ""):
        other = browser(served)
        csrf = other.get("/login").cookies["footfall_csrf"]
        answer = other.post("/login", data=data | {"csrf": csrf, "next": elsewhere})
        assert answer.headers["location"] == "/", elsewhere
        form = other.get("/login", params={"next": elsewhere})
        assert 'name="next" value="/"' in form.text, elsewhere


@pytest.mark.parametrize("role", ["installer", "merchant"])
def test_installers_enrol_agents_merchants_do_not(served: Served, role: str) -> None:
    name = {"installer": "ivan", "merchant": "alice"}[role]
    import nacl.signing  # noqa: PLC0415

    from firmware_agent.contract.messages import public_key_text  # noqa: PLC0415

    key = public_key_text(nacl.signing.SigningKey.generate())
    agent = f"till-{role}"
    answer = client(served, name).post(
        "/api/v1/sites/shop-a/agents", json={"agent": agent, "public_key": key}
    )
    if role == "installer":
        assert answer.status_code == 201
        assert any(a.agent == agent for a in served.store.agents("shop-a"))
        again = client(served, name).post(
            "/api/v1/sites/shop-a/agents", json={"agent": agent, "public_key": key}
        )
        assert again.status_code == 409 and again.json()["error"]["field"] == "agent"
    else:
        assert answer.status_code == 403
        assert answer.json()["error"]["message"] == "a merchant does not enrol agents"
    assert zone("Europe/Paris")  # the site's zone is what the API answers in
