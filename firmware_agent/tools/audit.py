"""The privacy reviewer's check of what agents actually publish (``footfall-agent audit``).

It trusts nothing the agents say about themselves except what it can check on the wire.
Each message, from a broker subscription or from a capture of the agents' MQTT traffic
(:mod:`firmware_agent.tools.mqtt_capture`), goes through:

* **contract**: UTF-8 JSON envelope, payload valid against its strict schema, topic ids
  equal to payload ids;
* **signature**: Ed25519 with the agent's public key, when the reviewer gives it;
* **identifier-like values** anywhere in the message: a MAC address in any spelling, a run
  of 12 or more hex digits (other than the epoch label), a base64-like blob, an integer of
  more than 40 bits, a string in a place that holds no free text (an SSID would be one);
* **the declared privacy mode** (the agent's retained ``meta``, which must be there: an agent
  that declares none fails): *k* at least the floor; no count of people, visits or devices
  from 1 to *k*-1; no relation of a message (``devices = devices_randomised + global``,
  ``visits_ended =`` the dwell bands; in counts v1 also ``devices = visitors + passersby``)
  that gives a small count back by subtraction; no ``occupancy_mean`` beside a suppressed
  ``occupancy_peak``; no figure the mode does not publish (strict mode's missing fields,
  meta v2's ``privacy.published``, what noise withholds) and no figure that is never
  published (``devices_epoch`` and counts v1's estimate: membership oracles); strict mode's
  window limit and id width (at most :data:`~firmware_agent.stages.privacy.STRICT_MAX_ID_BITS`
  bits); one epoch label never covering more time than the declared key lifetime (one window
  in strict mode); no two agents sharing an epoch label (which would suggest a shared key);
* **the epoch label carries nothing**: with the agent's public key, the audit recomputes it
  from the key and an epoch start (:func:`~firmware_agent.stages.privacy.epoch_label`); a label that
  is not one of those could carry an identifier (64 free bits per epoch) and fails;
* **topics**: a message on a topic that is neither an agent's
  (``footfall/v1/<site>/<agent>/<kind>``) nor Home Assistant's discovery config of one
  (``<prefix>/device/footfall-<site>/<agent>/config``, checked against
  :func:`~firmware_agent.service.homeassistant.discovery_message`) fails, so listening on ``#``
  catches anything an agent publishes elsewhere.

The rules about counts v2's fields come from the agent's own catalogue
(:mod:`firmware_agent.stages.privacy`: ``COUNTS``, ``RELATIONS``, ``STRICT_OMITS``, ``DP_WITHHELD``,
``NEVER_PUBLISHED``), so the agent and its audit cannot drift apart; counts v1's, which no
agent of this version publishes, are that contract's, frozen here.

The verdict is PASS when every message was audited without a failure (warnings, such as a
signature left unchecked for want of a key, do not fail it) and FAIL otherwise.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

import nacl.signing

from firmware_agent.contract.errors import MessageError
from firmware_agent.contract.messages import AgentId, Envelope, SiteId, Topic
from firmware_agent.service.homeassistant import discovery_message
from firmware_agent.stages.batch import DWELL_BANDS
from firmware_agent.stages.privacy import (
    COUNTS,
    DP_WITHHELD,
    IMPLICIT,
    NEVER_PUBLISHED,
    RELATIONS,
    STANDARD_MAX_KEY_S,
    STRICT_MAX_ID_BITS,
    STRICT_MAX_WINDOW_S,
    STRICT_OMITS,
    SUPPRESS_FLOOR,
    epoch_label,
    flatten_counts,
)

__all__ = ["Audit", "Finding", "audit_all"]

_MAC = re.compile(
    r"(?i)(?<![0-9a-f])[0-9a-f]{2}([:.-]?)(?:[0-9a-f]{2}\1){4}[0-9a-f]{2}(?![0-9a-f])"
)
_HEX_RUN = re.compile(r"(?i)[0-9a-f]{12,}")
_B64 = re.compile(r"[A-Za-z0-9+/_-]{16,}={0,2}")
_BIG_INT = 1 << 40
# Where a payload may hold a string, and what it must look like there.
_STRINGS: Mapping[str, re.Pattern[str]] = {
    "$.kind": re.compile(r"counts|status|meta"),
    "$.site": re.compile(r"[a-z0-9][a-z0-9_-]{0,62}"),
    "$.agent": re.compile(r"[a-z0-9][a-z0-9_-]{0,62}"),
    "$.epoch": re.compile(r"[0-9a-f]{16}"),
    "$.window_start": re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"),
    "$.at": re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"),
    "$.state": re.compile(r"online|offline"),
    "$.cause": re.compile(r"connected|stopped|lost"),
    "$.agent_version": re.compile(r"[0-9A-Za-z.+-]{1,32}"),
    "$.epoch_length": re.compile(r"midnight"),
    "$.epoch_timezone": re.compile(r"[A-Za-z0-9_+/-]{0,64}"),
    "$.privacy.mode": re.compile(r"standard|strict"),
    "$.thresholds.rssi_threshold_dbm": re.compile(r"auto"),
    "$.privacy.device_hash": re.compile(r"siphash-2-4"),
}
_HA_DISCOVERY = re.compile(
    r"(?P<prefix>.+)/device/footfall-(?P<site>[^/]+)/(?P<agent>[^/]+)/config"
)
_BANDS = tuple(f"dwell_minutes.{b}" for b in DWELL_BANDS)
# Per counts version: the relations, what strict mode and noise leave out, the counts k
# applies to. Version 2 is the agent's catalogue; version 1 is that contract, frozen.
_RELATIONS = {
    1: (
        ("devices", ("visitors", "passersby")),
        ("devices", ("devices_randomised", *IMPLICIT)),
        ("visits_ended", _BANDS),
    ),
    2: RELATIONS,
}
_STRICT_ABSENT = {1: ("visits_ended", "dwell_minutes", "static_excluded"), 2: STRICT_OMITS}
_DP_ABSENT = {1: ("static_excluded",), 2: DP_WITHHELD}
_COUNT_FIELDS = {
    1: frozenset(
        (
            "devices",
            "devices_randomised",
            "visitors",
            "passersby",
            "visits_ended",
            "static_excluded",
            *_BANDS,
            *NEVER_PUBLISHED,
        )
    ),
    2: frozenset(COUNTS),
}


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing wrong (``fail``) or unchecked (``warn``), with where it was found."""

    level: str  # "fail" or "warn"
    where: str  # 'site/agent counts seq 812' or 'message 3 on <topic>'
    reason: str

    def line(self) -> str:
        return f"{self.level.upper():4} {self.where}: {self.reason}"


