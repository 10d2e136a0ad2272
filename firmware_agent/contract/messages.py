"""The message contract between agents and the aggregator: ids, topics, payloads, signatures.

Both sides import this one module, so it stays light: the standard library and pynacl; the
schemas are checked by :mod:`firmware_agent.contract.schema_check` (standard library only). No
numba, numpy, scapy or paho.

Topics (:class:`Topic`)::

    footfall/v1/<site>/<agent>/counts   QoS 1, not retained: one message per closed window
    footfall/v1/<site>/<agent>/status   QoS 1, retained: online / offline (also the last will)
    footfall/v1/<site>/<agent>/meta     QoS 1, retained: how the agent counts, its privacy settings
    footfall/v1/<site>/<agent>/receipt  retained, from the aggregator: the windows it holds

A receipt (:func:`receipt_payload`, :func:`settled_ranges`) is the one message the aggregator
sends: signed with its own receipt key, it tells an agent which of its windows are settled, so
the agent's spool can let them go (``docs/messages.md``).

Site and agent ids match :data:`~firmware_agent.contract.fields.ID_PATTERN` (:class:`SiteId`,
:class:`AgentId`); the counts' fields and their privacy rules are :mod:`.fields`.

A message on the wire is an envelope, itself canonical JSON::

    {"alg":"ed25519","payload":{...},"sig":"<base64 of 64 bytes>"}

``sig`` is the agent's Ed25519 signature over :func:`canonical_json` of ``payload``: keys
sorted, no whitespace, UTF-8, no NaN; counts hold integers except v2's ``occupancy_mean`` (at
most 2 decimals, so Python's shortest float repr is the one text). A verifier decodes the
envelope, re-encodes the payload canonically, checks the signature with the agent's enrolled
public key, then validates the payload against the schema its ``kind`` and ``v`` name
(``schemas/<kind>.v<v>.json``, JSON Schema draft 2020-12, ``additionalProperties: false``
everywhere: unknown fields are errors) and, for counts v2, the rules a schema cannot say
(:func:`counts_v2_errors`). It must also check that the topic's site and agent are the
payload's. ``docs/messages.md`` documents every field.

**Versions** (:data:`VERSIONS`): an agent publishes counts v2, meta v2 and status v2
(:data:`CURRENT`); readers keep accepting counts v1, meta v1 and status v1 from agents not yet
upgraded. Status v2 adds the eviction rounds (:data:`~firmware_agent.contract.fields.EVICTIONS`).
The topic's ``v1`` names the topic layout, not a payload version.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import nacl.exceptions
import nacl.signing

from firmware_agent.contract.errors import MessageError, SchemaError, SignatureError
from firmware_agent.contract.fields import DIAGNOSTICS, EVICTIONS, ID_PATTERN, PEOPLE_FIGURES
from firmware_agent.contract.schema_check import check_for, control_characters

__all__ = [
    "CURRENT",
    "ID_PATTERN",
    "KINDS",
    "TOPIC_ROOT",
    "AgentId",
    "Envelope",
    "SiteId",
    "Topic",
    "canonical_json",
    "counts_payload",
    "counts_v2_errors",
    "known_schemas",
    "meta_payload",
    "public_key_text",
    "receipt_payload",
    "seal",
    "settled_ranges",
    "status_payload",
    "utc_text",
    "validate",
    "verify_key_from_text",
]

_ID = re.compile(ID_PATTERN)
TOPIC_ROOT = "footfall/v1"
KINDS = ("counts", "status", "meta")  # what agents send
RECEIPT = "receipt"  # what the aggregator sends back (v1)
_ALL_KINDS = (*KINDS, RECEIPT)
VERSIONS: Mapping[str, tuple[int, ...]] = {"counts": (1, 2), "status": (1, 2), "meta": (1, 2)}
"""Every (kind, v) a reader accepts: ``schemas/<kind>.v<v>.json``."""
CURRENT: Mapping[str, int] = {"counts": 2, "status": 2, "meta": 2}
"""The version of each kind an agent of this release publishes."""


def _check_id(value: object, what: str) -> None:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise MessageError(f"{what} must match {ID_PATTERN}, got {value!r}")


@dataclass(frozen=True, slots=True)
class SiteId:
    """A site's id, as it appears in topics and payloads."""

    value: str

    def __post_init__(self) -> None:
        _check_id(self.value, "site id")

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class AgentId:
    """An agent's id, unique within its site."""

    value: str

    def __post_init__(self) -> None:
        _check_id(self.value, "agent id")

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class Topic:
    """``footfall/v1/<site>/<agent>/<kind>``."""

    site: SiteId
    agent: AgentId
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in _ALL_KINDS:
            raise MessageError(
                f"topic kind must be one of {', '.join(_ALL_KINDS)}, got {self.kind!r}"
            )

    def __str__(self) -> str:
        return f"{TOPIC_ROOT}/{self.site}/{self.agent}/{self.kind}"

    @classmethod
    def parse(cls, text: str) -> Topic:
        """The topic a string names; :class:`MessageError` if it is not a footfall topic."""
        parts = text.split("/")
        if len(parts) != 5 or f"{parts[0]}/{parts[1]}" != TOPIC_ROOT:
            raise MessageError(f"topic must be {TOPIC_ROOT}/<site>/<agent>/<kind>, got {text!r}")
        return cls(SiteId(parts[2]), AgentId(parts[3]), parts[4])


