"""The contract's JSON Schema check: each schema compiled once into plain Python closures.

Both programs check the contract's own schemas (``firmware_agent/contract/schemas``) with it:
ingest's verifier on every message it receives, the agent's ``seal`` on every message it
sends. It covers the keywords the footfall schemas use, with JSON Schema's semantics made
strict in two ways (``const`` tells ``True`` from ``1`` as jsonschema does):

* a ``pattern`` (each is anchored, ``^...$``) must match the **whole** string (``re.fullmatch``):
  with ``re.search``, ``$`` also matches before a final newline, so a signature with a ``\n``
  after it passed, decoded to the same bytes, verified, and was 89 characters long, one more
  than the ``windows.sig`` column holds (PostgreSQL refused the insert: issue 16);
* an integer is an ``int`` that is not a ``bool``: JSON ``11.0`` is a number, refused where
  the contract says integer (no agent writes it; a count that is a float is not a count).

**Why ours and not a maintained validator** (``bench/bench_schema.py``, the envelope and a
counts v2 payload of the agent's own messages, 1,000 of them, best of 5, one run, 2 cores at
load 10.7):

=====================================  ==============  =========  ============  ===========
check                                  µs / message    x ours     refuses 11.0  no values
=====================================  ==============  =========  ============  ===========
``SchemaCheck`` (this module)          37.3            1          yes           yes
jsonschema 4.26 ``is_valid``           2,640           70.8       no            no
jsonschema, ``best_match`` (old seal)  2,600           69.7       no            no
fastjsonschema 2.22.3                  113.3           3.0        no            yes
jsonschema-rs 0.60 ``is_valid``        3.3             0.09       no            no
=====================================  ==============  =========  ============  ===========

jsonschema is 70 times slower: the agent's ``seal`` took 2.6-3.6 ms a message with it (a
backfill of 100,000 windows: 527 s at that load, issue 18's goal 30 s) and 0.26-0.36 ms with
this check (the backfill: 33 s at load 10.6, ``bench/bench_spool.py``). fastjsonschema is 3
times slower than ours and accepts ``11.0``. jsonschema-rs is 11 times faster (34 µs a message
saved, about 13 % of ingest's 260 µs of CPU a message, ``docs/aggregator.md``), but it accepts
``11.0`` (JSON Schema's integer, with no option to refuse it), quotes the payload's values in
its reasons (the verifier's refusals never do) and is a compiled Rust extension the agent would
have to install on a Raspberry Pi; and two checkers, one per program, would be two readings of
the contract. So the contract keeps this one: the standard library only, which also took
jsonschema (and its four dependencies, one of them a Rust extension, ``rpds-py``) off the
agent's install; jsonschema stays a test dependency that the tests hold this check equal to.

A keyword it does not know, or a pattern that is not anchored at both ends, is an error at
start-up, never a silent pass, and the tests hold it equal to jsonschema made strict the same
way on thousands of mutated messages.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable, Mapping
from importlib import resources
from typing import Any, TypeGuard

__all__ = ["SchemaCheck", "check_for", "control_characters", "schema"]

_CONTROL = re.compile("[\x00-\x1f\x7f]")


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
    return type(x) is int


def _is_number(x: object) -> TypeGuard[int | float]:
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
        if {"prefixItems", "items", "minItems", "maxItems"} & schema.keys():
            checks.append(self._array_check(schema))
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

    def _array_check(self, schema: Mapping[str, Any]) -> Check:
        """``prefixItems``, then ``items`` for the rest (``false``: no more), ``minItems``,
        ``maxItems`` (a receipt's gaps: pairs of seqs)."""
        prefix = [self._compile(s) for s in schema.get("prefixItems", ())]
        items = schema.get("items", True)
        rest = None if isinstance(items, bool) else self._compile(items)
        low = schema.get("minItems", 0)
        high = len(prefix) if items is False else schema.get("maxItems", math.inf)
        high = min(high, schema.get("maxItems", math.inf))

        def array_check(x: object) -> str | None:
            if not isinstance(x, list):
                return None  # "type" says whether it must be an array
            if len(x) < low:
                return f": must have at least {low} items"
            if len(x) > high:
                return f": must have at most {high} items"
            for i, value in enumerate(x):
                check = prefix[i] if i < len(prefix) else rest
                error = None if check is None else check(value)
                if error is not None:
                    return f"[{i}]{error}"
            return None

        return array_check

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
        "prefixItems",
        "items",
        "minItems",
        "maxItems",
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
        whole = _whole("pattern" in schema and schema["pattern"])
        longest = schema.get("maxLength", math.inf)
        return lambda x: type(x) is str and len(x) <= longest and whole(x)
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
            if type(x) is int:
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
        if low is not None and x < low:
            return f": must be at least {low}"
        if high is not None and x > high:
            return f": must be at most {high}"
        if above is not None and x <= above:
            return f": must be more than {above}"
        return None

    return number_check


def _whole(pattern: str | bool) -> Callable[[str], bool]:
    """Whether a string matches an anchored pattern (``^...$``) as a whole (see the module
    docstring); any string without a pattern."""
    if pattern is False:
        return lambda x: True
    if not isinstance(pattern, str) or not (
        pattern.startswith("^") and pattern.endswith("$") and not pattern.endswith("\\$")
    ):
        raise ValueError(f"unsupported pattern {pattern!r}: only '^...$', matched as a whole")
    body = re.compile(pattern[1:-1])
    return lambda x: body.fullmatch(x) is not None


def _string_check(schema: Mapping[str, Any]) -> Check:
    pattern = schema.get("pattern")
    whole = _whole(pattern if pattern is not None else False)
    longest = schema.get("maxLength")

    def string_check(x: object) -> str | None:
        if not isinstance(x, str):
            return None
        if longest is not None and len(x) > longest:
            return f": must be at most {longest} characters"
        if not whole(x):
            return f": does not match {pattern}"
        return None

    return string_check


def control_characters(value: object) -> str | None:
    """None, else ``<path>: control characters ...``: no string or field name holds one (a
    pattern says nothing about a field name, and JSON Schema's ``$`` matches before a final
    newline)."""
    if isinstance(value, str):
        return ": control characters are not allowed" if _CONTROL.search(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            if _CONTROL.search(key):
                return ": control characters are not allowed in field names"
            error = control_characters(item)
            if error is not None:
                return _key_path(key) + error
    return None


def schema(name: str) -> dict[str, Any]:
    """The contract's schema ``name`` (``counts.v2``, ``envelope.v1``, ...)."""
    text = resources.files("firmware_agent.contract").joinpath(f"schemas/{name}.json").read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


@functools.cache
def check_for(name: str) -> SchemaCheck:
    """The contract's schema ``name``, compiled once per process."""
    return SchemaCheck(schema(name))
