"""What both programs' MQTT sessions share: the broker settings' base, the reason codes in
words, and the reconnection backoff.

The agent publishes through paho (:mod:`firmware_agent.service.publish`), ingest reads through
its own session (:mod:`aggregator.mqtt`); each extends :class:`BrokerBase` with its own settings
(the agent's failover hosts and receipts, ingest's JetStream servers), and both check the
common ones, build their TLS context, name a broker's refusal and wait before reconnecting
here, so an operator reads the same sentence from either program. Standard library only: no
paho (the codes are the integers of the MQTT 5 specification, section 2.4; paho's
``ReasonCode`` carries the same integer in ``.value``).
"""

from __future__ import annotations

import random
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from firmware_agent.contract.errors import ConfigError
from firmware_agent.contract.resolve import setting

__all__ = ["PROTOCOLS", "Backoff", "BrokerBase", "reason_in_words"]

PROTOCOLS = ("5", "3.1.1")
"""The MQTT versions both programs speak (``broker.protocol``)."""

_REASONS = {
    0x01: "it does not speak MQTT 5 (try broker.protocol = '3.1.1')",  # a 3.1.1 CONNACK
    0x04: "disconnected with the will message",
    0x80: "the connection was closed (unspecified error)",
    0x81: "malformed packet",
    0x82: "protocol error",
    0x83: "implementation specific error",
    0x84: "it does not speak this MQTT version (try broker.protocol = '3.1.1')",
    0x85: "client identifier not valid",
    0x86: "bad user name or password (check broker.username and broker.password)",
    0x87: "not authorised (check broker.username and broker.password, and that the broker's "
    "ACL lets this account use its topics)",
    0x88: "server unavailable",
    0x89: "server busy",
    0x8A: "banned",
    0x8B: "server shutting down",
    0x8D: "no answer within the keep-alive (broker.keepalive_s)",
    0x8E: "session taken over: another client connected with the same client id",
    0x8F: "topic filter invalid",
    0x90: "topic name invalid",
    0x93: "receive maximum exceeded",
    0x95: "packet too large",
    0x97: "quota exceeded",
    0x99: "payload format invalid",
    0x9C: "use another server",
    0x9D: "server moved",
    0x9E: "shared subscriptions not supported",
    0x9F: "connection rate exceeded",
    0xA2: "wildcard subscriptions not supported",
}
_RETURN_CODES_311 = {  # CONNACK return codes of MQTT 3.1.1, and SUBACK's failure
    0x01: "it does not speak MQTT 3.1.1",
    0x02: "client identifier rejected",
    0x03: "server unavailable",
    0x04: _REASONS[0x86],
    0x05: _REASONS[0x87],
    0x80: "refused",
}


def reason_in_words(code: int, v5: bool = True, default: str | None = None) -> str:
    """An MQTT 5 reason code (or, ``v5`` False, a 3.1.1 return code) as words an operator can
    act on; a code without words here is ``default`` (else its number)."""
    words = (_REASONS if v5 else _RETURN_CODES_311).get(code, default)
    return f"reason code 0x{code:02x}" if words is None else words


@dataclass(slots=True)
class Backoff:
    """Capped exponential backoff with equal jitter: after ``quick`` retries every ``quick_s``,
    retry n waits between d/2 and d, d = min(max_s, initial_s * 2**n), so clients cut off
    together do not return together."""

    initial_s: float
    max_s: float
    quick: int = 0
    quick_s: float = 0.1
    attempt: int = 0

    def next(self) -> float:
        n = self.attempt
        self.attempt += 1
        if n < self.quick:
            return self.quick_s
        ceiling = min(self.max_s, self.initial_s * 2.0 ** min(n - self.quick, 32))
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def reset(self) -> None:
        self.attempt = 0


