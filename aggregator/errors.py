"""Errors raised by the footfall aggregator.

Every error the aggregator raises on purpose derives from :class:`AggregatorError`, so the
command line can turn any of them into one readable line and an exit code::

    AggregatorError
    ├── ConfigError            a setting is unknown, missing or out of range (names it)
    ├── StoreError             the database cannot be opened, migrated or written
    │   └── RegistryError      a site or agent is unknown, already enrolled, or malformed
    ├── AccountError           a user, role, grant, password or token is refused (names it)
    │   └── LoginRefusedError       wrong name or password, or too many failed logins lately
    ├── BrokerError            the broker cannot be reached or refuses the aggregator
    └── IngestFatalError       ingest cannot go on (the database unusable for longer than
                               ingest.database_retry_s, a stage failed): the process exits
                               non-zero and its supervisor starts it again

A message that an agent sends and the aggregator refuses is *not* an error: it is a
:class:`aggregator.verify.Refusal`, counted by reason and logged (rate-limited), and ingest
goes on; so is a message on which verifying or storing fails (it is quarantined).
"""

from __future__ import annotations

__all__ = [
    "AccountError",
    "AggregatorError",
    "BrokerError",
    "ConfigError",
    "IngestFatalError",
    "LoginRefusedError",
    "RegistryError",
    "StoreError",
]


class AggregatorError(Exception):
    """Base class of every error the aggregator raises on purpose."""


class ConfigError(AggregatorError):
    """A setting is unknown, missing or out of range."""


class StoreError(AggregatorError):
    """The database cannot be opened, migrated or written; ``transient`` when it may work
    again as it is (the connection, a lock: retried), not when it refused what it was given."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class RegistryError(StoreError):
    """A site or agent is unknown, already enrolled, or given in a form the registry refuses."""


class BrokerError(AggregatorError):
    """The broker cannot be reached, refuses the aggregator, or the connection is lost."""


class IngestFatalError(AggregatorError):
    """Ingest cannot go on: the process exits non-zero, for its supervisor to restart it."""


class AccountError(AggregatorError):
    """A user, role, grant, password or token is refused."""


class LoginRefusedError(AccountError):
    """A login is refused: wrong name or password, or by the limiter (``retry_after_s`` > 0:
    the password was not checked; try again after that many seconds)."""

    def __init__(self, message: str, *, retry_after_s: int = 0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @property
    def limited(self) -> bool:
        return self.retry_after_s > 0
