"""Accounts: who may see and do what, browser sessions, API tokens, the login rate limit.

Roles (:data:`ROLES`): a **merchant** reads the counts of the sites granted to them; an
**installer** sees the agents and health of the sites granted to them and enrols agents there
(no counts); an **admin** sees and does everything. The first admin is made from the command
line (``footfall-aggregator users add NAME --role admin``); there is no default password.

Secrets at rest: passwords as Argon2id (``nacl.pwhash.argon2id``, libsodium's interactive
limits); session and API token secrets (256 random bits, so a fast hash is enough) as their
SHA-256. An API token is shown once, when it is made. Failed logins are counted per account and
per client address in the database (so every process sees them): past :data:`MAX_FAILURES`
per account (or :data:`MAX_ADDRESS_FAILURES` per address) within :data:`FAILURE_WINDOW_S`,
logins are refused without checking the password until the window has passed.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

import nacl.exceptions
import nacl.pwhash
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from aggregator.errors import AccountError, LoginRefusedError
from aggregator.store import (
    Store,
    api_tokens,
    grants,
    login_failures,
    sessions,
    sites,
    users,
)

__all__ = [
    "FAILURE_WINDOW_S",
    "MAX_ADDRESS_FAILURES",
    "MAX_FAILURES",
    "ROLES",
    "Accounts",
    "TokenRow",
    "User",
]

ROLES = ("merchant", "installer", "admin")
MIN_PASSWORD = 10
MAX_FAILURES = 5
MAX_ADDRESS_FAILURES = 20
FAILURE_WINDOW_S = 900
TOKEN_PREFIX = "fft_"
_OPS = nacl.pwhash.argon2id.OPSLIMIT_INTERACTIVE
_MEM = nacl.pwhash.argon2id.MEMLIMIT_INTERACTIVE
# Checked against when the account does not exist, so that a wrong name costs what a wrong
# password costs (no telling names apart by timing).
_DUMMY_HASH = nacl.pwhash.argon2id.str(b"not a password of anyone's", _OPS, _MEM)


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
class TokenRow:
    """An API token as listed (never its secret)."""

    id: int
    name: str
    created_at: int
    last_used_at: int | None
    revoked_at: int | None


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _check_name(name: str) -> str:
    if not 1 <= len(name) <= 100 or any(c.isspace() or not c.isprintable() for c in name):
        raise AccountError(
            f"user name must be 1 to 100 printable characters without spaces, got {name!r}"
        )
    return name


class Accounts:
    """Accounts in a store's database."""

    def __init__(self, store: Store) -> None:
        self.store = store

    # --- users -----------------------------------------------------------------------------

    def add_user(self, name: str, role: str, password: str, now: int) -> int:
        """A new user (its id); the password is hashed with Argon2id."""
        name = _check_name(name)
        if role not in ROLES:
            raise AccountError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        _check_password(password)
        hashed = nacl.pwhash.argon2id.str(password.encode(), _OPS, _MEM).decode()
        with self.store.begin() as conn:
            if conn.execute(sa.select(users.c.id).where(users.c.name == name)).first():
                raise AccountError(f"user {name} already exists")
            result = conn.execute(
                users.insert().values(name=name, role=role, password_hash=hashed, created_at=now)
            )
            (user_id,) = result.inserted_primary_key or (None,)
        assert user_id is not None
        return int(user_id)

    def set_password(self, name: str, password: str) -> None:
        """A new password; every session of the user ends."""
        _check_password(password)
        hashed = nacl.pwhash.argon2id.str(password.encode(), _OPS, _MEM).decode()
        with self.store.begin() as conn:
            user_id = self._user_id(conn, name)
            conn.execute(users.update().where(users.c.id == user_id).values(password_hash=hashed))
            conn.execute(sessions.delete().where(sessions.c.user_id == user_id))

    def grant(self, name: str, site: str) -> None:
        """Let a user see a site (merchants: its counts; installers: its agents)."""
        with self.store.begin() as conn:
            user_id = self._user_id(conn, name)
            if conn.execute(sa.select(sites.c.id).where(sites.c.id == site)).first() is None:
                raise AccountError(f"site {site} does not exist")
            held = sa.select(grants).where(grants.c.user_id == user_id, grants.c.site_id == site)
            if conn.execute(held).first() is None:
                conn.execute(grants.insert().values(user_id=user_id, site_id=site))

    def users(self) -> list[User]:
        with self.store.begin() as conn:
            rows = conn.execute(
                sa.select(users.c.id, users.c.name, users.c.role).order_by(users.c.name)
            ).all()
            return [self._user(conn, row.id, row.name, row.role) for row in rows]

    def _user_id(self, conn: Connection, name: str) -> int:
        user_id = conn.execute(sa.select(users.c.id).where(users.c.name == name)).scalar()
        if user_id is None:
            raise AccountError(f"user {name} does not exist")
        return int(user_id)

    def _user(self, conn: Connection, user_id: int, name: str, role: str) -> User:
        granted = conn.execute(sa.select(grants.c.site_id).where(grants.c.user_id == user_id))
        return User(user_id, name, role, frozenset(granted.scalars()))

    # --- logging in ------------------------------------------------------------------------

    def login(self, name: str, password: str, address: str, now: int) -> User:
        """The user whose name and password these are; :class:`LoginRefusedError` otherwise, or
        when too many logins failed lately for that name or from that address."""
        keys = (f"user:{name[:100]}", f"addr:{address[:100]}")
        with self.store.begin() as conn:
            counted = {
                row.key: row.failures
                for row in conn.execute(
                    sa.select(login_failures).where(
                        login_failures.c.key.in_(keys),
                        login_failures.c.first_at > now - FAILURE_WINDOW_S,
                    )
                )
            }
            row = conn.execute(
                sa.select(users.c.id, users.c.role, users.c.password_hash).where(
                    users.c.name == name, users.c.disabled_at.is_(None)
                )
            ).first()
        if (
            counted.get(keys[0], 0) >= MAX_FAILURES
            or counted.get(keys[1], 0) >= MAX_ADDRESS_FAILURES
        ):
            raise LoginRefusedError("too many failed logins: try again in 15 minutes", limited=True)
        stored = row.password_hash.encode() if row is not None else _DUMMY_HASH
        try:
            nacl.pwhash.verify(stored, password.encode())
            ok = row is not None
        except nacl.exceptions.InvalidkeyError:
            ok = False
        if not ok or row is None:
            with self.store.begin() as conn:
                self._fail(conn, keys, now)
            raise LoginRefusedError("wrong user name or password")
        with self.store.begin() as conn:
            conn.execute(login_failures.delete().where(login_failures.c.key == keys[0]))
            return self._user(conn, row.id, name, row.role)

    def _fail(self, conn: Connection, keys: tuple[str, str], now: int) -> None:
        conn.execute(
            login_failures.delete().where(
                login_failures.c.key.in_(keys), login_failures.c.first_at <= now - FAILURE_WINDOW_S
            )
        )
        for key in keys:
            bumped = conn.execute(
                login_failures.update()
                .where(login_failures.c.key == key)
                .values(failures=login_failures.c.failures + 1)
            )
            if bumped.rowcount == 0:
                conn.execute(login_failures.insert().values(key=key, failures=1, first_at=now))

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
        """The user of a live session, or None."""
        with self.store.begin() as conn:
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

    def add_token(self, user: User, name: str, now: int) -> str:
        """A new API token for the user: its secret, shown this once (only a hash is kept)."""
        if not 1 <= len(name) <= 100:
            raise AccountError(f"token name must be 1 to 100 characters, got {len(name)}")
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self.store.begin() as conn:
            conn.execute(
                api_tokens.insert().values(
                    user_id=user.id, name=name, token_hash=_digest(secret), created_at=now
                )
            )
        return secret

    def tokens(self, user: User) -> list[TokenRow]:
        t = api_tokens.c
        with self.store.begin() as conn:
            rows = conn.execute(
                sa.select(t.id, t.name, t.created_at, t.last_used_at, t.revoked_at)
                .where(t.user_id == user.id)
                .order_by(t.id)
            ).all()
        return [TokenRow(*row) for row in rows]

    def revoke_token(self, user: User, token_id: int, now: int) -> bool:
        """Revoke one of the user's own tokens; whether there was such a live token."""
        with self.store.begin() as conn:
            done = conn.execute(
                api_tokens.update()
                .where(
                    api_tokens.c.id == token_id,
                    api_tokens.c.user_id == user.id,
                    api_tokens.c.revoked_at.is_(None),
                )
                .values(revoked_at=now)
            )
        return bool(done.rowcount)

    def token_user(self, secret: str, now: int) -> User | None:
        """The user of a live API token, or None; notes when it was last used (to the
        minute)."""
        t = api_tokens.c
        with self.store.begin() as conn:
            row = conn.execute(
                sa.select(
                    users.c.id, users.c.name, users.c.role, t.id.label("token"), t.last_used_at
                )
                .join(api_tokens, t.user_id == users.c.id)
                .where(
                    t.token_hash == _digest(secret),
                    t.revoked_at.is_(None),
                    users.c.disabled_at.is_(None),
                )
            ).first()
            if row is None:
                return None
            if row.last_used_at is None or now - row.last_used_at >= 60:
                conn.execute(api_tokens.update().where(t.id == row.token).values(last_used_at=now))
            return self._user(conn, row.id, row.name, row.role)


def _check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise AccountError(
            f"password must be at least {MIN_PASSWORD} characters, got {len(password)}"
        )
