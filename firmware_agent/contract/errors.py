"""Errors raised by the footfall agent.

Every error the agent raises on purpose derives from :class:`AgentError`, so the
command line can turn any of them into one readable line and exit code::

    AgentError
    ├── ConfigError            a setting is missing, unknown or out of range
    ├── TruthError             a ground-truth file cannot be read (footfall-agent evaluate)
    ├── CaptureError           a capture cannot be read
    │   ├── NotACaptureError   the file is not pcap/pcapng (wrong magic, HTML page, empty)
    │   ├── UnsupportedLinkTypeError
    │   │                      the capture's link type is not an 802.11 one we parse
    │   └── LiveCaptureError   a live interface cannot be opened or read (names it)
    │       └── ChannelHopError
    │                          iw is missing or refuses a channel
    ├── MessageError           a message breaks the contract (firmware_agent.contract.messages)
    │   ├── SchemaError        a payload or envelope does not validate (names the field)
    │   └── SignatureError     a signature does not verify, or a key is malformed
    ├── SigningKeyError        the agent's signing key file is missing, unsafe or damaged
    ├── SpoolError             the spool database cannot be opened or written
    └── BrokerError            the broker cannot be reached, refuses us, or drops us

Malformed frames are *not* errors: the parser counts and skips them.
"""

from __future__ import annotations


class AgentError(Exception):
    """Base class of every error the agent raises on purpose."""


class ConfigError(AgentError):
    """A setting is unknown, missing or out of range."""


class TruthError(AgentError):
    """A ground-truth file (timestamp,people) cannot be read or does not fit the captures."""


class CaptureError(AgentError):
    """A capture cannot be read."""


class NotACaptureError(CaptureError):
    """The input is not a pcap or pcapng capture."""


class UnsupportedLinkTypeError(CaptureError):
    """The capture's link-layer type is not one the parser understands."""


class LiveCaptureError(CaptureError):
    """A live interface is missing, not in monitor mode, or cannot be opened or read."""


class ChannelHopError(LiveCaptureError):
    """Channel hopping cannot run: ``iw`` is missing or refuses a channel."""


class MessageError(AgentError):
    """A message, topic or id breaks the message contract."""


class SchemaError(MessageError):
    """A payload or envelope does not validate against its JSON Schema."""


class SignatureError(MessageError):
    """A signature does not verify, or a public key is malformed."""


class SigningKeyError(AgentError):
    """The agent's signing key file is missing, readable by others or damaged."""


class SpoolError(AgentError):
    """The spool database cannot be opened or written."""


class BrokerError(AgentError):
    """The broker cannot be reached, refuses the agent, or the connection is lost."""
