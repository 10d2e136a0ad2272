"""tshark, run here, agrees with ``inspect`` on captures the project generates.

The shared oracle file covers the shared captures; this runs the same oracle script
(``../shared/tools/tshark_stats.sh``) live on synthetic captures in each link-layer
flavour we write (radiotap with and without FCS, bare 802.11). Needs Debian's ``tshark``:
``.ci/run`` installs it; elsewhere the test skips with that reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from firmware_agent.tools.capture_stats import inspect_capture
from firmware_agent.tools.synthetic import SyntheticSpec, write_synthetic_capture
from tests.agent.test_oracle import EXACT
from tests.support.shared import shared_path


@pytest.mark.shared
@pytest.mark.parametrize(
    "spec",
    [
        SyntheticSpec(frames=3000, devices=60, seed=3),
        SyntheticSpec(frames=3000, devices=60, seed=4, fcs=True),
        SyntheticSpec(frames=3000, devices=60, seed=5, link_type=105),
    ],
    ids=["radiotap", "radiotap-fcs", "ieee802.11"],
)
def test_live_tshark_agrees_with_inspect_on_synthetic_captures(
    spec: SyntheticSpec, tmp_path: Path
) -> None:
    script = shared_path("tools", "tshark_stats.sh")
    if shutil.which("tshark") is None:
        reason = "tshark is not installed (Debian package tshark; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    capture = tmp_path / "synthetic.pcap"
    truth = write_synthetic_capture(capture, spec)
    result = subprocess.run(
        ["bash", str(script), str(capture)], capture_output=True, text=True, check=True
    )
    expected = json.loads(result.stdout)
    facts = inspect_capture(capture)
    assert {k: facts[k] for k in EXACT} == {k: expected[k] for k in EXACT}
    assert facts["unique_sa"] == truth.addresses
