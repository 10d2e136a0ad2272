"""The agent's settings: one registry drives the TOML file, ``FOOTFALL_*`` variables,
command-line overrides and ``footfall-agent config show``.

Every setting has a dotted name (``count.window_s`` is ``window_s`` in the ``[count]``
table of ``/etc/footfall/agent.toml``), a default, a type and a help text. Precedence,
lowest first: default, config file, environment (``FOOTFALL_COUNT_WINDOW_S``), flag.
Unknown keys are errors, and so are values of the wrong type or out of range: each error
names the setting, the bad value and where it came from.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from pathlib import Path
from typing import TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from firmware_agent.contract.errors import ConfigError, MessageError
from firmware_agent.contract.messages import ID_PATTERN, AgentId, SiteId
from firmware_agent.contract.resolve import Setting, report, resolve
from firmware_agent.service.homeassistant import HomeAssistantSettings
from firmware_agent.service.metrics import MetricsSettings
from firmware_agent.service.publish import BrokerSettings
from firmware_agent.service.spool import SpoolSettings
from firmware_agent.stages.batch import NS
from firmware_agent.stages.count import CountSettings
from firmware_agent.stages.estimate import Calibration, EstimateSettings
from firmware_agent.stages.live import LiveSettings
from firmware_agent.stages.privacy import STANDARD_MAX_KEY_S, PrivacyPolicy

__all__ = [
    "SETTINGS",
    "AgentConfig",
    "AgentIdentity",
    "EpochClock",
    "Setting",
    "SourceSettings",
    "load_config",
]

DEFAULT_CONFIG = Path("/etc/footfall/agent.toml")
IdT = TypeVar("IdT", SiteId, AgentId)
T = TypeVar("T")


SETTINGS: tuple[Setting, ...] = (
    Setting("count.window_s", 300, "Window length in seconds; a divisor of 3600, 60 to 3600."),
    Setting(
        "count.lateness_s",
        10,
        "How far (s) a frame's timestamp may go back and still count in its own window.",
    ),
    Setting(
        "count.rssi_threshold_dbm",
        -75,
        "Signal (dBm) at or above which a device can be a visitor rather than a passer-by.",
    ),
    Setting("count.min_dwell_s", 120, "Presence (s) a device needs before it counts as a visitor."),
    Setting("count.visit_gap_s", 600, "Silence (s) after which a device's visit has ended."),
    Setting(
        "count.max_devices",
        250_000,
        "Ceiling of the device table (rows); at it, the longest silent rows are evicted.",
    ),
    Setting(
        "epoch.length",
        "midnight",
        "When the hashing key and device table are replaced: 'midnight' (local, and at most "
        "24 h) or seconds, 60 to 86400, a multiple of the window. Strict mode: every window.",
    ),
    Setting(
        "privacy.mode",
        "standard",
        "'standard' (keyed device ids for at most 24 h: dwell, visits, unique-today) or "
        "'strict' (nothing per device outlives a window of at most 10 min; truncated ids).",
    ),
    Setting(
        "privacy.suppress_below",
        5,
        "k: device counts from 1 to k-1 are published as suppressed, with any count that "
        "would give them back by subtraction. 2 to 1000.",
    ),
    Setting(
        "privacy.dp_epsilon",
        "off",
        "Per-window epsilon of discrete Laplace noise on published device counts, or 'off'.",
    ),
    Setting(
        "privacy.expected_devices",
        100,
        "Strict mode: devices expected in a window at busy times; sets the bits kept of a "
        "device id so that most devices share their value.",
    ),
    Setting(
        "epoch.timezone",
        "",
        "IANA time zone of the site for midnight epochs (empty: the system's local zone).",
    ),
    Setting("agent.site", "default", f"The site's id in topics and messages: {ID_PATTERN}."),
    Setting(
        "agent.id",
        "",
        f"This agent's id within its site: {ID_PATTERN} (empty: the host name, lower-cased, "
        "other characters replaced by '-').",
    ),
    Setting(
        "agent.config_dir",
        "/etc/footfall",
        "Directory of the signing key (signing.key, written by 'footfall-agent keygen').",
    ),
    Setting("agent.state_dir", "/var/lib/footfall", "Directory of the spool (spool.sqlite3)."),
    Setting("broker.host", "localhost", "MQTT broker host name or address."),
    Setting("broker.port", 1883, "MQTT broker port (8883 is usual with TLS)."),
    Setting(
        "broker.hosts",
        "",
        "More brokers, tried in turn after broker.host:broker.port fails or is lost: host:port "
        "pairs separated by commas (the other nodes of a cluster). Empty: broker.host only.",
    ),
    Setting("broker.username", "", "User name at the broker (empty: none)."),
    Setting("broker.password", "", "Password at the broker.", secret=True),
    Setting(
        "broker.tls_ca",
        "",
        "CA certificate file (PEM) that signed the broker's certificate; 'system' uses the "
        "system's CAs; empty: no TLS.",
    ),
    Setting(
        "broker.tls_cert", "", "Client certificate file (PEM) for TLS, if the broker wants one."
    ),
    Setting("broker.tls_key", "", "Private key file (PEM) of the client certificate."),
    Setting(
        "broker.keepalive_s",
        60,
        "Keep-alive (s): a silent connection is declared lost after about twice this.",
    ),
    Setting("broker.protocol", "5", "MQTT version: '5' or '3.1.1' (no message needs 5)."),
    Setting(
        "broker.max_inflight",
        64,
        "Counts messages sent and not yet acknowledged (QoS 1), at most.",
    ),
    Setting("broker.connect_timeout_s", 10, "How long (s) a connection attempt may take."),
    Setting(
        "broker.backoff_initial_ms",
        500,
        "First wait (ms) before reconnecting; it doubles at each failure, with jitter.",
    ),
    Setting("broker.backoff_max_s", 60, "Longest wait (s) between reconnection attempts."),
    Setting(
        "broker.stop_grace_s",
        10,
        "On SIGTERM, how long (s) to keep sending spooled windows before going offline.",
    ),
    Setting(
        "broker.receipt_key",
        "",
        "The aggregator's receipt public key (base64, 'footfall-aggregator receipt-key' prints "
        "it): a window then leaves the spool only when a receipt signed with it says the "
        "aggregator stored it, and is sent again when none does. Empty: a window leaves the "
        "spool on the broker's acknowledgement (an aggregator without receipts).",
    ),
    Setting(
        "broker.receipt_timeout_s",
        60,
        "With broker.receipt_key: a window sent this long (s) ago and still not in a receipt "
        "is sent again, oldest first.",
    ),
    Setting(
        "broker.resend_per_s",
        100,
        "With broker.receipt_key: windows sent again per second, at most.",
    ),
    Setting(
        "spool.max_windows",
        100_000,
        "Windows the spool keeps unsent at most; beyond, the oldest are dropped and counted.",
    ),
    Setting(
        "source.path",
        "",
        "What 'footfall-agent run' reads: a capture file (pcap, pcapng, .gz), '-' for a pcap "
        "stream on standard input, or 'iface:<name>' for a monitor-mode interface.",
    ),
    Setting(
        "source.speed",
        "realtime",
        "How fast a capture file is replayed: 'realtime' (its own pace), 'fast' (as fast as "
        "possible) or a factor such as '60' (60 times its pace).",
    ),
    Setting(
        "source.link_type",
        "auto",
        "Link type of a live interface's frames: 'auto' (from the interface: radiotap in "
        "monitor mode), 'radiotap', '802.11' or a pcap link type number.",
    ),
    Setting(
        "source.ring_mb",
        8,
        "Memory (MiB, 1 to 256) of the kernel ring a live interface is read through.",
    ),
    Setting("source.hop", "off", "Hop a live interface over source.hop_channels: 'on' or 'off'."),
    Setting(
        "source.hop_channels",
        "1,6,11",
        "Channels to hop over, separated by commas (with source.hop = 'on'; needs iw).",
    ),
    Setting("source.hop_dwell_ms", 200, "Time (ms, 50 to 60000) spent on each channel."),
    Setting(
        "metrics.port",
        0,
        "Port of the Prometheus endpoint (http://<metrics.host>:<port>/metrics); 0: none.",
    ),
    Setting("metrics.host", "127.0.0.1", "Address the Prometheus endpoint listens on."),
    Setting(
        "homeassistant.discovery",
        "off",
        "Publish a Home Assistant MQTT discovery config for this agent's counts: 'on' or 'off'.",
    ),
    Setting("homeassistant.prefix", "homeassistant", "Home Assistant's MQTT discovery prefix."),
)
# The estimate stage (firmware_agent/stages/estimate.py).
SETTINGS += (
    Setting(
        "estimate.rssi_threshold_dbm",
        "auto",
        "Signal (dBm) at or above which a device counts as in the venue for people_est; "
        "-120 counts all; 'auto' learns it from the signal of devices that linger (logged).",
    ),
    Setting("estimate.min_dwell_s", 60, "How long (s) a device must have been heard to count."),
    Setting(
        "estimate.link_gap_s",
        60,
        "Silence (s) within which a new random address may continue an old one's counter.",
    ),
    Setting(
        "estimate.seq_max_delta",
        64,
        "Largest step of the sequence number from an old random address to a new one that "
        "links them.",
    ),
    Setting(
        "estimate.cadence_gap_s",
        300,
        "Silence (s) within which a phone model that resets its sequence numbers may link a "
        "new random address to a chain by timing and signal.",
    ),
    Setting(
        "estimate.rssi_link_db",
        30,
        "Largest signal difference (dB) between a chain and a new address linked by timing.",
    ),
    Setting(
        "estimate.reset_min",
        5,
        "Address changes of a phone model seen before it may be judged to reset its sequence "
        "numbers.",
    ),
    Setting(
        "estimate.reset_share_pct",
        25,
        "A model resets its sequence numbers if fewer than this % of its address changes "
        "continued one (beyond chance).",
    ),
    Setting(
        "estimate.static_min_s",
        3600,
        "A device first heard while the site is closed (estimate.static_closed_h), then heard "
        "over at least this long (s) and in most windows, is static (a PC, a printer) and left "
        "out; 0 turns static exclusion off.",
    ),
    Setting(
        "estimate.static_share_pct",
        80,
        "Share (%) of the windows since it appeared a static device must have been heard in.",
    ),
    Setting(
        "estimate.static_closed_h",
        6,
        "The site is closed from local midnight until this hour: only a device first heard "
        "then can be static, so a person who stays all day is never taken for a PC (24: any "
        "device, whenever first heard).",
    ),
    Setting(
        "estimate.calibration_factor",
        "",
        "Site calibration, people = factor * people_est + offset; written by 'footfall-agent "
        "calibrate' (empty: not calibrated, no 'people' in the counts).",
    ),
    Setting("estimate.calibration_offset", "0", "Offset (people) of the site calibration."),
    Setting(
        "estimate.calibration_mae",
        "",
        "Mean absolute error (people) of the calibration on the windows it was fitted on.",
    ),
    Setting("estimate.calibration_windows", 0, "Windows the calibration was fitted on."),
)
_BY_NAME = {s.name: s for s in SETTINGS}


@dataclass(frozen=True, slots=True)
class EpochClock:
    """Where epochs end: local midnight in a zone (or 24 hours after the epoch began, if
    sooner: the 25-hour autumn day has a one-hour epoch before midnight), or every
    ``length_s`` seconds. ``next_boundary`` is asked at the start of each epoch.

    A boundary is always a window boundary (midnight rounded up to the next window start,
    which matters only for zones off the hour with 30- or 60-minute windows).
    """

    length_s: int | None  # None: midnight
    zone: ZoneInfo | None  # None: system local
    window_s: int

    def next_boundary(self, t_ns: int) -> int:
        """First epoch boundary strictly after ``t_ns``, in ns since the Unix epoch."""
        w = self.window_s * NS
        if self.length_s is not None:
            step = self.length_s * NS
            return (t_ns // step + 1) * step
        local = datetime.fromtimestamp(t_ns / NS, self.zone).astimezone(self.zone)
        midnight = datetime.combine(local.date() + timedelta(days=1), time(0), self.zone)
        if self.zone is None:
            midnight = midnight.astimezone()
        b = int(midnight.timestamp()) * NS
        # A key never lives more than a day, not even on a 25-hour daylight-saving day.
        return min(-(-b // w) * w, t_ns // w * w + STANDARD_MAX_KEY_S * NS)


@dataclass(frozen=True, slots=True)
class AgentIdentity:
    """Who this agent is and where it keeps its files."""

    site: SiteId
    agent: AgentId
    config_dir: Path
    state_dir: Path


@dataclass(frozen=True, slots=True)
class SourceSettings:
    """What ``footfall-agent run`` reads, and how fast (``speed`` None: as fast as possible)."""

    path: str
    speed: float | None

    @classmethod
    def parse(cls, path: str, speed: str) -> SourceSettings:
        text = speed.strip().lower()
        if text in ("realtime", "fast"):
            return cls(path, 1.0 if text == "realtime" else None)
        try:
            factor = float(text.removesuffix("x"))
        except ValueError:
            factor = 0.0
        if not 0 < factor <= 1e6:
            raise ConfigError(
                "source.speed must be 'realtime', 'fast' or a factor between 0 and 1000000 "
                f"such as '60', got {speed!r}"
            )
        return cls(path, factor)


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """The effective settings, checked, with where each value came from."""

    values: Mapping[str, int | str]
    sources: Mapping[str, str]
    count: CountSettings
    epoch: EpochClock
    identity: AgentIdentity
    broker: BrokerSettings
    spool: SpoolSettings
    source: SourceSettings
    live: LiveSettings
    metrics: MetricsSettings
    homeassistant: HomeAssistantSettings
    estimate: EstimateSettings = field(default_factory=EstimateSettings)
    calibration: Calibration | None = None
    privacy: PrivacyPolicy = field(default_factory=PrivacyPolicy)
    file: Path | None = None  # the TOML file read, if any

    def show(self) -> list[tuple[str, str, str]]:
        """(name, value, source) rows, secrets masked."""
        rows = []
        for s in SETTINGS:
            shown = "********" if s.secret and self.values[s.name] else repr(self.values[s.name])
            rows.append((s.name, shown, self.sources[s.name]))
        return rows


class _Problems:
    """Every mistake in the settings, each with where its setting was set; the settings
    built from defaults where one is wrong, so that the checks after it still run."""

    def __init__(self, found: list[str], places: Mapping[str, str]) -> None:
        self.found = found
        self.places = places

    def check(self, section: str, make: Callable[[], T], fallback: Callable[[], T]) -> T:
        try:
            return make()
        except ConfigError as exc:
            self.found.append(self._placed(str(exc), section))
            return fallback()

    def _placed(self, message: str, section: str) -> str:
        """The message, with where each setting of ``section`` it names was set."""
        named = [
            s.name
            for s in SETTINGS
            if s.name.startswith(section)
            and re.search(rf"\b{re.escape(s.name.removeprefix(section))}\b", message)
        ]
        where = [
            self.places[n] for n in named if n in self.places and self.places[n] not in message
        ]
        return f"{message} ({'; '.join(where)})" if where else message


def load_config(
    path: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> AgentConfig:
    """Defaults, then ``path`` (or /etc/footfall/agent.toml if present), then environment,
    then ``overrides`` (command-line flags, by dotted name). Every mistake is reported at
    once, in one :class:`ConfigError`, each with its file, line, table and key."""
    if path is None and DEFAULT_CONFIG.is_file():
        path = DEFAULT_CONFIG
    found: list[str] = []
    places: dict[str, str] = {}
    values, sources = resolve(
        SETTINGS,
        path,
        os.environ if environ is None else environ,
        overrides or {},
        ConfigError,
        problems=found,
        places=places,
    )
    problems = _Problems(found, places)
    count = problems.check(
        "count.",
        lambda: CountSettings(
            window_s=int(values["count.window_s"]),
            lateness_s=int(values["count.lateness_s"]),
            rssi_threshold_dbm=int(values["count.rssi_threshold_dbm"]),
            min_dwell_s=int(values["count.min_dwell_s"]),
            visit_gap_s=int(values["count.visit_gap_s"]),
            max_devices=int(values["count.max_devices"]),
        ),
        CountSettings,
    )
    if not values["agent.id"]:
        values["agent.id"] = _host_agent_id()
    strict = str(values["privacy.mode"]).strip().lower() == "strict"
    if strict and sources["epoch.length"] == "default":
        values["epoch.length"] = str(count.window_s)
    epoch = problems.check(
        "epoch.",
        lambda: _epoch_clock(values, count.window_s),
        lambda: EpochClock(None, None, count.window_s),
    )
    privacy = problems.check(
        "privacy.",
        lambda: PrivacyPolicy.from_settings(
            values,
            count.window_s,
            STANDARD_MAX_KEY_S if epoch.length_s is None else epoch.length_s,
            count.lateness_s,
        ),
        PrivacyPolicy,
    )
    identity = AgentIdentity(
        problems.check(
            "agent.", lambda: _checked_id(SiteId, "agent.site", values), lambda: SiteId("default")
        ),
        problems.check(
            "agent.", lambda: _checked_id(AgentId, "agent.id", values), lambda: AgentId("agent")
        ),
        Path(str(values["agent.config_dir"])),
        Path(str(values["agent.state_dir"])),
    )
    broker = problems.check(
        "broker.",
        lambda: BrokerSettings(
            host=str(values["broker.host"]),
            port=int(values["broker.port"]),
            hosts=str(values["broker.hosts"]),
            username=str(values["broker.username"]),
            password=str(values["broker.password"]),
            tls_ca=str(values["broker.tls_ca"]),
            tls_cert=str(values["broker.tls_cert"]),
            tls_key=str(values["broker.tls_key"]),
            keepalive_s=int(values["broker.keepalive_s"]),
            protocol=str(values["broker.protocol"]),
            max_inflight=int(values["broker.max_inflight"]),
            connect_timeout_s=int(values["broker.connect_timeout_s"]),
            backoff_initial_ms=int(values["broker.backoff_initial_ms"]),
            backoff_max_s=int(values["broker.backoff_max_s"]),
            stop_grace_s=int(values["broker.stop_grace_s"]),
            receipt_key=str(values["broker.receipt_key"]),
            receipt_timeout_s=int(values["broker.receipt_timeout_s"]),
            resend_per_s=int(values["broker.resend_per_s"]),
        ),
        BrokerSettings,
    )
    spool = problems.check(
        "spool.", lambda: SpoolSettings(max_windows=int(values["spool.max_windows"])), SpoolSettings
    )
    source = problems.check(
        "source.",
        lambda: SourceSettings.parse(str(values["source.path"]), str(values["source.speed"])),
        lambda: SourceSettings("", 1.0),
    )
    live = problems.check(
        "source.",
        lambda: LiveSettings.parse(
            str(values["source.link_type"]),
            int(values["source.ring_mb"]),
            str(values["source.hop"]),
            str(values["source.hop_channels"]),
            int(values["source.hop_dwell_ms"]),
        ),
        LiveSettings,
    )
    metrics = problems.check(
        "metrics.",
        lambda: MetricsSettings(str(values["metrics.host"]), int(values["metrics.port"])),
        MetricsSettings,
    )
    homeassistant = problems.check(
        "homeassistant.",
        lambda: HomeAssistantSettings.parse(
            str(values["homeassistant.discovery"]), str(values["homeassistant.prefix"])
        ),
        HomeAssistantSettings,
    )
    estimate = problems.check(
        "estimate.",
        lambda: EstimateSettings.from_settings(values, count.window_s, count.lateness_s),
        EstimateSettings,
    )
    calibration = problems.check(
        "estimate.", lambda: Calibration.from_settings(values), lambda: None
    )
    if found:
        raise ConfigError(report(found, str(path) if path is not None else "the settings"))
    return AgentConfig(
        values,
        sources,
        count,
        epoch,
        identity,
        broker,
        spool,
        source,
        live,
        metrics,
        homeassistant,
        estimate=estimate,
        calibration=calibration,
        privacy=privacy,
        file=path,
    )


def _host_agent_id() -> str:
    """This host's name as an agent id: lower-cased, other characters replaced by '-'."""
    name = re.sub(r"[^a-z0-9_-]", "-", socket.gethostname().split(".")[0].lower())
    return name.strip("-_")[:63] or "agent"


def _checked_id(make: Callable[[str], IdT], name: str, values: Mapping[str, int | str]) -> IdT:
    try:
        return make(str(values[name]))
    except MessageError as exc:
        raise ConfigError(f"{name} must match {ID_PATTERN}, got {values[name]!r}") from exc


def _epoch_clock(values: Mapping[str, int | str], window_s: int) -> EpochClock:
    zone_name = str(values["epoch.timezone"])
    zone = None
    if zone_name:
        try:
            zone = ZoneInfo(zone_name)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ConfigError(
                f"epoch.timezone must be an IANA zone such as 'Europe/Paris', got {zone_name!r}"
            ) from exc
    length = str(values["epoch.length"]).strip()
    if length == "midnight":
        return EpochClock(None, zone, window_s)
    try:
        seconds = int(length)
    except ValueError:
        seconds = 0
    if seconds < 60 or seconds % window_s:
        raise ConfigError(
            "epoch.length must be 'midnight' or seconds, at least 60, that are a multiple "
            f"of count.window_s ({window_s}), got {length!r}"
        )
    return EpochClock(seconds, zone, window_s)
