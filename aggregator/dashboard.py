"""The merchants' dashboard: server-rendered pages (Jinja2), charts drawn by the vendored uPlot
(``aggregator/web/static/uPlot-1.6.32.min.js``; no build step, no CDN), installed on the web
app beside the API by :func:`install_dashboard` (the app: :mod:`aggregator.app`).

Pages: ``/login``, ``/`` (the user's sites), ``/sites/<site>?date=YYYY-MM-DD`` (a day: by hour
against the same weekday a week before, the last 4 weeks by day, busy times, dwell, capture
rate, agents' health; CSV of what is shown), ``/account`` (API tokens). Every form carries a
CSRF token that must equal the ``footfall_csrf`` cookie (double submit; the cookie is
``SameSite=Strict`` and ``HttpOnly``). The session cookie is ``HttpOnly``, ``SameSite=Lax``,
and ``Secure`` when the request came over TLS (``serve.secure_cookies``). Every page is sent
with a Content-Security-Policy that allows scripts and styles from this server only.
"""

from __future__ import annotations

import hmac
import secrets
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, FastAPI, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from swagger_ui_bundle import swagger_ui_path  # type: ignore[import-untyped]

from aggregator import __version__
from aggregator.accounts import TOKEN_DAYS, User
from aggregator.api import (
    CSRF_COOKIE,
    KEY_PATTERN,
    SESSION_COOKIE,
    SITE_PATTERN,
    ApiError,
    asked_day,
    dashboard_data,
    install_error_handlers,
    overview,
    services,
)
from aggregator.errors import AccountError, LoginRefusedError, RegistryError
from aggregator.query import Site
from firmware_agent.contract.fields import ID_PATTERN

__all__ = ["UPLOT", "install_dashboard", "shown_value"]

WEB = Path(__file__).with_name("web")
UPLOT = "uPlot-1.6.32"
templates = Jinja2Templates(directory=WEB / "templates")


def shown_value(value: int | None, suppressed: int) -> str:
    """A count as a person reads it: ``12``; ``≥ 12`` when some windows were suppressed;
    ``suppressed`` when every window was; ``—`` when it was not published."""
    if value is None:
        return "suppressed" if suppressed else "—"
    return f"≥ {value}" if suppressed else str(value)


def _shown(row: dict[str, Any], measure: str) -> str:
    return shown_value(row[measure], row[f"{measure}_suppressed"])


def people_value(value: int | None, suppressed: int) -> str:
    """A people figure as a person reads it: ``12``; ``≥ 12`` when some windows were
    suppressed; ``suppressed`` when every window was; ``—`` when there is none."""
    if not value:  # nothing published, or only zeros beside suppressed windows: no "≥ 0"
        return "suppressed" if suppressed else ("—" if value is None else "0")
    return shown_value(value, suppressed)


def change_text(pct: float | None) -> str:
    """A change in whole per cent with its sign (``+12 %``, ``-3 %``); one that rounds to 0 is
    ``0 %``, never ``-0 %`` (227 visitors against 228); ``—`` when there is none."""
    if pct is None:
        return "—"
    whole = round(pct)
    return f"{whole:+d} %" if whole else "0 %"


def _utc(unix_s: int | None) -> str:
    return "—" if unix_s is None else time.strftime("%Y-%m-%d %H:%M", time.gmtime(unix_s))


templates.env.globals.update(
    shown=_shown,
    shown_value=shown_value,
    people=people_value,
    change=change_text,
    id_pattern=ID_PATTERN,
)
templates.env.filters["utc"] = _utc
# The API docs page: Swagger UI's own script and styles from this server; it sets style
# attributes as it draws, which style-src 'self' refuses (the page stays usable: layout is in
# its stylesheet), so nothing inline is allowed here either.
DOCS_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
pages = APIRouter(include_in_schema=False)


class _SignInRequiredError(Exception):
    """Not signed in: go to the login page."""


def _page_user(request: Request) -> User:
    secret = request.cookies.get(SESSION_COOKIE)
    user = services(request).accounts.session_user(secret, int(time.time())) if secret else None
    if user is None:
        raise _SignInRequiredError
    return user


def _csrf(request: Request) -> str:
    """The browser's CSRF token (made on the first page it sees; the middleware sets it)."""
    token: str = getattr(request.state, "csrf", "")
    return token


def _check_csrf(request: Request, given: str) -> None:
    expected = request.cookies.get(CSRF_COOKIE, "")
    if not expected or not hmac.compare_digest(expected, given):
        raise ApiError(403, "the form is stale or came from another site: reload and try again")


