"""The HTTP API (FastAPI, OpenAPI at ``/api/v1/openapi.json``): sites, agents and their
health, counts by window, hour and day in the site's time zone, CSV export, and the dashboard's
data in one call.

**Who sees what.** Every call is made as a user: an API token (``Authorization: Bearer
fft_…``) or the dashboard's session cookie (then a state-changing call must also send the
``X-CSRF-Token`` header equal to the ``footfall_csrf`` cookie). A site that is not granted to
the user answers 404, exactly as a site that does not exist; a call the user's role may not
make on a site they see answers 403.

**One error shape.** Every error the API answers, whatever raised it::

    {"error": {"status": 404, "code": "not_found", "message": "site s9 does not exist",
               "field": null}}

``field`` names the parameter or body field at fault when there is one.
"""

from __future__ import annotations

import csv
import hmac
import io
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import date, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from aggregator.accounts import Accounts, User
from aggregator.errors import RegistryError
from aggregator.people import (
    FIGURES,
    PEOPLE_UNITS,
    busy_times,
    figures,
    group,
    hours_of,
    overview_row,
    summary,
)
from aggregator.query import MAX_WINDOW_DAYS, MEASURES, UNITS, Counts, Site
from aggregator.rollup import zone
from aggregator.store import AgentHealth, Store
from firmware_agent.contract.fields import ID_PATTERN

__all__ = [
    "CSRF_COOKIE",
    "SESSION_COOKIE",
    "ApiError",
    "Services",
    "api_router",
    "asked_day",
    "csv_response",
    "error_body",
]

log = logging.getLogger("footfall.aggregator")

SESSION_COOKIE = "footfall_session"
CSRF_COOKIE = "footfall_csrf"
SITE_PATTERN = f"^{ID_PATTERN}$"
AGENT_PATTERN = SITE_PATTERN
KEY_PATTERN = "^[A-Za-z0-9+/]*={0,2}$"  # base64
# Local days the API answers for (the roll-ups' keys; a day's bounds must be instants).
FIRST_DAY, LAST_DAY = date(2000, 1, 1), date(9998, 12, 31)
MAX_RANGE_DAYS = {"window": MAX_WINDOW_DAYS, "hour": 31, "day": 366, "week": 371, "month": 731}
_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    422: "invalid",
    429: "too_many_requests",
    500: "internal",
}


