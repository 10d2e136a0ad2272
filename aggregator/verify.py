"""Every message ingest receives passes here: accepted with its agent, or refused with a reason.

The checks, in order (``docs/messages.md``, "Verifying"): size limit; UTF-8; JSON (no NaN,
not nested past 1,024 levels); the envelope's and the payload's JSON Schemas, strictly
(unknown fields refused, control characters refused, dates that exist, patterns matching the
whole string, integers that are JSON integers); the topic's site, agent and kind equal the
payload's; a counts window's length is one the agent allows, its start is aligned to it and
within :class:`WindowLimits` of now, and its counts make sense together (:data:`SENSE`); the
agent is enrolled and not revoked; the signature is canonical base64 and the Ed25519
signature over the payload's canonical JSON verifies with the enrolled key; a counts window
does not start before the time up to which retention deleted the agent's windows (a replay).
A counts window's content is checked before its signature but refused only after the signature
verified (a window with both wrong is ``bad_signature``): such a refusal names a window its
agent really sent, which ingest settles (:attr:`Refusal.settles`, docs/aggregator.md).

A refusal is a value, not an exception: :class:`Refusal` carries one of :data:`REASONS` and a
detail that names the field or agent at fault and never quotes the payload (no values, only
field names, types and the schema's own limits).

The schemas are the contract's own files, checked by the contract's
:class:`~firmware_agent.contract.schema_check.SchemaCheck` (strict: patterns match whole
strings, an integer is a JSON integer; why ours and not a library's, measured, in its module).
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import nacl.exceptions
import orjson

from aggregator.registry import AgentEntry, Registry
from firmware_agent.contract.errors import MessageError
from firmware_agent.contract.fields import DWELL_FIELDS
from firmware_agent.contract.messages import (
    VERSIONS,
    Topic,
    canonical_json,
    counts_v2_errors,
    known_schemas,
)
from firmware_agent.contract.schema_check import SchemaCheck, check_for, control_characters

__all__ = [
    "REASONS",
    "SENSE",
    "WINDOW_LENGTHS",
    "Accepted",
    "Refusal",
    "Verifier",
    "WindowLimits",
]

# Why a message was not stored. The first group is decided here, before the store (the last
# two of it when the verifier or the store failed on this message alone: ingest quarantines
# it, aggregator.ingest); the second by the store (a message it already holds).
REASONS: dict[str, str] = {
    "too_large": "larger than ingest.max_message_bytes",
    "not_utf8": "not UTF-8",
    "not_json": "not JSON",
    "too_deep": "JSON nested too deeply",
    "bad_topic": "not on a footfall/v1/<site>/<agent>/<kind> topic",
    "schema": "does not validate against its JSON Schema",
    "topic_mismatch": "the topic's site, agent or kind differ from the payload's",
    "window_length": "window_s is not a length an agent can have (a divisor of 3600, 60 to 3600)",
    "window_unaligned": "window_start is not a multiple of window_s since 1970 (UTC)",
    "window_range": "window_start too far in the past or the future (ingest.max_window_*)",
    "inconsistent": "counts that cannot be together (a part above its whole, a sum that fails)",
    "unknown_agent": "from an agent that is not enrolled",
    "revoked_agent": "from a revoked agent",
    "sig_encoding": "the signature is not canonical base64 (other bits, same bytes)",
    "bad_signature": "the signature does not verify with the enrolled key",
    "expired": "a window older than what retention already deleted (a replay)",
    "verify_failed": "verifying it raised an unexpected error (quarantined)",
    "store_failed": "the database refused it alone (quarantined)",
    "duplicate": "already stored under this agent and seq (a redelivery or a replay)",
    "seq_conflict": "a different message under an agent and seq already stored",
    "duplicate_window": "a window already stored for this agent under another seq",
}


@dataclass(frozen=True, slots=True)
class Refusal:
    """A message that is not stored, and why."""

    reason: str
    detail: str
    site: str = ""  # from the topic, when it names one
    agent: str = ""
    # (agent key, seq) of a counts window whose signature verified with the enrolled key but
    # whose content is refused (window_length, window_unaligned, window_range, inconsistent,
    # expired): the agent really sent it, it will never be stored, so ingest settles it (the
    # agent's receipt covers it). Never set otherwise: not for a schema refusal (the seq of a
    # payload that does not validate is not to be trusted, and an agent speaking a newer
    # schema must keep its windows), nor for a message whose signature did not verify.
    settles: tuple[int, int] | None = None

    @property
    def who(self) -> str:
        return f"{self.site}/{self.agent}" if self.site else "(no agent)"


@dataclass(slots=True)  # not frozen: thousands a second, and frozen ones are slow to make
class Accepted:
    """A verified message from an enrolled agent."""

    kind: str
    payload: dict[str, Any] = field(repr=False)
    signature: str = field(repr=False)  # base64, as received
    agent: AgentEntry
    received_at: int  # Unix seconds
    canonical: str = field(repr=False)  # the payload's canonical JSON: what the signature covers
    window_start: int  # counts: the window's start; status: its time ("at"); meta: 0


@functools.lru_cache(maxsize=1 << 14)
def _topic(text: str) -> Topic | None:
    try:
        return Topic.parse(text)
    except MessageError:
        return None


def canonical(kind: str, payload: Mapping[str, Any]) -> bytes:
    """:func:`canonical_json` of a validated payload; orjson (ten times faster) where it gives
    the same bytes: counts and status payloads whose numbers are all ``int`` (counts v2's
    ``occupancy_mean`` is a float: Python's own text for it) and whose strings are ASCII
    without escapes (their patterns)."""
    if kind != "meta" and _all_int(payload):
        return orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)
    return canonical_json(payload)


def _all_int(payload: Mapping[str, Any]) -> bool:
    for value in payload.values():
        if type(value) is float:
            return False
        if type(value) is dict and not _all_int(value):
            return False
    return True


# --- sense: what the counts of one window say about each other -----------------------------

# Every length an agent's count.window_s can have: a divisor of 3600, 60 to 3600.
WINDOW_LENGTHS = frozenset(n for n in range(60, 3601) if 3600 % n == 0)


@dataclass(frozen=True, slots=True)
class Sum:
    """``whole`` is the sum of ``parts`` (checked when every one is published)."""

    whole: str
    parts: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Within:
    """``part`` is at most ``whole`` (checked when both are published)."""

    part: str
    whole: str


Rule = Sum | Within

# The relations a payload's counts must satisfy, per (kind, schema version). A field is named
# as in the payload, a dwell band as ``dwell_minutes.<band>``; a rule with a field that is
# null (suppressed) or absent is skipped. An agent whose meta says it adds differential-privacy
# noise in standard mode (each count noised on its own) is held only to the schema: its sums
# need not add up (firmware_agent.stages.privacy; strict mode corrects after the noise, so its
# relations hold). A new schema version adds its own row here.
SENSE: dict[tuple[str, int], tuple[Rule, ...]] = {
    ("counts", 1): (
        Sum("devices", ("visitors", "passersby")),
        Sum("visits_ended", DWELL_FIELDS),
        Within("devices_randomised", "devices"),
        Within("visitors", "devices"),
        Within("passersby", "devices"),
        Within("devices", "devices_epoch"),
    ),
    # v2 (firmware_agent/stages/people.py): an arrived visit that ends counts in visits_ended and in
    # one dwell band; the mean of the window's occupancy samples is at most their peak.
    # People and devices are not compared: a person's chain links several addresses, and a
    # visit counts in the window of its instant, not in each window it was heard in.
    ("counts", 2): (
        Sum("visits_ended", DWELL_FIELDS),
        Within("devices_randomised", "devices"),
        Within("occupancy_mean", "occupancy_peak"),
    ),
}


def sense_check(rules: tuple[Rule, ...]) -> Callable[[Mapping[str, Any]], str | None]:
    """A payload's first broken rule in words (field names and their values, which are
    counts), sums first, else None. The fields the rules name are read once: v1's rules
    cost about 4 µs a message here, against about 60 µs for the signature."""
    sums = [(r.whole, r.parts) for r in rules if isinstance(r, Sum)]
    withins = [(r.part, r.whole) for r in rules if isinstance(r, Within)]
    names = {w for w, _ in sums} | {p for _, parts in sums for p in parts}
    names |= {n for pair in withins for n in pair}
    paths = [(name, *name.partition(".")[::2]) for name in sorted(names)]

    def check(payload: Mapping[str, Any]) -> str | None:
        got: dict[str, int | float] = {}
        for name, outer, inner in paths:
            value = payload.get(outer)
            if inner and type(value) is dict:
                value = value.get(inner)
            if type(value) is int or type(value) is float:
                got[name] = value
        for whole_name, parts in sums:
            whole = got.get(whole_name)
            if whole is None:
                continue
            total: int | float = 0
            for name in parts:
                part = got.get(name)
                if part is None:
                    break
                total += part
            else:
                if total != whole:
                    return f"{whole_name} is {whole} but {' + '.join(parts)} is {total}"
        for part_name, whole_name in withins:
            part, whole = got.get(part_name), got.get(whole_name)
            if part is not None and whole is not None and part > whole:
                return f"{part_name} ({part}) is more than {whole_name} ({whole})"
        return None

    return check


@dataclass(frozen=True, slots=True)
class WindowLimits:
    """How far a counts window's start may lie from the time it is received: ``past_s``
    before (ingest.max_window_age_days: an agent's spool, a replayed capture) and
    ``future_s`` after (ingest.max_window_lead_s: clock skew; a closed window never starts
    in the future)."""

    past_s: int = 3650 * 86400
    future_s: int = 3600


# --- the verifier --------------------------------------------------------------------------


class Verifier:
    """Turns (topic, bytes) into :class:`Accepted` or :class:`Refusal`; keeps time spent."""

    def __init__(self, max_message_bytes: int, limits: WindowLimits | None = None) -> None:
        self.max_message_bytes = max_message_bytes
        self.limits = limits or WindowLimits()
        self.sense = {
            v: sense_check(rules) for (kind, v), rules in SENSE.items() if kind == "counts"
        }
        self.envelope = check_for("envelope.v1")
        self.payloads: dict[tuple[str, int | float], SchemaCheck] = {
            (kind, v): check_for(f"{kind}.v{v}")
            for kind, versions in VERSIONS.items()
            for v in versions
        }
        self.parse_s = 0.0  # decoding, JSON, schemas, topic
        self.verify_s = 0.0  # canonical JSON and Ed25519
        self._lock = threading.Lock()

    def check(
        self, topic: str, data: bytes, registry: Registry, received_at: int, size: int = -1
    ) -> Accepted | Refusal:
        """Verify one message; ``size`` is its size as sent when ``data`` is not all of it
        (the session kept none of a message larger than its maximum packet size)."""
        started = time.perf_counter()
        outcome = self._parse(topic, data, len(data) if size < 0 else size)
        parsed = time.perf_counter()
        if isinstance(outcome, Refusal):
            result: Accepted | Refusal = outcome
        else:
            where, payload, signature, when = outcome
            result = self._verify(where, payload, signature, when, registry, received_at)
        done = time.perf_counter()
        with self._lock:
            self.parse_s += parsed - started
            self.verify_s += done - parsed
        return result

    def _parse(
        self, topic: str, data: bytes, size: int
    ) -> Refusal | tuple[Topic, dict[str, Any], str, int]:
        where = _topic(topic)
        if where is None:
            return Refusal("bad_topic", "the topic is not footfall/v1/<site>/<agent>/<kind>")
        site, agent = where.site.value, where.agent.value

        def refuse(reason: str, detail: str) -> Refusal:
            return Refusal(reason, f"{where.kind} message: {detail}", site, agent)

        if size > self.max_message_bytes:
            return refuse(
                "too_large",
                f"{size} bytes, more than ingest.max_message_bytes ({self.max_message_bytes})",
            )
        try:
            text = data.decode()
        except UnicodeDecodeError as exc:
            return refuse("not_utf8", f"byte {exc.start} is not UTF-8")
        try:
            envelope = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            why = str(exc).split(":")[0]
            if "depth limit" in why:
                return refuse("too_deep", "JSON nested more than 1024 levels deep")
            return refuse("not_json", f"not JSON ({why})")
        error = self.envelope.errors(envelope)
        if error is not None:
            return refuse("schema", f"envelope: {error}")
        payload = envelope["payload"]
        kind, version = payload.get("kind"), payload.get("v")
        check = None
        if isinstance(kind, str) and isinstance(version, int | float):
            check = self.payloads.get((kind, version))
        if check is None:
            return refuse(
                "schema",
                f"$.kind and $.v must name a known schema ({known_schemas()})",
            )
        error = check.errors(payload)
        if error is None and (kind, version) == ("counts", 2):
            error = counts_v2_errors(payload)
        if error is None and "\\" in text:  # only an escape can make a control character
            control = control_characters(payload)
            error = None if control is None else "$" + control
        if error is not None:
            return refuse("schema", error)
        if (payload["site"], payload["agent"], payload["kind"]) != (site, agent, where.kind):
            return refuse(
                "topic_mismatch",
                f"the payload names {payload['kind']} of {payload['site']}/{payload['agent']} "
                f"but came on the {where.kind} topic of {site}/{agent}",
            )
        when = 0
        stamp = payload.get("window_start", payload.get("at"))
        if isinstance(stamp, str):
            try:
                when = int(datetime.fromisoformat(stamp).timestamp())
            except ValueError:
                field_name = "window_start" if kind == "counts" else "at"
                return refuse("schema", f"$.{field_name}: not a real date and time")
        return where, payload, envelope["sig"], when

    def _sense(
        self, where: Topic, payload: dict[str, Any], when: int, received_at: int, exact: bool
    ) -> Refusal | None:
        """A counts window whose length, start or counts cannot be right; None if they can."""
        site, agent = where.site.value, where.agent.value
        window_s = payload["window_s"]
        if window_s not in WINDOW_LENGTHS:
            return Refusal(
                "window_length",
                f"counts window_s={window_s}: not a divisor of 3600 from 60 to 3600",
                site,
                agent,
            )
        if when % window_s:
            return Refusal(
                "window_unaligned",
                f"counts window_start is {when % window_s} s past a multiple of "
                f"window_s={window_s}",
                site,
                agent,
            )
        lead = when - received_at
        if lead > self.limits.future_s or -lead > self.limits.past_s:
            return Refusal(
                "window_range",
                f"counts window_start is {abs(lead)} s {'after' if lead > 0 else 'before'} "
                f"its arrival (limits: {self.limits.past_s // 86400} days before, "
                f"{self.limits.future_s} s after)",
                site,
                agent,
            )
        sense = self.sense.get(payload["v"]) if exact else None
        nonsense = None if sense is None else sense(payload)
        if nonsense is not None:
            return Refusal("inconsistent", f"counts: {nonsense}", site, agent)
        return None

    def _verify(
        self,
        where: Topic,
        payload: dict[str, Any],
        signature: str,
        when: int,
        registry: Registry,
        received_at: int,
    ) -> Accepted | Refusal:
        site, agent, kind = where.site.value, where.agent.value, where.kind
        entry = registry.get(site, agent)
        if entry is None:
            return Refusal(
                "unknown_agent", f"{kind} message from an agent that is not enrolled", site, agent
            )
        if entry.revoked:
            return Refusal("revoked_agent", f"{kind} message from a revoked agent", site, agent)
        nonsense = None
        if kind == "counts":  # checked first, refused only once the signature verified
            nonsense = self._sense(where, payload, when, received_at, not entry.noisy)
        raw = base64.b64decode(signature)  # the schema's pattern: 86 base64 characters, "=="
        if base64.b64encode(raw).decode() != signature:
            return Refusal(
                "sig_encoding",
                f"{kind} message: the signature's last character has bits set that base64 "
                "drops (the same signature, spelled otherwise)",
                site,
                agent,
            )
        signed = canonical(kind, payload)
        try:
            entry.verify_key.verify(signed, raw)
        except (nacl.exceptions.CryptoError, ValueError):
            return Refusal(
                "bad_signature",
                f"{kind} message: the signature does not verify with the enrolled key",
                site,
                agent,
            )
        if nonsense is None and kind == "counts" and when < entry.pruned_before:
            nonsense = Refusal(
                "expired",
                f"counts window_start is before {_utc(entry.pruned_before)}, up to which "
                "retention deleted this agent's windows",
                site,
                agent,
            )
        if nonsense is not None:
            return dataclasses.replace(nonsense, settles=(entry.key, int(payload["seq"])))
        return Accepted(kind, payload, signature, entry, received_at, signed.decode(), when)


def _utc(unix_s: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix_s))
