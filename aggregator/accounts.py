"""Accounts: who may see and do what, browser sessions, API tokens, the login limiter.

Roles (:data:`ROLES`): a **merchant** reads the counts of the sites granted to them; an
**installer** sees the agents and health of the sites granted to them and enrols agents there
(no counts); an **admin** sees and does everything. The first admin is made from the command
line (``footfall-aggregator users add NAME --role admin``); there is no default password.

Secrets at rest: passwords as Argon2id (``nacl.pwhash.argon2id``, libsodium's interactive
limits); session and API token secrets (256 random bits, so a fast hash is enough) as their
SHA-256. An API token is shown once, when it is made, and expires (:data:`TOKEN_DAYS` days by
default).

**Taking access back.** Every request reads the user, role and grants afresh, so a grant
removed (:meth:`Accounts.revoke_grant`) hides the site at the next request. Disabling a user
(:meth:`Accounts.disable`), and a new password, end every session of theirs and revoke every
API token: enabling them again brings none back (a leaked token stays dead). The last enabled
admin cannot be disabled. An admin revokes any user's token.

**The login limiter.** Before a password is checked, the attempt is counted in the database,
in the same transaction that decides whether it may be checked at all, under a row lock on
each counter (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: the ``INSERT … ON CONFLICT DO UPDATE``
locks the row), so simultaneous attempts cannot all read "below the limit": of 200 wrong
passwords sent at once, exactly :data:`FREE_ATTEMPTS` are checked (the rest answer "try again
in 60 s"; ``tests/aggregator/test_accounts.py``). Attempts are counted per name *and* client address
(:data:`FREE_ATTEMPTS` free, then a wait of :data:`BACKOFF_S` doubling per attempt up to
:data:`BACKOFF_MAX_S`), so wrong passwords from another address never slow the owner down at
their own; and per address over every name (:data:`FREE_ADDRESS_ATTEMPTS` free, the same
backoff), against one address trying many names. A successful login clears its name's count
at that address and gives back its attempt to the address's. A counter is forgotten after
:data:`FORGET_S` without attempts (deleted in a transaction of its own that skips locked rows).
A try the limiter refuses is a read only (no write lock, no fsync): a flood of them costs the
database little. The address is the TCP peer's, or the one a proxy listed
in ``serve.forwarded_allow_ips`` forwards (default: no proxy is believed).
"""

from __future__ import annotations

import functools
import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import nacl.exceptions
import nacl.pwhash
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from aggregator.errors import AccountError, LoginRefusedError
from aggregator.store import (
    Store,
    api_tokens,
    grants,
    login_attempts,
    sessions,
    sites,
    users,
)

__all__ = [
    "BACKOFF_MAX_S",
    "BACKOFF_S",
    "FORGET_S",
    "FREE_ADDRESS_ATTEMPTS",
    "FREE_ATTEMPTS",
    "MAX_TOKEN_DAYS",
    "ROLES",
    "TOKEN_DAYS",
    "Accounts",
    "TokenRow",
    "User",
    "UserRow",
    "backoff_s",
    "check_new_user",
]

ROLES = ("merchant", "installer", "admin")
MIN_PASSWORD = 10
FREE_ATTEMPTS = 5  # per name and address
FREE_ADDRESS_ATTEMPTS = 20  # per address, over every name
BACKOFF_S = 60  # the wait after the free attempts; doubled after each further one
BACKOFF_MAX_S = 900
FORGET_S = 86400  # a counter without attempts for this long starts again
TOKEN_DAYS = 90  # an API token's default lifetime
MAX_TOKEN_DAYS = 3660
TOKEN_PREFIX = "fft_"
_OPS = nacl.pwhash.argon2id.OPSLIMIT_INTERACTIVE
_MEM = nacl.pwhash.argon2id.MEMLIMIT_INTERACTIVE


@dataclass(frozen=True, slots=True)
class User:
    """A signed-in user: role and the sites granted (admins see every site)."""

    id: int
    name: str
    role: str
    sites: frozenset[str]

    def sees(self, site: str) -> bool:
        """Whether the site exists for this user at all (else: 404, as if it did not exist)."""
        return self.role == "admin" or site in self.sites

    @property
    def reads_counts(self) -> bool:
        return self.role in ("merchant", "admin")

    @property
    def enrols(self) -> bool:
        return self.role in ("installer", "admin")


@dataclass(frozen=True, slots=True)
class UserRow:
    """A user as listed: role, sites granted, and since when disabled (None: enabled)."""

    name: str
    role: str
    sites: list[str]
    disabled_at: int | None


