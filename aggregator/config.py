"""The aggregator's settings: each declared once, on the field of its settings class
(:func:`~firmware_agent.contract.resolve.setting`); the registry (:data:`SETTINGS`) made from
them drives the TOML file, ``FOOTFALL_AGG_*`` variables, command-line overrides and
``footfall-aggregator config show``, through the agent's settings machinery.

Every setting has a dotted name (``store.dsn`` is ``dsn`` in the ``[store]`` table of
``/etc/footfall/aggregator.toml``), a default, a kind and a help text. Precedence, lowest
first: default, config file, environment (``FOOTFALL_AGG_STORE_DSN``), flag (``--set``).
Unknown keys are errors, and so are values of the wrong type or out of range: each error names
the setting, the bad value and where it came from.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from aggregator.errors import ConfigError
from firmware_agent.contract.broker import BrokerBase
from firmware_agent.contract.resolve import (
    Setting,
    Value,
    build,
    declared,
    redefault,
    resolve,
    setting,
)

__all__ = [
    "DEFAULT_CONFIG",
    "SECTIONS",
    "SETTINGS",
    "AggregatorConfig",
    "BrokerSettings",
    "IngestSettings",
    "ServeSettings",
    "StoreSettings",
    "load_config",
]

DEFAULT_CONFIG = Path("/etc/footfall/aggregator.toml")
SQLITE_FILE = "aggregator.sqlite3"
T = TypeVar("T")


def _check(problems: list[str], ok: bool, message: str) -> None:
    if not ok:
        problems.append(message)


def mask_dsn(dsn: str) -> str:
    """A database URL with its password replaced by stars."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1********@", dsn)


@dataclass(frozen=True, slots=True)
class StoreSettings:
    """Where the data lives and how long fine windows stay."""

    dsn: str = setting(
        "",
        "Database URL: empty for SQLite in store.data_dir; 'sqlite:///PATH'; or PostgreSQL, "
        "'postgresql://USER:PASSWORD@HOST:PORT/DB' (driven by psycopg 3).",
        secret=mask_dsn,
    )
    schema: str = setting(
        "",
        "PostgreSQL schema that holds the aggregator's tables (empty: the server's search_path, "
        "usually 'public'). Created if missing.",
    )
    retention_days: int = setting(
        90,
        "Days of fine (per-window) counts kept; older windows are deleted, their hourly and daily "
        "roll-ups stay. 0 keeps every window.",
    )
    data_dir: Path = setting(
        "/var/lib/footfall-aggregator",
        f"Directory of the aggregator's files: the SQLite database ({SQLITE_FILE}) when "
        "store.dsn is empty.",
        parse=Path,
    )

    def __post_init__(self) -> None:
        problems: list[str] = []
        scheme = self.dsn.split(":", 1)[0].lower()
        _check(
            problems,
            scheme.split("+")[0] in ("sqlite", "postgresql", "postgres"),
            "store.dsn must start with 'sqlite:///' or 'postgresql://', got "
            f"{mask_dsn(self.dsn)!r}",
        )
        _check(
            problems,
            not self.schema or re.fullmatch("[a-z_][a-z0-9_]{0,62}", self.schema) is not None,
            f"store.schema must match [a-z_][a-z0-9_]{{0,62}}, got {self.schema!r}",
        )
        _check(
            problems,
            not self.schema or not scheme.startswith("sqlite"),
            "store.schema applies to PostgreSQL only; leave it empty with SQLite",
        )
        _check(
            problems,
            0 <= self.retention_days <= 100_000,
            f"store.retention_days must be between 0 (keep all) and 100000, got "
            f"{self.retention_days}",
        )
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def is_sqlite(self) -> bool:
        return self.dsn.lower().startswith("sqlite")


