"""``footfall-agent audit``: PASS on what real agents publish (from a broker and from a
capture of their traffic), FAIL with its own reason on each kind of leak."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any

import nacl.signing
import pytest

from firmware_agent.contract.fields import (
    CATALOGUE,
    DWELL,
    DWELL_BANDS,
    STANDARD_PUBLISHES,
    STRICT_PUBLISHES,
)
from firmware_agent.contract.messages import (
    AgentId,
    SiteId,
    canonical_json,
    counts_payload,
    meta_payload,
    seal,
    status_payload,
)
from firmware_agent.service.homeassistant import discovery_message
from firmware_agent.stages.privacy import epoch_label
from firmware_agent.tools.audit import Audit

SITE, AGENT = "shop-12", "entrance"
KEY = nacl.signing.SigningKey(bytes(range(32)))


def _meta(mode: str = "standard", **privacy: object) -> dict[str, Any]:
    strict = mode == "strict"
    return meta_payload(
        SiteId(SITE),
        AgentId(AGENT),
        agent_version="0.1.0",
        window_s=300,
        epoch_length=300 if strict else "midnight",
        epoch_timezone="UTC",
        thresholds={
            "rssi_threshold_dbm": -75,
            "min_dwell_s": 120,
            "visit_gap_s": 600,
            "lateness_s": 10,
            "presence_hold_s": 120,
        },
        privacy={
            "mode": mode,
            "device_hash": "siphash-2-4",
            "key_bits": 128,
            "key_lifetime_s": 300 if strict else 86400,
            "id_bits": 6 if strict else None,
            "suppress_below": 5,
            "dp_epsilon": None,
            "dp_epsilon_day": None,
            "published": {
                name: not strict or name in STRICT_PUBLISHES for name in STANDARD_PUBLISHES
            },
        }
        | privacy,
    )


MIDNIGHT = int(datetime(2024, 3, 5, tzinfo=UTC).timestamp())
LABEL = epoch_label(KEY.verify_key.encode(), MIDNIGHT)  # the day's epoch, begun at midnight


def _counts(seq: int = 1, epoch: str = LABEL, **fields: Any) -> dict[str, Any]:
    window = {
        "window_start": f"2024-03-05T10:{5 * (seq % 12):02d}:00Z",
        "window_s": 300,
        "probe_requests": 96,
        "malformed": 0,
        "late_frames": 0,
        "devices": 20,
        "devices_randomised": 10,
        "visitors": 12,
        "passersby": 8,
        "visits_ended": 9,
        "dwell_minutes": {"lt5": 0, "5-15": 9, "15-30": 0, "30-60": 0, "ge60": 0},
    }
    window = {k: v for k, v in (window | fields).items() if v is not _ABSENT}
    return counts_payload(SiteId(SITE), AgentId(AGENT), seq, epoch, window, version=1)


def _counts_v2(seq: int = 1, **fields: Any) -> dict[str, Any]:
    """A strict agent's counts v2: the device diagnostics only."""
    window = {
        "window_start": f"2024-03-05T10:{5 * (seq % 12):02d}:00Z",
        "window_s": 300,
        "no_data": False,
        "probe_requests": 96,
        "malformed": 0,
        "late_frames": 0,
        "devices": 20,
        "devices_randomised": 10,
    }
    return counts_payload(SiteId(SITE), AgentId(AGENT), seq, LABEL, window | fields)


_ABSENT = object()
_STRICT = {"visits_ended": _ABSENT, "dwell_minutes": _ABSENT}
# A schema-valid value of each optional field, to publish where it must not be.
_SAMPLE: dict[str, object] = {DWELL: dict.fromkeys(DWELL_BANDS, 0), "calibrated": False}
_SAMPLE |= {"occupancy_mean": 7.5}


def _audit(*payloads: dict[str, Any], key: nacl.signing.SigningKey = KEY) -> Audit:
    audit = Audit({f"{SITE}/{AGENT}": KEY.verify_key})
    for p in payloads:
        audit.add(f"footfall/v1/{p['site']}/{p['agent']}/{p['kind']}", seal(p, key))
    return audit


def _reasons(audit: Audit) -> list[str]:
    return [f.reason for f in audit.findings() if f.level == "fail"]


def test_honest_messages_pass() -> None:
    audit = _audit(_meta(), _counts(1), _counts(2, visitors=None, passersby=None))
    assert _reasons(audit) == []
    assert audit.verdict()
    assert "verdict: PASS" in audit.report()


def test_status_v1_and_v2_pass_and_a_status_with_more_than_its_schema_fails() -> None:
    """Status v2's eviction rounds are part of the contract the audit checks (an agent of
    this release publishes them); a status that adds a figure of its own breaks it."""
    status = {
        version: status_payload(
            SiteId(SITE),
            AgentId(AGENT),
            cause="connected",
            at=1_709_625_600,
            spool_pending=2,
            spool_dropped=0,
            last_seq=7,
            evictions=(3, 11),
            version=version,
        )
        for version in (1, 2)
    }
    audit = _audit(_meta(), status[1], status[2], _counts(1))
    assert (_reasons(audit), audit.verdict()) == ([], True)
    leaky = status[2] | {"devices_epoch": 250_001}
    body = canonical_json(leaky)
    envelope = {"alg": "ed25519", "payload": leaky, "sig": ""}
    envelope["sig"] = base64.b64encode(KEY.sign(body).signature).decode()
    audit.add(f"footfall/v1/{SITE}/{AGENT}/status", canonical_json(envelope))
    assert _reasons(audit) == [
        "breaks the contract: status message: $: unexpected field 'devices_epoch'"
    ]


