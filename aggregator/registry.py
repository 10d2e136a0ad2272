"""What ingest knows about enrolled agents: a snapshot of the registry the store keeps.

The store (:mod:`aggregator.store`) keeps sites and agents; ingest holds a :class:`Registry`
snapshot in memory and reloads it whenever the store's registry version changes (every
``agents add`` or ``agents revoke`` bumps it), so a revocation takes effect at the next batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import nacl.signing

__all__ = ["AgentEntry", "Registry"]


@dataclass(frozen=True, slots=True)
class AgentEntry:
    """One enrolled agent, as ingest needs it."""

    key: int  # the store's number for the agent
    site: str
    agent: str
    verify_key: nacl.signing.VerifyKey = field(repr=False)
    revoked: bool
    zone: str  # the site's IANA time zone
    pruned_through_seq: int  # windows up to this seq were deleted by retention


@dataclass(frozen=True, slots=True)
class Registry:
    """Enrolled agents by (site, agent), and the registry version they were read at."""

    version: int
    agents: Mapping[tuple[str, str], AgentEntry]

    def get(self, site: str, agent: str) -> AgentEntry | None:
        return self.agents.get((site, agent))