@dataclass(frozen=True, slots=True)
class BrokerSettings(BrokerBase):
    """Ingest's broker: the common settings (:class:`BrokerBase`, its own defaults) and the
    broker's kind, with JetStream's servers, replicas and acknowledgement wait."""

    config_error: ClassVar[type[Exception]] = ConfigError
    username: str = redefault(BrokerBase, "username", "aggregator")
    keepalive_s: int = redefault(BrokerBase, "keepalive_s", 30)
    backoff_max_s: int = redefault(BrokerBase, "backoff_max_s", 30)
    protocol: str = redefault(
        BrokerBase,
        "protocol",
        "5",
        "MQTT version: '5', or '3.1.1' for a broker without 5 (amqtt, the demo's embedded one): no"
        " shared subscription (ingest.share_group must be empty), no session expiry or receive "
        "maximum (the broker's own limits apply).",
    )
    kind: str = setting(
        "mqtt",
        "Where ingest reads the agents' messages: 'mqtt' (a broker such as Mosquitto, at "
        "broker.host:broker.port) or 'jetstream' (streams on a NATS cluster, at broker.servers; "
        "the agents still publish over MQTT, to the cluster's MQTT listener).",
        choices=("mqtt", "jetstream"),
    )
    servers: str = setting(
        "",
        "NATS servers for broker.kind = 'jetstream', comma-separated "
        "(nats://n1:4222,nats://n2:4222,...; tls:// with broker.tls_ca). Empty: "
        "nats://broker.host:4222.",
    )
    stream_replicas: int = setting(
        1,
        "JetStream: copies of each stream (1, or 3 on a 3-node cluster), set when "
        "footfall-aggregator creates or updates its streams.",
    )
    ack_wait_s: int = setting(
        30,
        "JetStream: a message an ingest process took and did not acknowledge within this many "
        "seconds (it died, or its database hangs) goes to another ingest process.",
    )

    def problems(self) -> list[str]:
        problems = BrokerBase.problems(self)
        _check(
            problems,
            self.kind in ("mqtt", "jetstream"),
            f"broker.kind must be 'mqtt' or 'jetstream', got {self.kind!r}",
        )
        bad = [u for u in self.server_urls if not re.fullmatch(r"(nats|tls)://[^\s,/]+", u)]
        _check(
            problems,
            not bad,
            f"broker.servers must be nats://host:port or tls://host:port addresses separated by "
            f"commas, got {', '.join(map(repr, bad))}",
        )
        _check(
            problems,
            1 <= self.stream_replicas <= 5,
            f"broker.stream_replicas must be between 1 and 5, got {self.stream_replicas}",
        )
        _check(
            problems,
            1 <= self.ack_wait_s <= 86400,
            f"broker.ack_wait_s must be between 1 and 86400, got {self.ack_wait_s}",
        )
        return problems

    @property
    def server_urls(self) -> list[str]:
        """The NATS servers (broker.kind = 'jetstream')."""
        listed = [u.strip() for u in self.servers.split(",") if u.strip()]
        return listed or [f"nats://{self.host}:4222"]

    @property
    def address(self) -> str:
        if self.kind == "jetstream":
            return ",".join(self.server_urls)
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class IngestSettings:
    """How ingest subscribes, batches and refuses."""

    client_id: str = setting(
        "",
        "MQTT client id of this ingest process; its persistent session (and the messages the "
        "broker holds for it) is found again by this id, so it must be stable across restarts and "
        "unique per process (empty: 'footfall-aggregator-<ingest.replica>').",
    )
    share_group: str = setting(
        "footfall",
        "Shared-subscription group: ingest processes in one group split the counts between them "
        "($share/<group>/footfall/v1/+/+/counts). Empty: a plain subscription, for a single ingest"
        " process (Mosquitto 2.0 keeps it over a broker restart, but not a shared one: see "
        "docs/aggregator.md).",
    )
    session_expiry_s: int = setting(
        604800,
        "How long (s) the broker keeps this process's session, and the counts queued for it, while"
        " the process is away (MQTT 5; with 3.1.1 the broker decides).",
    )
    receive_maximum: int = setting(
        2000,
        "Messages the broker may send before this process acknowledges them (MQTT 5 Receive "
        "Maximum); at least twice ingest.batch_max.",
    )
    batch_max: int = setting(
        500,
        "Messages stored per database transaction, at most; each is acknowledged once its "
        "transaction commits.",
    )
    batch_wait_ms: int = setting(
        50, "Longest wait (ms) for more messages before a partial batch is committed."
    )
    verify_threads: int = setting(
        2,
        "Threads that check signatures (Ed25519 runs outside Python's GIL, so two use two cores); "
        "1 checks in the worker itself.",
    )
    max_message_bytes: int = setting(
        65536,
        "Messages larger than this (bytes) are refused unread (a counts message is ~600); "
        "announced to the broker, with 1024 bytes for the topic, as the MQTT 5 Maximum Packet "
        "Size, so it drops larger ones.",
    )
    max_window_age_days: int = setting(
        3650,
        "Counts windows that start more than this many days before they arrive are refused "
        "(window_range): an agent's spool and a replayed capture are younger.",
    )
    max_window_lead_s: int = setting(
        3600,
        "Counts windows that start more than this many seconds after they arrive are refused "
        "(window_range): a closed window never starts in the future; this allows clock skew.",
    )
    database_retry_s: int = setting(
        600,
        "How long (s) ingest retries a database that cannot be reached before it exits non-zero "
        "for its supervisor to start it again (the broker keeps what it has not stored); 0: retry "
        "for ever.",
    )
    stop_grace_s: int = setting(
        20,
        "How long (s) a stop (SIGTERM) waits for ingest to finish the batch in hand before the "
        "process exits without it (the broker sends it again); keep it under the supervisor's "
        "stop timeout (systemd's TimeoutStopSec, 90 s by default).",
    )
    log_interval_s: int = setting(
        60,
        "A refusal is logged once per reason and agent per this many seconds (then counted only); "
        "a summary line is logged as often.",
    )
    prune_interval_s: int = setting(
        3600, "How often (s) ingest deletes windows older than store.retention_days."
    )
    receipt_key_file: str = setting(
        "",
        "The aggregator's receipt signing key (Ed25519; made, mode 0600, if missing): every ingest"
        " replica needs the same file, and agents its public key ('footfall-aggregator "
        "receipt-key'). Empty: receipt.key in store.data_dir.",
    )
    receipt_interval_ms: int = setting(
        1000,
        "Least time (ms) between two receipts to one agent; a receipt that changes in between goes"
        " out when it is over.",
    )
    replica: str = setting(
        "",
        "Name of this ingest process among its replicas ('a', 'b', or a systemd instance's %i): "
        "the default ingest.client_id is 'footfall-aggregator-<replica>', the same whatever the "
        "host is called. Empty: the host name (set it where the host name changes at each start, "
        "as in a container).",
    )

    def __post_init__(self) -> None:
        problems: list[str] = []
        _check(
            problems,
            0 <= self.receipt_interval_ms <= 600_000,
            "ingest.receipt_interval_ms must be between 0 and 600000, got "
            f"{self.receipt_interval_ms}",
        )
        _check(
            problems,
            re.fullmatch(r"[A-Za-z0-9_.:-]{1,128}", self.client_id) is not None,
            f"ingest.client_id must be 1 to 128 of A-Z a-z 0-9 _ . : -, got {self.client_id!r}",
        )
        _check(
            problems,
            re.fullmatch(r"[A-Za-z0-9_-]{0,64}", self.share_group) is not None,
            f"ingest.share_group must be up to 64 of A-Z a-z 0-9 _ -, got {self.share_group!r}",
        )
        _check(
            problems,
            0 <= self.session_expiry_s <= 0xFFFFFFFF,
            f"ingest.session_expiry_s must be between 0 and 4294967295, got "
            f"{self.session_expiry_s}",
        )
        _check(
            problems,
            1 <= self.batch_max <= 10_000,
            f"ingest.batch_max must be between 1 and 10000, got {self.batch_max}",
        )
        _check(
            problems,
            2 * self.batch_max <= self.receive_maximum <= 65535,
            "ingest.receive_maximum must be at least twice ingest.batch_max "
            f"({2 * self.batch_max}) and at most 65535, got {self.receive_maximum}",
        )
        _check(
            problems,
            0 <= self.batch_wait_ms <= 10_000,
            f"ingest.batch_wait_ms must be between 0 and 10000, got {self.batch_wait_ms}",
        )
        _check(
            problems,
            1 <= self.verify_threads <= 64,
            f"ingest.verify_threads must be between 1 and 64, got {self.verify_threads}",
        )
        _check(
            problems,
            1024 <= self.max_message_bytes <= 16 << 20,
            "ingest.max_message_bytes must be between 1024 and 16777216, got "
            f"{self.max_message_bytes}",
        )
        _check(
            problems,
            1 <= self.max_window_age_days <= 36500,
            "ingest.max_window_age_days must be between 1 and 36500, got "
            f"{self.max_window_age_days}",
        )
        _check(
            problems,
            0 <= self.max_window_lead_s <= 86400 * 366,
            "ingest.max_window_lead_s must be between 0 and 31622400, got "
            f"{self.max_window_lead_s}",
        )
        _check(
            problems,
            0 <= self.database_retry_s <= 86400 * 7,
            f"ingest.database_retry_s must be between 0 and 604800, got {self.database_retry_s}",
        )
        _check(
            problems,
            1 <= self.stop_grace_s <= 3600,
            f"ingest.stop_grace_s must be between 1 and 3600, got {self.stop_grace_s}",
        )
        _check(
            problems,
            1 <= self.log_interval_s <= 86400,
            f"ingest.log_interval_s must be between 1 and 86400, got {self.log_interval_s}",
        )
        _check(
            problems,
            10 <= self.prune_interval_s <= 86400 * 7,
            f"ingest.prune_interval_s must be between 10 and 604800, got {self.prune_interval_s}",
        )
        if problems:
            raise ConfigError("; ".join(problems))