@pytest.mark.parametrize(
    ("payloads", "reason"),
    [
        ([_meta(), _counts(visitors=3, passersby=17)], "$.visitors is a small count below k=5"),
        (
            [_meta(), _counts(devices_randomised=18)],
            "devices with global addresses follows by subtraction and is below k=5",
        ),
        ([_meta(), _counts(visitors=None, passersby=17)], "$.visitors follows by subtraction"),
        ([_meta("strict"), _counts()], "strict mode publishes visits_ended, dwell_minutes"),
        ([_meta(suppress_below=1), _counts()], "below the floor of 2"),
        ([_counts(1)], "no meta message seen: it declares no privacy mode"),
        ([_meta(), _counts(1, epoch="a45e60010203abcd")], "is not derived from the agent's"),
        ([_meta(), _counts(1, devices_epoch=80)], "publishes devices_epoch: a membership oracle"),
        ([_meta(), _counts(1, people_est=9)], "publishes people_est: a membership oracle"),
        ([_meta("strict", id_bits=16), _counts(**_STRICT)], "strict mode with 16-bit ids"),
        (
            [_meta("strict"), _counts(**_STRICT, static_excluded=10)],
            "strict mode publishes static_excluded",
        ),
        ([_meta(key_lifetime_s=90000), _counts()], "standard mode keeps a key 90000 s"),
        (
            [_meta(), _counts(1), _counts(2, window_start="2024-03-06T10:55:00Z")],
            "one epoch label spans 89700 s of windows",
        ),
        (
            [_meta(), _counts(1, agent="aabbccddeeff")],
            "$.agent holds text shaped like a MAC address",
        ),
        ([_meta(), _counts(1, devices=0xA45E60010203)], "$.devices is a 48-bit"),
    ],
)
def test_each_leak_fails_with_its_reason(payloads: list[dict[str, Any]], reason: str) -> None:
    audit = _audit(*payloads)
    assert not audit.verdict()
    assert any(reason in r for r in _reasons(audit)), _reasons(audit)


def test_a_strict_agent_that_publishes_static_excluded_fails() -> None:
    """Issue 19: the audit's hand copy of what strict mode omits let a strict agent publish
    ``static_excluded`` (the estimator's static devices: devices followed for hours). Written
    out here, not read from the catalogue, so a catalogue that drops it fails too."""
    for counts in (_counts_v2(static_excluded=0), _counts(**_STRICT, static_excluded=10)):
        audit = _audit(_meta("strict"), counts)
        assert "strict mode publishes static_excluded" in _reasons(audit)
        assert not audit.verdict()


@pytest.mark.parametrize(
    ("v", "name"), [(v, name) for v, c in CATALOGUE.items() for name in c.strict_omits]
)
def test_every_field_strict_omits_fails_in_strict_mode(v: int, name: str) -> None:
    """Each field the catalogue says strict mode omits, published by a strict agent, fails
    with its name (in counts v1 and v2)."""
    counts = _counts(**_STRICT) if v == 1 else _counts_v2()
    audit = _audit(_meta("strict"), counts | {name: _SAMPLE.get(name, 10)})
    assert f"strict mode publishes {name}" in _reasons(audit)


@pytest.mark.parametrize(
    ("v", "name"), [(v, name) for v, c in CATALOGUE.items() for name in c.dp_withheld]
)
def test_every_field_noise_withholds_fails_under_noise(v: int, name: str) -> None:
    counts = _counts() if v == 1 else _counts_v2()
    audit = _audit(_meta(dp_epsilon=1.0), counts | {name: _SAMPLE.get(name, 10)})
    assert any(r.startswith("noised counts publish") and name in r for r in _reasons(audit)), (
        _reasons(audit)
    )


def test_a_message_off_the_agent_topics_fails_and_home_assistant_discovery_passes() -> None:
    """Listening on '#': Home Assistant's discovery config of an agent (exactly the one footfall
    publishes) and its birth message are recognised; anything else off the agent topics fails,
    and so does a discovery config that is not footfall's."""
    topic, config = discovery_message("homeassistant", SiteId(SITE), AgentId(AGENT))
    honest = _audit(_meta(), _counts(1))
    honest.add(topic, config)
    honest.add("homeassistant/status", b"online")
    assert _reasons(honest) == [] and honest.verdict()
    elsewhere = _audit(_meta(), _counts(1))
    elsewhere.add(f"shop/{SITE}/{AGENT}/counts", seal(_counts(2), KEY))
    assert any("published off the agent topics" in r for r in _reasons(elsewhere))
    tampered = _audit(_meta())
    tampered.add(topic, config.replace(b"{", b'{"ssid": "MyHome", ', 1))
    assert "not the Home Assistant discovery config a footfall agent publishes" in _reasons(
        tampered
    )


def test_a_payload_outside_the_contract_fails_and_is_scanned() -> None:
    audit = Audit({})
    body = (
        b'{"alg":"ed25519","payload":{"kind":"counts","ssid":"MyHome","mac":"a4:5e:60:01:02:03"}}'
    )
    audit.add(f"footfall/v1/{SITE}/{AGENT}/counts", body)
    reasons = _reasons(audit)
    assert any("breaks the contract" in r for r in reasons)
    assert not audit.verdict()


def test_a_forged_signature_and_a_shared_key_fail() -> None:
    other = nacl.signing.SigningKey(bytes(32))
    forged = _audit(_meta(), _counts(1), key=other)
    assert "the signature does not verify with the given public key" in _reasons(forged)
    audit = Audit({})
    for agent in ("a1", "a2"):
        p = _counts(1) | {"agent": agent}
        audit.add(f"footfall/v1/{SITE}/{agent}/counts", seal(p, KEY))
    assert any("agents share epoch label" in r for r in _reasons(audit))
    warnings = [f.reason for f in audit.findings() if f.level == "warn"]
    assert any("signatures not checked" in w for w in warnings)
