"""The store's registry: sites, and the agents enrolled at them with their public keys.

Every enrolment, revocation and prune bumps ``registry_state.version``; ingest reloads its
in-memory :class:`aggregator.registry.Registry` (what the verifier checks against) when the
version moves. (Named for the job, not ``registry.py``: that name is ingest's in-memory view.)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from aggregator.errors import RegistryError, StoreError
from aggregator.registry import AgentEntry, Registry, noisy
from aggregator.store.engine import Database
from aggregator.store.schema import agents, registry_state, sites
from firmware_agent.contract.errors import MessageError
from firmware_agent.contract.messages import AgentId, SiteId, public_key_text, verify_key_from_text


@dataclass(frozen=True, slots=True)
class SiteRow:
    id: str
    name: str
    timezone: str
    agents: int


def check_site(site: str) -> str:
    try:
        return SiteId(site).value
    except MessageError as exc:
        raise RegistryError(str(exc)) from exc


def check_new_site(site: str, timezone: str) -> str:
    """The site id, once it and the time zone (IANA) are acceptable (checked before anything
    is written, or a database made)."""
    site = check_site(site)
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise RegistryError(
            f"time zone must be an IANA name such as 'Europe/Paris', got {timezone!r}"
        ) from exc
    return site


def check_agent(agent: str) -> str:
    try:
        return AgentId(agent).value
    except MessageError as exc:
        raise RegistryError(str(exc)) from exc


def bump_version(conn: Connection) -> None:
    """Tell ingest the registry changed (it reloads it at its next batch)."""
    conn.execute(registry_state.update().values(version=registry_state.c.version + 1))


class Enrolment(Database):
    """Sites and agents (see the module docstring)."""

    def add_site(self, site: str, name: str, timezone: str, now: int) -> None:
        """Register a site; its time zone (IANA) decides its local hours and days."""
        site = check_new_site(site, timezone)
        with self.begin() as conn:
            exists = conn.execute(sa.select(sites.c.timezone).where(sites.c.id == site)).first()
            if exists is not None:
                raise RegistryError(f"site {site} already exists (time zone {exists[0]})")
            conn.execute(
                sites.insert().values(id=site, name=name or site, timezone=timezone, created_at=now)
            )

    def sites(self) -> list[SiteRow]:
        count = (
            sa.select(sa.func.count())
            .where(agents.c.site_id == sites.c.id)
            .scalar_subquery()
            .label("agents")
        )
        with self.begin() as conn:
            rows = conn.execute(
                sa.select(sites.c.id, sites.c.name, sites.c.timezone, count).order_by(sites.c.id)
            ).all()
        return [SiteRow(*row) for row in rows]

    def add_agent(
        self, site: str, agent: str, public_key: str, now: int, *, replace: bool = False
    ) -> None:
        """Enrol an agent with its Ed25519 public key (base64, as ``keygen`` prints it).
        ``replace`` gives an enrolled (or revoked) agent a new key and lifts a revocation."""
        site, agent = check_site(site), check_agent(agent)
        try:
            key_text = public_key_text(verify_key_from_text(public_key))
        except MessageError as exc:
            raise RegistryError(f"agent {site}/{agent}: {exc}") from exc
        with self.begin() as conn:
            if conn.execute(sa.select(sites.c.id).where(sites.c.id == site)).first() is None:
                raise RegistryError(
                    f"site {site} does not exist: add it first "
                    f"(footfall-aggregator sites add {site} --timezone ZONE)"
                )
            row = conn.execute(
                sa.select(agents.c.agent_key, agents.c.revoked_at).where(
                    agents.c.site_id == site, agents.c.agent_id == agent
                )
            ).first()
            if row is None:
                conn.execute(
                    agents.insert().values(
                        site_id=site, agent_id=agent, public_key=key_text, enrolled_at=now
                    )
                )
            elif not replace:
                state = "revoked" if row.revoked_at is not None else "enrolled"
                raise RegistryError(
                    f"agent {site}/{agent} is already {state}; --replace enrols the new key"
                    + (" and lifts the revocation" if row.revoked_at is not None else "")
                )
            else:
                conn.execute(
                    agents.update()
                    .where(agents.c.agent_key == row.agent_key)
                    .values(public_key=key_text, enrolled_at=now, revoked_at=None)
                )
            bump_version(conn)

    def add_agents(self, site: str, keys: Mapping[str, str], now: int) -> None:
        """Enrol many new agents of one site at once: agent id -> public key (an installer's
        list; one transaction)."""
        site = check_site(site)
        rows = []
        for agent, public_key in keys.items():
            try:
                key_text = public_key_text(verify_key_from_text(public_key))
            except MessageError as exc:
                raise RegistryError(f"agent {site}/{agent}: {exc}") from exc
            rows.append(
                {
                    "site_id": site,
                    "agent_id": check_agent(agent),
                    "public_key": key_text,
                    "enrolled_at": now,
                }
            )
        try:
            with self.begin() as conn:
                conn.execute(agents.insert(), rows)
                bump_version(conn)
        except StoreError as exc:
            raise RegistryError(
                f"cannot enrol {len(rows)} agents of site {site} (is the site there, and are "
                f"they new?): {exc}"
            ) from exc

    def revoke_agent(self, site: str, agent: str, now: int) -> None:
        """Refuse the agent's messages from now on (its stored windows stay)."""
        site, agent = check_site(site), check_agent(agent)
        with self.begin() as conn:
            done = conn.execute(
                agents.update()
                .where(
                    agents.c.site_id == site,
                    agents.c.agent_id == agent,
                    agents.c.revoked_at.is_(None),
                )
                .values(revoked_at=now)
            )
            if done.rowcount == 0:
                known = conn.execute(
                    sa.select(agents.c.revoked_at).where(
                        agents.c.site_id == site, agents.c.agent_id == agent
                    )
                ).first()
                if known is None:
                    raise RegistryError(f"agent {site}/{agent} is not enrolled")
                raise RegistryError(f"agent {site}/{agent} is already revoked")
            bump_version(conn)

    def registry_version(self) -> int:
        with self.begin(read_only=True) as conn:  # SQLite: never waits for the write lock
            return int(conn.execute(sa.select(registry_state.c.version)).scalar_one())

    def registry(self) -> Registry:
        """Every enrolled agent (revoked ones too: their messages are refused by name)."""
        with self.begin(read_only=True) as conn:
            version = int(conn.execute(sa.select(registry_state.c.version)).scalar_one())
            rows = conn.execute(
                sa.select(
                    agents.c.agent_key,
                    agents.c.site_id,
                    agents.c.agent_id,
                    agents.c.public_key,
                    agents.c.revoked_at,
                    agents.c.pruned_before,
                    agents.c.meta,
                    sites.c.timezone,
                ).join_from(agents, sites, agents.c.site_id == sites.c.id)
            ).all()
        entries = {
            (row.site_id, row.agent_id): AgentEntry(
                key=row.agent_key,
                site=row.site_id,
                agent=row.agent_id,
                verify_key=verify_key_from_text(row.public_key),
                revoked=row.revoked_at is not None,
                zone=row.timezone,
                pruned_before=row.pruned_before,
                noisy=noisy(json.loads(row.meta) if row.meta else None),
            )
            for row in rows
        }
        return Registry(version, entries)
