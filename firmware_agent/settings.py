"""The agent's settings registry: the TOML file, ``FOOTFALL_*`` variables, command-line
overrides and ``footfall-agent config show``, generated from the settings classes.

Every setting is declared once, on the field of the class that uses it
(:func:`~firmware_agent.contract.resolve.setting`): its dotted name (``count.window_s`` is
``window_s`` in the ``[count]`` table of ``/etc/footfall/agent.toml``), default, kind and help
text. :data:`SECTIONS` says which class holds which table; :data:`SETTINGS` is made from them.
Precedence, lowest first: default, config file, environment (``FOOTFALL_COUNT_WINDOW_S``),
flag. Unknown keys are errors, and so are values of the wrong kind or out of range: each error
names the setting, the bad value and where it came from.

Light on purpose: ``config show`` imports this module and the classes, and no numba
(tests/agent/test_settings.py).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from firmware_agent.contract.errors import ConfigError
from firmware_agent.contract.resolve import Setting, build, declared, resolve
from firmware_agent.service.config import AgentConfig, AgentIdentity, SourceSettings
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
from firmware_agent.stages.privacy import STANDARD_MAX_KEY_S, PrivacyPolicy

__all__ = ["DEFAULT_CONFIG", "SECTIONS", "SETTINGS", "load_config"]

DEFAULT_CONFIG = Path("/etc/footfall/agent.toml")

SECTIONS: tuple[tuple[str, type[Any]], ...] = (
    ("agent", AgentIdentity),
    ("count", CountSettings),
    ("epoch", EpochClock),
    ("privacy", PrivacyPolicy),
    ("broker", BrokerSettings),
    ("spool", SpoolSettings),
    ("source", SourceSettings),
    ("source", LiveSettings),
    ("metrics", MetricsSettings),
    ("homeassistant", HomeAssistantSettings),
    ("estimate", EstimateSettings),
    ("estimate", Calibration),
)
"""Which settings class holds each table of the config file."""
SETTINGS: tuple[Setting, ...] = tuple(
    s for section, cls in SECTIONS for s in declared(section, cls)
)


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
    values, sources, problems = resolve(
        SETTINGS, path, os.environ if environ is None else environ, overrides or {}, ConfigError
    )
    count = problems.check("count.", lambda: build(CountSettings, "count", values), CountSettings)
    if values["privacy.mode"] == "strict" and sources["epoch.length"] == "default":
        values["epoch.length"] = str(count.window_s)
    epoch = problems.check(
        "epoch.",
        lambda: build(EpochClock, "epoch", values, window_s=count.window_s),
        lambda: EpochClock(None, None, count.window_s),
    )
    privacy = problems.check(
        "privacy.",
        lambda: build(
            PrivacyPolicy,
            "privacy",
            values,
            window_s=count.window_s,
            key_lifetime_s=STANDARD_MAX_KEY_S if epoch.length_s is None else epoch.length_s,
            lateness_s=count.lateness_s,
        ),
        PrivacyPolicy,
    )
    identity = problems.check(
        "agent.",
        lambda: build(AgentIdentity, "agent", values),
        AgentIdentity,
    )
    if not values["agent.id"]:
        values["agent.id"] = str(identity.agent)  # config show says which id the host name made
    estimate = problems.check(
        "estimate.",
        lambda: build(
            EstimateSettings,
            "estimate",
            values,
            window_s=count.window_s,
            lateness_s=count.lateness_s,
            visit_gap_s=count.visit_gap_s,
            max_devices=count.max_devices,
        ),
        EstimateSettings,
    )
    calibrated = bool(str(values["estimate.calibration_factor"]).strip())
    calibration = problems.check(
        "estimate.",
        lambda: build(Calibration, "estimate", values) if calibrated else None,
        lambda: None,
    )
    config = AgentConfig(
        values,
        sources,
        count,
        epoch,
        identity,
        problems.check("broker.", lambda: build(BrokerSettings, "broker", values), BrokerSettings),
        problems.check("spool.", lambda: build(SpoolSettings, "spool", values), SpoolSettings),
        problems.check("source.", lambda: build(SourceSettings, "source", values), SourceSettings),
        problems.check("source.", lambda: build(LiveSettings, "source", values), LiveSettings),
        problems.check(
            "metrics.", lambda: build(MetricsSettings, "metrics", values), MetricsSettings
        ),
        problems.check(
            "homeassistant.",
            lambda: build(HomeAssistantSettings, "homeassistant", values),
            HomeAssistantSettings,
        ),
        estimate=estimate,
        calibration=calibration,
        privacy=privacy,
        file=path,
    )
    problems.raise_found(path)
    return config
