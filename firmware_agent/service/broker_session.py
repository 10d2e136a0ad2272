"""A short MQTT session beside the publisher's: connect, maybe publish, disconnect.

``footfall-agent doctor`` uses it to check that the broker answers and accepts the agent's
credentials, Home Assistant discovery to publish its retained config, and ``footfall-agent
audit`` to listen to what agents publish. Unlike the
publisher's connection it has **no last will** (a will would overwrite the agent's retained
status if this session dropped) and its own client id (``footfall-<site>-<agent>-<purpose>``),
so it never takes over the running agent's session.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode

from firmware_agent.contract.errors import BrokerError
from firmware_agent.service.publish import BrokerSettings, paho_client, reason_in_words

__all__ = ["BrokerSession"]


class BrokerSession:
    """One will-less MQTT session (a context manager); errors are :class:`BrokerError`."""

    def __init__(self, settings: BrokerSettings, client_id: str) -> None:
        self.settings = settings
        self._connack: ReasonCode | None = None
        self._acks: dict[int, ReasonCode] = {}
        self._subacks: dict[int, list[ReasonCode]] = {}
        client = paho_client(settings, client_id, settings.ssl_context())
        client.on_connect = self._on_connect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        self._client = client
        self._received: list[tuple[str, bytes]] = []

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        self._connack = reason

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason: ReasonCode, _p: Any) -> None:
        self._acks[mid] = reason

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, reasons: list[ReasonCode], _p: Any) -> None:
        self._subacks[mid] = reasons

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        self._received.append((message.topic, bytes(message.payload)))

    def __enter__(self) -> BrokerSession:
        s = self.settings
        where = f"broker {s.address}"
        try:
            self._client.connect(s.host, s.port, s.keepalive_s)
        except OSError as exc:  # TLS and socket errors alike
            raise BrokerError(f"cannot connect to {where}: {exc}") from exc
        deadline = time.monotonic() + s.connect_timeout_s
        while self._connack is None:
            if time.monotonic() > deadline:
                self._client.disconnect()
                raise BrokerError(f"{where} did not accept the connection within "
                                  f"{s.connect_timeout_s} s")  # fmt: skip
            if self._client.loop(0.05) != mqtt.MQTT_ERR_SUCCESS and self._connack is None:
                raise BrokerError(f"{where} closed the connection before accepting it")
        if self._connack.is_failure:
            self._client.disconnect()
            raise BrokerError(f"{where} refused the connection: {reason_in_words(self._connack)}")
        return self

    def publish(self, topic: str, body: bytes, *, retain: bool) -> None:
        """Publish at QoS 1 and wait for the broker's acknowledgement."""
        info = self._client.publish(topic, body, qos=1, retain=retain)
        deadline = time.monotonic() + self.settings.connect_timeout_s
        while info.mid not in self._acks:
            if time.monotonic() > deadline:
                raise BrokerError(f"broker {self.settings.address} did not acknowledge {topic}")
            self._client.loop(0.05)
        reason = self._acks.pop(info.mid)
        if reason.is_failure:
            raise BrokerError(
                f"broker {self.settings.address} refused {topic}: {reason_in_words(reason)}"
            )

    def listen(
        self, topic_filter: str, seconds: float, ready: Callable[[], None] | None = None
    ) -> Iterator[tuple[str, bytes]]:
        """(topic, payload) of what arrives on ``topic_filter`` (QoS 1, retained messages
        first) for ``seconds`` from the broker's acknowledgement of the subscription, when
        ``ready`` is called (so a caller can tell when nothing published will be missed)."""
        _result, mid = self._client.subscribe(topic_filter, qos=1)
        deadline = time.monotonic() + self.settings.connect_timeout_s
        while mid not in self._subacks:
            if time.monotonic() > deadline:
                raise BrokerError(f"broker {self.settings.address} did not acknowledge the "
                                  f"subscription to {topic_filter}")  # fmt: skip
            if self._client.loop(0.05) != mqtt.MQTT_ERR_SUCCESS:
                raise BrokerError(f"broker {self.settings.address} dropped the connection")
        refused = [r for r in self._subacks.pop(mid) if r.is_failure]
        if refused:
            raise BrokerError(f"broker {self.settings.address} refused the subscription to "
                              f"{topic_filter}: {reason_in_words(refused[0])}")  # fmt: skip
        if ready is not None:
            ready()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self._client.loop(0.1) != mqtt.MQTT_ERR_SUCCESS:
                raise BrokerError(f"broker {self.settings.address} dropped the connection")
            yield from self._received
            self._received.clear()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._client.disconnect()
        self._client.loop(0.05)