@dataclass(frozen=True, slots=True)
class BrokerBase:
    """Where an MQTT broker is and how to reach it: the settings both programs have, checked
    where made (:meth:`problems`; a subclass adds its own), and their TLS context. A
    setting that cannot be used raises :attr:`config_error`, the program's own."""

    config_error: ClassVar[type[Exception]] = ConfigError
    host: str = setting("localhost", "MQTT broker host name or address.")
    port: int = setting(1883, "MQTT broker port (8883 is usual with TLS).")
    username: str = setting("", "User name at the broker (empty: none).")
    password: str = setting("", "Password at the broker.", secret=True)
    tls_ca: str = setting(
        "",
        "CA certificate file (PEM) that signed the broker's certificate; 'system' uses the "
        "system's CAs; empty: no TLS.",
    )
    tls_cert: str = setting("", "Client certificate file (PEM) for TLS, if the broker wants one.")
    tls_key: str = setting("", "Private key file (PEM) of the client certificate.")
    keepalive_s: int = setting(
        60, "Keep-alive (s): a silent connection is declared lost after about twice this."
    )
    connect_timeout_s: int = setting(10, "How long (s) a connection attempt may take.")
    backoff_max_s: int = setting(60, "Longest wait (s) between reconnection attempts.")
    protocol: str = setting(
        "5", "MQTT version: '5' or '3.1.1' (no message needs 5).", choices=PROTOCOLS
    )

    def __post_init__(self) -> None:
        if problems := self.problems():
            raise self.config_error("; ".join(problems))

    def problems(self) -> list[str]:
        """What is wrong with these settings, each in words (empty: nothing)."""
        checks = (
            (bool(self.host), "broker.host must not be empty"),
            (1 <= self.port <= 65535, f"broker.port must be between 1 and 65535, got {self.port}"),
            (
                self.protocol in PROTOCOLS,
                f"broker.protocol must be '5' or '3.1.1', got {self.protocol!r}",
            ),
            (
                1 <= self.keepalive_s <= 65535,
                f"broker.keepalive_s must be between 1 and 65535, got {self.keepalive_s}",
            ),
            (
                1 <= self.connect_timeout_s <= 300,
                f"broker.connect_timeout_s must be between 1 and 300, got {self.connect_timeout_s}",
            ),
            (
                1 <= self.backoff_max_s <= 3600,
                f"broker.backoff_max_s must be between 1 and 3600, got {self.backoff_max_s}",
            ),
            (
                not (self.password and not self.username),
                "broker.password is set but broker.username is empty",
            ),
            (
                bool(self.tls_cert) == bool(self.tls_key),
                "broker.tls_cert and broker.tls_key go together: set both or neither",
            ),
            (
                not self.tls_cert or bool(self.tls_ca),
                "broker.tls_cert needs TLS: set broker.tls_ca (a CA file or 'system')",
            ),
        )
        return [message for ok, message in checks if not ok]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context (None without TLS): TLS 1.2 at least, the host name checked; a file
        that cannot be used is named."""
        if not self.tls_ca:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.tls_ca == "system":
            context.load_default_certs()
        else:
            self._readable(self.tls_ca, "broker.tls_ca")
            try:
                context.load_verify_locations(cafile=self.tls_ca)
            except ssl.SSLError as exc:
                raise self.config_error(
                    f"broker.tls_ca {self.tls_ca}: not a PEM CA certificate ({exc.reason})"
                ) from exc
        if self.tls_cert:
            self._readable(self.tls_cert, "broker.tls_cert")
            self._readable(self.tls_key, "broker.tls_key")
            try:
                context.load_cert_chain(self.tls_cert, self.tls_key)
            except ssl.SSLError as exc:
                raise self.config_error(
                    f"broker.tls_cert {self.tls_cert} and broker.tls_key {self.tls_key}: not a "
                    f"PEM certificate and its key ({exc.reason})"
                ) from exc
        return context

    def _readable(self, path: str, setting: str) -> None:
        try:
            Path(path).open("rb").close()
        except OSError as exc:
            raise self.config_error(f"{setting} {path}: cannot read: {exc.strerror}") from exc
