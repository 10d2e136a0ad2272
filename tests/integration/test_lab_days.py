"""Issue 15 on a sample of the 101 lab days (the full sweep is bench/bench_lab.py).

Six days are replayed through the agent (no cache) and calibrated out of sample among
themselves (two folds, as the sweep does): a day whose class stays 5 hours, an outage in a
class, empty days. Goals the sweep does not reach are ``xfail(strict=True)`` with its numbers.
docs/ACCURACY.md's lab-days section must carry the digest of today's inputs.
"""

from __future__ import annotations

import tomllib
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from firmware_agent import cli
from firmware_agent.tools.evaluate import Truth
from tests.support import lab_days as ld
from tests.support.lab_doc import DOC, inputs_digest, section
from tests.support.shared import shared_path

pytestmark = pytest.mark.shared

SAMPLE = ("2022-11-24", "2023-02-22", "2023-02-23", "2023-03-14", "2023-10-04", "2023-10-11")
LONG_STAY = "2023-10-04"  # 15-17 people from 13:00 for almost 5 hours
OUTAGE = "2023-02-22"  # the sensor heard nothing for hours of a class
VISIT_DAY = "2023-02-07"  # fold 0's calibration visit in docs/ACCURACY.md
HOUR = timedelta(hours=1)
SWEEP = "over the 101 days (docs/ACCURACY.md, bench/bench_lab.py)"
GOALS = ("occupied MAE <= 1.5", "occupied MAPE < 15 %", "r >= 0.9", "empty mean <= 0.2",
         "empty p95 <= 1", "no day MAE > 3")  # fmt: skip
MISSES = {
    "occupied MAE <= 1.5": f"2.36 people {SWEEP}: people_est per person is 0.85-1.66 from "
    "class day to class day (sd 14 % of the mean) and one site calibration applies one ratio; "
    "no truth-free figure of a day tracked that ratio (|r| <= 0.31: addresses, probes, random "
    "share, short-lived chains, turnover per chain); with each day's own ratio (in sample) the "
    "windows away from class changes still read 1.70 off (what keeps the error up, and what "
    "was tried: docs/ACCURACY.md)",
    "occupied MAPE < 15 %": f"20.55 % {SWEEP}, the same cause as the MAE",
    "no day MAE > 3": f"worst day 5.34 people {SWEEP} (2023-04-26, 24 people, the biggest "
    "class, read low; 50 of its windows are an outage)",
}


@pytest.fixture(scope="module")
def lab() -> Path:
    return shared_path("data", "lab")


@pytest.fixture(scope="module")
def sample(lab: Path) -> list[ld.Scored]:
    truth = Truth.read(lab / "truth.csv")
    config = ld.lab_config()
    days = [d for d in ld.lab_days(lab) if d.date in SAMPLE]
    return [ld.scored(ld.replay_day(d, config, cache=None), truth) for d in days]


@pytest.fixture(scope="module")
def sample_report(sample: list[ld.Scored]) -> ld.Report:
    return ld.report(sample)


def test_doc_section_is_current(lab: Path) -> None:
    text = section(DOC.read_text())
    assert text, "docs/ACCURACY.md has no lab-days section: run bench/bench_lab.py --doc"
    assert f"<!-- inputs {inputs_digest(lab)} -->" in text, (
        "docs/ACCURACY.md's lab-days section is stale: run .venv/bin/python bench/bench_lab.py "
        "--doc"
    )


def test_a_class_that_stays_five_hours_is_not_taken_for_pcs(sample_report: ld.Report) -> None:
    at = [d.date for d in sample_report.days].index(LONG_STAY)
    day, est = sample_report.days[at], sample_report.estimate[at]
    late = np.flatnonzero(day.truth >= 10)[-12:]  # the class's last hour, 4 h after it came
    assert est[late].mean() >= 0.7 * day.truth[late].mean()


def test_an_outage_is_missing_not_an_empty_room(sample: list[ld.Scored]) -> None:
    outage = next(d for d in sample if d.date == OUTAGE)
    assert outage.missing == 71
    assert all(d.missing == 0 for d in sample if d.date in ("2022-11-24", "2023-02-23"))


def test_an_empty_day_reads_at_most_one_person(sample_report: ld.Report) -> None:
    for day, est in zip(sample_report.days, sample_report.estimate, strict=True):
        if day.truth.size and day.truth.max() == 0:
            assert est.max() <= 1, day.date


def _goal(name: str) -> object:
    reason = MISSES.get(name)
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("name", [_goal(n) for n in GOALS])
def test_goal_over_the_lab_days(name: str) -> None:
    """The sweep's pooled goals as published (test_doc_section_is_current keeps them current:
    the doc carries the digest of the code and data they come from)."""
    text = section(DOC.read_text())
    rows = [line for line in text.splitlines() if line.startswith(f"| {name} |")]
    assert rows, f"no row for {name!r} in docs/ACCURACY.md's lab-days section"
    assert rows[-1].endswith("| met |"), rows[-1]  # the headline variant's table


def test_calibrate_from_one_visit_sets_the_site_threshold(lab: Path, tmp_path: Path) -> None:
    """README's procedure on a class day: the empty hour before the class and its first hour,
    as a truth file of those two hours only; calibrate finds the site threshold and the fit."""
    rows = (lab / "truth.csv").read_text().splitlines()[1:]
    day = [r.split(",") for r in rows if r.startswith(VISIT_DAY)]
    arrives = next(datetime.fromisoformat(t) for t, p in day if float(p) >= 3)
    begins = arrives.replace(minute=arrives.minute // 5 * 5) - timedelta(hours=1)
    visit = [(t, p) for t, p in day if begins <= datetime.fromisoformat(t) < begins + 2 * HOUR]
    truth = tmp_path / "visit.csv"
    truth.write_text("timestamp,people\n" + "".join(f"{t},{p}\n" for t, p in visit))
    config = tmp_path / "agent.toml"
    config.write_text('[epoch]\ntimezone = "Europe/Prague"\n')
    capture = next(d.path for d in ld.lab_days(lab) if d.date == VISIT_DAY)
    args = ["calibrate", str(capture), "--truth", str(truth), "--config", str(config)]
    assert cli.main([*args, "--site-threshold"]) == 0
    estimate = tomllib.loads(config.read_text())["estimate"]
    assert estimate["rssi_threshold_dbm"] == -66
    assert estimate["calibration_windows"] == 24
    assert 0.5 < estimate["calibration_factor"] < 1.5