def utc_text(unix_s: int) -> str:
    """``2024-03-05T10:55:00Z``: how payloads write a time (UTC, whole seconds)."""
    return datetime.fromtimestamp(unix_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def canonical_json(value: object) -> bytes:
    """The one encoding that is signed: sorted keys, no whitespace, UTF-8, no NaN."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def _schema_errors(name: str, instance: Any, what: str) -> None:
    error = check_for(name).errors(instance)
    if error is not None:
        raise SchemaError(f"{what}: {error}")


def known_schemas() -> str:
    """Every (kind, v) a reader accepts, for error messages: ``counts v1/2, status v1, ...``."""
    return ", ".join(f"{kind} v{'/'.join(map(str, v))}" for kind, v in VERSIONS.items())


def counts_v2_errors(payload: Mapping[str, Any]) -> str | None:
    """What a schema-valid counts v2 payload breaks of the rules JSON Schema cannot say, or None.

    ``occupancy_mean`` has at most 2 decimals (``round(x, 2) == x``: one canonical text);
    under ``no_data`` every people and device figure is null (a gap, never a zero), and a
    dwell band is null too.
    """
    mean = payload.get("occupancy_mean")
    if isinstance(mean, float) and round(mean, 2) != mean:
        return f"$.occupancy_mean: {mean!r} has more than 2 decimals"
    if payload.get("no_data"):
        for name in (*PEOPLE_FIGURES, *DIAGNOSTICS):
            value = payload.get(name)
            if isinstance(value, Mapping):
                value = next((v for v in value.values() if v is not None), None)
            if value is not None:
                return f"$.{name}: must be null when $.no_data is true, got {value!r}"
    return None


def validate(payload: Mapping[str, object]) -> None:
    """Check a payload against the schema of its ``kind`` and ``v`` (and counts v2's rules).

    :class:`SchemaError` names the field at fault: ``counts message: $.devices: -1 is less
    than the minimum of 0``.
    """
    kind, version = payload.get("kind"), payload.get("v")
    known = {**VERSIONS, RECEIPT: (1,)}.get(kind, ()) if isinstance(kind, str) else ()
    if version not in known:
        raise SchemaError(
            f"payload: $.kind and $.v must name a known schema ({known_schemas()}), "
            f"got kind={kind!r} v={version!r}"
        )
    what = f"{kind} message"
    _schema_errors(f"{kind}.v{version}", payload, what)
    if (kind, version) == ("counts", 2):
        error = counts_v2_errors(payload)
        if error is not None:
            raise SchemaError(f"{what}: {error}")
    control = control_characters(payload)
    if control is not None:
        raise SchemaError(f"{what}: ${control}")


def seal(payload: Mapping[str, object], key: nacl.signing.SigningKey) -> bytes:
    """Validate ``payload``, sign its canonical JSON, and return the envelope's bytes."""
    validate(payload)
    signature = key.sign(canonical_json(payload)).signature
    envelope = {"alg": "ed25519", "payload": payload, "sig": base64.b64encode(signature).decode()}
    return canonical_json(envelope)


def public_key_text(key: nacl.signing.SigningKey | nacl.signing.VerifyKey) -> str:
    """The public key as enrolment takes it: 32 bytes, standard base64."""
    verify_key = key.verify_key if isinstance(key, nacl.signing.SigningKey) else key
    return base64.b64encode(bytes(verify_key)).decode()


def verify_key_from_text(text: str) -> nacl.signing.VerifyKey:
    """An enrolled public key from its base64 text (:func:`public_key_text`)."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except binascii.Error as exc:
        raise SignatureError(f"public key must be base64, got {text!r}") from exc
    if len(raw) != 32:
        raise SignatureError(f"public key must be 32 bytes of base64, got {len(raw)} bytes")
    return nacl.signing.VerifyKey(raw)


@dataclass(frozen=True, slots=True)
class Envelope:
    """A received message: its payload (validated) and signature (not yet verified)."""

    payload: dict[str, Any]
    signature: bytes

    @classmethod
    def parse(cls, data: bytes) -> Envelope:
        """Decode and validate an envelope and its payload; :meth:`verify` checks the signature."""
        try:
            envelope = json.loads(data.decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SchemaError(f"envelope: not UTF-8 JSON: {exc}") from exc
        _schema_errors("envelope.v1", envelope, "envelope")
        payload = envelope["payload"]
        validate(payload)
        return cls(payload, base64.b64decode(envelope["sig"]))

    @property
    def topic(self) -> Topic:
        """The topic this payload belongs on."""
        return Topic(
            SiteId(self.payload["site"]), AgentId(self.payload["agent"]), self.payload["kind"]
        )

    def verify(self, key: nacl.signing.VerifyKey) -> dict[str, Any]:
        """The payload if ``key`` signed it; :class:`SignatureError` otherwise."""
        try:
            key.verify(canonical_json(self.payload), self.signature)
        except nacl.exceptions.BadSignatureError as exc:
            raise SignatureError(
                f"{self.payload['kind']} message from {self.payload['site']}/"
                f"{self.payload['agent']}: the signature does not verify with the enrolled key"
            ) from exc
        return self.payload


def counts_payload(
    site: SiteId,
    agent: AgentId,
    seq: int,
    epoch: str,
    window: Mapping[str, object],
    *,
    version: int = CURRENT["counts"],
) -> dict[str, object]:
    """A counts payload: one window's published counts and its header (``version`` 1 only
    for readers' tests: the agent publishes v2)."""
    header = {"kind": "counts", "v": version, "site": site.value, "agent": agent.value}
    return header | {"seq": seq, "epoch": epoch} | dict(window)


def status_payload(
    site: SiteId,
    agent: AgentId,
    *,
    cause: str,
    at: int,
    spool_pending: int,
    spool_dropped: int,
    last_seq: int,
    evictions: tuple[int, int] = (0, 0),
    version: int = CURRENT["status"],
) -> dict[str, object]:
    """A status payload; ``cause`` is ``connected`` (online), ``stopped`` or ``lost`` (offline).

    ``evictions``: the count and estimate stages' eviction rounds since the agent started
    (v2; ``version`` 1, without them, only for readers' tests)."""
    payload: dict[str, object] = {
        "kind": "status",
        "v": version,
        "site": site.value,
        "agent": agent.value,
        "state": "online" if cause == "connected" else "offline",
        "cause": cause,
        "at": utc_text(at),
        "spool_pending": spool_pending,
        "spool_dropped": spool_dropped,
        "last_seq": last_seq,
    }
    if version >= 2:
        payload |= dict(zip(EVICTIONS, evictions, strict=True))
    return payload


def meta_payload(
    site: SiteId,
    agent: AgentId,
    *,
    agent_version: str,
    window_s: int,
    epoch_length: str | int,
    epoch_timezone: str,
    thresholds: Mapping[str, int | str],
    privacy: Mapping[str, object],
) -> dict[str, object]:
    """A meta payload (v2): how the agent counts and what it does for privacy.

    ``thresholds`` carries ``presence_hold_s`` and ``privacy`` its ``published`` list."""
    return {
        "kind": "meta",
        "v": CURRENT["meta"],
        "counts_v": CURRENT["counts"],
        "site": site.value,
        "agent": agent.value,
        "agent_version": agent_version,
        "window_s": window_s,
        "epoch_length": epoch_length,
        "epoch_timezone": epoch_timezone,
        "thresholds": dict(thresholds),
        "privacy": dict(privacy),
    }


def receipt_payload(
    site: SiteId, agent: AgentId, settled: Sequence[tuple[int, int]], at: int
) -> dict[str, object]:
    """A receipt payload from an agent's settled ranges ``[(lo, hi), ...]`` (inclusive,
    sorted, apart, not empty): the first and last settled seq, the contiguous run from the
    first, and the gaps between the ranges."""
    gaps = [[hi + 1, lo - 1] for (_, hi), (lo, _) in itertools.pairwise(settled)]
    return {
        "kind": RECEIPT,
        "v": 1,
        "site": site.value,
        "agent": agent.value,
        "at": utc_text(at),
        "first_seq": settled[0][0],
        "through_seq": settled[0][1],
        "last_seq": settled[-1][1],
        "gaps": gaps,
    }


def settled_ranges(payload: Mapping[str, Any]) -> list[tuple[int, int]]:
    """The ranges ``[(lo, hi), ...]`` a (schema-valid) receipt payload settles;
    :class:`SchemaError` if its figures contradict each other."""
    first, through, last = payload["first_seq"], payload["through_seq"], payload["last_seq"]
    if not first <= through <= last:
        raise SchemaError(
            f"receipt message: needs first_seq <= through_seq <= last_seq, got {first}, "
            f"{through}, {last}"
        )
    ranges, lo = [], first
    for gap_lo, gap_hi in payload["gaps"]:
        if not lo <= gap_lo - 1 < gap_lo <= gap_hi < last or gap_lo <= through:
            raise SchemaError(
                f"receipt message: $.gaps: [{gap_lo}, {gap_hi}] is not a gap between settled "
                f"seqs above through_seq {through} and below last_seq {last}, in order"
            )
        ranges.append((lo, gap_lo - 1))
        lo = gap_hi + 1
    if ranges and ranges[0][1] != through:
        raise SchemaError(
            f"receipt message: through_seq {through} is not where the first gap starts"
        )
    ranges.append((lo, last))
    return ranges