@dataclass(frozen=True, slots=True)
class TokenRow:
    """An API token as listed (never its secret)."""

    id: int
    user: str
    name: str
    created_at: int
    expires_at: int
    last_used_at: int | None
    revoked_at: int | None

    def state(self, now: int) -> Literal["live", "expired", "revoked"]:
        if self.revoked_at is not None:
            return "revoked"
        return "expired" if self.expires_at <= now else "live"


def backoff_s(attempts: int, free: int) -> int:
    """The wait (s) before the next attempt, after ``attempts`` counted with ``free`` free:
    none while below ``free``, then :data:`BACKOFF_S` doubling up to :data:`BACKOFF_MAX_S`."""
    if attempts < free:
        return 0
    return min(BACKOFF_MAX_S, BACKOFF_S << min(attempts - free, 16))


@functools.cache
def _dummy_hash() -> bytes:
    """Checked against when the account does not exist, so that a wrong name costs what a
    wrong password costs (no telling names apart by timing); made at the first login."""
    return nacl.pwhash.argon2id.str(b"not a password of anyone's", _OPS, _MEM)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def check_new_user(name: str, role: str, password: str) -> str:
    """The user name, once name, role and password are all acceptable (checked before anything
    is written, or a database made)."""
    name = _check_name(name)
    if role not in ROLES:
        raise AccountError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    _check_password(password)
    return name


def _check_name(name: str) -> str:
    if not 1 <= len(name) <= 100 or any(c.isspace() or not c.isprintable() for c in name):
        raise AccountError(
            f"user name must be 1 to 100 printable characters without spaces, got {name!r}"
        )
    return name


def _limiter_keys(name: str, address: str) -> dict[str, int]:
    """The login limiter's counters for an attempt, in lock order: key -> free attempts."""
    return dict(
        sorted(
            {
                f"addr:{address[:64]}": FREE_ADDRESS_ATTEMPTS,
                f"name:{name[:100]}@{address[:64]}": FREE_ATTEMPTS,
            }.items()
        )
    )