class ApiError(Exception):
    """An error answered in the API's one shape."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


def error_body(status: int, message: str, field: str | None = None) -> dict[str, Any]:
    code = _CODES.get(status, "bad_request" if status < 500 else "internal")
    return {"error": {"status": status, "code": code, "message": message, "field": field}}


class Services:
    """What a request needs: the store, accounts, counts, and how long sessions last."""

    def __init__(self, store: Store, session_s: int, secure_cookies: str) -> None:
        self.store = store
        self.accounts = Accounts(store)
        self.counts = Counts(store)
        self.session_s = session_s
        self.secure_cookies = secure_cookies  # "auto" (when the request came by https), on, off


def services(request: Request) -> Services:
    found: Services = request.app.state.services
    return found


_bearer = HTTPBearer(auto_error=False, description="An API token: fft_…")
_cookie = APIKeyCookie(name=SESSION_COOKIE, auto_error=False, description="A dashboard session")


def current_user(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    cookie: Annotated[str | None, Security(_cookie)],
) -> User:
    """The user making the call (401 when there is none)."""
    found = services(request)
    now = int(time.time())
    if bearer is not None:
        user = found.accounts.token_user(bearer.credentials, now)
        if user is None:
            raise ApiError(401, "the API token is unknown, expired or revoked", "Authorization")
        return user
    if request.headers.get("authorization"):
        raise ApiError(401, "Authorization must be 'Bearer <API token>'", "Authorization")
    if cookie:
        user = found.accounts.session_user(cookie, now)
        if user is not None:
            if request.method not in ("GET", "HEAD") and not _csrf_ok(request):
                raise ApiError(
                    403, "X-CSRF-Token must equal the footfall_csrf cookie", "X-CSRF-Token"
                )
            return user
    raise ApiError(401, "sign in, or send an API token (Authorization: Bearer fft_…)")


def _csrf_ok(request: Request) -> bool:
    expected = request.cookies.get(CSRF_COOKIE, "")
    given = request.headers.get("x-csrf-token", "")
    return bool(expected) and hmac.compare_digest(expected, given)


CurrentUser = Annotated[User, Depends(current_user)]
SiteIdPath = Annotated[str, Path(pattern=SITE_PATTERN, description="site id")]


def visible_site(request: Request, site_id: SiteIdPath, user: CurrentUser) -> Site:
    """The site, if the user may see it; 404 as if it did not exist otherwise."""
    if user.sees(site_id):
        try:
            return services(request).counts.site(site_id)
        except RegistryError:
            pass
    raise ApiError(404, f"site {site_id} does not exist", "site_id")


VisibleSite = Annotated[Site, Depends(visible_site)]


def counts_site(site: VisibleSite, user: CurrentUser) -> Site:
    """The site, if the user may also read its counts (merchants and admins)."""
    if not user.reads_counts:
        raise ApiError(403, f"a {user.role} does not read counts", "site_id")
    return site


CountsSite = Annotated[Site, Depends(counts_site)]


def local_today(site: Site) -> date:
    return datetime.now(zone(site.timezone)).date()


def asked_day(site: Site, day: date | None, field: str) -> date:
    """The local day asked for (today when none), if the API answers for it."""
    if day is None:
        return local_today(site)
    if not FIRST_DAY <= day <= LAST_DAY:
        raise ApiError(422, f"{field}: a day from {FIRST_DAY} to {LAST_DAY}, got {day}", field)
    return day


def _day_range(
    site: Site, first: date | None, last: date | None, resolution: str
) -> tuple[date, date]:
    last = asked_day(site, last, "to")
    first = asked_day(site, first, "from") if first else last
    if first > last:
        raise ApiError(422, f"from ({first}) is after to ({last})", "from")
    limit = MAX_RANGE_DAYS[resolution]
    if (last - first).days >= limit:
        raise ApiError(
            422,
            f"resolution {resolution}: at most {limit} days at a time, "
            f"got {(last - first).days + 1}",
            "from",
        )
    return first, last


class SiteOut(BaseModel):
    id: str
    name: str
    timezone: str


class MeOut(BaseModel):
    name: str
    role: str
    sites: list[str]


class AgentIn(BaseModel):
    agent: str = Field(pattern=AGENT_PATTERN, description="agent id, as in its topics")
    public_key: str = Field(
        max_length=100, pattern=KEY_PATTERN, description="base64 Ed25519 key (keygen prints it)"
    )


Resolution = Annotated[str, Query(pattern="^(window|hour|day)$", description="window, hour or day")]
FromDay = Annotated[date | None, Query(alias="from", description="first local day (default: to)")]
ToDay = Annotated[date | None, Query(alias="to", description="last local day (default: today)")]
OnDay = Annotated[date | None, Query(description="local day (default: today)")]


def _rows(
    counts: Counts, site: Site, resolution: str, first: date, last: date
) -> list[dict[str, Any]]:
    read: dict[str, Callable[[Site, date, date], list[dict[str, Any]]]] = {
        "window": counts.windows,
        "hour": counts.hours,
        "day": counts.days,
    }
    return read[resolution](site, first, last)


RANGES = ("day", "week", "month", "custom")


def range_bounds(
    range_: str, day: date, first: date | None, last: date | None
) -> tuple[date, date, date, date]:
    """A range's first and last local day and its previous period's: a day against the same
    weekday a week before, a week (Monday to Sunday) against the week before, a month against
    the month before, a custom range against as many days just before it."""
    if range_ == "day":
        return day, day, day - timedelta(days=7), day - timedelta(days=7)
    if range_ == "week":
        monday = day - timedelta(days=day.weekday())
        return (
            monday,
            monday + timedelta(days=6),
            monday - timedelta(days=7),
            monday - timedelta(days=1),
        )
    if range_ == "month":
        start = day.replace(day=1)
        following = (start + timedelta(days=32)).replace(day=1)
        before = (start - timedelta(days=1)).replace(day=1)
        return start, following - timedelta(days=1), before, start - timedelta(days=1)
    first, last = first or day, last or day
    if first > last:
        raise ApiError(422, f"from ({first}) is after to ({last})", "from")
    if (last - first).days >= MAX_RANGE_DAYS["day"]:
        raise ApiError(422, f"a custom range is at most {MAX_RANGE_DAYS['day']} days", "from")
    length = last - first + timedelta(days=1)
    return first, last, first - length, first - timedelta(days=1)


def dashboard_data(
    found: Services,
    site: Site,
    day: date,
    range_: str = "day",
    first: date | None = None,
    last: date | None = None,
) -> dict[str, Any]:
    """Everything the site page shows for a range ending or containing ``day``."""
    first, last, before_first, before_last = range_bounds(range_, day, first, last)
    resolution = "hour" if first == last else "day"
    now = int(time.time())
    by = "hour" if resolution == "hour" else "day"
    # Agents' health over the range's last day (a month of windows is too many to read).
    day_start, day_end = found.counts.day_bounds(site, last, last)
    # One transaction for it all: each one more is a pool check-out (a ping), BEGIN and
    # COMMIT, three round trips to a server that a loaded machine is slow to schedule.
    with found.store.begin(read_only=True) as conn:
        busy = busy_times(conn, site, last)
        hours = hours_of(conn, site, first, last, by)
        before = hours_of(conn, site, before_first, before_last, by)
        # A day's tiles are of the day shown and the same weekday a week before: just read.
        read = (hours, before) if range_ == "day" else None
        tiles = summary(conn, site, last if range_ != "day" else day, now, read)
        agents = found.store.agents(site.id, since=day_start, until=day_end, conn=conn)
    return {
        "site": asdict(site),
        "date": day.isoformat(),
        "range": range_,
        "resolution": resolution,
        "first": first.isoformat(),
        "last": last.isoformat(),
        "previous_first": before_first.isoformat(),
        "previous_last": before_last.isoformat(),
        "summary": tiles,
        "rows": group(hours, resolution),
        "previous": group(before, resolution),
        "total": next(iter(group(hours, "range")), None),
        "previous_total": next(iter(group(before, "range")), None),
        "busy": busy,
        "agents": [asdict(a) for a in agents],
    }


# The CSV columns: device-level counts (diagnostics) and people figures, after the period.
DEVICE_COLUMNS = ["windows", "probe_requests"] + [
    n for m in MEASURES for n in (m, f"{m}_suppressed")
]
PEOPLE_COLUMNS = ["windows", "v1_windows", "no_data_windows"] + [
    n for m in FIGURES for n in (m, f"{m}_suppressed")
]


def csv_response(
    site: Site, resolution: str, rows: list[dict[str, Any]], people: bool, name: str
) -> Response:
    """Rows as a CSV download; the header names each column's unit and the site's zone."""
    names, units = (PEOPLE_COLUMNS, PEOPLE_UNITS) if people else (DEVICE_COLUMNS, UNITS)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        [f"{resolution} ({site.timezone})"] + [f"{column} ({units[column]})" for column in names]
    )
    for row in rows:
        writer.writerow([row["local"]] + ["" if row[n] is None else row[n] for n in names])
    return Response(
        out.getvalue(),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


def range_body(
    site: Site, resolution: str, first: date, last: date, units: dict[str, str], rows: Any
) -> dict[str, Any]:
    """The JSON of a range's rows (counts or people)."""
    return {
        "site": site.id,
        "timezone": site.timezone,
        "resolution": resolution,
        "from": first.isoformat(),
        "to": last.isoformat(),
        "units": units,
        "rows": rows,
    }


