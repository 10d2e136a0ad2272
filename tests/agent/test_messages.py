"""The message contract: ids and topics checked where made, strict schemas that name the field
at fault, signatures over canonical JSON, a module light enough for the aggregator, and
docs/messages.md kept honest (every field documented, every example valid)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any

import jsonschema
import nacl.signing
import pytest

from firmware_agent.cli import BUNDLED_SAMPLE
from firmware_agent.contract.errors import MessageError, SchemaError, SignatureError
from firmware_agent.contract.fields import EVICTIONS
from firmware_agent.contract.messages import (
    AgentId,
    Envelope,
    SiteId,
    Topic,
    canonical_json,
    counts_payload,
    public_key_text,
    receipt_payload,
    seal,
    settled_ranges,
    status_payload,
    validate,
    verify_key_from_text,
)
from firmware_agent.settings import load_config
from firmware_agent.stages.capture import CaptureReader
from firmware_agent.stages.pipeline import Pipeline
from tests.support.shared import REPO

DOC = REPO / "docs" / "messages.md"
SCHEMAS = REPO / "firmware_agent" / "contract" / "schemas"
KEY = nacl.signing.SigningKey(bytes(32))  # the example key of docs/messages.md
SITE, AGENT = SiteId("shop-12"), AgentId("entrance")


def _window() -> dict[str, Any]:
    return {
        "window_start": "2024-03-05T10:55:00Z",
        "window_s": 300,
        "no_data": False,
        "probe_requests": 96,
        "malformed": 0,
        "late_frames": 0,
        "arrivals": 6,
        "passersby": 14,
        "visits_ended": 18,
        "dwell_minutes": {"lt5": 5, "5-15": 5, "15-30": 1, "30-60": 1, "ge60": 6},
        "occupancy_mean": 12.37,
        "occupancy_peak": 15,
        "calibrated": False,
        "devices": 31,
        "devices_randomised": 24,
        "static_excluded": 0,
    }


def _v1_window() -> dict[str, Any]:
    return {
        "window_start": "2024-03-05T10:55:00Z",
        "window_s": 300,
        "probe_requests": 96,
        "malformed": 0,
        "late_frames": 0,
        "devices": 11,
        "devices_randomised": 3,
        "visitors": 8,
        "passersby": 3,
        "visits_ended": 18,
        "dwell_minutes": {"lt5": 5, "5-15": 5, "15-30": 1, "30-60": 1, "ge60": 6},
        "devices_epoch": 289,
    }


def _counts() -> dict[str, object]:
    return counts_payload(SITE, AGENT, 812, "9f3c1a7e52b04d68", _window())


@pytest.mark.parametrize("bad", ["Shop 1", "", "-x", "a/b", "a" * 64, "s1\n", "é"])
def test_ids_refuse_what_does_not_match_the_pattern(bad: str) -> None:
    with pytest.raises(MessageError, match=r"site id must match \[a-z0-9\]\[a-z0-9_-\]\{0,62\}"):
        SiteId(bad)
    with pytest.raises(MessageError, match="agent id must match"):
        AgentId(bad)


def test_topics_are_built_and_parsed() -> None:
    topic = Topic(SITE, AGENT, "counts")
    assert str(topic) == "footfall/v1/shop-12/entrance/counts"
    assert Topic.parse(str(topic)) == topic
    for bad in ("footfall/v2/s/a/counts", "footfall/v1/s/a/counts/x", "footfall/v1/S/a/meta"):
        with pytest.raises(MessageError):
            Topic.parse(bad)
    with pytest.raises(MessageError, match="topic kind must be one of counts, status, meta"):
        Topic(SITE, AGENT, "debug")


def test_canonical_json_sorts_keys_without_whitespace() -> None:
    assert (
        canonical_json({"b": 1, "a": {"d": "é", "c": [1, 2]}})
        == '{"a":{"c":[1,2],"d":"é"},"b":1}'.encode()
    )


def test_sealed_message_verifies_and_tampering_does_not() -> None:
    data = seal(_counts(), KEY)
    envelope = Envelope.parse(data)
    assert envelope.verify(KEY.verify_key) == _counts()
    assert str(envelope.topic) == "footfall/v1/shop-12/entrance/counts"
    forged = data.replace(b'"arrivals":6', b'"arrivals":7')
    with pytest.raises(SignatureError, match="does not verify with the enrolled key"):
        Envelope.parse(forged).verify(KEY.verify_key)
    other = nacl.signing.SigningKey.generate()
    with pytest.raises(SignatureError):
        envelope.verify(other.verify_key)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mac": "a4:5e:60:01:02:03"}, r"counts message: \$: unexpected field 'mac'"),
        ({"devices": -1}, r"counts message: \$.devices: must be at least 0"),
        ({"seq": 0}, r"counts message: \$.seq: must be at least 1"),
        ({"epoch": "not hex"}, r"counts message: \$.epoch: does not match"),
        ({"window_start": "2024-03-05 10:55"}, r"counts message: \$.window_start"),
        ({"dwell_minutes": {"lt5": 1}}, r"\$.dwell_minutes: the required field '5-15' is missing"),
        ({"site": "s1\n"}, r"counts message: \$.site: does not match"),  # as a whole
        ({"v": 3}, r"payload: \$.kind and \$.v must name a known schema \(counts v1/2, "),
        ({"v": 1}, r"counts message: \$: the required field 'visitors' is missing"),
        ({"devices_epoch": 289}, r"counts message: \$: unexpected field 'devices_epoch'"),
        ({"visitors": 8}, r"counts message: \$: unexpected field 'visitors'"),
        ({"occupancy_mean": 1.234}, r"\$.occupancy_mean: 1.234 has more than 2 decimals"),
        ({"occupancy_mean": -1}, r"\$.occupancy_mean"),
        ({"no_data": True}, r"\$.arrivals: must be null when \$.no_data is true, got 6"),
        ({"no_data": None}, r"counts message: \$.no_data: must be boolean, got null"),
    ],
)
def test_schema_errors_name_the_field(change: dict[str, object], message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        validate(_counts() | change)
    with pytest.raises(SchemaError):
        seal(_counts() | change, KEY)  # the agent cannot send what does not validate


def test_counts_v1_still_validates_and_verifies() -> None:
    v1 = counts_payload(SITE, AGENT, 812, "9f3c1a7e52b04d68", _v1_window(), version=1)
    assert Envelope.parse(seal(v1, KEY)).verify(KEY.verify_key) == v1
    with pytest.raises(SchemaError, match=r"unexpected field 'no_data'"):
        validate(v1 | {"no_data": False})


def test_no_data_window_is_all_null_figures() -> None:
    gap = _counts() | {"no_data": True, "probe_requests": 0, "occupancy_mean": None}
    gap |= {name: None for name in ("arrivals", "passersby", "visits_ended", "occupancy_peak")}
    gap |= {"devices": None, "devices_randomised": None, "static_excluded": None}
    with pytest.raises(SchemaError, match=r"\$.dwell_minutes: must be null"):
        validate(gap)
    validate(gap | {"dwell_minutes": dict.fromkeys(("lt5", "5-15", "15-30", "30-60", "ge60"))})


def test_envelope_refuses_unknown_fields_and_bad_signatures() -> None:
    envelope = json.loads(seal(_counts(), KEY))
    with pytest.raises(SchemaError, match=r"envelope: \$: unexpected field 'key'"):
        Envelope.parse(json.dumps(envelope | {"key": "x"}).encode())
    with pytest.raises(SchemaError, match=r"envelope: \$.sig"):
        Envelope.parse(json.dumps(envelope | {"sig": "short"}).encode())
    with pytest.raises(SchemaError, match="not UTF-8 JSON"):
        Envelope.parse(b"\xff")


def test_status_state_follows_its_cause() -> None:
    online = status_payload(
        SITE, AGENT, cause="connected", at=0, spool_pending=0, spool_dropped=0, last_seq=0
    )
    validate(online)
    with pytest.raises(SchemaError, match=r"\$.cause"):
        validate(online | {"cause": "lost"})


def test_status_v2_carries_the_eviction_rounds_and_v1_stays_without() -> None:
    """Status v2 (what an agent publishes) has both eviction rounds, required, whole and not
    negative; v1 (still accepted) has neither, and a v1 message with them is refused."""
    v2, v1 = (
        status_payload(
            SITE,
            AGENT,
            cause="connected",
            at=0,
            spool_pending=0,
            spool_dropped=0,
            last_seq=4,
            evictions=(3, 11),
            version=version,
        )
        for version in (2, 1)
    )
    validate(v2)
    assert (v2["v"], v2["count_evictions"], v2["estimate_evictions"]) == (2, 3, 11)
    assert tuple(k for k in v2 if k.endswith("_evictions")) == EVICTIONS
    validate(v1)
    assert v1 == {k: v for k, v in v2.items() if k not in EVICTIONS} | {"v": 1}
    for bad, field in (
        (v1 | {"count_evictions": 3}, "unexpected field 'count_evictions'"),
        ({k: v for k, v in v2.items() if k != "estimate_evictions"}, "'estimate_evictions'"),
        (v2 | {"count_evictions": -1}, r"\$.count_evictions"),
        (v2 | {"estimate_evictions": 1.5}, r"\$.estimate_evictions"),
    ):
        with pytest.raises(SchemaError, match=field):
            validate(bad)


def test_public_keys_round_trip_as_base64() -> None:
    text = public_key_text(KEY)
    assert verify_key_from_text(text) == KEY.verify_key
    with pytest.raises(SignatureError, match="32 bytes"):
        verify_key_from_text("AAAA")
    with pytest.raises(SignatureError, match="must be base64"):
        verify_key_from_text("not base64!")


def test_every_replayed_window_fits_the_counts_schema() -> None:
    pipeline = Pipeline(load_config(None, environ={}))
    with CaptureReader(BUNDLED_SAMPLE) as reader:
        for seq, window in enumerate(pipeline.run(reader), 1):
            validate(counts_payload(SITE, AGENT, seq, "0123456789abcdef", window.as_dict()))


def test_schemas_are_valid_2020_12_and_closed() -> None:
    def closed(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                assert node.get("additionalProperties") is False, where
            for key, value in node.items():
                closed(value, f"{where}.{key}")

    for path in SCHEMAS.glob("*.json"):
        schema = json.loads(path.read_text())
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        closed(schema, path.name)


def test_importing_the_contract_loads_nothing_heavy() -> None:
    code = (
        "import sys, firmware_agent.contract.messages as m\n"
        "m.validate({'kind': 'status', 'v': 1, 'site': 's', 'agent': 'a', 'state': 'online',"
        " 'cause': 'connected', 'at': '2024-01-01T00:00:00Z', 'spool_pending': 0,"
        " 'spool_dropped': 0, 'last_seq': 0})\n"
        "heavy = {'numba', 'numpy', 'scapy', 'paho', 'jsonschema'}\n"
        "print(sorted({n.split('.')[0] for n in sys.modules} & heavy))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def _fields(node: Any) -> set[str]:
    names: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.get("properties", {}).items():
            names.add(key)
            names |= _fields(value)
    return names


def test_docs_document_every_field_of_every_schema() -> None:
    documented = set(re.findall(r"^\| `([^`]+)` \|", DOC.read_text(), re.MULTILINE))
    for path in SCHEMAS.glob("*.json"):
        missing = _fields(json.loads(path.read_text())) - documented
        assert not missing, f"docs/messages.md does not document {sorted(missing)} of {path.name}"


def test_docs_examples_validate_and_the_signed_one_verifies() -> None:
    text = DOC.read_text()
    (public_key,) = re.findall(r"public\s+key `([A-Za-z0-9+/=]{44})`", text)
    assert public_key == public_key_text(KEY)
    blocks = re.findall(r"```json\n(.*?)```", text, re.DOTALL)
    kinds = []
    for block in blocks:
        data = json.loads(block)
        if "alg" in data:
            Envelope.parse(block.strip().encode()).verify(verify_key_from_text(public_key))
        else:
            validate(data)
        kinds.append(data.get("kind", "envelope"))
    assert sorted(kinds) == ["counts", "counts", "envelope", "meta", "meta", "receipt", "status"]


def test_a_receipt_names_the_settled_ranges_and_one_that_contradicts_itself_is_refused() -> None:
    ranges = [(5, 9), (12, 12), (20, 30)]
    payload = receipt_payload(SITE, AGENT, ranges, 1_709_625_600)
    validate(payload)
    assert (payload["first_seq"], payload["through_seq"], payload["last_seq"]) == (5, 9, 30)
    assert payload["gaps"] == [[10, 11], [13, 19]]
    assert settled_ranges(payload) == ranges
    assert settled_ranges(receipt_payload(SITE, AGENT, [(7, 7)], 0)) == [(7, 7)]
    for change in (
        {"through_seq": 10},  # inside the first gap
        {"through_seq": 8},  # not where the first gap starts
        {"gaps": [[13, 19], [10, 11]]},  # out of order
        {"gaps": [[10, 30]]},  # reaches last_seq
        {"first_seq": 31},
    ):
        with pytest.raises(SchemaError, match="receipt message"):
            settled_ranges(payload | change)
