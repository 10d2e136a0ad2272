"""Every message ingest receives passes here: accepted with its agent, or refused with a reason.

The checks, in order (``docs/messages.md``, "Verifying"): size limit; UTF-8; JSON (no NaN,
not nested past 1,024 levels); the envelope's and the payload's JSON Schemas, strictly
(unknown fields refused, control characters refused, dates that exist); the topic's site,
agent and kind equal the payload's; the agent is enrolled and not revoked; the Ed25519
signature over the payload's canonical JSON verifies with the enrolled key; a counts window is
not at or below the seq up to which retention deleted the agent's windows (a replay).

A refusal is a value, not an exception: :class:`Refusal` carries one of :data:`REASONS` and a
detail that names the field or agent at fault and never quotes the payload (no values, only
field names, types and the schema's own limits).

The schemas are the contract's own files (``firmware_agent/schemas``). ``jsonschema`` checks a
counts message in about a millisecond here, five times the budget of a whole message at
5,000 messages/s, so :class:`SchemaCheck` compiles each schema once into plain Python closures
for the keywords the footfall schemas use, with jsonschema's semantics (an integer is an
``int`` that is not a ``bool``, or an integral ``float``; ``pattern`` is ``re.search``;
``const`` tells ``True`` from ``1``). A keyword it does not know is an error at start-up, never
a silent pass, and the tests hold it equal to jsonschema on thousands of mutated messages.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import math
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from typing import Any

import nacl.exceptions
import orjson

from aggregator.registry import AgentEntry, Registry
from firmware_agent.errors import MessageError
from firmware_agent.messages import (
    VERSIONS,
    Topic,
    canonical_json,
    counts_v2_errors,
    known_schemas,
)

__all__ = ["REASONS", "Accepted", "Refusal", "SchemaCheck", "Verifier"]

# Why a message was not stored. The first group is decided here, before the store; the
# second by the store (a message it already holds).
REASONS: dict[str, str] = {
    "too_large": "larger than ingest.max_message_bytes",
    "not_utf8": "not UTF-8",
    "not_json": "not JSON",
    "too_deep": "JSON nested too deeply",
    "bad_topic": "not on a footfall/v1/<site>/<agent>/<kind> topic",
    "schema": "does not validate against its JSON Schema",
    "topic_mismatch": "the topic's site, agent or kind differ from the payload's",
    "unknown_agent": "from an agent that is not enrolled",
    "revoked_agent": "from a revoked agent",
    "bad_signature": "the signature does not verify with the enrolled key",
    "expired": "a window older than what retention already deleted (a replay)",
    "duplicate": "already stored under this agent and seq (a redelivery or a replay)",
    "seq_conflict": "a different message under an agent and seq already stored",
    "duplicate_window": "a window already stored for this agent under another seq",
}
_CONTROL = re.compile("[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class Refusal:
    """A message that is not stored, and why."""

    reason: str
    detail: str
    site: str = ""  # from the topic, when it names one
    agent: str = ""

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


# --- the schema compiler -------------------------------------------------------------------

# A check returns None when the instance is valid, else "<path rest>: <what is wrong>".
Check = Callable[[Any], str | None]
_ANNOTATIONS = frozenset({"$schema", "$id", "$defs", "title", "description", "$comment"})
_TYPE_NAMES = {
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    dict: "an object",
    list: "an array",
    type(None): "null",
}


def _what(value: object) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _is_integer(x: object) -> bool:
    return (isinstance(x, int) and not isinstance(x, bool)) or (
        isinstance(x, float) and x.is_integer()
    )


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


_TYPES: dict[str, Callable[[object], bool]] = {
    "integer": _is_integer,
    "number": _is_number,
    "string": lambda x: isinstance(x, str),
    "object": lambda x: isinstance(x, dict),
    "array": lambda x: isinstance(x, list),
    "boolean": lambda x: isinstance(x, bool),
    "null": lambda x: x is None,
}


def _equal(one: object, two: object) -> bool:
    """jsonschema's equality: True and 1 differ, 1 and 1.0 do not."""
    if one is two:
        return True
    if isinstance(one, str) or isinstance(two, str):
        return one == two
    if isinstance(one, list) and isinstance(two, list):
        return len(one) == len(two) and all(_equal(a, b) for a, b in zip(one, two, strict=True))
    if isinstance(one, dict) and isinstance(two, dict):
        return one.keys() == two.keys() and all(_equal(one[k], two[k]) for k in one)
    if isinstance(one, bool) or isinstance(two, bool):
        return isinstance(one, bool) and isinstance(two, bool) and one == two
    return one == two