class Accounts:
    """Accounts in a store's database."""

    def __init__(self, store: Store) -> None:
        self.store = store
        insert = postgresql.insert if store.dialect == "postgresql" else sqlite.insert
        upsert = insert(login_attempts).values(
            key=sa.bindparam("key"), attempts=0, next_at=0, last_at=sa.bindparam("now")
        )
        a = login_attempts.c
        # Makes the counter if missing and locks its row until the transaction ends.
        self._lock_counter = upsert.on_conflict_do_update(
            index_elements=["key"], set_={"last_at": a.last_at}
        ).returning(a.attempts, a.next_at, a.last_at)

    # --- users -----------------------------------------------------------------------------

    def add_user(
        self, name: str, role: str, password: str, now: int, granted: Sequence[str] = ()
    ) -> int:
        """A new user (its id), who sees the sites ``granted``; the password is hashed with
        Argon2id. All or nothing: a site that does not exist adds no user."""
        name = check_new_user(name, role, password)
        hashed = nacl.pwhash.argon2id.str(password.encode(), _OPS, _MEM).decode()
        with self.store.begin() as conn:
            if conn.execute(sa.select(users.c.id).where(users.c.name == name)).first():
                raise AccountError(f"user {name} already exists")
            known = set(conn.execute(sa.select(sites.c.id)).scalars())
            if missing := [site for site in granted if site not in known]:
                raise AccountError(
                    f"site {missing[0]} does not exist: add it first (footfall-aggregator sites "
                    f"add {missing[0]} --timezone ZONE); no user was added"
                )
            result = conn.execute(
                users.insert().values(name=name, role=role, password_hash=hashed, created_at=now)
            )
            (user_id,) = result.inserted_primary_key or (None,)
            if user_id is None:
                raise AccountError(f"the database gave user {name} no id")
            for site in dict.fromkeys(granted):
                conn.execute(grants.insert().values(user_id=user_id, site_id=site))
        return int(user_id)

    def set_password(self, name: str, password: str, now: int) -> None:
        """A new password; every session of the user ends and every API token is revoked."""
        _check_password(password)
        hashed = nacl.pwhash.argon2id.str(password.encode(), _OPS, _MEM).decode()
        with self.store.begin() as conn:
            user_id = self._user_id(conn, name)
            conn.execute(users.update().where(users.c.id == user_id).values(password_hash=hashed))
            self._end_access(conn, user_id, now)

    def disable(self, name: str, now: int) -> UserRow:
        """Disable a user: no login; every session ends, every API token is revoked. The last
        enabled admin cannot be disabled (nobody could manage accounts then)."""
        with self.store.begin() as conn:
            user_id = self._user_id(conn, name)
            row = conn.execute(
                sa.select(users.c.role, users.c.disabled_at).where(users.c.id == user_id)
            ).one()
            if row.disabled_at is None:
                if row.role == "admin" and self._enabled_admins(conn) <= 1:
                    raise AccountError(
                        f"user {name} is the last enabled admin: make or enable another admin first"
                    )
                conn.execute(users.update().where(users.c.id == user_id).values(disabled_at=now))
            self._end_access(conn, user_id, now)
            return self._row(conn, user_id)

    def enable(self, name: str) -> UserRow:
        """Let a disabled user log in again (their old tokens stay revoked)."""
        with self.store.begin() as conn:
            user_id = self._user_id(conn, name)
            conn.execute(users.update().where(users.c.id == user_id).values(disabled_at=None))
            return self._row(conn, user_id)

    def grant(self, name: str, site: str) -> UserRow:
        """Let a user see a site (merchants: its counts; installers: its agents)."""
        with self.store.begin() as conn:
            user_id = self._user_id(conn, name)
            if conn.execute(sa.select(sites.c.id).where(sites.c.id == site)).first() is None:
                raise AccountError(f"site {site} does not exist")
            held = sa.select(grants).where(grants.c.user_id == user_id, grants.c.site_id == site)
            if conn.execute(held).first() is None:
                conn.execute(grants.insert().values(user_id=user_id, site_id=site))
            return self._row(conn, user_id)

    def revoke_grant(self, name: str, site: str) -> UserRow:
        """Stop a user seeing a site, from their next request on."""
        with self.store.begin() as conn:
            user_id = self._user_id(conn, name)
            done = conn.execute(
                grants.delete().where(grants.c.user_id == user_id, grants.c.site_id == site)
            )
            if not done.rowcount:
                raise AccountError(f"user {name} has no grant of site {site}")
            return self._row(conn, user_id)

    def users(self) -> list[User]:
        """The enabled users."""
        with self.store.begin() as conn:
            rows = conn.execute(
                sa.select(users.c.id, users.c.name, users.c.role)
                .where(users.c.disabled_at.is_(None))
                .order_by(users.c.name)
            ).all()
            return [self._user(conn, row.id, row.name, row.role) for row in rows]

    def user(self, name: str) -> User:
        """An enabled user, by name."""
        with self.store.begin() as conn:
            user_id = self._user_id(conn, name)
            row = conn.execute(
                sa.select(users.c.role, users.c.disabled_at).where(users.c.id == user_id)
            ).one()
            if row.disabled_at is not None:
                raise AccountError(f"user {name} is disabled (footfall-aggregator users enable)")
            return self._user(conn, user_id, name, row.role)

    def user_rows(self) -> list[UserRow]:
        """Every user, disabled ones too, as listed."""
        with self.store.begin() as conn:
            ids = conn.execute(sa.select(users.c.id).order_by(users.c.name)).scalars().all()
            return [self._row(conn, user_id) for user_id in ids]

    def _user_id(self, conn: Connection, name: str) -> int:
        user_id = conn.execute(sa.select(users.c.id).where(users.c.name == name)).scalar()
        if user_id is None:
            raise AccountError(f"user {name} does not exist")
        return int(user_id)

    def _user(self, conn: Connection, user_id: int, name: str, role: str) -> User:
        granted = conn.execute(sa.select(grants.c.site_id).where(grants.c.user_id == user_id))
        return User(user_id, name, role, frozenset(granted.scalars()))

    def _row(self, conn: Connection, user_id: int) -> UserRow:
        row = conn.execute(
            sa.select(users.c.name, users.c.role, users.c.disabled_at).where(users.c.id == user_id)
        ).one()
        user = self._user(conn, user_id, row.name, row.role)
        return UserRow(row.name, row.role, sorted(user.sites), row.disabled_at)

    def _enabled_admins(self, conn: Connection) -> int:
        count = conn.execute(
            sa.select(sa.func.count()).where(users.c.role == "admin", users.c.disabled_at.is_(None))
        ).scalar()
        return int(count or 0)

    def _end_access(self, conn: Connection, user_id: int, now: int) -> None:
        conn.execute(sessions.delete().where(sessions.c.user_id == user_id))
        conn.execute(
            api_tokens.update()
            .where(api_tokens.c.user_id == user_id, api_tokens.c.revoked_at.is_(None))
            .values(revoked_at=now)
        )

    # --- logging in ------------------------------------------------------------------------

    def login(self, name: str, password: str, address: str, now: int) -> User:
        """The user whose name and password these are; :class:`LoginRefusedError` otherwise, or
        (``limited``, with ``retry_after_s``) when the limiter does not let this attempt be
        checked (see the module docstring)."""
        keys = _limiter_keys(name, address)
        wait = self._waiting(keys, now)
        if not wait:
            with self.store.begin() as conn:
                wait = self._count_attempt(conn, keys, now)
            self._forget(now)
        if wait:
            raise LoginRefusedError(
                f"too many failed logins from this address: try again in {wait} s",
                retry_after_s=wait,
            )
        with self.store.begin(read_only=True) as conn:
            row = conn.execute(
                sa.select(users.c.id, users.c.role, users.c.password_hash).where(
                    users.c.name == name, users.c.disabled_at.is_(None)
                )
            ).first()
        stored = row.password_hash.encode() if row is not None else _dummy_hash()
        try:
            nacl.pwhash.verify(stored, password.encode())
            ok = row is not None
        except nacl.exceptions.InvalidkeyError:
            ok = False
        if not ok or row is None:
            raise LoginRefusedError("wrong user name or password")
        with self.store.begin() as conn:
            self._forgive(conn, keys, now)
            return self._user(conn, row.id, name, row.role)

    def _waiting(self, keys: dict[str, int], now: int) -> int:
        """The wait a counter already asks for, read without a lock (0: none). A guesser's
        refused tries are reads then, never writes: they take no write lock and no fsync."""
        a = login_attempts.c
        with self.store.begin(read_only=True) as conn:
            latest = conn.execute(
                sa.select(sa.func.max(a.next_at)).where(
                    a.key.in_(keys), a.last_at >= now - FORGET_S
                )
            ).scalar()
        return max(0, int(latest or 0) - now)

    def _count_attempt(self, conn: Connection, keys: dict[str, int], now: int) -> int:
        """Count an attempt on every counter, if each (read again under its row lock) lets it
        be checked now: 0; else the seconds to wait (and nothing is counted)."""
        counted: dict[str, int] = {}
        wait = 0
        for key in keys:
            attempts, next_at, last_at = conn.execute(
                self._lock_counter, {"key": key, "now": now}
            ).one()
            if last_at < now - FORGET_S:
                attempts, next_at = 0, 0
            wait = max(wait, next_at - now)
            counted[key] = attempts + 1
        if wait > 0:
            return wait
        for key, attempts in counted.items():
            conn.execute(
                login_attempts.update()
                .where(login_attempts.c.key == key)
                .values(
                    attempts=attempts, next_at=now + backoff_s(attempts, keys[key]), last_at=now
                )
            )
        return 0

    def _forget(self, now: int) -> None:
        """Delete the counters without attempts for :data:`FORGET_S`, in a transaction of its
        own that skips rows others hold (PostgreSQL), so it never waits for nor blocks an
        attempt's locks in an order that could deadlock."""
        a = login_attempts.c
        old = sa.select(a.key).where(a.last_at < now - FORGET_S).with_for_update(skip_locked=True)
        with self.store.begin() as conn:
            conn.execute(login_attempts.delete().where(a.key.in_(old)))

    def _forgive(self, conn: Connection, keys: dict[str, int], now: int) -> None:
        """A successful login: its name's counter at this address goes; the address's gives
        the attempt back."""
        for key, free in keys.items():
            attempts, _, last_at = conn.execute(self._lock_counter, {"key": key, "now": now}).one()
            if key.startswith("name:") or attempts <= 1:
                conn.execute(login_attempts.delete().where(login_attempts.c.key == key))
                continue
            conn.execute(
                login_attempts.update()
                .where(login_attempts.c.key == key)
                .values(attempts=attempts - 1, next_at=last_at + backoff_s(attempts - 1, free))
            )

    # --- sessions --------------------------------------------------------------------------

    def open_session(self, user: User, now: int, lifetime_s: int) -> str:
        """A new session's secret (for the cookie); only its SHA-256 is stored."""
        secret = secrets.token_urlsafe(32)
        with self.store.begin() as conn:
            conn.execute(sessions.delete().where(sessions.c.expires_at <= now))
            conn.execute(
                sessions.insert().values(
                    token_hash=_digest(secret),
                    user_id=user.id,
                    created_at=now,
                    expires_at=now + lifetime_s,
                )
            )
        return secret

    def session_user(self, secret: str, now: int) -> User | None:
        """The user of a live session, or None (read without the write lock: see
        :meth:`token_user`)."""
        with self.store.begin(read_only=True) as conn:
            row = conn.execute(
                sa.select(users.c.id, users.c.name, users.c.role)
                .join(sessions, sessions.c.user_id == users.c.id)
                .where(
                    sessions.c.token_hash == _digest(secret),
                    sessions.c.expires_at > now,
                    users.c.disabled_at.is_(None),
                )
            ).first()
            return None if row is None else self._user(conn, row.id, row.name, row.role)

    def close_session(self, secret: str) -> None:
        with self.store.begin() as conn:
            conn.execute(sessions.delete().where(sessions.c.token_hash == _digest(secret)))

    # --- API tokens ------------------------------------------------------------------------

    def add_token(self, user: User, name: str, now: int, days: int = TOKEN_DAYS) -> str:
        """A new API token for the user, valid ``days`` days: its secret, shown this once (only
        a hash is kept)."""
        if not 1 <= len(name) <= 100:
            raise AccountError(f"token name must be 1 to 100 characters, got {len(name)}")
        if not 1 <= days <= MAX_TOKEN_DAYS:
            raise AccountError(f"a token's lifetime must be 1 to {MAX_TOKEN_DAYS} days, got {days}")
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self.store.begin() as conn:
            conn.execute(
                api_tokens.insert().values(
                    user_id=user.id,
                    name=name,
                    token_hash=_digest(secret),
                    created_at=now,
                    expires_at=now + days * 86400,
                )
            )
        return secret

    def tokens(self, user_name: str | None = None) -> list[TokenRow]:
        """API tokens (of one user, by name), oldest first."""
        with self.store.begin() as conn:
            if user_name is None:
                return self._tokens(conn, sa.true())
            return self._tokens(conn, api_tokens.c.user_id == self._user_id(conn, user_name))

    def _tokens(self, conn: Connection, where: sa.ColumnElement[bool]) -> list[TokenRow]:
        t = api_tokens.c
        rows = conn.execute(
            sa.select(
                t.id, users.c.name, t.name, t.created_at, t.expires_at, t.last_used_at, t.revoked_at
            )
            .join(users, users.c.id == t.user_id)
            .where(where)
            .order_by(t.id)
        ).all()
        return [TokenRow(*row) for row in rows]

    def revoke_token(self, owner: User | None, token_id: int, now: int) -> TokenRow | None:
        """Revoke a live token: one of ``owner``'s, or anyone's (``owner`` None: an admin's
        call); the token, or None when there is no such live token."""
        t = api_tokens.c
        if not 1 <= token_id < 2**31:
            return None
        mine = sa.true() if owner is None else t.user_id == owner.id
        with self.store.begin() as conn:
            done = conn.execute(
                api_tokens.update()
                .where(t.id == token_id, mine, t.revoked_at.is_(None))
                .values(revoked_at=now)
            )
            return self._tokens(conn, t.id == token_id)[0] if done.rowcount else None

    def token_user(self, secret: str, now: int) -> User | None:
        """The user of a live API token (neither revoked nor expired, its user enabled), or
        None; notes when it was last used (to the minute)."""
        t = api_tokens.c
        with self.store.begin(read_only=True) as conn:
            row = conn.execute(
                sa.select(
                    users.c.id, users.c.name, users.c.role, t.id.label("token"), t.last_used_at
                )
                .join(api_tokens, t.user_id == users.c.id)
                .where(
                    t.token_hash == _digest(secret),
                    t.revoked_at.is_(None),
                    t.expires_at > now,
                    users.c.disabled_at.is_(None),
                )
            ).first()
            if row is None:
                return None
            user = self._user(conn, row.id, row.name, row.role)
        # Every call reads in a read-only transaction, and only the first in a minute writes:
        # on SQLite a writer's BEGIN IMMEDIATE waits for the write lock, which ingest's
        # batches hold, so a call that wrote each time waited for ingest.
        if row.last_used_at is None or now - row.last_used_at >= 60:
            with self.store.begin() as conn:
                conn.execute(api_tokens.update().where(t.id == row.token).values(last_used_at=now))
        return user


def _check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise AccountError(
            f"password must be at least {MIN_PASSWORD} characters, got {len(password)}"
        )
