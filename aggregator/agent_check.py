"""``footfall-aggregator agents check SITE AGENT``: the installer's path seen from the aggregator.

The agent's ``doctor`` sees whether a receipt came back, not why none did; the store knows.
One table (:mod:`firmware_agent.contract.checks`), a fix per failure, in the order the path is
walked:

* **site**: the admin made it (``sites add``);
* **enrolment**: the agent's key is enrolled and not revoked (``enrol``, or the web page);
* **refusals**: messages from this agent that were not stored, by reason (a key that does not
  verify, a revoked agent); a warning once windows are stored anyway. Ingest counts those of an
  agent that is not enrolled under no agent (made-up topics add no rows), so they are not this
  agent's: the enrolment line says how many of its site's there were;
* **stored**: windows of this agent are in the store: the last one, its seq, when seen;
* **status**: its last status message (online, offline, its spool) — a warning if offline.
"""

from __future__ import annotations

from aggregator.store import AgentHealth, Store
from aggregator.verify import REASONS
from firmware_agent.contract.checks import FAIL, OK, SKIP, WARN, Finding
from firmware_agent.contract.messages import utc_text

__all__ = ["check_agent"]


def check_agent(store: Store, site: str, agent: str) -> list[Finding]:
    """The findings for one agent of one site, read from the store."""
    if site not in {s.id for s in store.sites()}:
        return [
            Finding(
                "site",
                FAIL,
                f"site {site} does not exist",
                f"an admin: footfall-aggregator sites add {site} --timezone ZONE",
            ),
            *(Finding(check, SKIP, "needs the site") for check in _AFTER_SITE),
        ]
    found = [Finding("site", OK, f"site {site} exists")]
    health = next((a for a in store.agents(site) if a.agent == agent), None)
    counts = store.refusal_counts()
    found.append(_enrolment(site, agent, health, counts.get(("unknown_agent", site, ""), 0)))
    refused = {reason: n for (reason, s, a), n in counts.items() if (s, a) == (site, agent)}
    stored = health is not None and health.windows > 0
    found.append(_refusals(refused, stored))
    if health is None or not stored:
        found.append(
            Finding(
                "stored",
                FAIL,
                f"no window of {site}/{agent} is stored",
                "on the Pi: systemctl start footfall-agent, then footfall-agent "
                "doctor (broker login, ACL); windows arrive as each one closes "
                "(count.window_s)",
            )
        )
    else:
        found.append(_stored(health))
    found.append(_status(health))
    return found


_AFTER_SITE = ("enrolment", "refusals", "stored", "status")


def _enrolment(site: str, agent: str, health: AgentHealth | None, unenrolled: int) -> Finding:
    if health is None:
        refused = f" ({unenrolled} messages of this site's agents not enrolled were refused)"
        return Finding(
            "enrolment",
            FAIL,
            f"agent {site}/{agent} is not enrolled" + (refused if unenrolled else ""),
            "on the Pi, footfall-agent enrol prints the command (footfall-aggregator "
            f"enrol ...); or an installer enrols it on the web page /sites/{site}",
        )
    if health.revoked_at is not None:
        return Finding(
            "enrolment",
            FAIL,
            f"agent {site}/{agent} was revoked at {utc_text(health.revoked_at)}",
            "footfall-aggregator enrol --replace "
            "with the agent's key (footfall-agent enrol prints it)",
        )
    return Finding(
        "enrolment",
        OK,
        f"enrolled at {utc_text(health.enrolled_at)}, key {health.public_key[:12]}...",
    )


def _refusals(refused: dict[str, int], stored: bool) -> Finding:
    if not refused:
        return Finding("refusals", OK, "no message of this agent was refused")
    detail = "; ".join(
        f"{n} {reason} ({REASONS.get(reason, reason)})" for reason, n in sorted(refused.items())
    )
    fix = (
        "bad_signature: enrol the key the agent has now (footfall-agent enrol prints it; "
        "enrol --replace); unknown_agent: enrol it"
    )
    return Finding("refusals", WARN if stored else FAIL, detail, "" if stored else fix)


def _stored(health: AgentHealth) -> Finding:
    last = utc_text(health.last_window) if health.last_window is not None else "-"
    seen = utc_text(health.last_seen_at) if health.last_seen_at is not None else "-"
    return Finding(
        "stored",
        OK,
        f"{health.windows} windows, the last of "
        f"{last} (seq {health.last_seq}), last seen {seen}, "
        f"{health.missing} missing",
    )


def _status(health: AgentHealth | None) -> Finding:
    if health is None or health.state is None:
        return Finding("status", SKIP, "no status message yet")
    at = utc_text(health.status_at) if health.status_at is not None else "-"
    detail = f"{health.state} since {at} ({health.cause}), {health.spool_pending} windows spooled"
    if health.state != "online":
        return Finding("status", WARN, detail, "on the Pi: systemctl status footfall-agent")
    if health.count_evictions or health.estimate_evictions:
        return Finding(
            "status",
            WARN,
            f"{detail}; its tables were at their ceiling (eviction rounds since it started: "
            f"{health.count_evictions} device table, {health.estimate_evictions} estimator)",
            "raise count.max_devices or estimate.max_fingerprints if the Pi's memory allows "
            "(hardware/README.md)",
        )
    return Finding("status", OK, detail)