@dataclass(slots=True)
class _AgentSeen:
    messages: int = 0
    counts: int = 0
    signed: int = 0
    unsigned: int = 0
    meta: dict[str, Any] | None = None
    labels: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))


@dataclass(slots=True)
class Audit:
    """Feed it messages (:meth:`add`), then read :meth:`findings` and :meth:`verdict`."""

    keys: Mapping[str, nacl.signing.VerifyKey] = field(default_factory=dict)  # 'site/agent'
    messages: int = 0
    _agents: dict[str, _AgentSeen] = field(default_factory=dict)
    _findings: list[Finding] = field(default_factory=list)
    _pending: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def add(self, topic: str, body: bytes) -> None:
        """Audit one message received on ``topic``."""
        self.messages += 1
        where = f"message {self.messages} on {topic}"
        if self._home_assistant(topic, body, where):
            return
        self._scan_raw(body, where)
        try:
            on_topic = Topic.parse(topic)
        except MessageError:
            self._fail(where, "published off the agent topics (footfall/v1/<site>/<agent>/...)")
            on_topic = None
        try:
            envelope = Envelope.parse(body)
        except MessageError as exc:
            self._fail(where, f"breaks the contract: {exc}")
            return
        p = envelope.payload
        name = f"{p['site']}/{p['agent']}"
        where = f"{name} {p['kind']}" + (f" seq {p['seq']}" if "seq" in p else "")
        if on_topic is not None and on_topic != envelope.topic:
            self._fail(where, f"published on {topic}, which names another site or agent")
        seen = self._agents.setdefault(name, _AgentSeen())
        seen.messages += 1
        self._check_signature(envelope, name, where, seen)
        self._scan(p, "$", where)
        if p["kind"] == "meta":
            seen.meta = p
            self._check_meta(p, where)
        elif p["kind"] == "counts":
            seen.counts += 1
            start = int(datetime.fromisoformat(p["window_start"]).timestamp())
            seen.labels[p["epoch"]].append(start)
            self._pending.append((where, p))  # checked against meta once all is in

    def findings(self) -> list[Finding]:
        """Every finding, counts checked against their agent's meta (seen before or after)."""
        out = list(self._findings)
        for where, p in self._pending:
            out += _counts_findings(p, self._agents[f"{p['site']}/{p['agent']}"].meta, where)
        out += self._label_findings()
        return out

    def verdict(self) -> bool:
        """True (PASS) when messages were audited and none failed."""
        return self.messages > 0 and not any(f.level == "fail" for f in self.findings())

    def report(self) -> str:
        """The printed report: a table per agent, the findings, the verdict."""
        findings = self.findings()
        head = f"{'agent':32} {'mode':8} {'k':>3} {'epsilon':>8} {'msgs':>5} {'counts':>6} "
        lines = [head + f"{'signed':>9} {'fails':>5}"]
        for name, seen in sorted(self._agents.items()):
            privacy = (seen.meta or {}).get("privacy", {})
            eps = privacy.get("dp_epsilon")
            fails = sum(f.level == "fail" and f.where.startswith(name + " ") for f in findings)
            lines.append(
                f"{name:32} {privacy.get('mode', '?'):8} {privacy.get('suppress_below', '?'):>3} "
                f"{'off' if eps is None else eps:>8} {seen.messages:>5} {seen.counts:>6} "
                f"{f'{seen.signed}/{seen.messages}':>9} {fails:>5}"
            )
        lines.append("")
        lines.append(
            "checks: contract (schema, topics, topic ids), signatures, identifier-like values, "
            "declared privacy mode (meta present, k, small counts, subtraction, unpublished and "
            "strict fields, strict id width, key lifetime), epoch labels recomputed, shared keys"
        )
        lines += [f.line() for f in findings] or ["no findings"]
        n_fail = sum(f.level == "fail" for f in findings)
        n_warn = len(findings) - n_fail
        verdict = "PASS" if self.verdict() else "FAIL"
        if self.messages == 0:
            verdict += " (no message to audit)"
        lines.append(
            f"verdict: {verdict}: {self.messages} messages from {len(self._agents)} agents, "
            f"{n_fail} failures, {n_warn} warnings"
        )
        return "\n".join(lines)

    def as_json(self) -> dict[str, object]:
        findings = self.findings()
        return {
            "verdict": "pass" if self.verdict() else "fail",
            "messages": self.messages,
            "agents": {
                name: {"messages": s.messages, "counts": s.counts, "signed": s.signed}
                for name, s in sorted(self._agents.items())
            },
            "findings": [
                {"level": f.level, "where": f.where, "reason": f.reason} for f in findings
            ],
        }

    def _home_assistant(self, topic: str, body: bytes, where: str) -> bool:
        """Whether ``topic`` is Home Assistant's: its birth message, or the discovery config
        of an agent, which must be exactly the one footfall publishes (version aside)."""
        if topic.endswith("/status") and topic.count("/") == 1 and body in (b"online", b"offline"):
            return True  # Home Assistant's own birth and last-will message
        match = _HA_DISCOVERY.fullmatch(topic)
        if match is None:
            return False
        try:
            _, expected = discovery_message(
                match["prefix"], SiteId(match["site"]), AgentId(match["agent"])
            )
            same = _unversioned(json.loads(body)) == _unversioned(json.loads(expected))
        except (MessageError, ValueError):
            same = False
        if not same:
            self._fail(where, "not the Home Assistant discovery config a footfall agent publishes")
        return True

    def _fail(self, where: str, reason: str) -> None:
        self._findings.append(Finding("fail", where, reason))

    def _check_signature(self, envelope: Envelope, name: str, where: str, seen: _AgentSeen) -> None:
        key = self.keys.get(name)
        if key is None:
            if seen.unsigned == 0:
                self._findings.append(
                    Finding("warn", name, "no public key given (--key): signatures not checked")
                )
            seen.unsigned += 1
            return
        try:
            envelope.verify(key)
        except MessageError:
            self._fail(where, "the signature does not verify with the given public key")
            return
        seen.signed += 1

    def _scan_raw(self, body: bytes, where: str) -> None:
        """Identifier-like text in a message that is not JSON (JSON is scanned by field)."""
        if not _parses(body) and _MAC.search(body.decode("utf-8", "replace")):
            self._fail(where, "holds text shaped like a MAC address")

    def _scan(self, value: object, path: str, where: str) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                self._scan(inner, f"{path}.{key}", where)
        elif isinstance(value, list):
            for i, inner in enumerate(value):
                self._scan(inner, f"{path}[{i}]", where)
        elif isinstance(value, bool) or value is None:
            return
        elif isinstance(value, int):
            if abs(value) >= _BIG_INT:
                self._fail(where, f"{path} is a {value.bit_length()}-bit integer (like a MAC)")
        elif isinstance(value, str):
            self._scan_text(value, path, where)

    def _scan_text(self, text: str, path: str, where: str) -> None:
        shape = _STRINGS.get(path)
        if _MAC.search(text):
            self._fail(where, f"{path} holds text shaped like a MAC address")
        elif path != "$.epoch" and _HEX_RUN.search(text):
            self._fail(where, f"{path} holds a run of 12 or more hex digits")
        elif _base64_like(text):
            self._fail(where, f"{path} holds a base64-like blob")
        elif shape is None or not shape.fullmatch(text):
            self._fail(where, f"{path} holds a string where none is expected (an SSID?)")

    def _check_meta(self, p: Mapping[str, Any], where: str) -> None:
        privacy = p["privacy"]
        k, life = privacy["suppress_below"], privacy["key_lifetime_s"]
        if k < SUPPRESS_FLOOR:
            self._fail(
                where,
                f"suppress_below {k}, below the floor of {SUPPRESS_FLOOR}: a count of one "
                "device is published",
            )
        if privacy["mode"] == "strict":
            bits = privacy["id_bits"]
            if p["window_s"] > STRICT_MAX_WINDOW_S:
                self._fail(where, f"strict mode with {p['window_s']} s windows (at most 600)")
            if life != p["window_s"] or bits is None:
                self._fail(where, "strict mode must replace its key every window and truncate ids")
            elif bits > STRICT_MAX_ID_BITS:
                self._fail(
                    where,
                    f"strict mode with {bits}-bit ids (at most {STRICT_MAX_ID_BITS}): most "
                    "devices would keep an id of their own",
                )
        elif life > STANDARD_MAX_KEY_S:
            self._fail(where, f"standard mode keeps a key {life} s (at most 86400)")

    def _label_findings(self) -> list[Finding]:
        out: list[Finding] = []
        owners: dict[str, set[str]] = defaultdict(set)
        for name, seen in self._agents.items():
            privacy = (seen.meta or {}).get("privacy", {})
            window_s = int((seen.meta or {}).get("window_s", 0))
            life = privacy.get("key_lifetime_s")
            for label, starts in seen.labels.items():
                owners[label].add(name)
                span = max(starts) - min(starts) + window_s
                if life is not None and span > life:
                    out.append(
                        Finding(
                            "fail",
                            name,
                            f"one epoch label spans {span} s of windows, more than the declared "
                            f"key lifetime of {life} s",
                        )
                    )
        out += self._derived_labels()
        for label, names in owners.items():
            if len(names) > 1:
                out.append(
                    Finding(
                        "fail",
                        ", ".join(sorted(names)),
                        f"agents share epoch label {label}: one hashing key for several sensors",
                    )
                )
        out += [
            Finding("fail", name, "no meta message seen: it declares no privacy mode to check")
            for name, seen in self._agents.items()
            if seen.meta is None
        ]
        return out

    def _derived_labels(self) -> list[Finding]:
        """Every epoch label recomputed from the agent's public key and an epoch start that
        fits its windows and key lifetime; a label that is none of them carries bits."""
        out = []
        for name, seen in self._agents.items():
            key = self.keys.get(name)
            if seen.meta is None or not seen.labels:
                continue
            if key is None:
                out.append(Finding("warn", name, "no public key given (--key): epoch labels "
                                   "not recomputed"))  # fmt: skip
                continue
            window_s = int(seen.meta["window_s"])
            life = int(seen.meta["privacy"]["key_lifetime_s"])
            public = key.encode()
            for label, starts in seen.labels.items():
                first = min(starts)
                earliest = max(starts) + window_s - life
                if not any(
                    epoch_label(public, start) == label
                    for start in range(first, earliest - 1, -window_s)
                ):
                    out.append(
                        Finding(
                            "fail",
                            name,
                            f"epoch label {label} is not derived from the agent's public key "
                            "and an epoch start: it could carry an identifier",
                        )
                    )
        return out