class ErrorDetail(BaseModel):
    status: int
    code: str
    message: str
    field: str | None


class ErrorOut(BaseModel):
    """The one shape of every error."""

    error: ErrorDetail


class EnrolledOut(BaseModel):
    site: str
    agent: str


class CountsOut(BaseModel):
    """Device-level counts (v1 agents' figures and v2's diagnostics): devices, not people."""

    model_config = ConfigDict(populate_by_name=True)

    site: str
    timezone: str
    resolution: str
    from_: str = Field(alias="from")
    to: str
    units: dict[str, str]
    rows: list[dict[str, str | int | None]]


class PeopleRow(BaseModel):
    """One hour, day, week (keyed by its Monday) or month ('YYYY-MM') of people figures.
    A figure is null when no window published it; ``<figure>_suppressed`` counts the windows
    that suppressed it (the value is then a lower bound); ``no_data`` marks a gap."""

    local: str
    windows: int
    v1_windows: int
    no_data_windows: int
    no_data: bool
    arrivals: int | None
    arrivals_suppressed: int
    passersby: int | None
    passersby_suppressed: int
    visits_ended: int | None
    visits_ended_suppressed: int
    dwell_lt5: int | None
    dwell_lt5_suppressed: int
    dwell_5_15: int | None
    dwell_5_15_suppressed: int
    dwell_15_30: int | None
    dwell_15_30_suppressed: int
    dwell_30_60: int | None
    dwell_30_60_suppressed: int
    dwell_ge60: int | None
    dwell_ge60_suppressed: int
    occupancy_mean: float | None
    occupancy_mean_suppressed: int
    occupancy_peak: int | None
    occupancy_peak_suppressed: int
    capture_rate: float | None = Field(
        description="arrivals / (arrivals + passers-by) over the windows that published both"
    )


