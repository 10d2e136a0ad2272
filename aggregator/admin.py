"""The API's admin calls: taking access back without a shell on the server. An admin lists
users and disables or enables them, grants and removes sites, lists API tokens and revokes
anyone's (:mod:`aggregator.accounts` says what each does to sessions and tokens).

Authenticated as every API call is (:func:`aggregator.api.current_user`: a token, or the
dashboard's session with the ``X-CSRF-Token`` header on a state change); a caller who is not an
admin gets 403 on every one of these, whatever the user, site or token named.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel, Field

from aggregator.accounts import TokenRow, User, UserRow
from aggregator.api import SITE_PATTERN, ApiError, CurrentUser, api_router, services
from aggregator.errors import AccountError

__all__ = ["admin_router"]


class UserOut(BaseModel):
    """A user as an admin sees them."""

    name: str
    role: Literal["merchant", "installer", "admin"]
    sites: list[str] = Field(description="sites granted (an admin sees every site)")
    disabled_at: int | None = Field(description="when disabled (Unix s); null: enabled")


class TokenOut(BaseModel):
    """An API token (never its secret)."""

    id: int
    user: str
    name: str
    created_at: int = Field(description="Unix s")
    expires_at: int = Field(description="Unix s")
    last_used_at: int | None = Field(description="Unix s, to the minute; null: never used")
    revoked_at: int | None = Field(description="Unix s; null: not revoked")
    state: Literal["live", "expired", "revoked"]


def admin_user(user: CurrentUser) -> User:
    """The caller, if an admin (403 otherwise)."""
    if user.role != "admin":
        raise ApiError(403, f"a {user.role} does not manage users or tokens")
    return user


Admin = Annotated[User, Depends(admin_user)]
UserName = Annotated[str, Path(min_length=1, max_length=100, description="user name")]
SiteName = Annotated[str, Path(pattern=SITE_PATTERN, description="site id")]
TokenId = Annotated[int, Path(ge=1, le=2**31 - 1, description="token id (tokens lists them)")]

admin_router = APIRouter(prefix="/api/v1", tags=["admin"], responses=api_router.responses)


def _user_out(row: UserRow) -> UserOut:
    return UserOut.model_validate(asdict(row))


def _token_out(row: TokenRow, now: int) -> TokenOut:
    return TokenOut(**asdict(row), state=row.state(now))


def _changed(change: Callable[[], UserRow]) -> UserOut:
    """The user after a change; an account refused as the API answers: 404 for what does not
    exist, 409 otherwise, naming the site or the user."""
    try:
        return _user_out(change())
    except AccountError as exc:
        text = str(exc)
        missing = "does not exist" in text or "has no grant" in text
        field = "site" if text.startswith("site") or "grant" in text else "name"
        raise ApiError(404 if missing else 409, text, field) from exc


@admin_router.get("/users", response_model=list[UserOut], summary="every user (admins)")
def get_users(request: Request, _admin: Admin) -> list[UserOut]:
    return [_user_out(row) for row in services(request).accounts.user_rows()]


@admin_router.post(
    "/users/{name}/disable",
    response_model=UserOut,
    summary="disable a user: no login, sessions end, tokens revoked (admins)",
)
def disable_user(request: Request, _admin: Admin, name: UserName) -> UserOut:
    return _changed(lambda: services(request).accounts.disable(name, int(time.time())))


@admin_router.post(
    "/users/{name}/enable",
    response_model=UserOut,
    summary="let a disabled user log in again; old tokens stay revoked (admins)",
)
def enable_user(request: Request, _admin: Admin, name: UserName) -> UserOut:
    return _changed(lambda: services(request).accounts.enable(name))


@admin_router.put(
    "/users/{name}/grants/{site}", response_model=UserOut, summary="grant a site (admins)"
)
def put_grant(request: Request, _admin: Admin, name: UserName, site: SiteName) -> UserOut:
    return _changed(lambda: services(request).accounts.grant(name, site))


@admin_router.delete(
    "/users/{name}/grants/{site}",
    response_model=UserOut,
    summary="remove a site from a user, from their next request on (admins)",
)
def delete_grant(request: Request, _admin: Admin, name: UserName, site: SiteName) -> UserOut:
    return _changed(lambda: services(request).accounts.revoke_grant(name, site))


@admin_router.get("/tokens", response_model=list[TokenOut], summary="API tokens (admins)")
def get_tokens(
    request: Request,
    _admin: Admin,
    user: Annotated[str | None, Query(max_length=100, description="only this user's")] = None,
) -> list[TokenOut]:
    now = int(time.time())
    try:
        rows = services(request).accounts.tokens(user)
    except AccountError as exc:
        raise ApiError(404, str(exc), "user") from exc
    return [_token_out(row, now) for row in rows]


@admin_router.post(
    "/tokens/{token_id}/revoke",
    response_model=TokenOut,
    summary="revoke anyone's API token (admins)",
)
def revoke_token(request: Request, _admin: Admin, token_id: TokenId) -> TokenOut:
    now = int(time.time())
    row = services(request).accounts.revoke_token(None, token_id, now)
    if row is None:
        raise ApiError(404, f"no live token {token_id}", "token_id")
    return _token_out(row, now)