def audit_all(
    messages: Iterable[tuple[str, bytes]], keys: Mapping[str, nacl.signing.VerifyKey]
) -> Audit:
    """An audit of every (topic, body)."""
    audit = Audit(keys)
    for topic, body in messages:
        audit.add(topic, body)
    return audit


def _counts_findings(
    p: Mapping[str, Any], meta: Mapping[str, Any] | None, where: str
) -> list[Finding]:
    if meta is None:
        return []
    privacy = meta["privacy"]
    k = int(privacy["suppress_below"])
    out = []
    if p["window_s"] != meta["window_s"]:
        out.append(
            Finding("fail", where, f"window_s {p['window_s']}, meta says {meta['window_s']}")
        )
    v = int(p["v"])
    if never := [name for name in NEVER_PUBLISHED if name in p]:
        out.append(Finding("fail", where, f"publishes {', '.join(never)}: a membership oracle"))
    if privacy["mode"] == "strict":
        present = [name for name in _STRICT_ABSENT[v] if name in p]
        if present:
            out.append(Finding("fail", where, f"strict mode publishes {', '.join(present)}"))
    if privacy.get("dp_epsilon") is not None and (withheld := set(_DP_ABSENT[v]) & set(p)):
        out.append(Finding("fail", where, f"noised counts publish {', '.join(sorted(withheld))}"))
    published = privacy.get("published", {})
    if unannounced := sorted(n for n, on in published.items() if not on and n in p):
        out.append(
            Finding("fail", where, f"publishes {', '.join(unannounced)}: meta says it does not")
        )
    flat = {
        name: cast(int | None, value)
        for name, value in flatten_counts(p).items()
        if name in _COUNT_FIELDS[v]
    }
    for name, value in flat.items():
        if value is not None and 0 < value < k:
            out.append(Finding("fail", where, f"$.{name} is a small count below k={k}"))
    if p.get("occupancy_peak", 0) is None and p.get("occupancy_mean") is not None:
        out.append(Finding("fail", where, "$.occupancy_mean is published with a suppressed peak"))
    for total, all_parts in _RELATIONS[v]:
        parts = tuple(m for m in all_parts if m not in IMPLICIT)
        if total not in flat or any(m not in flat for m in parts):
            continue
        nulls = [m for m in (total, *parts) if flat[m] is None]
        implicit = len(parts) < len(all_parts)  # the rest of the total is never published
        if len(nulls) + implicit != 1:
            continue
        n = {m: v for m, v in flat.items() if v is not None}
        if implicit:
            hidden, derived = "devices with global addresses", n[total] - n[parts[0]]
        elif nulls[0] == total:
            hidden, derived = f"$.{total}", sum(n[m] for m in parts)
        else:
            hidden = f"$.{nulls[0]}"
            derived = n[total] - sum(n[m] for m in parts if m != nulls[0])
        if 0 < derived < k:
            out.append(
                Finding("fail", where, f"{hidden} follows by subtraction and is below k={k}")
            )
    return out


def _unversioned(value: object) -> object:
    """A JSON value without its ``sw_version`` fields (the auditor's version is not the
    agent's)."""
    if isinstance(value, dict):
        return {k: _unversioned(v) for k, v in value.items() if k != "sw_version"}
    return value


def _base64_like(text: str) -> bool:
    return any(
        re.search("[A-Z]", m) and re.search("[a-z]", m) and re.search("[0-9]", m)
        for m in _B64.findall(text)
    )


def _parses(body: bytes) -> bool:
    try:
        json.loads(body)
    except ValueError:
        return False
    return True