class PeopleOut(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    site: str
    timezone: str
    resolution: str
    from_: str = Field(alias="from")
    to: str
    units: dict[str, str]
    rows: list[PeopleRow]


class SummaryOut(BaseModel):
    """A day's headline tiles (people figures; null when not known)."""

    date: str
    arrivals: int | None = Field(description="visitors so far (people whose visit began)")
    arrivals_suppressed: int
    arrivals_week_before: int | None
    change_pct: float | None
    compared_until: str | None
    occupancy_now: float | None = Field(description="people in the shop: latest hour's mean")
    occupancy_at: str | None
    occupancy_peak: int | None = Field(description="most people in the shop at once that day")
    peak_hour: str | None
    peak_hour_arrivals: int | None
    median_dwell_minutes: float | None
    visits_ended: int | None
    capture_rate: float | None = Field(
        description="arrivals / (arrivals + passers-by) over the windows that published both"
    )
    passersby: int | None
    hours: int
    v1_windows: int


class OverviewRow(BaseModel):
    site: str
    name: str
    timezone: str
    arrivals: int | None
    change_pct: float | None
    occupancy_now: float | None
    capture_rate: float | None
    median_dwell_minutes: float | None
    arrivals_7d: int | None
    arrivals_7d_before: int | None
    change_7d_pct: float | None


class HeatmapOut(BaseModel):
    first: str
    last: str
    visitors: list[list[float | None]]
    visitors_suppressed: list[list[int]]


class DashboardOut(BaseModel):
    """Everything the site page shows for a range (the page embeds exactly this)."""

    site: SiteOut
    date: str
    range: str
    resolution: str
    first: str
    last: str
    previous_first: str
    previous_last: str
    summary: SummaryOut
    rows: list[PeopleRow]
    previous: list[PeopleRow]
    total: PeopleRow | None
    previous_total: PeopleRow | None
    busy: list[list[float | None]]
    agents: list[AgentHealth]


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorOut, "description": description}
    for status, description in (
        (400, "the request body is not JSON"),
        (401, "not signed in, or an unknown API token"),
        (403, "the user's role may not make this call (or the CSRF token is missing)"),
        (404, "no such site or path, or a site not granted to the user"),
        (409, "already there"),
        (422, "a parameter or body field is invalid (``field`` names it)"),
    )
}
api_router = APIRouter(prefix="/api/v1", responses=_ERRORS)


