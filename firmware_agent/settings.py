"""The agent's settings: one registry drives the TOML file, ``FOOTFALL_*`` variables,
command-line overrides and ``footfall-agent config show``.

Every setting has a dotted name (``count.window_s`` is ``window_s`` in the ``[count]``
table of ``/etc/footfall/agent.toml``), a default, a type and a help text. Precedence,
lowest first: default, config file, environment (``FOOTFALL_COUNT_WINDOW_S``), flag.
Unknown keys are errors, and so are values of the wrong type or out of range: each error
names the setting, the bad value and where it came from.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from firmware_agent.count import NS, CountSettings
from firmware_agent.errors import ConfigError

__all__ = ["SETTINGS", "AgentConfig", "EpochClock", "Setting", "load_config"]

DEFAULT_CONFIG = Path("/etc/footfall/agent.toml")


@dataclass(frozen=True, slots=True)
class Setting:
    name: str
    default: int | str
    help: str
    secret: bool = False

    @property
    def env(self) -> str:
        return "FOOTFALL_" + self.name.upper().replace(".", "_")


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
        "epoch.length",
        "midnight",
        "When the hashing key and device table are replaced: 'midnight' (local) or seconds, "
        "60 to 86400, a multiple of the window.",
    ),
    Setting(
        "epoch.timezone",
        "",
        "IANA time zone of the site for midnight epochs (empty: the system's local zone).",
    ),
)
_BY_NAME = {s.name: s for s in SETTINGS}


@dataclass(frozen=True, slots=True)
class EpochClock:
    """Where epochs end: local midnight in a zone, or every ``length_s`` seconds.

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
        return -(-b // w) * w


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """The effective settings, checked, with where each value came from."""

    values: Mapping[str, int | str]
    sources: Mapping[str, str]
    count: CountSettings
    epoch: EpochClock

    def show(self) -> list[tuple[str, str, str]]:
        """(name, value, source) rows, secrets masked."""
        rows = []
        for s in SETTINGS:
            shown = "********" if s.secret and self.values[s.name] else repr(self.values[s.name])
            rows.append((s.name, shown, self.sources[s.name]))
        return rows


def _flatten(table: Mapping[str, object], prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _unknown(name: str, where: str) -> ConfigError:
    hint = difflib.get_close_matches(name, _BY_NAME, n=1)
    did_you_mean = f"; did you mean {hint[0]!r}?" if hint else ""
    return ConfigError(f"{where}: unknown setting {name!r}{did_you_mean}")


def _coerce(setting: Setting, value: object, where: str) -> int | str:
    if isinstance(setting.default, int):
        if isinstance(value, bool):
            raise ConfigError(f"{setting.name} must be an integer, got {value!r} (from {where})")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{setting.name} must be an integer, got {value!r} (from {where})")
    if isinstance(value, int | str) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{setting.name} must be a string, got {value!r} (from {where})")


def load_config(
    path: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> AgentConfig:
    """Defaults, then ``path`` (or /etc/footfall/agent.toml if present), then environment,
    then ``overrides`` (command-line flags, by dotted name)."""
    environ = os.environ if environ is None else environ
    values: dict[str, int | str] = {s.name: s.default for s in SETTINGS}
    sources = {s.name: "default" for s in SETTINGS}
    if path is None and DEFAULT_CONFIG.is_file():
        path = DEFAULT_CONFIG
    if path is not None:
        try:
            table = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
        for name, value in _flatten(table).items():
            if name not in _BY_NAME:
                raise _unknown(name, str(path))
            values[name] = _coerce(_BY_NAME[name], value, str(path))
            sources[name] = str(path)
    for s in SETTINGS:
        if s.env in environ:
            values[s.name] = _coerce(s, environ[s.env], s.env)
            sources[s.name] = s.env
    for name, value in (overrides or {}).items():
        if name not in _BY_NAME:
            raise _unknown(name, "command line")
        values[name] = _coerce(_BY_NAME[name], value, "command line")
        sources[name] = "command line"
    count = CountSettings(
        window_s=int(values["count.window_s"]),
        lateness_s=int(values["count.lateness_s"]),
        rssi_threshold_dbm=int(values["count.rssi_threshold_dbm"]),
        min_dwell_s=int(values["count.min_dwell_s"]),
        visit_gap_s=int(values["count.visit_gap_s"]),
    )
    return AgentConfig(values, sources, count, _epoch_clock(values, count.window_s))


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
    if not 60 <= seconds <= 86400 or seconds % window_s:
        raise ConfigError(
            "epoch.length must be 'midnight' or seconds from 60 to 86400 that are a multiple "
            f"of count.window_s ({window_s}), got {length!r}"
        )
    return EpochClock(seconds, zone, window_s)