@dataclass(frozen=True, slots=True)
class ServeSettings:
    """Where the API and dashboard listen, and how they treat sessions."""

    host: str = setting("127.0.0.1", "Address the API and dashboard listen on.")
    port: int = setting(8080, "Port of the API and dashboard (HTTP; put TLS in front).")
    ingest: bool = setting(
        True,
        "'on': 'serve' also runs ingest in the same process (a single-site install); 'off': API "
        "and dashboard only, with 'footfall-aggregator ingest' run apart (for scale).",
    )
    session_hours: int = setting(12, "How long (h) a dashboard sign-in lasts.")
    secure_cookies: str = setting(
        "auto",
        "Mark cookies Secure: 'auto' when the request came over https (set the proxy's "
        "X-Forwarded-Proto and serve.forwarded_allow_ips), 'on' always, 'off' never.",
        choices=("auto", "on", "off"),
    )
    forwarded_allow_ips: str = setting(
        "",
        "Reverse proxies whose X-Forwarded-For/-Proto headers are believed: comma-separated "
        "addresses or networks (e.g. '127.0.0.1,10.0.0.0/8'). Empty (the default): none, the "
        "client is the TCP peer. The login limiter counts by this client address, so a proxy "
        "listed here must set X-Forwarded-For itself.",
    )

    @property
    def trusted_proxies(self) -> list[str]:
        """The proxies whose forwarded headers are believed (none by default)."""
        return [p.strip() for p in self.forwarded_allow_ips.split(",") if p.strip()]

    def __post_init__(self) -> None:
        problems: list[str] = []
        _check(problems, bool(self.host), "serve.host must not be empty")
        _check(problems, 1 <= self.port <= 65535, f"serve.port must be 1 to 65535, got {self.port}")
        _check(
            problems,
            1 <= self.session_hours <= 24 * 90,
            f"serve.session_hours must be between 1 and 2160, got {self.session_hours}",
        )
        for proxy in self.trusted_proxies:
            try:
                ipaddress.ip_network(proxy)
            except ValueError:
                problems.append(
                    "serve.forwarded_allow_ips must be comma-separated addresses or networks "
                    f"(e.g. 127.0.0.1,10.0.0.0/8), got {proxy!r}"
                )
        if problems:
            raise ConfigError("; ".join(problems))