def _render(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
    return templates.TemplateResponse(
        request,
        template,
        {"csrf": _csrf(request), "uplot": UPLOT, "version": __version__, **context},
        status_code=status,
    )


def _secure(request: Request) -> bool:
    setting = services(request).secure_cookies
    return setting == "on" or (setting == "auto" and request.url.scheme == "https")


def _user_site(request: Request, user: User, site_id: str) -> Site:
    if user.sees(site_id):
        try:
            return services(request).counts.site(site_id)
        except RegistryError:
            pass
    raise ApiError(404, f"site {site_id} does not exist")


def _local_path(target: str) -> str:
    """Where to go after signing in: ``target`` if it is a path on this server (``/...``, not
    ``//host`` nor a backslash, which browsers read as another host), else ``/``."""
    local = target.startswith("/") and not target.startswith("//") and "\\" not in target
    return target if local and target.isprintable() else "/"


@pages.get("/login")
def login_page(
    request: Request, next_page: Annotated[str, Query(alias="next", max_length=2000)] = "/"
) -> HTMLResponse:
    return _render(request, "login.html", title="Sign in", next_page=_local_path(next_page))


@pages.post("/login")
def login(
    request: Request,
    name: Annotated[str, Form(max_length=100)],
    password: Annotated[str, Form(max_length=1000)],
    csrf: Annotated[str, Form(max_length=100)] = "",
    next_page: Annotated[str, Form(alias="next", max_length=2000)] = "/",
) -> Response:
    _check_csrf(request, csrf)
    found = services(request)
    address = request.client.host if request.client else "-"
    target = _local_path(next_page)
    try:
        user = found.accounts.login(name, password, address, int(time.time()))
    except LoginRefusedError as exc:
        status = 429 if exc.limited else 401
        page = _render(
            request,
            "login.html",
            status,
            title="Sign in",
            error=str(exc),
            name=name,
            next_page=target,
        )
        if exc.limited:
            page.headers["Retry-After"] = str(exc.retry_after_s)
        return page
    secret = found.accounts.open_session(user, int(time.time()), found.session_s)
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        secret,
        max_age=found.session_s,
        httponly=True,
        samesite="lax",
        secure=_secure(request),
    )
    return response


@pages.post("/logout")
def logout(request: Request, csrf: Annotated[str, Form(max_length=100)] = "") -> Response:
    _check_csrf(request, csrf)
    secret = request.cookies.get(SESSION_COOKIE)
    if secret:
        services(request).accounts.close_session(secret)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, httponly=True, samesite="lax", secure=_secure(request))
    return response


@pages.get("/")
def home(request: Request) -> HTMLResponse:
    user = _page_user(request)
    only = None if user.role == "admin" else user.sites
    found = services(request)
    rows = overview(found, user, None) if user.reads_counts else []
    return _render(
        request,
        "sites.html",
        title="Sites",
        user=user,
        sites=found.counts.sites(only),
        overview=rows,
    )


_BANDS = {"lt5": "under 5 min", "5_15": "5-15 min", "15_30": "15-30 min"}
_BANDS |= {"30_60": "30-60 min", "ge60": "an hour or more"}


def _period_text(data: dict[str, Any]) -> tuple[str, str]:
    """The range and its previous period, in words."""
    first, last = date.fromisoformat(data["first"]), date.fromisoformat(data["last"])
    before = date.fromisoformat(data["previous_first"])
    if data["range"] == "day":
        return first.strftime("%A %d %B %Y"), f"the same weekday a week before ({before})"
    if data["range"] == "month":
        return first.strftime("%B %Y"), before.strftime("%B %Y")
    words = "the week" if data["range"] == "week" else "the range"
    return f"{words} {first} to {last}", f"the {(last - first).days + 1} days before"


def _empty_text(data: dict[str, Any], first_day: str | None) -> str:
    if first_day is None:
        return "No people figures yet: no agent of this site has sent a window."
    if data["last"] < first_day:
        return f"No data: this site's first window is on {first_day}, after this range."
    if data["first"] > date.today().isoformat():
        return "No data yet: this range is in the future."
    return "No people figures for this range (agents were off, or send device counts only)."


@pages.get("/sites/{site_id}")
def site_page(
    request: Request,
    site_id: str,
    day: Annotated[date | None, Query(alias="date")] = None,
    range_: Annotated[str, Query(alias="range", pattern="^(day|week|month|custom)$")] = "day",
    first: Annotated[date | None, Query(alias="from")] = None,
    last: Annotated[date | None, Query(alias="to")] = None,
) -> HTMLResponse:
    user = _page_user(request)
    site = _user_site(request, user, site_id)
    found = services(request)
    day = asked_day(site, day, "date")
    context: dict[str, Any] = {"title": site.name, "user": user, "site": site, "day": day}
    if not user.reads_counts:
        day_start, day_end = found.counts.day_bounds(site, day, day)
        agents = found.store.agents(site.id, since=day_start, until=day_end)
        return _render(request, "agents.html", agents=agents, **context)
    if range_ == "custom":
        first = asked_day(site, first, "from") if first else day
        last = asked_day(site, last, "to") if last else day
    data = dashboard_data(found, site, day, range_, first, last)
    period_text, previous_text = _period_text(data)
    step = {"day": 1, "week": 7}.get(range_, 0)
    previous = day - timedelta(days=step) if step else date.fromisoformat(data["previous_last"])
    following = (
        day + timedelta(days=step) if step else date.fromisoformat(data["last"]) + timedelta(days=1)
    )
    suppressed = (data["total"] or {}).get("arrivals_suppressed", 0)
    return _render(
        request,
        "site.html",
        data=data,
        agents=data["agents"],
        bands=list(_BANDS.items()),
        previous=previous,
        following=following,
        week_before=day - timedelta(days=7),
        period_text=period_text,
        previous_text=previous_text,
        empty_text=_empty_text(data, found.counts.first_day(site)),
        suppressed_text=(
            f"≥ marks a lower bound: {suppressed} window{'s' if suppressed > 1 else ''} had "
            "too few people to publish (privacy threshold)."
            if suppressed
            else ""
        ),
        heat_max=max((v for row in data["busy"] for v in row if v), default=0),
        **context,
    )


