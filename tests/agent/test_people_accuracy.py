"""Issue 14's accuracy goals for the people figures, on synthetic captures with ground truth
(tests/support/accuracy_people.py): every hour's arrivals within 10 % of the truth and every dwell
band within 10 %, and docs/ACCURACY.md's people section is what that module writes."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest

from firmware_agent.stages.capture import CaptureReader
from firmware_agent.stages.pipeline import parse_frames
from firmware_agent.tools.synthetic import PeopleSpec, write_people_capture
from tests.support.accuracy_people import (
    GOAL_PCT,
    SCENARIOS,
    WHY,
    Result,
    rewrite,
    run,
    section,
    written,
)
from tests.support.shared import REPO


def test_the_truth_is_who_was_there_and_phones_rotate_their_addresses() -> None:
    spec = PeopleSpec(rates=(30.0,), duration_s=2 * 3600, per_burst_share=0.2, seed=4)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.pcap"
        truth = write_people_capture(path, spec)
        with CaptureReader(path) as reader:
            probes = [parse_frames(batch) for batch in reader]
    ts = np.concatenate([p.ts_ns for p in probes])
    addresses = np.unique(np.concatenate([p.mac for p in probes]), axis=0)
    hours = truth.hourly()
    visitors = int(truth.visitor.sum())
    assert sum(int(str(h["arrivals"])) for h in hours) == visitors
    assert sum(int(str(h["visits_ended"])) for h in hours) == visitors
    assert len(ts) == truth.frames and ts.min() >= spec.start_ns and ts.max() < truth.end_ns
    assert len(addresses) > 3 * len(truth.visitor)  # random addresses rotate
    assert np.all(np.diff(ts) >= 0)


def test_with_global_addresses_hourly_arrivals_and_dwell_bands_meet_the_goal() -> None:
    for result in (run(s) for s in SCENARIOS if s.spec.rotating_share == 0):
        assert result.worst_hour_pct <= GOAL_PCT, result.scenario.name
        assert result.worst_band_pct <= GOAL_PCT, result.scenario.name


def _rotating() -> list[Result]:
    return [run(s) for s in SCENARIOS if s.spec.rotating_share > 0]


@pytest.mark.xfail(strict=True, reason=" ".join(WHY))
def test_with_rotating_addresses_hourly_arrivals_and_dwell_bands_meet_the_goal() -> None:
    for result in _rotating():
        assert result.worst_hour_pct <= GOAL_PCT, result.scenario.name
        assert result.worst_band_pct <= GOAL_PCT, result.scenario.name


def test_with_rotating_addresses_the_figures_stay_as_near_as_measured() -> None:
    """Today's numbers over the four seeds (worst hour 15.6 %, worst band 13.7 %, both below
    the truth: 13.3 % and 13.7 % before the synthetic phones' signal jumped as real phones' do
    (firmware_agent/tools/synthetic.py); 12.8 % and 12.1 % while a busy model's ring forgot
    addresses still heard, whose splits hid part of the per-burst phones' undercount; 18.8 % and
    15.5 % before a visit cut short by the capture's end arrived there; 37.5 % and 21.4 % on
    seed 1 before the split rule and the dwell's probing interval), and occupancy within 15 %
    everywhere."""
    rotating = _rotating()
    assert max(r.worst_hour_pct for r in rotating) <= 16.0
    assert max(r.worst_band_pct for r in rotating) <= 14.0
    for result in (run(s) for s in SCENARIOS):
        errors = [abs(h.occupancy_est - h.occupancy) for h in result.hours]
        assert np.mean(errors) < 0.15 * np.mean([h.occupancy for h in result.hours])


def test_the_accuracy_section_is_current() -> None:
    text = (REPO / "docs" / "ACCURACY.md").read_text()
    assert written(text) == section(), (
        "regenerate it: .venv/bin/python -m tests.support.accuracy_people"
    )
    assert rewrite(text) == text
