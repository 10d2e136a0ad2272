"""Every message is accepted with its agent or refused with its own reason, never stored blind.

The fast schema check must agree with jsonschema (the contract's own validator), made strict as
the verifier is (patterns match whole strings, integers are JSON integers), on every message,
valid or not; the fast canonical encoding must give the contract's bytes.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
import random
import re
from collections.abc import Iterator
from typing import Any

import nacl.signing
import pytest
from jsonschema import Draft202012Validator, ValidationError, validators

from aggregator.registry import AgentEntry, Registry
from aggregator.verify import REASONS, Accepted, Refusal, Verifier, canonical
from firmware_agent.contract.messages import (
    AgentId,
    SiteId,
    canonical_json,
    counts_payload,
    meta_payload,
    receipt_payload,
    seal,
    status_payload,
)
from firmware_agent.contract.schema_check import SchemaCheck
from firmware_agent.stages.privacy import STANDARD_PUBLISHES
from tests.agent.test_messages import _window
from tests.support.agent_fleet import fast_seal, window
from tests.support.aggregator_harness import Agent

TOPIC = "footfall/v1/s1/a1/counts"
NOW = 1_730_000_000  # 2024-10-27: the messages' windows are from 2024-03-05
PRUNED_BEFORE = 1_709_596_800  # 2024-03-05T00:00:00Z: retention deleted what came before


@pytest.fixture
def agent() -> Agent:
    return Agent()


def registry_of(*entries: tuple[Agent, bool]) -> Registry:
    return Registry(
        1,
        {
            (a.site, a.agent): AgentEntry(
                i + 1, a.site, a.agent, a.key.verify_key, revoked, "UTC", PRUNED_BEFORE
            )
            for i, (a, revoked) in enumerate(entries)
        },
    )


def check(data: bytes, registry: Registry, topic: str = TOPIC) -> Accepted | Refusal:
    return Verifier(65536).check(topic, data, registry, NOW)


def refused(result: Accepted | Refusal) -> str:
    assert isinstance(result, Refusal), f"accepted: {result}"
    assert result.reason in REASONS
    return result.reason


def test_a_signed_message_from_an_enrolled_agent_is_accepted(agent: Agent) -> None:
    result = check(agent.counts(7, "2024-03-05T10:55:00Z"), registry_of((agent, False)))
    assert isinstance(result, Accepted)
    assert (result.kind, result.payload["seq"], result.window_start) == ("counts", 7, 1709636100)


def _tampered(agent: Agent, edit: Any) -> bytes:
    envelope = json.loads(agent.counts(7, "2024-03-05T10:55:00Z"))
    edit(envelope)
    return canonical_json(envelope)


def test_hostile_messages_are_each_refused_with_their_own_reason(agent: Agent) -> None:
    other, revoked = Agent("s1", "a2"), Agent("s1", "a3")
    registry = registry_of((agent, False), (revoked, True))
    good = agent.counts(7, "2024-03-05T10:55:00Z")

    def forge(e: dict[str, Any]) -> None:
        e["payload"]["probe_requests"] = 500  # the signature no longer covers it

    def respell(e: dict[str, Any]) -> None:
        sig = e["sig"]
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
        e["sig"] = sig[:85] + alphabet[alphabet.index(sig[85]) | 1] + "=="  # bits base64 drops
        assert base64.b64decode(e["sig"]) == base64.b64decode(sig)

    def extra_field(e: dict[str, Any]) -> None:
        e["payload"]["mac"] = "aa:bb:cc:dd:ee:ff"

    deep = b'{"alg":"ed25519","payload":' + b'{"a":' * 5000 + b"1" + b"}" * 5001
    cases = {
        "forged signature": (_tampered(agent, forge), TOPIC, "bad_signature"),
        "signature spelled with other trailing bits (same bytes)": (
            _tampered(agent, respell),
            TOPIC,
            "sig_encoding",
        ),
        "signed by another key": (
            other.counts(7, "2024-03-05T10:55:00Z").replace(b'"a2"', b'"a1"'),
            TOPIC,
            "bad_signature",
        ),
        "unknown agent": (other.counts(7, "2024-03-05T10:55:00Z"), other.topic, "unknown_agent"),
        "revoked agent": (
            revoked.counts(7, "2024-03-05T10:55:00Z"),
            revoked.topic,
            "revoked_agent",
        ),
        "extra field": (_tampered(agent, extra_field), TOPIC, "schema"),
        "ids that disagree with the topic": (good, "footfall/v1/s1/a9/counts", "topic_mismatch"),
        "kind that disagrees with the topic": (good, "footfall/v1/s1/a1/status", "topic_mismatch"),
        "10 MB payload": (b"{" + b" " * (10 << 20) + b"}", TOPIC, "too_large"),
        "invalid UTF-8": (good.replace(b"entrance", b"\xff\xfe") + b"\xc3\x28", TOPIC, "not_utf8"),
        "deeply nested JSON": (deep, TOPIC, "too_deep"),
        "not JSON": (b"counts!", TOPIC, "not_json"),
        "NaN": (good.replace(b'"devices":11', b'"devices":NaN'), TOPIC, "not_json"),
        "not a footfall topic": (good, "footfall/v2/s1/a1/counts", "bad_topic"),
        "impossible date": (
            _tampered(agent, lambda e: e["payload"].update(window_start="2024-13-45T10:55:00Z")),
            TOPIC,
            "schema",
        ),
        "replay of a window retention deleted": (
            agent.counts(5, "2024-03-04T10:55:00Z"),
            TOPIC,
            "expired",
        ),
    }
    reasons = {
        name: refused(check(data, registry, topic)) for name, (data, topic, _) in cases.items()
    }
    assert reasons == {name: reason for name, (_, _, reason) in cases.items()}


def test_a_refusal_names_the_field_or_agent_and_never_quotes_the_payload(agent: Agent) -> None:
    registry = registry_of((agent, False))

    def extra(e: dict[str, Any]) -> None:
        e["payload"]["ssid"] = "MyHomeNetwork-5G"

    def negative(e: dict[str, Any]) -> None:
        e["payload"]["devices"] = -3

    def secret_epoch(e: dict[str, Any]) -> None:
        e["payload"]["epoch"] = "aa:bb:cc:dd:ee:ff"

    details = [check(_tampered(agent, edit), registry) for edit in (extra, negative, secret_epoch)]
    texts = [r.detail for r in details if isinstance(r, Refusal)]
    assert texts == [
        "counts message: $: unexpected field 'ssid'",
        "counts message: $.devices: must be at least 0",
        "counts message: $.epoch: does not match ^[0-9a-f]{16}$",
    ]
    assert not any("MyHome" in t or "aa:bb" in t or "-3" in t for t in texts)
    unknown = check(
        Agent("s1", "zz").counts(1, "2024-03-05T10:55:00Z"), registry, "footfall/v1/s1/zz/counts"
    )
    assert isinstance(unknown, Refusal) and unknown.who == "s1/zz"


def _mutations(payload: dict[str, Any], rng: random.Random) -> list[Any]:
    """Payloads near a valid one: values of every JSON type in every field, fields removed
    and added, nested too."""
    values: list[Any] = [
        0,
        1,
        -1,
        1.0,
        2.5,
        9007199254740991,
        9007199254740992,
        True,
        False,
        None,
        "",
        "x",
        "counts",
        "s1\n",
        "2024-03-05T10:55:00Z\n",
        [],
        {},
        [1],
        {"a": 1},
        1e300,
        "0123456789abcdef",
        "9f3c1a7e52b04d6",
        "online",
        "midnight",
        60,
        86400,
        -120,
    ]
    out: list[Any] = [payload]
    for key in list(payload):
        for value in values:
            changed = copy.deepcopy(payload)
            changed[key] = value
            out.append(changed)
        removed = copy.deepcopy(payload)
        del removed[key]
        out.append(removed)
        if isinstance(payload[key], dict):
            for inner in list(payload[key]):
                for value in rng.sample(values, 6):
                    changed = copy.deepcopy(payload)
                    changed[key][inner] = value
                    out.append(changed)
                changed = copy.deepcopy(payload)
                changed[key]["extra"] = 1
                out.append(changed)
        if isinstance(payload[key], list):  # a receipt's gaps: pairs of seqs, at most 255
            for items in ([[1]], [[1, 2, 3]], [[0, 1]], [[1, 2.0]], [[1, 2]] * 256, [[1, 2], 3]):
                out.append(payload | {key: items})
    for value in values:
        out.append(payload | {"unknown": value})
    out += [None, [], "counts", 1]
    return out


V2_WINDOW = _window() | {  # with suppressed counts too
    "passersby": None,
    "dwell_minutes": {"lt5": 0, "5-15": None, "15-30": None, "30-60": 0, "ge60": 0},
}


@pytest.mark.parametrize(
    "name",
    [
        "counts.v1",
        "counts.v2",
        "status.v1",
        "status.v2",
        "meta.v1",
        "meta.v2",
        "envelope.v1",
        "receipt.v1",
    ],
)
def test_the_fast_schema_check_agrees_with_jsonschema(name: str) -> None:
    site, agent = SiteId("s1"), AgentId("a1")
    privacy = {
        "mode": "standard",
        "device_hash": "siphash-2-4",
        "key_bits": 128,
        "key_lifetime_s": 90000,
        "id_bits": None,
        "suppress_below": 5,
        "dp_epsilon": 0.5,
        "dp_epsilon_day": 144.0,
    }
    thresholds = {"rssi_threshold_dbm": -75, "min_dwell_s": 120, "visit_gap_s": 600}
    meta = meta_payload(
        site,
        agent,
        agent_version="0.1.0",
        window_s=300,
        epoch_length="midnight",
        epoch_timezone="Europe/Paris",
        thresholds=thresholds | {"lateness_s": 10, "presence_hold_s": 120},
        privacy=privacy | {"published": dict.fromkeys(STANDARD_PUBLISHES, True)},
    )
    v1_meta = {k: v for k, v in meta.items() if k != "counts_v"} | {"v": 1}
    v1_meta["thresholds"] = thresholds | {"lateness_s": 10}
    v1_meta["privacy"] = privacy
    samples = {
        "counts.v1": counts_payload(
            site, agent, 3, "9f3c1a7e52b04d68", window(0) | {"people_est": 4}, version=1
        ),
        "counts.v2": counts_payload(site, agent, 3, "9f3c1a7e52b04d68", V2_WINDOW),
        "status.v1": status_payload(
            site,
            agent,
            cause="connected",
            at=0,
            spool_pending=1,
            spool_dropped=0,
            last_seq=3,
            version=1,
        ),
        "status.v2": status_payload(
            site,
            agent,
            cause="lost",
            at=0,
            spool_pending=1,
            spool_dropped=0,
            last_seq=3,
            evictions=(2, 7),
        ),
        "meta.v1": v1_meta,
        "meta.v2": meta,
        "envelope.v1": {"alg": "ed25519", "payload": {}, "sig": "A" * 86 + "=="},
        "receipt.v1": receipt_payload(site, agent, [(5, 9), (12, 12), (20, 30)], 0),
    }
    schema = json.loads(
        (
            __import__("importlib").resources.files("firmware_agent.contract")
            / f"schemas/{name}.json"
        ).read_text()
    )
    kind = name.partition(".")[0]
    fast, slow = SchemaCheck(schema), STRICT(schema)
    cases = _mutations(samples[name], random.Random(kind))
    disagreements = [case for case in cases if (fast.errors(case) is None) != slow.is_valid(case)]
    assert disagreements == []
    assert sum(fast.errors(c) is None for c in cases) >= 3  # the valid side is exercised too


def _whole_pattern(
    validator: Any, pattern: str, instance: object, _schema: Any
) -> Iterator[ValidationError]:
    if isinstance(instance, str) and re.fullmatch(pattern[1:-1], instance) is None:
        yield ValidationError(f"{instance!r} does not match {pattern!r} as a whole")


STRICT = validators.extend(
    Draft202012Validator,
    validators={"pattern": _whole_pattern},
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _checker, x: type(x) is int
    ),
)


def test_the_strict_checks_refuse_what_plain_jsonschema_lets_through() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "s": {"pattern": "^a$"}}}
    for instance in ({"n": 11.0}, {"s": "a\n"}):
        assert Draft202012Validator(schema).is_valid(instance)
        assert SchemaCheck(schema).errors(instance) is not None
        assert not STRICT(schema).is_valid(instance)


def test_an_unknown_schema_keyword_is_an_error_not_a_silent_pass() -> None:
    with pytest.raises(ValueError, match="unsupported JSON Schema keywords: \\['format'\\]"):
        SchemaCheck({"type": "string", "format": "date-time"})


def test_the_fast_canonical_encoding_is_the_contracts(agent: Agent) -> None:
    rng = random.Random(3)
    for i in range(300):
        extra = {"people_est": rng.randrange(99), "people": rng.randrange(99)} if i % 2 else {}
        w = window(i, rng.randrange(1000)) | extra | {"devices": rng.randrange(2**53)}
        payload = counts_payload(
            SiteId("s1"), AgentId("a-1_x"), rng.randrange(1, 2**53), "0" * 16, w, version=1
        )
        assert canonical("counts", payload) == canonical_json(payload)
    status = status_payload(
        SiteId("s1"),
        AgentId("a1"),
        cause="lost",
        at=9,
        spool_pending=1,
        spool_dropped=2,
        last_seq=3,
    )
    assert canonical("status", status) == canonical_json(status)


def test_the_verifier_accepts_what_the_agent_seals(agent: Agent) -> None:
    key = nacl.signing.SigningKey(bytes(32))
    signed = seal(
        counts_payload(
            SiteId("shop-12"),
            AgentId("entrance"),
            1709631000,
            "9f3c1a7e52b04d68",
            window(0),
            version=1,
        ),
        key,
    )
    shop = Agent("shop-12", "entrance")
    shop.key = key
    result = check(signed, registry_of((shop, False)), shop.topic)
    assert isinstance(result, Accepted)
    assert fast_seal(result.payload, key) == signed


@pytest.mark.parametrize(
    ("fields", "broken"),
    [
        ({"visits_ended": 2, "dwell_minutes": {"lt5": 1, "5-15": 0, "15-30": 0, "30-60": 0,
          "ge60": 0}}, "visits_ended is 2 but dwell_minutes.lt5"),
        ({"occupancy_mean": 15.5}, "occupancy_mean (15.5) is more than occupancy_peak (15)"),
        ({"devices_randomised": 32}, "devices_randomised (32) is more than devices (31)"),
    ],
    ids=["dwell", "occupancy", "randomised"],
)  # fmt: skip
def test_counts_v2_are_held_to_their_own_rules_unless_the_agent_adds_noise(
    agent: Agent, fields: dict[str, Any], broken: str
) -> None:
    def sealed(window: dict[str, Any]) -> bytes:
        payload = counts_payload(SiteId("s1"), AgentId("a1"), 9, "9f3c1a7e52b04d68", window)
        return fast_seal(payload, agent.key)

    exact = registry_of((agent, False))
    assert isinstance(check(sealed(V2_WINDOW), exact), Accepted)
    result = check(sealed(V2_WINDOW | fields), exact)
    assert isinstance(result, Refusal) and result.reason == "inconsistent"
    assert broken in result.detail
    entry = exact.agents[("s1", "a1")]
    noisy = Registry(2, {("s1", "a1"): dataclasses.replace(entry, noisy=True)})
    assert isinstance(check(sealed(V2_WINDOW | fields), noisy), Accepted)
