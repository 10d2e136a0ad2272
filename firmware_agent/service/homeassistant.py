"""Home Assistant MQTT discovery: a shop's Home Assistant shows the agent's people counts.

With ``homeassistant.discovery = "on"`` the agent publishes, retained, one *device discovery*
message (Home Assistant 2024.11 or later) to::

    <homeassistant.prefix>/device/footfall-<site>/<agent>/config

It declares one device (the agent) with sensors for the last window's people present (mean
and peak), arrivals, passers-by and devices heard (a diagnostic), each with its unit, which
Home Assistant reads straight from the agent's signed ``counts`` messages
(``value_json.payload.arrivals``; a window without data or a suppressed count reads as
unknown), and its availability from the retained ``status`` message.
Nothing new goes on the wire but this config: Home Assistant reads the counts the aggregator
reads.

The topic keeps the site and agent as two levels (node id ``footfall-<site>``, object id
``<agent>``), so the broker's ACL pattern for agents whose user name is ``<site>/<agent>``
(``hardware/mosquitto/footfall.acl``) allows exactly this topic and no other agent's.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from dataclasses import dataclass

from firmware_agent import __version__
from firmware_agent.contract.errors import BrokerError, ConfigError
from firmware_agent.contract.messages import AgentId, SiteId, Topic
from firmware_agent.contract.resolve import setting
from firmware_agent.service.broker_session import BrokerSession
from firmware_agent.service.publish import BrokerSettings

__all__ = ["HomeAssistantSettings", "announce_in_background", "discovery_message"]

log = logging.getLogger("footfall.agent")

_SENSORS = (
    ("occupancy_mean", "People present", "people", "mdi:account-group"),
    ("occupancy_peak", "People present (peak)", "people", "mdi:account-multiple"),
    ("arrivals", "Arrivals", "people", "mdi:account-arrow-right"),
    ("passersby", "Passers-by", "people", "mdi:walk"),
    ("devices", "Devices heard (diagnostic)", "devices", "mdi:cellphone-wireless"),
)
_PREFIX = re.compile(r"[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*")


@dataclass(frozen=True, slots=True)
class HomeAssistantSettings:
    """Whether and where to publish the discovery config; checked where made."""

    discovery: bool = setting(
        False,
        "Publish a Home Assistant MQTT discovery config for this agent's counts: 'on' or 'off'.",
    )
    prefix: str = setting("homeassistant", "Home Assistant's MQTT discovery prefix.")

    def __post_init__(self) -> None:
        if not _PREFIX.fullmatch(self.prefix):
            raise ConfigError(
                "homeassistant.prefix must be topic levels of letters, digits, '_' and '-' "
                f"such as 'homeassistant', got {self.prefix!r}"
            )


def discovery_message(prefix: str, site: SiteId, agent: AgentId) -> tuple[str, bytes]:
    """(topic, retained payload) of the device discovery config for this agent."""
    node = f"footfall-{site}-{agent}"
    components = {
        field: {
            "platform": "sensor",
            "name": name,
            "unique_id": f"{node}-{field}",
            "icon": icon,
            "unit_of_measurement": unit,
            "state_class": "measurement",
            "value_template": "{{ value_json.payload.%s }}" % field,  # noqa: UP031 (Jinja braces)
        }
        for field, name, unit, icon in _SENSORS
    }
    config = {
        "device": {
            "identifiers": [node],
            "name": f"footfall {site}/{agent}",
            "manufacturer": "footfall",
            "model": "footfall agent",
            "sw_version": __version__,
        },
        "origin": {"name": "footfall", "sw_version": __version__},
        "state_topic": str(Topic(site, agent, "counts")),
        "availability": [
            {
                "topic": str(Topic(site, agent, "status")),
                "value_template": "{{ value_json.payload.state }}",
                "payload_available": "online",
                "payload_not_available": "offline",
            }
        ],
        "components": components,
    }
    topic = f"{prefix}/device/footfall-{site}/{agent}/config"
    return topic, json.dumps(config, sort_keys=True).encode()


def announce_in_background(
    broker: BrokerSettings,
    settings: HomeAssistantSettings,
    site: SiteId,
    agent: AgentId,
    stop: threading.Event,
) -> threading.Thread:
    """Publish the discovery config once, retrying with backoff until it is acknowledged or
    ``stop`` is set, in a daemon thread (started)."""
    topic, body = discovery_message(settings.prefix, site, agent)
    backoff = broker.backoff()

    def run() -> None:
        while not stop.is_set():
            try:
                with BrokerSession(broker, f"footfall-{site}-{agent}-ha") as session:
                    session.publish(topic, body, retain=True)
                log.info("Home Assistant discovery published site=%s agent=%s", site, agent)
                return
            except BrokerError as exc:
                delay = backoff.next()
                log.warning("Home Assistant discovery: %s; next attempt in %.1f s", exc, delay)
                stop.wait(delay)

    thread = threading.Thread(target=run, name="footfall-homeassistant", daemon=True)
    thread.start()
    return thread