@api_router.get("/me", response_model=MeOut, summary="the user making the call")
def get_me(user: CurrentUser) -> MeOut:
    return MeOut(name=user.name, role=user.role, sites=sorted(user.sites))


@api_router.get("/sites", response_model=list[SiteOut], summary="the sites the user sees")
def get_sites(request: Request, user: CurrentUser) -> list[SiteOut]:
    only = None if user.role == "admin" else user.sites
    return [SiteOut(**asdict(s)) for s in services(request).counts.sites(only)]


@api_router.get("/sites/{site_id}", response_model=SiteOut, summary="one site")
def get_site(site: VisibleSite) -> SiteOut:
    return SiteOut(**asdict(site))


@api_router.get(
    "/sites/{site_id}/agents",
    response_model=list[AgentHealth],
    summary="the site's agents, their health and counts version",
)
def get_agents(
    request: Request,
    site: VisibleSite,
    since_hours: Annotated[int, Query(ge=1, le=24 * 366, description="windows counted since")] = 24,
) -> list[dict[str, Any]]:
    since = int(time.time()) - 3600 * since_hours
    return [asdict(a) for a in services(request).store.agents(site.id, since=since)]


@api_router.post(
    "/sites/{site_id}/agents", status_code=201, response_model=EnrolledOut, summary="enrol an agent"
)
def post_agent(
    request: Request, site: VisibleSite, user: CurrentUser, body: AgentIn
) -> dict[str, str]:
    if not user.enrols:
        raise ApiError(403, f"a {user.role} does not enrol agents", "site_id")
    try:
        services(request).store.add_agent(site.id, body.agent, body.public_key, int(time.time()))
    except RegistryError as exc:
        field = "public_key" if "public key" in str(exc) else "agent"
        raise ApiError(409 if "already" in str(exc) else 422, str(exc), field) from exc
    return {"site": site.id, "agent": body.agent}


@api_router.get(
    "/sites/{site_id}/counts",
    response_model=CountsOut,
    summary="device-level counts (diagnostics) by window, hour or day",
)
def get_counts(
    request: Request,
    site: CountsSite,
    first: FromDay = None,
    last: ToDay = None,
    resolution: Resolution = "hour",
) -> dict[str, Any]:
    first, last = _day_range(site, first, last, resolution)
    rows = _rows(services(request).counts, site, resolution, first, last)
    return range_body(site, resolution, first, last, UNITS, rows)


@api_router.get(
    "/sites/{site_id}/counts.csv",
    summary="counts as CSV (the header names units)",
    response_class=Response,
    responses={200: {"content": {"text/csv": {"schema": {"type": "string"}}}}},
)
def get_counts_csv(
    request: Request,
    site: CountsSite,
    first: FromDay = None,
    last: ToDay = None,
    resolution: Resolution = "hour",
) -> Response:
    first, last = _day_range(site, first, last, resolution)
    rows = _rows(services(request).counts, site, resolution, first, last)
    name = f"footfall-{site.id}-{resolution}-{first}-{last}.csv"
    return csv_response(site, resolution, rows, False, name)


@api_router.get(
    "/sites/{site_id}/heatmap",
    response_model=HeatmapOut,
    summary="device-level busy times (v1 visitors, devices): weekday by hour, 4 weeks",
)
def get_heatmap(request: Request, site: CountsSite, day: OnDay = None) -> dict[str, Any]:
    return services(request).counts.heatmap(site, asked_day(site, day, "day"))


Range = Annotated[
    str,
    Query(
        alias="range", pattern="^(day|week|month|custom)$", description="day, week, month or custom"
    ),
]
PeopleResolution = Annotated[
    str, Query(pattern="^(hour|day|week|month)$", description="hour, day, week or month")
]