def _key_path(key: str) -> str:
    if key.isidentifier():
        return f".{key}"
    return f"[{key[:40]!r}]"


class SchemaCheck:
    """One JSON Schema compiled to closures (see the module docstring)."""

    def __init__(self, schema: Mapping[str, Any]) -> None:
        self._root = schema
        self._refs: dict[str, Check] = {}
        self.check: Check = self._compile(schema)

    def errors(self, instance: object) -> str | None:
        """None if valid, else ``$<path>: <what is wrong>``."""
        error = self.check(instance)
        return None if error is None else "$" + error

    def _ref(self, ref: str) -> Check:
        if not ref.startswith("#/$defs/"):
            raise ValueError(f"unsupported $ref {ref!r}: only '#/$defs/<name>'")
        if ref not in self._refs:
            name = ref.removeprefix("#/$defs/")
            self._refs[ref] = self._compile(self._root["$defs"][name])
        return self._refs[ref]

    def _compile(self, schema: Mapping[str, Any]) -> Check:
        unknown = set(schema) - _ANNOTATIONS - _KEYWORDS
        if unknown:
            raise ValueError(f"unsupported JSON Schema keywords: {sorted(unknown)}")
        if set(schema) - _ANNOTATIONS == {"$ref"}:
            return self._ref(schema["$ref"])
        checks: list[Check] = []
        if "type" in schema:
            checks.append(_type_check(schema))
        for keyword in ("const", "enum"):
            if keyword in schema:
                checks.append(_value_check(keyword, schema[keyword]))
        if {"minimum", "maximum", "exclusiveMinimum"} & schema.keys():
            checks.append(_number_check(schema))
        if {"pattern", "maxLength"} & schema.keys():
            checks.append(_string_check(schema))
        if {"properties", "required", "additionalProperties"} & schema.keys():
            checks.append(self._object_check(schema))
        if "$ref" in schema:
            checks.append(self._ref(schema["$ref"]))
        if "oneOf" in schema:
            checks.append(self._one_of([self._compile(s) for s in schema["oneOf"]]))
        if "if" in schema:
            checks.append(self._if_then_else(schema))
        generic = _all_of(checks)
        fast = _fast_path(schema)
        if fast is None:
            return generic

        def fast_or_generic(x: object) -> str | None:
            return None if fast(x) else generic(x)

        return fast_or_generic

    def _object_check(self, schema: Mapping[str, Any]) -> Check:
        subschemas = schema.get("properties", {})
        properties = {k: self._compile(v) for k, v in subschemas.items()}
        # Integer fields in bounds, or null where the schema allows it (most of a counts
        # message), are checked inline, no call.
        ranges = {k: r for k, v in subschemas.items() if (r := self._int_range(v)) is not None}
        required = tuple(schema.get("required", ()))
        required_set = frozenset(required)
        additional = schema.get("additionalProperties", True)
        if additional not in (True, False):
            raise ValueError("additionalProperties must be true or false here")
        known = frozenset(properties)

        def object_check(x: object) -> str | None:
            if not isinstance(x, dict):
                return None  # "type" says whether it must be an object
            if not required_set <= x.keys():
                missing = next(name for name in required if name not in x)
                return f": the required field {missing!r} is missing"
            if additional is False and not x.keys() <= known:
                extra = sorted(str(k) for k in x.keys() - known)[0]
                return f": unexpected field {extra[:40]!r}"
            for key, value in x.items():
                bounds = ranges.get(key)
                if bounds is not None and (
                    (type(value) is int and bounds[0] <= value <= bounds[1])
                    or (value is None and bounds[2])
                ):
                    continue
                check = properties.get(key)
                if check is not None:
                    error = check(value)
                    if error is not None:
                        return _key_path(key) + error
            return None

        return object_check

    def _int_range(self, schema: Mapping[str, Any]) -> tuple[float, float, bool] | None:
        """(minimum, maximum, null allowed) of a schema that says only "an integer in bounds",
        or "one of: an integer in bounds, null"."""
        keywords = set(schema) - _ANNOTATIONS
        if keywords == {"$ref"} and schema["$ref"].startswith("#/$defs/"):
            return self._int_range(self._root["$defs"][schema["$ref"].removeprefix("#/$defs/")])
        if schema.get("type") == "integer" and keywords <= {"type", "minimum", "maximum"}:
            return (schema.get("minimum", -math.inf), schema.get("maximum", math.inf), False)
        if keywords == {"oneOf"} and len(schema["oneOf"]) == 2:
            integer, null = schema["oneOf"]
            bounds = self._int_range(integer)
            if bounds is not None and not bounds[2] and null == {"type": "null"}:
                return (bounds[0], bounds[1], True)
        return None

    def _one_of(self, options: list[Check]) -> Check:
        def one_of(x: object) -> str | None:
            errors = [option(x) for option in options]
            if errors.count(None) == 1:
                return None
            # One alternative of the value's own type failed on a bound: that is the reason.
            near = [e for e in errors if e is not None and ", got " not in e]
            if errors.count(None) == 0 and len(near) == 1:
                return near[0]
            return f": must match exactly one of {len(options)} alternatives"

        return one_of

    def _if_then_else(self, schema: Mapping[str, Any]) -> Check:
        condition = self._compile(schema["if"])
        then = self._compile(schema.get("then", {}))
        otherwise = self._compile(schema.get("else", {}))
        return lambda x: then(x) if condition(x) is None else otherwise(x)


