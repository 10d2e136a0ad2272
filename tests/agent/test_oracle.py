"""The agent's own path agrees with tshark on every shared capture.

``../shared/data/tshark_expected.jsonl`` holds what tshark 4.0 says about each capture
(``../shared/tools/tshark_stats.sh``). ``inspect_capture`` computes the same facts through
capture -> parse -> anonymize, counting distinct transmitters from keyed hashes.

Deliberate differences: none on these captures. The agent *skips* probes whose FCS the
radio header flags as bad and malformed probes when counting footfall, but ``inspect``
reports them the way tshark does (as probe requests, ``probe_fcs_bad`` and
``probe_malformed`` say how many), so the numbers stay comparable.
"""

from __future__ import annotations

from typing import Any

import pytest

from firmware_agent.tools.capture_stats import inspect_capture
from tests.support.shared import shared_capture_names

EXACT = (
    "frames",
    "probe_requests",
    "probe_malformed",
    "unique_sa",
    "unique_sa_local",
    "wildcard_probes",
    "directed_probes",
    "dbm_min",
    "dbm_max",
    "read_error",
)


@pytest.mark.shared
@pytest.mark.parametrize("name", shared_capture_names())
def test_inspect_agrees_with_tshark(name: str, pcaps_dir: Any, oracle: dict[str, Any]) -> None:
    expected = oracle[name]
    facts = inspect_capture(pcaps_dir / name)
    assert {k: facts[k] for k in EXACT} == {k: expected[k] for k in EXACT}
    for key in ("probe_first_ts", "probe_last_ts"):
        if expected[key] is None:
            assert facts[key] is None
        else:
            assert facts[key] == pytest.approx(expected[key], abs=1e-6), key
