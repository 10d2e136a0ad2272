"""What ingest knows about enrolled agents: a snapshot of the registry the store keeps.

The store (:mod:`aggregator.store`) keeps sites and agents; ingest holds a :class:`Registry`
snapshot in memory and reloads it whenever the store's registry version changes (every
``agents add`` or ``agents revoke`` bumps it, and so do retention and a meta message that
changes whether the agent's counts carry noise), so a revocation takes effect at the next
batch.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import nacl.signing

__all__ = ["AgentEntry", "Registry", "noisy"]


@dataclass(frozen=True, slots=True)
class AgentEntry:
    """One enrolled agent, as ingest needs it."""

    key: int  # the store's number for the agent
    site: str
    agent: str
    verify_key: nacl.signing.VerifyKey = field(repr=False)
    revoked: bool
    zone: str  # the site's IANA time zone
    pruned_before: int  # retention deleted this agent's windows that started before (Unix s)
    noisy: bool = False  # its meta says each count carries its own noise (standard mode + DP)


@dataclass(frozen=True)
class Registry:
    """Enrolled agents by (site, agent), and the registry version they were read at."""

    version: int
    agents: Mapping[tuple[str, str], AgentEntry]

    def get(self, site: str, agent: str) -> AgentEntry | None:
        return self.agents.get((site, agent))

    @functools.cached_property
    def sites(self) -> frozenset[str]:
        """The sites with an agent enrolled."""
        return frozenset(site for site, _ in self.agents)


def noisy(meta: Mapping[str, Any] | None) -> bool:
    """Whether an agent's meta payload says each count carries its own differential-privacy
    noise (standard mode: its counts need not add up; strict mode corrects them after it)."""
    privacy = (meta or {}).get("privacy") or {}
    return privacy.get("mode") == "standard" and privacy.get("dp_epsilon") is not None
