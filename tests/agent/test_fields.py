"""The contract's one field catalogue (:mod:`firmware_agent.contract.fields`): the privacy stage
and the audit hold the same objects, the JSON Schemas and ``docs/messages.md`` agree with it,
and no other source file spells its lists again."""

from __future__ import annotations

import json
import re
from importlib import resources
from typing import Any

from firmware_agent.contract import fields
from firmware_agent.stages import privacy
from firmware_agent.stages.privacy import PrivacyPolicy
from firmware_agent.tools import audit
from tests.support import fields_doc
from tests.support.shared import REPO


def _schema(name: str) -> dict[str, Any]:
    text = resources.files("firmware_agent.contract").joinpath(f"schemas/{name}.json").read_text()
    return dict(json.loads(text))


def test_the_audit_and_the_privacy_stage_hold_the_same_catalogue() -> None:
    """Same objects, not equal copies: the audit's rules cannot drift from the agent's."""
    v2 = audit.CATALOGUE[2]
    assert audit.CATALOGUE is fields.CATALOGUE
    assert privacy.COUNTS is v2.counts
    assert privacy.RELATIONS is v2.relations
    assert privacy.DP_WITHHELD is v2.dp_withheld
    assert privacy.IMPLICIT is audit.IMPLICIT
    assert privacy.WITH_PEAK is audit.WITH_PEAK
    assert privacy.STANDARD_PUBLISHES is fields.STANDARD_PUBLISHES


def test_what_each_mode_publishes_is_what_the_audit_lets_through() -> None:
    """The agent's policies publish exactly what the catalogue's rules leave: strict omits
    ``strict_omits`` (``static_excluded`` among them), noise withholds ``dp_withheld``."""
    v2 = fields.COUNTS_V2
    strict = PrivacyPolicy(mode="strict", window_s=300, key_lifetime_s=300)
    noised = PrivacyPolicy(dp_epsilon=1.0)
    assert set(fields.STANDARD_PUBLISHES) - set(strict.publishes) == set(v2.strict_omits)
    assert set(fields.STANDARD_PUBLISHES) - set(noised.publishes) == set(v2.dp_withheld)
    assert "static_excluded" in v2.strict_omits and "static_excluded" in v2.dp_withheld
    assert PrivacyPolicy().publishes == fields.STANDARD_PUBLISHES


def test_each_counts_schema_agrees_with_the_catalogue() -> None:
    """The schemas stay hand-written JSON (their descriptions are the readers' reference and
    the aggregator validates by them as published); their fields are held to the catalogue."""
    for v, catalogue in fields.CATALOGUE.items():
        schema = _schema(f"counts.v{v}")
        assert set(schema["properties"]) == set(catalogue.fields), v
        assert schema["required"] == [*fields.HEADER, *catalogue.required], v
        dwell = schema["properties"][fields.DWELL]
        assert tuple(dwell["properties"]) == fields.DWELL_BANDS == tuple(dwell["required"])
    published = _schema("meta.v2")["properties"]["privacy"]["properties"]["published"]
    assert tuple(published["properties"]) == fields.STANDARD_PUBLISHES
    assert tuple(published["required"]) == fields.STANDARD_PUBLISHES


def test_every_schema_holds_ids_to_the_one_pattern() -> None:
    for path in resources.files("firmware_agent.contract").joinpath("schemas").iterdir():
        patterns = re.findall(r'"pattern": "(\^\[a-z0-9\][^"]*)"', path.read_text())
        assert set(patterns) <= {f"^{fields.ID_PATTERN}$"}, path.name


def test_the_message_docs_field_catalogue_is_current() -> None:
    text = fields_doc.DOC.read_text()
    assert fields_doc.section() in text, (
        "docs/messages.md's field catalogue is stale: python -m tests.support.fields_doc"
    )


def test_no_other_source_spells_the_catalogue_again() -> None:
    """The id pattern and the dwell bands written out anywhere but the catalogue (and the
    schemas, tested above) would be a copy that can drift."""
    spelled = (fields.ID_PATTERN, '"lt5", "5-15"', "'lt5', '5-15'")
    found = [
        f"{path.relative_to(REPO)}: {text}"
        for folder in ("firmware_agent", "aggregator")
        for path in (REPO / folder).rglob("*")
        if path.suffix in (".py", ".html", ".js") and path.name != "fields.py"
        for text in spelled
        if text in path.read_text()
    ]
    assert found == []


def test_status_v2_is_v1_and_the_eviction_rounds() -> None:
    v1, v2 = _schema("status.v1"), _schema("status.v2")
    assert set(v2["properties"]) == set(v1["properties"]) | set(fields.EVICTIONS)
    assert v2["required"] == [*v1["required"], *fields.EVICTIONS]
