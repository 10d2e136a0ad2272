"""Errors raised by the footfall agent.

Every error the agent raises on purpose derives from :class:`AgentError`, so the
command line can turn any of them into one readable line and exit code::

    AgentError
    ├── ConfigError            a setting is missing, unknown or out of range
    └── CaptureError           a capture cannot be read
        ├── NotACaptureError   the file is not pcap/pcapng (wrong magic, HTML page, empty)
        └── UnsupportedLinkTypeError
                               the capture's link type is not an 802.11 one we parse

Malformed frames are *not* errors: the parser counts and skips them.
"""

from __future__ import annotations


class AgentError(Exception):
    """Base class of every error the agent raises on purpose."""


class ConfigError(AgentError):
    """A setting is unknown, missing or out of range."""


class CaptureError(AgentError):
    """A capture cannot be read."""


class NotACaptureError(CaptureError):
    """The input is not a pcap or pcapng capture."""


class UnsupportedLinkTypeError(CaptureError):
    """The capture's link-layer type is not one the parser understands."""