@pages.post("/sites/{site_id}/agents")
def enrol_agent(
    request: Request,
    site_id: str,
    agent: Annotated[str, Form(pattern=SITE_PATTERN)],
    public_key: Annotated[str, Form(max_length=100, pattern=KEY_PATTERN)],
    csrf: Annotated[str, Form(max_length=100)] = "",
) -> Response:
    _check_csrf(request, csrf)
    user = _page_user(request)
    site = _user_site(request, user, site_id)
    if not user.enrols:
        raise ApiError(403, f"a {user.role} does not enrol agents")
    try:
        services(request).store.add_agent(site.id, agent, public_key, int(time.time()))
    except RegistryError as exc:
        raise ApiError(422, str(exc)) from exc
    return RedirectResponse(f"/sites/{site.id}", status_code=303)


def _account_page(request: Request, user: User, **extra: Any) -> HTMLResponse:
    """The account page: the user's API tokens, each with its state, and the form for one."""
    tokens = services(request).accounts.tokens(user.name)
    return _render(
        request,
        "account.html",
        title="Account",
        user=user,
        tokens=tokens,
        now=int(time.time()),
        token_days=TOKEN_DAYS,
        **extra,
    )


@pages.get("/account")
def account(request: Request) -> HTMLResponse:
    return _account_page(request, _page_user(request))


@pages.post("/account/tokens")
def add_token(
    request: Request,
    name: Annotated[str, Form(max_length=100)],
    csrf: Annotated[str, Form(max_length=100)] = "",
) -> HTMLResponse:
    _check_csrf(request, csrf)
    user = _page_user(request)
    try:
        secret = services(request).accounts.add_token(user, name, int(time.time()))
    except AccountError as exc:
        raise ApiError(422, str(exc), "name") from exc
    return _account_page(request, user, new_token=secret)


@pages.post("/account/tokens/{token_id}/revoke")
def revoke_token(
    request: Request, token_id: int, csrf: Annotated[str, Form(max_length=100)] = ""
) -> Response:
    _check_csrf(request, csrf)
    user = _page_user(request)
    if not services(request).accounts.revoke_token(user, token_id, int(time.time())):
        raise ApiError(404, f"token {token_id} does not exist")
    return RedirectResponse("/account", status_code=303)


@pages.get("/api/v1/docs")
def api_docs(request: Request) -> HTMLResponse:
    """The API's documentation (Swagger UI 5, from the swagger-ui-bundle-v2 package): open to
    anyone, as the OpenAPI document is; trying a call needs a session or a token."""
    response = templates.TemplateResponse(request, "api_docs.html", {"version": __version__})
    response.headers["Content-Security-Policy"] = DOCS_CSP
    return response


class _Headers(BaseHTTPMiddleware):
    """Security headers on every answer; the CSRF cookie for a browser that has none."""

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        known = request.cookies.get(CSRF_COOKIE)
        request.state.csrf = known or secrets.token_urlsafe(24)
        response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "same-origin"
        response.headers["X-Frame-Options"] = "DENY"
        if not request.url.path.startswith("/static/"):
            response.headers.setdefault("Cache-Control", "no-store")
        if not known:
            response.set_cookie(
                CSRF_COOKIE,
                request.state.csrf,
                httponly=True,
                samesite="strict",
                secure=_secure(request),
            )
        return response


def install_dashboard(app: FastAPI) -> None:
    """The pages, their static files and security headers, and HTML error pages, on ``app``
    (:func:`aggregator.app.create_app`)."""
    app.include_router(pages)
    app.mount("/static", StaticFiles(directory=WEB / "static"), name="static")
    app.mount("/api/v1/docs/assets", StaticFiles(directory=str(swagger_ui_path)), name="docs")
    app.add_middleware(_Headers)

    def error_page(request: Request, status: int, message: str) -> Response:
        return _render(request, "error.html", status, title=f"Error {status}", message=message)

    install_error_handlers(app, error_page)

    @app.exception_handler(_SignInRequiredError)
    async def to_login(request: Request, _exc: _SignInRequiredError) -> Response:
        """The login page, which comes back to the page asked for (a link to a site's day,
        as the demo prints, survives signing in)."""
        asked = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        if request.method != "GET" or asked == "/":
            return RedirectResponse("/login", status_code=303)
        return RedirectResponse(f"/login?{urlencode({'next': asked})}", status_code=303)
