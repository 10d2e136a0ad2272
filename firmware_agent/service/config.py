"""The agent's whole configuration as the service and the tools read it: who the agent is, what
it reads, and the settings of every stage and service part, checked.

:func:`firmware_agent.settings.load_config` makes it; the settings themselves are declared on
the classes here and on the classes of the parts that use them.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from firmware_agent.contract.errors import ConfigError, MessageError
from firmware_agent.contract.messages import ID_PATTERN, AgentId, SiteId
from firmware_agent.contract.resolve import Value, setting
from firmware_agent.service.homeassistant import HomeAssistantSettings
from firmware_agent.service.metrics import MetricsSettings
from firmware_agent.service.publish import BrokerSettings
from firmware_agent.service.spool import SpoolSettings
from firmware_agent.stages.config import (
    Calibration,
    CountSettings,
    EpochClock,
    EstimateSettings,
    LiveSettings,
)
from firmware_agent.stages.privacy import PrivacyPolicy

__all__ = ["AgentConfig", "AgentIdentity", "SourceSettings"]

IdT = TypeVar("IdT", SiteId, AgentId)


def _speed(speed: str) -> float | None:
    """``source.speed``: a factor of the capture's pace; None: as fast as possible."""
    text = speed.strip().lower()
    if text in ("realtime", "fast"):
        return 1.0 if text == "realtime" else None
    try:
        factor = float(text.removesuffix("x"))
    except ValueError:
        factor = 0.0
    if not 0 < factor <= 1e6:
        raise ConfigError(
            "source.speed must be 'realtime', 'fast' or a factor between 0 and 1000000 "
            f"such as '60', got {speed!r}"
        )
    return factor


@dataclass(frozen=True, slots=True)
class SourceSettings:
    """What ``footfall-agent run`` reads, and how fast (``speed`` None: as fast as possible)."""

    path: str = setting(
        "",
        "What 'footfall-agent run' reads: a capture file (pcap, pcapng, .gz), '-' for a pcap "
        "stream on standard input, or 'iface:<name>' for a monitor-mode interface.",
    )
    speed: float | None = setting(
        "realtime",
        "How fast a capture file is replayed: 'realtime' (its own pace), 'fast' (as fast as "
        "possible) or a factor such as '60' (60 times its pace).",
        parse=_speed,
    )


def _host_agent_id() -> str:
    """This host's name as an agent id: lower-cased, other characters replaced by '-'."""
    name = re.sub(r"[^a-z0-9_-]", "-", socket.gethostname().split(".")[0].lower())
    return name.strip("-_")[:63] or "agent"


def _checked_id(make: Callable[[str], IdT], name: str) -> Callable[[str], IdT]:
    def checked(text: str) -> IdT:
        try:
            return make(text)
        except MessageError as exc:
            raise ConfigError(f"{name} must match {ID_PATTERN}, got {text!r}") from exc

    return checked


@dataclass(frozen=True, slots=True)
class AgentIdentity:
    """Who this agent is and where it keeps its files."""

    site: SiteId = setting(
        "default",
        f"The site's id in topics and messages: {ID_PATTERN}.",
        parse=_checked_id(SiteId, "agent.site"),
    )
    agent: AgentId = setting(
        "",
        f"This agent's id within its site: {ID_PATTERN} (empty: the host name, lower-cased, "
        "other characters replaced by '-').",
        key="id",
        parse=lambda text: _checked_id(AgentId, "agent.id")(text or _host_agent_id()),
    )
    config_dir: Path = setting(
        "/etc/footfall",
        "Directory of the signing key (signing.key, written by 'footfall-agent keygen').",
        parse=Path,
    )
    state_dir: Path = setting(
        "/var/lib/footfall", "Directory of the spool (spool.sqlite3).", parse=Path
    )


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """The effective settings, checked, with where each value came from."""

    values: Mapping[str, Value]
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