_KEYWORDS = frozenset(
    {
        "type",
        "const",
        "enum",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "pattern",
        "maxLength",
        "properties",
        "required",
        "additionalProperties",
        "$ref",
        "oneOf",
        "if",
        "then",
        "else",
    }
)


def _all_of(checks: list[Check]) -> Check:
    if not checks:
        return lambda x: None
    if len(checks) == 1:
        return checks[0]
    first, *rest = checks

    def all_of(x: object) -> str | None:
        error = first(x)
        if error is None:
            for check in rest:
                error = check(x)
                if error is not None:
                    break
        return error

    return all_of


def _fast_path(schema: Mapping[str, Any]) -> Callable[[object], bool] | None:
    """An exact test that accepts the common valid values of a simple schema at once (an
    ``int`` in bounds, a ``str`` that matches); anything else goes the generic way."""
    keywords = set(schema) - _ANNOTATIONS
    kind = schema.get("type")
    if kind == "integer" and keywords <= {"type", "minimum", "maximum"}:
        low = schema.get("minimum", -math.inf)
        high = schema.get("maximum", math.inf)
        return lambda x: type(x) is int and low <= x <= high
    if kind == "string" and keywords <= {"type", "pattern", "maxLength"}:
        pattern = re.compile(schema.get("pattern", ""))
        longest = schema.get("maxLength", math.inf)
        return lambda x: type(x) is str and len(x) <= longest and pattern.search(x) is not None
    if keywords == {"const"} and type(schema["const"]) in (str, int):
        value, value_type = schema["const"], type(schema["const"])
        return lambda x: type(x) is value_type and x == value
    if keywords == {"enum"} and all(type(v) is str for v in schema["enum"]):
        options = frozenset(schema["enum"])
        return lambda x: type(x) is str and x in options
    return None


def _type_check(schema: Mapping[str, Any]) -> Check:
    names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    tests = [_TYPES[name] for name in names]
    wanted = " or ".join(names)
    if names == ["integer"]:  # the commonest: counts

        def integer(x: object) -> str | None:
            if type(x) is int or _is_integer(x):
                return None
            return f": must be an integer, got {_what(x)}"

        return integer
    if names == ["object"]:

        def is_object(x: object) -> str | None:
            return None if type(x) is dict else f": must be an object, got {_what(x)}"

        return is_object

    def type_check(x: object) -> str | None:
        if any(test(x) for test in tests):
            return None
        return f": must be {wanted}, got {_what(x)}"

    return type_check


def _value_check(keyword: str, value: Any) -> Check:
    options = [value] if keyword == "const" else list(value)
    shown = json.dumps(value)

    def value_check(x: object) -> str | None:
        if any(_equal(x, option) for option in options):
            return None
        return f": must be {shown}" if keyword == "const" else f": must be one of {shown}"

    return value_check