@api_router.get(
    "/sites/{site_id}/dashboard",
    response_model=DashboardOut,
    summary="everything the site page shows for a day, week, month or custom range",
)
def get_dashboard(
    request: Request,
    site: CountsSite,
    day: OnDay = None,
    range_: Range = "day",
    first: FromDay = None,
    last: ToDay = None,
) -> dict[str, Any]:
    return dashboard_data(
        services(request),
        site,
        asked_day(site, day, "day"),
        range_,
        first and asked_day(site, first, "from"),
        last and asked_day(site, last, "to"),
    )


def _people(
    request: Request, site: Site, first: date | None, last: date | None, resolution: str
) -> tuple[date, date, list[dict[str, Any]]]:
    first, last = _day_range(site, first, last, resolution)
    with services(request).store.begin(read_only=True) as conn:
        return first, last, figures(conn, site, first, last, resolution)


@api_router.get(
    "/sites/{site_id}/people",
    response_model=PeopleOut,
    summary="people figures (arrivals, passers-by, visits, dwell, occupancy) by hour, day, "
    "week or month",
)
def get_people(
    request: Request,
    site: CountsSite,
    first: FromDay = None,
    last: ToDay = None,
    resolution: PeopleResolution = "hour",
) -> dict[str, Any]:
    first, last, rows = _people(request, site, first, last, resolution)
    return range_body(site, resolution, first, last, PEOPLE_UNITS, rows)


@api_router.get(
    "/sites/{site_id}/people.csv",
    summary="people figures as CSV (the header names units)",
    response_class=Response,
    responses={200: {"content": {"text/csv": {"schema": {"type": "string"}}}}},
)
def get_people_csv(
    request: Request,
    site: CountsSite,
    first: FromDay = None,
    last: ToDay = None,
    resolution: PeopleResolution = "hour",
) -> Response:
    first, last, rows = _people(request, site, first, last, resolution)
    name = f"footfall-{site.id}-people-{resolution}-{first}-{last}.csv"
    return csv_response(site, resolution, rows, True, name)


@api_router.get(
    "/sites/{site_id}/summary", response_model=SummaryOut, summary="a day's headline tiles"
)
def get_summary(request: Request, site: CountsSite, day: OnDay = None) -> dict[str, Any]:
    with services(request).store.begin(read_only=True) as conn:
        return summary(conn, site, asked_day(site, day, "day"), int(time.time()))


@api_router.get(
    "/overview",
    response_model=list[OverviewRow],
    summary="one row per site the user reads: the day and the last 7 days against the 7 before",
)
def get_overview(request: Request, user: CurrentUser, day: OnDay = None) -> list[dict[str, Any]]:
    return overview(services(request), user, day)


def overview(found: Services, user: User, day: date | None) -> list[dict[str, Any]]:
    """The overview's rows (each site's own local day when ``day`` is not given)."""
    if not user.reads_counts:
        raise ApiError(403, f"a {user.role} does not read counts")
    only = None if user.role == "admin" else user.sites
    now = int(time.time())
    with found.store.begin(read_only=True) as conn:
        return [
            overview_row(conn, site, asked_day(site, day, "day"), now)
            for site in found.counts.sites(only)
        ]


def install_error_handlers(app: FastAPI, page: Callable[[Request, int, str], Response]) -> None:
    """Every error in the one shape under /api/; as an HTML page (``page``) elsewhere."""

    def answer(request: Request, status: int, message: str, field: str | None) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse(error_body(status, message, field), status_code=status)
        return page(request, status, message)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        return answer(request, exc.status, exc.message, exc.field)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        response = answer(request, exc.status_code, str(exc.detail), None)
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0]
        where = [
            str(part)
            for part in first.get("loc", ())
            if part not in ("query", "path", "body", "header", "cookie")
        ]
        field = ".".join(where) or None
        message = f"{field or 'request'}: {first.get('msg', 'invalid')}"
        return answer(request, 422, message, field)

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception) -> Response:
        log.error(
            "internal error on %s %s: %s",
            request.method,
            request.url.path,
            type(exc).__name__,
            exc_info=exc,
        )
        return answer(request, 500, "internal error (the server's log says more)", None)
