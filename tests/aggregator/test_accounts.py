"""Access that can be taken back, and a login limiter that slows an attacker without locking
the owner out (issue 16, findings 6 and 7).

In the store (SQLite, then PostgreSQL): a new password or a disable ends sessions *and* API
tokens; a removed grant hides the site at once; tokens expire; attempts are counted per name
and address with a doubling wait. Through the real server (``footfall-aggregator serve``'s
uvicorn): simultaneous wrong passwords are checked at most the limit; ``X-Forwarded-For`` is
believed only from configured proxies. Through the API: an admin does all of it, typed and
CSRF-checked; the account page shows each token's expiry. Through the command line: the same,
by name and token id.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from aggregator.accounts import (
    BACKOFF_MAX_S,
    BACKOFF_S,
    FORGET_S,
    FREE_ADDRESS_ATTEMPTS,
    FREE_ATTEMPTS,
    TOKEN_DAYS,
    Accounts,
    backoff_s,
)
from aggregator.cli import main
from aggregator.config import StoreSettings, load_config
from aggregator.errors import AccountError, ConfigError, LoginRefusedError
from aggregator.store import Store, login_attempts
from tests.support.web_harness import PASSWORD, Served, serve_command

NOW = 1_790_000_000
WRONG = "not the password"


def _site(store: Store, site: str = "s1") -> None:
    store.add_site(site, site, "Europe/Paris", NOW)


def test_a_new_password_ends_sessions_and_api_tokens(store: Store) -> None:
    accounts = Accounts(store)
    accounts.add_user("carol", "merchant", PASSWORD, NOW)
    user = accounts.user("carol")
    token = accounts.add_token(user, "reports", NOW)
    session = accounts.open_session(user, NOW, 3600)
    assert accounts.token_user(token, NOW) == accounts.session_user(session, NOW) == user

    accounts.set_password("carol", "a brand new passphrase", NOW + 1)
    assert accounts.token_user(token, NOW + 2) is None
    assert accounts.session_user(session, NOW + 2) is None
    assert [t.state(NOW + 2) for t in accounts.tokens("carol")] == ["revoked"]
    with pytest.raises(LoginRefusedError, match="wrong user name or password"):
        accounts.login("carol", PASSWORD, "10.0.0.1", NOW + 3)
    assert accounts.login("carol", "a brand new passphrase", "10.0.0.1", NOW + 3) == user


def test_disabling_ends_access_and_enabling_brings_back_no_token(store: Store) -> None:
    accounts = Accounts(store)
    accounts.add_user("root", "admin", PASSWORD, NOW)
    accounts.add_user("dave", "installer", PASSWORD, NOW)
    dave = accounts.user("dave")
    token = accounts.add_token(dave, "laptop", NOW)
    session = accounts.open_session(dave, NOW, 3600)

    row = accounts.disable("dave", NOW + 10)
    assert (row.name, row.disabled_at) == ("dave", NOW + 10)
    assert accounts.token_user(token, NOW + 11) is None
    assert accounts.session_user(session, NOW + 11) is None
    with pytest.raises(LoginRefusedError, match="wrong user name or password"):
        accounts.login("dave", PASSWORD, "10.0.0.1", NOW + 11)
    with pytest.raises(AccountError, match="user dave is disabled"):
        accounts.user("dave")
    assert [u.name for u in accounts.users()] == ["root"]
    assert [(u.name, u.disabled_at) for u in accounts.user_rows()] == [
        ("dave", NOW + 10),
        ("root", None),
    ]

    assert accounts.enable("dave").disabled_at is None
    assert accounts.token_user(token, NOW + 12) is None  # a leaked token stays dead
    assert accounts.login("dave", PASSWORD, "10.0.0.1", NOW + 12).name == "dave"

    with pytest.raises(AccountError, match="user root is the last enabled admin"):
        accounts.disable("root", NOW + 13)
    accounts.add_user("root2", "admin", PASSWORD, NOW)
    assert accounts.disable("root", NOW + 14).disabled_at == NOW + 14


def test_a_removed_grant_hides_the_site_at_the_next_request(store: Store) -> None:
    _site(store, "s1")
    _site(store, "s2")
    accounts = Accounts(store)
    accounts.add_user("erin", "merchant", PASSWORD, NOW)
    accounts.grant("erin", "s1")
    assert accounts.grant("erin", "s2").sites == ["s1", "s2"]
    token = accounts.add_token(accounts.user("erin"), "t", NOW)
    assert accounts.revoke_grant("erin", "s1").sites == ["s2"]
    seen = accounts.token_user(token, NOW + 1)
    assert seen is not None and not seen.sees("s1") and seen.sees("s2")
    with pytest.raises(AccountError, match="user erin has no grant of site s1"):
        accounts.revoke_grant("erin", "s1")


def test_api_tokens_expire_and_an_admin_revokes_anyones(store: Store) -> None:
    accounts = Accounts(store)
    accounts.add_user("fred", "merchant", PASSWORD, NOW)
    fred = accounts.user("fred")
    default = accounts.add_token(fred, "default", NOW)
    short = accounts.add_token(fred, "short", NOW, days=1)
    rows = {t.name: t for t in accounts.tokens("fred")}
    assert rows["default"].expires_at == NOW + TOKEN_DAYS * 86400
    assert accounts.token_user(short, NOW + 86399) == fred
    assert accounts.token_user(short, NOW + 86400) is None
    assert rows["short"].state(NOW + 86400) == "expired"
    with pytest.raises(AccountError, match="lifetime must be 1 to 3660 days, got 0"):
        accounts.add_token(fred, "never", NOW, days=0)

    accounts.add_user("gina", "merchant", PASSWORD, NOW)
    gina = accounts.user("gina")
    token_id = rows["default"].id
    assert accounts.revoke_token(gina, token_id, NOW + 5) is None  # not hers
    assert accounts.token_user(default, NOW + 5) == fred
    revoked = accounts.revoke_token(None, token_id, NOW + 6)  # an admin's call: anyone's
    assert revoked is not None and (revoked.user, revoked.revoked_at) == ("fred", NOW + 6)
    assert accounts.token_user(default, NOW + 7) is None
    assert accounts.revoke_token(None, token_id, NOW + 8) is None  # no longer live
    assert accounts.revoke_token(None, 2**40, NOW + 8) is None


def _checked(accounts: Accounts, name: str, password: str, address: str, now: int) -> int:
    """0 when the password was checked (and was wrong); the wait when the limiter refused."""
    try:
        accounts.login(name, password, address, now)
    except LoginRefusedError as exc:
        return exc.retry_after_s
    raise AssertionError("the login succeeded")


def test_wrong_passwords_from_elsewhere_never_lock_the_owner_out(store: Store) -> None:
    accounts = Accounts(store)
    accounts.add_user("owner", "merchant", PASSWORD, NOW)
    attacker, home = "203.0.113.9", "198.51.100.7"
    waits = [_checked(accounts, "owner", WRONG, attacker, NOW) for _ in range(FREE_ATTEMPTS + 3)]
    assert waits == [0] * FREE_ATTEMPTS + [BACKOFF_S] * 3
    # The owner, at their own address, at the same second: let in.
    assert accounts.login("owner", PASSWORD, home, NOW).name == "owner"
    # The attacker waits, twice as long after each try, up to the cap.
    at, expected = NOW, []
    for attempts in range(FREE_ATTEMPTS, FREE_ATTEMPTS + 6):
        wait = backoff_s(attempts, FREE_ATTEMPTS)
        expected.append(wait)
        assert _checked(accounts, "owner", WRONG, attacker, at + wait - 1) == 1
        at += wait
        assert _checked(accounts, "owner", WRONG, attacker, at) == 0
    assert expected == [60, 120, 240, 480, 900, 900] and BACKOFF_MAX_S == 900
    # Forgotten after a quiet day.
    assert _checked(accounts, "owner", WRONG, attacker, at + FORGET_S + 1) == 0

    # The owner's own mistakes: a success clears their count at that address.
    for _ in range(FREE_ATTEMPTS - 1):
        assert _checked(accounts, "owner", WRONG, home, NOW) == 0
    accounts.login("owner", PASSWORD, home, NOW)
    for _ in range(FREE_ATTEMPTS):
        assert _checked(accounts, "owner", WRONG, home, NOW) == 0


def test_one_address_trying_many_names_is_slowed_too(store: Store) -> None:
    accounts = Accounts(store)
    accounts.add_user("hana", "merchant", PASSWORD, NOW)
    sprayer = "192.0.2.50"
    waits = [
        _checked(accounts, f"user{i}", WRONG, sprayer, NOW) for i in range(FREE_ADDRESS_ATTEMPTS)
    ]
    assert waits == [0] * FREE_ADDRESS_ATTEMPTS
    assert _checked(accounts, "hana", WRONG, sprayer, NOW) == BACKOFF_S
    assert accounts.login("hana", PASSWORD, "192.0.2.51", NOW).name == "hana"
    # A day later the sprayer's counters are gone from the table, not merely ignored.
    assert _checked(accounts, "hana", WRONG, "192.0.2.52", NOW + FORGET_S + 1) == 0
    with store.begin() as conn:
        kept = set(conn.execute(sa.select(login_attempts.c.key)).scalars())
    assert kept == {"addr:192.0.2.52", "name:hana@192.0.2.52"}


def _login(url: str, name: str, password: str, forwarded_for: str | None = None) -> int:
    """One login through the sign-in form: the status (303: signed in; 401: the password was
    checked and is wrong; 429: refused unchecked, with Retry-After)."""
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
    with httpx.Client(base_url=url, cookies={"footfall_csrf": "c"}, timeout=60) as client:
        answer = client.post(
            "/login", data={"name": name, "password": password, "csrf": "c"}, headers=headers
        )
    if answer.status_code == 429:
        assert int(answer.headers["retry-after"]) > 0
    return answer.status_code


def _try(url: str, name: str, forwarded_for: str | None = None) -> int:
    return _login(url, name, WRONG, forwarded_for)


@pytest.mark.parametrize("tries", [20, 100, 200])  # finding 7: 11, 13 and 17 were checked
def test_simultaneous_wrong_passwords_are_checked_at_most_the_limit(
    store: Store, store_settings: StoreSettings, tries: int
) -> None:
    Accounts(store).add_user("victim", "merchant", PASSWORD, NOW)
    with serve_command(store_settings) as url, ThreadPoolExecutor(tries) as pool:
        start = threading.Barrier(tries)

        def attempt(_: int) -> int:
            start.wait()
            return _try(url, "victim")

        statuses = list(pool.map(attempt, range(tries)))
    assert statuses.count(401) == FREE_ATTEMPTS
    assert statuses.count(429) == tries - FREE_ATTEMPTS


def test_forwarded_addresses_are_believed_only_from_configured_proxies(
    store: Store, store_settings: StoreSettings
) -> None:
    Accounts(store).add_user("ida", "merchant", PASSWORD, NOW)
    attacker, home = "203.0.113.66", "198.51.100.7"
    # Default: no proxy believed. Whatever X-Forwarded-For says, every try comes from
    # 127.0.0.1, so the owner's "own address" is the attacker's too.
    with serve_command(store_settings) as url:
        guesses = [_try(url, "ida", attacker) for _ in range(FREE_ATTEMPTS)]
        assert guesses == [401] * FREE_ATTEMPTS
        assert _login(url, "ida", PASSWORD, home) == 429
    # The proxy listed: each forwarded client is counted apart, and the owner is let in.
    with serve_command(store_settings, **{"serve.forwarded_allow_ips": "127.0.0.1"}) as url:
        guesses = [_try(url, "ida", attacker) for _ in range(FREE_ATTEMPTS + 1)]
        assert guesses == [401] * FREE_ATTEMPTS + [429]
        assert _login(url, "ida", PASSWORD, home) == 303


def test_trusted_proxies_must_be_addresses() -> None:
    with pytest.raises(ConfigError, match=r"serve\.forwarded_allow_ips must be .* got 'proxy'"):
        load_config(environ={}, overrides={"serve.forwarded_allow_ips": "10.0.0.1, proxy"})
    assert load_config(environ={}).serve.trusted_proxies == []


def test_an_admin_takes_access_back_through_the_api(served: Served) -> None:
    accounts = Accounts(served.store)
    name = f"jo-{time.time_ns()}"
    accounts.add_user(name, "merchant", PASSWORD, NOW)
    accounts.grant(name, "shop-a")
    jo_token = accounts.add_token(accounts.user(name), "jo", int(time.time()))
    now = int(time.time())
    admin = httpx.Client(
        base_url=served.url,
        headers={"Authorization": f"Bearer {accounts.add_token(accounts.user('admin'), 'a', now)}"},
    )
    jo = httpx.Client(base_url=served.url, headers={"Authorization": f"Bearer {jo_token}"})
    with admin, jo:
        # Not an admin: 403 on every admin call.
        for method, path in [
            ("GET", "/api/v1/users"),
            ("POST", f"/api/v1/users/{name}/disable"),
            ("DELETE", f"/api/v1/users/{name}/grants/shop-a"),
            ("GET", "/api/v1/tokens"),
            ("POST", "/api/v1/tokens/1/revoke"),
        ]:
            answer = jo.request(method, path)
            assert answer.status_code == 403, (method, path)
            assert answer.json()["error"]["message"] == "a merchant does not manage users or tokens"
        assert jo.get("/api/v1/sites/shop-a").status_code == 200

        listed = {u["name"]: u for u in admin.get("/api/v1/users").json()}
        assert listed[name] == {
            "name": name,
            "role": "merchant",
            "sites": ["shop-a"],
            "disabled_at": None,
        }
        removed = admin.delete(f"/api/v1/users/{name}/grants/shop-a")
        assert removed.status_code == 200 and removed.json()["sites"] == []
        assert jo.get("/api/v1/sites/shop-a").status_code == 404
        assert admin.put(f"/api/v1/users/{name}/grants/shop-a").json()["sites"] == ["shop-a"]
        gone = admin.delete(f"/api/v1/users/{name}/grants/shop-b")
        assert (gone.status_code, gone.json()["error"]["field"]) == (404, "site")

        (token,) = admin.get(f"/api/v1/tokens?user={name}").json()
        assert token["state"] == "live" and token["expires_at"] - token["created_at"] == 90 * 86400
        revoked = admin.post(f"/api/v1/tokens/{token['id']}/revoke").json()
        assert revoked["state"] == "revoked"
        assert jo.get("/api/v1/me").json()["error"]["message"] == (
            "the API token is unknown, expired or revoked"
        )
        assert admin.post(f"/api/v1/tokens/{token['id']}/revoke").status_code == 404

        # A session ends when its user is disabled; through a session the call needs CSRF.
        page = httpx.Client(base_url=served.url, cookies={"footfall_csrf": "c"})
        with page:
            page.post("/login", data={"name": name, "password": PASSWORD, "csrf": "c"})
            assert page.get("/api/v1/me").json()["name"] == name
            disabled = admin.post(f"/api/v1/users/{name}/disable").json()
            assert disabled["disabled_at"] is not None
            assert page.get("/api/v1/me").status_code == 401
        assert admin.post(f"/api/v1/users/{name}/enable").json()["disabled_at"] is None
        assert admin.post("/api/v1/users/nobody-here/disable").status_code == 404

    signed = httpx.Client(base_url=served.url, cookies={"footfall_csrf": "c"})
    with signed:
        signed.post("/login", data={"name": "admin", "password": PASSWORD, "csrf": "c"})
        forged = signed.post(f"/api/v1/users/{name}/disable")
        assert forged.status_code == 403 and forged.json()["error"]["field"] == "X-CSRF-Token"
        assert signed.get(f"/api/v1/tokens?user={name}").status_code == 200

    spec = httpx.get(f"{served.url}/api/v1/openapi.json").json()
    assert {"UserOut", "TokenOut"} <= set(spec["components"]["schemas"])
    disable = spec["paths"]["/api/v1/users/{name}/disable"]["post"]
    schema = disable["responses"]["200"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/UserOut"}


def test_the_users_commands_take_access_back(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    dsn = ["--set", f"store.dsn=sqlite:///{tmp_path / 'agg.sqlite3'}"]

    def run(*argv: str, stdin: str | None = None) -> tuple[int, str, str]:
        status = main([*argv, *dsn])
        out, err = capsys.readouterr()
        return status, out, err

    assert run("sites", "add", "shop-1", "--timezone", "Europe/Paris")[0] == 0
    with Store.open(StoreSettings(f"sqlite:///{tmp_path / 'agg.sqlite3'}")) as store:
        accounts = Accounts(store)
        accounts.add_user("boss", "admin", PASSWORD, NOW)
        accounts.add_user("kim", "merchant", PASSWORD, NOW)
    assert (
        run("users", "grant", "kim", "shop-1")[1]
        == "user kim (merchant, sites shop-1): sees site shop-1\n"
    )
    status, out, _ = run("users", "token", "kim", "reports", "--expires", "7")
    assert status == 0 and out.startswith("fft_")
    status, out, _ = run("users", "tokens", "kim")
    header, row = out.splitlines()
    assert header.split() == ["ID", "USER", "NAME", "STATE", "MADE", "EXPIRES", "LAST", "USED"]
    assert row.split()[:4] == ["1", "kim", "reports", "live"]
    assert run("users", "revoke-token", "1")[1] == "token 1 (reports) of user kim revoked\n"
    status, _, err = run("users", "revoke-token", "1")
    assert status == 1 and "no live API token 1" in err
    status, out, _ = run("users", "revoke-grant", "kim", "shop-1")
    assert (
        out
        == "user kim (merchant, sites -): no longer sees site shop-1, from their next request on\n"
    )
    assert "disabled; their sessions have ended" in run("users", "disable", "kim")[1]
    status, out, _ = run("users", "list")
    assert out.splitlines()[2].split()[:3] == ["kim", "merchant", "disabled"]
    status, _, err = run("users", "token", "kim", "again")
    assert status == 1 and "user kim is disabled" in err
    assert "enabled (their old API tokens stay revoked)" in run("users", "enable", "kim")[1]
    status, _, err = run("users", "disable", "boss")
    assert status == 1 and "boss is the last enabled admin" in err
    assert len(err.splitlines()) == 1


def test_the_account_page_shows_each_tokens_expiry_and_state(served: Served) -> None:
    accounts = Accounts(served.store)
    name = f"lu-{time.time_ns()}"
    accounts.add_user(name, "merchant", PASSWORD, NOW)
    accounts.add_token(accounts.user(name), "old one", NOW - 100 * 86400)
    with httpx.Client(base_url=served.url, cookies={"footfall_csrf": "c"}) as page:
        signed = page.post("/login", data={"name": name, "password": PASSWORD, "csrf": "c"})
        assert signed.status_code == 303
        made = page.post("/account/tokens", data={"name": "new one", "csrf": "c"})
        assert made.status_code == 200 and "it expires after 90 days" in made.text
        rows = {
            row.split("</td>")[0]: row for row in page.get("/account").text.split("<tr><td>")[1:]
        }
    assert "expired" in rows["old one"] and "Revoke" not in rows["old one"]
    assert "Revoke" in rows["new one"]
    expires = time.strftime("%Y-%m-%d", time.gmtime(time.time() + TOKEN_DAYS * 86400))
    assert expires in rows["new one"]