def _number_check(schema: Mapping[str, Any]) -> Check:
    low, high = schema.get("minimum"), schema.get("maximum")
    above = schema.get("exclusiveMinimum")

    def number_check(x: object) -> str | None:
        if not _is_number(x):
            return None
        assert isinstance(x, int | float)
        if low is not None and x < low:
            return f": must be at least {low}"
        if high is not None and x > high:
            return f": must be at most {high}"
        if above is not None and x <= above:
            return f": must be more than {above}"
        return None

    return number_check


def _string_check(schema: Mapping[str, Any]) -> Check:
    pattern = re.compile(schema["pattern"]) if "pattern" in schema else None
    longest = schema.get("maxLength")

    def string_check(x: object) -> str | None:
        if not isinstance(x, str):
            return None
        if longest is not None and len(x) > longest:
            return f": must be at most {longest} characters"
        if pattern is not None and pattern.search(x) is None:
            return f": does not match {pattern.pattern}"
        return None

    return string_check


def _control_characters(value: object) -> str | None:
    """As the contract's ``validate``: no control characters in any string or key."""
    if isinstance(value, str):
        return ": control characters are not allowed" if _CONTROL.search(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            if _CONTROL.search(key):
                return ": control characters are not allowed in field names"
            error = _control_characters(item)
            if error is not None:
                return _key_path(key) + error
    return None


def _schema(name: str) -> dict[str, Any]:
    text = resources.files("firmware_agent").joinpath(f"schemas/{name}.json").read_text()
    schema: dict[str, Any] = json.loads(text)
    return schema


@functools.lru_cache(maxsize=1 << 14)
def _topic(text: str) -> Topic | None:
    try:
        return Topic.parse(text)
    except MessageError:
        return None


def canonical(kind: str, payload: Mapping[str, Any]) -> bytes:
    """:func:`canonical_json` of a validated payload; orjson (ten times faster) where it gives
    the same bytes: counts and status payloads, whose numbers are all ``int`` and whose
    strings are ASCII without escapes (their schemas' patterns)."""
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


# --- the verifier --------------------------------------------------------------------------


class Verifier:
    """Turns (topic, bytes) into :class:`Accepted` or :class:`Refusal`; keeps time spent."""

    def __init__(self, max_message_bytes: int) -> None:
        self.max_message_bytes = max_message_bytes
        self.envelope = SchemaCheck(_schema("envelope.v1"))
        self.payloads: dict[tuple[str, int | float], SchemaCheck] = {
            (kind, v): SchemaCheck(_schema(f"{kind}.v{v}"))
            for kind, versions in VERSIONS.items()
            for v in versions
        }
        self.parse_s = 0.0  # decoding, JSON, schemas, topic
        self.verify_s = 0.0  # canonical JSON and Ed25519
        self._lock = threading.Lock()

    def check(
        self, topic: str, data: bytes, registry: Registry, received_at: int
    ) -> Accepted | Refusal:
        started = time.perf_counter()
        outcome = self._parse(topic, data)
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

    def _parse(self, topic: str, data: bytes) -> Refusal | tuple[Topic, dict[str, Any], str, int]:
        where = _topic(topic)
        if where is None:
            return Refusal("bad_topic", "the topic is not footfall/v1/<site>/<agent>/<kind>")
        site, agent = where.site.value, where.agent.value

        def refuse(reason: str, detail: str) -> Refusal:
            return Refusal(reason, f"{where.kind} message: {detail}", site, agent)

        if len(data) > self.max_message_bytes:
            return refuse(
                "too_large",
                f"{len(data)} bytes, more than ingest.max_message_bytes ({self.max_message_bytes})",
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
            control = _control_characters(payload)
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
        signed = canonical(kind, payload)
        try:
            entry.verify_key.verify(signed, base64.b64decode(signature))
        except (nacl.exceptions.CryptoError, binascii.Error, ValueError):
            return Refusal(
                "bad_signature",
                f"{kind} message: the signature does not verify with the enrolled key",
                site,
                agent,
            )
        if kind == "counts" and payload["seq"] <= entry.pruned_through_seq:
            return Refusal(
                "expired",
                f"counts seq={payload['seq']} is at or below seq {entry.pruned_through_seq}, "
                "whose windows retention deleted",
                site,
                agent,
            )
        return Accepted(kind, payload, signature, entry, received_at, signed.decode(), when)
