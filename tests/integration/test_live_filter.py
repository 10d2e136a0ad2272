"""The kernel's probe-request filter (firmware_agent/stages/live.py) on the real captures: run
frame by frame by the BPF interpreter of tests/agent/test_live.py, it keeps exactly the probe
requests, as many as tshark counts. Here rather than in the agent's fast layer: interpreting the
program in Python over every frame of aircrackng_wpa.cap takes about 4 s of CPU (19 s on a busy
machine); the bundled sample's run stays in tests/agent/test_live.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from firmware_agent.stages.capture import CaptureReader
from firmware_agent.stages.live import PROBE_REQUEST_FILTERS
from firmware_agent.stages.parse import KIND_PROBE, parse_batch
from tests.agent.test_live import SNAPLEN, is_probe_request, run_bpf

FILTER_CAPTURES = [
    "gianlucavigo_01_HuaweiTablet_01_filtered.pcap",  # radiotap with FCS, only probes
    "gianlucavigo_01_iPadApple_01.pcap",  # radiotap, beacons and data too
    "shinyvv_dump-01.cap",  # bare 802.11
    "aircrackng_wpa.cap",  # Prism (no probe request: all rejected)
]


@pytest.mark.shared
@pytest.mark.parametrize("name", FILTER_CAPTURES)
def test_kernel_filter_keeps_exactly_the_probe_requests(
    name: str, pcaps_dir: Path, oracle: dict[str, dict[str, Any]]
) -> None:
    kept = rejected = 0
    with CaptureReader(pcaps_dir / name) as reader:
        for batch in reader:
            probes = parse_batch(batch)
            for i in range(len(batch)):
                start = int(batch.offsets[i])
                frame = batch.data[start : start + int(batch.lengths[i])].tobytes()
                link = int(batch.link_types[i])
                verdict = run_bpf(PROBE_REQUEST_FILTERS[link], frame)
                assert verdict in (0, SNAPLEN)
                assert (verdict == SNAPLEN) == is_probe_request(link, frame), (name, i)
                kept += verdict == SNAPLEN
                rejected += verdict == 0
            # every probe the parser counts passes the filter
            assert int(np.count_nonzero(probes.kind == KIND_PROBE)) <= kept
    assert kept == oracle[name]["probe_requests"]  # tshark's count, an independent one
    if name == "gianlucavigo_01_iPadApple_01.pcap":
        assert rejected > kept  # beacons and data frames stay in the kernel