@dataclass(frozen=True, slots=True)
class AggregatorConfig:
    """The effective settings, checked, with where each value came from."""

    values: Mapping[str, Value]
    sources: Mapping[str, str]
    store: StoreSettings
    broker: BrokerSettings
    ingest: IngestSettings
    serve: ServeSettings

    def __post_init__(self) -> None:
        if self.broker.protocol != "5" and self.ingest.share_group:
            raise ConfigError(
                f"ingest.share_group = {self.ingest.share_group!r} needs MQTT 5 (a shared "
                f"subscription), but broker.protocol is {self.broker.protocol!r}: set "
                "ingest.share_group = '' (one ingest process) or broker.protocol = '5'"
            )


SECTIONS: tuple[tuple[str, type[Any]], ...] = (
    ("store", StoreSettings),
    ("broker", BrokerSettings),
    ("ingest", IngestSettings),
    ("serve", ServeSettings),
)
"""Which settings class holds each table of the config file."""
SETTINGS: tuple[Setting, ...] = tuple(
    s for section, cls in SECTIONS for s in declared(section, cls, env_prefix="FOOTFALL_AGG_")
)


def load_config(
    path: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> AggregatorConfig:
    """Defaults, then ``path`` (or /etc/footfall/aggregator.toml if present), then the
    environment, then ``overrides`` (command-line flags, by dotted name). The settings whose
    default is made from others (the database, the client id, the receipt key file) get it
    here, so that ``config show`` prints what is used. Every mistake is reported at once, in
    one :class:`ConfigError`, each with its file, line, table and key."""
    if path is None and DEFAULT_CONFIG.is_file():
        path = DEFAULT_CONFIG
    values, sources, problems = resolve(
        SETTINGS, path, os.environ if environ is None else environ, overrides or {}, ConfigError
    )
    _derive(values)
    defaults = _derive({s.name: s.default for s in SETTINGS})

    def section(name: str, cls: type[T]) -> T:
        return problems.check(
            f"{name}.", lambda: build(cls, name, values), lambda: build(cls, name, defaults)
        )

    store = section("store", StoreSettings)
    broker = section("broker", BrokerSettings)
    ingest = section("ingest", IngestSettings)
    serve = section("serve", ServeSettings)
    try:
        config = AggregatorConfig(values, sources, store, broker, ingest, serve)
    except ConfigError as exc:
        problems.found.append(str(exc))
    problems.raise_found(path)
    return config


def _derive(values: dict[str, Value]) -> dict[str, Value]:
    """``values`` with the settings whose default is made from others filled in, if empty."""
    data_dir = Path(str(values["store.data_dir"]))
    derived = {
        "store.dsn": f"sqlite:///{data_dir / SQLITE_FILE}",
        "ingest.client_id": _default_client_id(str(values["ingest.replica"])),
        "ingest.receipt_key_file": str(data_dir / "receipt.key"),
    }
    for name, value in derived.items():
        values[name] = values[name] or value
    return values


def _default_client_id(replica: str) -> str:
    name = replica or socket.gethostname().split(".")[0]
    return f"footfall-aggregator-{re.sub(r'[^A-Za-z0-9_.-]', '-', name) or 'host'}"[:128]
