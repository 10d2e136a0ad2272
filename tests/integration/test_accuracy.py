"""The issue's goals, asserted on the real captures with ground truth (tests/support/accuracy.py).

Goals the estimator does not reach are marked ``xfail(strict=True)`` with the reason: they
are reported, not hidden, and a change that reaches one makes its test fail until the mark
goes. docs/ACCURACY.md must be what tests/support/accuracy.py writes today.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.accuracy import (
    EMPTY_DAY,
    ESTIMATOR,
    GOAL_MAE,
    GOAL_MAPE,
    GOAL_ONE_PHONE,
    GOAL_R,
    LAB,
    STAGES,
    lab_result,
    one_phone,
    one_phone_names,
    ours,
    table,
)
from tests.support.shared import REPO, SHARED

pytestmark = pytest.mark.shared

_LOW_VARIANCE = (
    "the truth hardly moves on this day (14-15 people but for the last window): r >= 0.9 needs "
    "a per-window error sd of at most 0.63 people, the estimator's is 1.39-1.60 where the truth "
    "moves (2024-04-04); see docs/ACCURACY.md"
)
_AFTERNOON = (
    "2023-02-21: the class changes at 11:45 and the afternoon's brings more devices per person "
    "(people_est 1.11 x the truth before, 1.57 x after); see docs/ACCURACY.md"
)
_THREE_DAYS = (
    "15.5 % (p1; p2, the second sensor, meets it at 13.6 % since chains that hold two phones are "
    "split), calibrated on the three other shared days: with estimate.reset_min from 5 to 10 it "
    "moved between 14.7 and 16.6 % before that, the noise of a three-day calibration (over the "
    "101 lab days the same change moves the occupied MAE by 0.01); reset_min 5 is what keeps "
    "the one-phone captures at 1 or 2"
)
MISSES = {
    ("fryza_p1_sc6-61_2023-02-08", "r"): _LOW_VARIANCE,
    ("fryza_p1_sc6-61_2023-02-21", "mae"): _AFTERNOON,
    ("fryza_p1_sc6-61_2023-02-21", "r"): _AFTERNOON,
    ("fryza_p1_sc6-61_2023-02-21", "mape"): _AFTERNOON,
    ("fryza_p1_sc6-61_2024-04-04", "mape"): _THREE_DAYS,
}


def _goal(name: str, metric: str) -> object:
    reason = MISSES.get((name, metric))
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return pytest.param(name, metric, marks=marks, id=f"{name}-{metric}")


@pytest.fixture(scope="module")
def pcaps(pcaps_dir: Path) -> Path:
    return pcaps_dir.resolve()


@pytest.mark.parametrize(
    ("name", "metric"),
    [_goal(n, m) for n in LAB if n != EMPTY_DAY for m in ("mae", "r", "mape")],
)
def test_lab_day_meets_the_goal_left_out_of_its_own_calibration(
    pcaps: Path, name: str, metric: str
) -> None:
    s = lab_result(pcaps, name, ESTIMATOR, False).calibrated
    if metric == "mae":
        assert s.mae <= GOAL_MAE
    elif metric == "r":
        assert s.r is not None and s.r >= GOAL_R
    else:
        assert s.mape is not None and s.mape < GOAL_MAPE


def test_empty_room_has_no_window_above_one_person(pcaps: Path) -> None:
    res = lab_result(pcaps, EMPTY_DAY, ESTIMATOR, False)
    assert res.people_est_max <= 1 and res.people_max <= 1


@pytest.mark.parametrize("name", [n for n in LAB if n != EMPTY_DAY])
def test_estimator_beats_calibrated_distinct_addresses(pcaps: Path, name: str) -> None:
    naive = lab_result(pcaps, name, STAGES[0][0], False).calibrated
    ours = lab_result(pcaps, name, ESTIMATOR, False).calibrated
    assert ours.mae < naive.mae
    assert ours.mape is not None and naive.mape is not None and ours.mape < naive.mape


def test_one_phone_is_one_or_two_devices(pcaps: Path) -> None:
    names = one_phone_names(pcaps)
    assert len(names) == 9
    for name in names:
        result = one_phone(pcaps, name)
        assert 1 <= result.estimated_max <= GOAL_ONE_PHONE, name
    assert max(one_phone(pcaps, n).addresses for n in names) == 465


def test_accuracy_table_is_current(pcaps: Path) -> None:
    assert SHARED.is_dir()
    written = (REPO / "docs" / "ACCURACY.md").read_text()
    assert ours(written) == table(pcaps), (
        "regenerate it: .venv/bin/python -m tests.support.accuracy ..."
    )
