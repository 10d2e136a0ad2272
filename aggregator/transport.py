"""What ingest reads through, whatever the broker: the part the MQTT session
(:class:`aggregator.mqtt.Session`) and the JetStream consumers
(:class:`aggregator.jetstream.JetStreamSession`) have in common, so :mod:`aggregator.ingest`
verifies, stores, refuses and acknowledges the same way over either."""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from aggregator.config import BrokerSettings

if TYPE_CHECKING:
    from aggregator.mqtt import Delivery

__all__ = ["Transport"]


class Transport(abc.ABC):
    """A connection to the broker kept by a thread of its own (:meth:`start`), which hands
    every message to ``on_message`` (in that thread: it must be quick) with at most
    ``receive_maximum`` unacknowledged; ``connected`` is set while messages can flow."""

    def __init__(
        self,
        settings: BrokerSettings,
        *,
        receive_maximum: int,
        on_message: Callable[[Delivery], None],
        thread_name: str,
    ) -> None:
        self.settings = settings
        self.receive_maximum = receive_maximum
        self.on_message = on_message
        self.connected = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)

    @property
    def address(self) -> str:
        return self.settings.address

    def start(self) -> None:
        self._thread.start()

    @abc.abstractmethod
    def _run(self) -> None:
        """The thread: connect, receive, acknowledge, until stopped."""

    @abc.abstractmethod
    def stop(self, timeout: float = 5.0) -> None:
        """Send the acknowledgements queued, disconnect and end the thread."""

    @abc.abstractmethod
    def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Acknowledge deliveries after their commit (any thread), in the order given."""

    @abc.abstractmethod
    def publish(self, topic: str, payload: bytes) -> bool:
        """Send a receipt on ``topic`` (any thread); False (nothing sent) while not connected."""
