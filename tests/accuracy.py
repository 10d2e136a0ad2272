"""The accuracy table of docs/ACCURACY.md, from the real captures with ground truth.

    .venv/bin/python -m tests.accuracy ../shared/data/pcaps > docs/ACCURACY.md

Lab room (``fryza_*``, truth from tests/truth_fryza.py): every capture is replayed through the
agent's pipeline once per stage of the estimator, each stage adding one thing to the one
before; every stage's count is scored as it is and after a linear calibration fitted on the
*other* days of position 1 (leave one day out: the evaluated day never enters its own fit; the
second sensor's day, p2, is calibrated on the position-1 days of other dates). All of it twice:
with every device, and without the 14 lab PCs the dataset's authors exclude (their list is
read from ../shared/data/README.md and used here only, never by the estimator).

One phone per file (``baccichet_*``): distinct addresses against the estimate, with the
locally administered bit ignored (the dataset's anonymiser drew random addresses) and no
signal threshold (each file is one phone near the sniffer; there is no street).

tests/test_accuracy.py asserts the goals from the same numbers.
"""

from __future__ import annotations

import functools
import re
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from firmware_agent.capture_stats import inspect_capture
from firmware_agent.estimate import Calibration, EstimateSettings
from firmware_agent.evaluate import Replay, Scores, Truth, fit_calibration, replay, score
from firmware_agent.settings import AgentConfig, load_config
from tests import accuracy_people
from tests.truth_fryza import LAB_ZONE, write_truth

COMMAND = ".venv/bin/python -m tests.accuracy ../shared/data/pcaps > docs/ACCURACY.md"
LAB_P1 = tuple(f"fryza_p1_sc6-61_{day}" for day in ("2023-02-08", "2023-02-21", "2024-03-31",
                                                     "2024-04-04"))  # fmt: skip
LAB_P2 = ("fryza_p2_sc6-61_2024-04-04",)
LAB = LAB_P1 + LAB_P2
EMPTY_DAY = "fryza_p1_sc6-61_2024-03-31"
GOAL_MAE, GOAL_R, GOAL_MAPE, GOAL_ONE_PHONE = 1.5, 0.9, 15.0, 2

# Each stage adds one thing to the one before.
STAGES: tuple[tuple[str, dict[str, object]], ...] = (
    ("distinct addresses", {"rssi_threshold_dbm": -120, "static_min_s": 0, "link": False,
                            "min_dwell_s": 0}),
    ("+ signal threshold (auto)", {"static_min_s": 0, "link": False, "min_dwell_s": 0}),
    ("+ static exclusion", {"link": False, "min_dwell_s": 0}),
    ("+ linking random addresses", {"min_dwell_s": 0}),
    ("+ 60 s dwell (the estimator)", {}),
)  # fmt: skip
ESTIMATOR = STAGES[-1][0]
SWEEP_DBM = tuple(range(-90, -49, 2))  # fixed site thresholds tried against the goals
# r = sd(truth) / sqrt(sd(truth)^2 + sd(error)^2) for an error independent of the truth, so
# r >= GOAL_R needs sd(error) <= sd(truth) * sqrt(1 / GOAL_R^2 - 1).
R_ERROR_RATIO = (1 / GOAL_R**2 - 1) ** 0.5


def date_of(name: str) -> str:
    return name.rsplit("_", 1)[-1]


def authors_pcs(pcaps: Path) -> frozenset[bytes]:
    """The lab PCs the dataset's authors exclude, from the shared data's README."""
    readme = (pcaps.parent / "README.md").read_text()
    line = next(line for line in readme.splitlines() if "fixed lab PCs" in line)
    found = re.findall(r"\b(?:[0-9a-f]{2}:){5}[0-9a-f]{2}\b", line.split("fixed lab PCs")[1])
    return frozenset(bytes.fromhex(mac.replace(":", "")) for mac in found)


def lab_config(stage: dict[str, object]) -> AgentConfig:
    config = load_config(None, environ={"FOOTFALL_EPOCH_TIMEZONE": LAB_ZONE.key})
    return replace(config, estimate=replace(config.estimate, **stage))  # type: ignore[arg-type]


@functools.cache
def lab_truth(pcaps: Path) -> Truth:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lab.csv"
        write_truth([pcaps / f"{name}_ver-99.csv" for name in LAB], path)
        return Truth.read(path)


@functools.cache
def lab_replay(
    pcaps: Path, name: str, stage: str, without_pcs: bool, threshold: int | None = None
) -> Replay:
    """One lab capture through a stage; ``threshold``: a fixed site threshold (dBm) instead."""
    drop = authors_pcs(pcaps) if without_pcs else frozenset()
    settings = dict(dict(STAGES)[stage])
    if threshold is not None:
        settings["rssi_threshold_dbm"] = threshold
    config = lab_config(settings)
    return replay(pcaps / f"{name}_anonymized.pcap", config, drop_addresses=drop)


@dataclass(frozen=True, slots=True)
class LabResult:
    name: str
    stage: str
    without_pcs: bool
    raw: Scores  # the stage's count as an estimate of people
    calibrated: Scores  # after leave-one-day-out calibration
    calibration: Calibration
    people_est_max: int  # highest uncalibrated count of a window
    people_max: int  # highest calibrated count of a window
    threshold: str | None
    truths: tuple[float, ...]  # the truth per window
    errors: tuple[float, ...]  # calibrated people - truth, per window


@functools.cache
def lab_result(
    pcaps: Path, name: str, stage: str, without_pcs: bool, threshold: int | None = None
) -> LabResult:
    truth = lab_truth(pcaps)
    pairs = lab_replay(pcaps, name, stage, without_pcs, threshold).scored(truth)
    fit_x: list[int] = []
    fit_y: list[float] = []
    for other in LAB_P1:
        if date_of(other) != date_of(name):
            for window, value in lab_replay(pcaps, other, stage, without_pcs, threshold).scored(
                truth
            ):
                fit_x.append(int(window.people_est or 0))
                fit_y.append(value)
    calibration = fit_calibration(fit_x, fit_y)
    counts = [int(w.people_est or 0) for w, _ in pairs]
    people = [calibration.people(c) for c in counts]
    truths = [t for _, t in pairs]
    return LabResult(
        name,
        stage,
        without_pcs,
        score(counts, truths),
        score(people, truths),
        calibration,
        max(counts),
        max(people),
        lab_replay(pcaps, name, stage, without_pcs, threshold).threshold_note,
        tuple(truths),
        tuple(float(e) for e in np.subtract(people, truths)),
    )


@dataclass(frozen=True, slots=True)
class OnePhone:
    name: str
    addresses: int
    estimated_max: int  # most devices estimated in one window
    estimated_mean: float  # over the windows with probe requests
    windows: int  # with probe requests


def one_phone_names(pcaps: Path) -> list[str]:
    return sorted(p.name for p in pcaps.glob("baccichet_*.pcap"))


@functools.cache
def one_phone(pcaps: Path, name: str) -> OnePhone:
    config = load_config(None, environ={})
    estimate = EstimateSettings(
        window_s=config.count.window_s,
        lateness_s=config.count.lateness_s,
        rssi_threshold_dbm=-120,
        assume_randomised=True,
    )
    result = replay(pcaps / name, replace(config, estimate=estimate))
    estimated = [int(w.people_est or 0) for w in result.windows if w.probe_requests]
    return OnePhone(
        name,
        int(str(inspect_capture(pcaps / name)["unique_sa"])),
        max(estimated),
        sum(estimated) / len(estimated),
        len(estimated),
    )


def _f(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _mark(ok: bool) -> str:
    return "met" if ok else "**not met**"


def goals_met(result: LabResult) -> tuple[bool, bool, bool]:
    s = result.calibrated
    return (
        s.mae <= GOAL_MAE,
        s.r is not None and s.r >= GOAL_R,
        s.mape is not None and s.mape < GOAL_MAPE,
    )


def empty_day_met(result: LabResult) -> bool:
    return result.people_max <= 1 and result.people_est_max <= 1


def goals_count(pcaps: Path, threshold: int | None) -> int:
    """Lab-room goals the estimator meets (of 13), every device; None: the learnt threshold."""
    met = 0
    for name in LAB:
        res = lab_result(pcaps, name, ESTIMATOR, False, threshold)
        if name == EMPTY_DAY:
            met += empty_day_met(res)
        else:
            met += sum(goals_met(res))
    return met


def _cell(s: Scores) -> str:
    return f"{_f(s.mae)} / {_f(s.mape, 1)} / {_f(s.r, 2)}"


def feasibility(pcaps: Path) -> list[str]:
    """What the goals ask of these days: r against the truth's spread, and fixed thresholds."""
    busy = [name for name in LAB if name != EMPTY_DAY]
    out = [
        "## What the goals ask of these days",
        "",
        "The estimator, every device, calibrated leave-one-day-out. Error: calibrated people "
        "minus the truth, per window. For an error independent of the truth, r = sd(truth) / "
        f"sqrt(sd(truth)^2 + sd(error)^2), so r >= {GOAL_R} needs sd(error) <= "
        f"{R_ERROR_RATIO:.3f} x sd(truth). *r of the count* is people_est's own r with the "
        "truth, before any calibration: no linear calibration changes it.",
        "",
        "| capture | windows | truth: mean, sd, range | r of the count | error: mean | error: sd "
        f"| r >= {GOAL_R} needs error sd at most |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in busy:
        res = lab_result(pcaps, name, ESTIMATOR, False)
        truth_sd = float(np.std(res.truths))
        out.append(
            f"| {name} | {res.calibrated.windows} | {np.mean(res.truths):.1f}, {truth_sd:.2f}, "
            f"{min(res.truths):.1f}-{max(res.truths):.1f} | {_f(res.raw.r, 3)} "
            f"| {np.mean(res.errors):+.2f} | {np.std(res.errors):.2f} "
            f"| {R_ERROR_RATIO * truth_sd:.2f} |"
        )
    learnt = goals_count(pcaps, None)
    counts = {dbm: goals_count(pcaps, dbm) for dbm in SWEEP_DBM}
    most = max(counts.values())
    best = ", ".join(f"{dbm}" for dbm, met in counts.items() if met == most)
    out += [
        "",
        "### One fixed site threshold instead of the learnt one",
        "",
        f"The estimator with `estimate.rssi_threshold_dbm` fixed, from {SWEEP_DBM[0]} to "
        f"{SWEEP_DBM[-1]} dBm, everything else as above. Each cell: MAE / MAPE % / r. "
        f"Goals met: of the 13 (MAE, MAPE and r on four days, and the empty day). The learnt "
        f"threshold meets {learnt}; the most any fixed one meets is {most} ({best} dBm).",
        "",
        "| dBm | "
        + " | ".join(name.removeprefix("fryza_") for name in busy)
        + " | empty day: max people | goals met |",
        "|---|" + "---|" * (len(busy) + 2),
    ]
    for dbm in SWEEP_DBM:
        cells = [_cell(lab_result(pcaps, n, ESTIMATOR, False, dbm).calibrated) for n in busy]
        empty = lab_result(pcaps, EMPTY_DAY, ESTIMATOR, False, dbm).people_max
        out.append(f"| {dbm} | " + " | ".join(cells) + f" | {empty} | {counts[dbm]} |")
    return out


def table(pcaps: Path) -> str:
    out = [
        "# Accuracy: people estimates against ground truth",
        "",
        f"Generated by `{COMMAND}` from the shared captures (see tests/accuracy.py); do not "
        "edit by hand. 5-minute windows; a window's truth is the mean number of people over it.",
        "MAE and RMSE in people; MAPE over windows with 3 or more people; r is Pearson's.",
        "*As counted*: the stage's count taken as people. *Calibrated*: people = factor x "
        "count + offset fitted on the other position-1 days of the room (leave one day out; "
        "p2, a second sensor on 2024-04-04, is calibrated on the position-1 days of other "
        "dates). The empty Sunday has no MAPE or r (nobody is there).",
        "",
        "## Goals (the estimator, calibrated leave-one-day-out)",
        "",
        f"Lab days: MAE at most {GOAL_MAE}, r at least {GOAL_R}, MAPE below {GOAL_MAPE:g} %. "
        f"Empty day: no window above 1 person. One phone: at most {GOAL_ONE_PHONE} devices.",
        "",
        "| capture | devices | MAE | r | MAPE | max people (empty day) |",
        "|---|---|---|---|---|---|",
    ]
    for without in (False, True):
        for name in LAB:
            res = lab_result(pcaps, name, ESTIMATOR, without)
            mae_ok, r_ok, mape_ok = goals_met(res)
            s = res.calibrated
            empty = (
                f"{res.people_max} people, {res.people_est_max} people_est: "
                + _mark(empty_day_met(res))
                if name == EMPTY_DAY
                else ""
            )
            if name == EMPTY_DAY:
                cells = [f"{_f(s.mae)} {_mark(mae_ok)}", "n/a", "n/a", empty]
            else:
                cells = [
                    f"{_f(s.mae)} {_mark(mae_ok)}",
                    f"{_f(s.r, 3)} {_mark(r_ok)}",
                    f"{_f(s.mape, 1)} % {_mark(mape_ok)}",
                    "",
                ]
            devices = "without the authors' 14 PCs" if without else "all"
            out.append(f"| {name} | {devices} | " + " | ".join(cells) + " |")
    phones = [one_phone(pcaps, n) for n in one_phone_names(pcaps)]
    worst = max(p.estimated_max for p in phones)
    out += [
        "",
        f"One phone per file: at most {worst} devices estimated in a window "
        f"({_mark(worst <= GOAL_ONE_PHONE)}).",
    ]
    for without in (False, True):
        title = "without the authors' 14 lab PCs" if without else "every device"
        out += [
            "",
            f"## Lab room, {title}",
            "",
            "| capture | stage | as counted: MAE | MAPE | r | calibrated: MAE | MAPE | RMSE "
            "| r | windows | calibration (fitted on the other days) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name in LAB:
            for stage, _ in STAGES:
                res = lab_result(pcaps, name, stage, without)
                raw, cal, c = res.raw, res.calibrated, res.calibration
                out.append(
                    f"| {name} | {stage} | {_f(raw.mae)} | {_f(raw.mape, 1)} | {_f(raw.r, 3)} "
                    f"| {_f(cal.mae)} | {_f(cal.mape, 1)} | {_f(cal.rmse)} | {_f(cal.r, 3)} "
                    f"| {cal.windows} | {c.factor:.3f} x count {c.offset:+.2f} (fit MAE "
                    f"{c.mae:.2f}) |"
                )
    out += [
        "",
        "Signal thresholds the estimator learnt (auto), every device:",
        "",
    ]
    for name in LAB:
        out.append(f"- {name}: {lab_result(pcaps, name, ESTIMATOR, False).threshold}")
    out += ["", *feasibility(pcaps)]
    out += [
        "",
        "## Reading it",
        "",
        "- r needs the truth to move. On 2023-02-08 it is 14-15 people in every window but the "
        "last, and on 2023-02-21 15-18 but for the class change and the end, so r there "
        "measures noise: it needs a per-window error of at most 0.63 and 1.06 people (sd; "
        "above), while the estimator's error on the day it tracks, 2024-04-04, is 1.39-1.60. "
        "MAE and MAPE are the meaningful scores on those days.",
        "- On 2023-02-21 the estimate runs low in the morning (18 people) and high in the "
        "afternoon (15): the class changes at 11:45 (half the morning's devices fall silent "
        "between 11:34 and 11:52, a dozen new ones start from 11:46), and the afternoon class "
        "brings more devices per person: people_est is 1.11 x the truth from 10:00 to 11:40 "
        "and 1.57 x from 12:00 to 13:45. The rise is in weak devices: per window, 17.5 counted "
        "devices are at -62 dBm or stronger in both halves, while weaker ones (down to the "
        "learnt threshold, -61 to -69 dBm over the day) go from 1.6 to 5.4, mostly phones "
        "with random addresses (5.7 chains of them per morning window, 8.9 per afternoon "
        "one). A stricter site threshold helps that day and costs 2023-02-08 (the table "
        "above): one linear calibration per room cannot follow a device-per-person ratio that "
        "changes within a day, and people_est's r with the truth there is -0.05, so no "
        "calibration of it can.",
        "- Tried and not kept (measured leave-one-day-out; 2023-02-21 calibrated MAE 3.06 "
        "now): a time-weighted people_est (each chain counts the share of the window from its "
        "first to its last frame, widened by 60-180 s; MAE 3.07-3.24: mean occupancy is no better "
        "estimated than presence); cadence linking off (estimate.reset_min at its maximum; MAE "
        "1.96, MAPE 13.0 % there, but 2023-02-08 and p2 worse, and five of the nine one-phone "
        "files estimate no device instead of two).",
        "- Also tried and not kept, with a Python copy of the estimator that gives the same "
        "people_est on every lab capture: (1) a chain's signal in a window as its second "
        "strongest frame, upper quartile, mean or median instead of its strongest, each for "
        "the threshold test, Otsu's split or both (12 combinations): 2024-04-04 p1 MAPE "
        "12.2-17.9 %, 2023-02-21 MAE 2.72-4.31, r on the 2023 days at most 0.10; which one wins "
        "on 2024-04-04 is within the noise of the choice. (2) Kittler-Illingworth's split "
        "instead of Otsu's: thresholds of -76 to -87 dBm, every day worse (2023-02-21 MAE "
        "7.89). (3) The threshold chosen by `calibrate` with the factor (the least fit error "
        "on the other days, -90 to -50 dBm): it picks -58 dBm for 2023-02-08 (MAE 2.49), -70 "
        "for 2023-02-21 (2.97) and -54 for 2024-04-04 (MAPE 18.4 %); the other days' best "
        "threshold is not the left-out day's. (4) Calibration through the origin (people = "
        "factor x people_est): 2024-04-04 p1 MAPE 14.5 %, 2023-02-08 MAE 1.30, 2023-02-21 "
        "3.14; the issue asks for a factor and an offset. (5) Gap-filled presence (a chain "
        "counts in every window between two of its frames up to 15 minutes apart; it would "
        "publish 15 minutes late; measured against the same copy counting a chain's whole "
        "dwell from its first window): 2023-02-08 MAE 1.53 -> 1.39, 2023-02-21 3.08 -> 2.83, "
        "2024-04-04 p1 MAPE 16.6 -> 14.3 %, p2 MAE 0.84 -> 0.90; with each chain counting its "
        "share of the window instead, r reaches 0.65-0.67 on 2023-02-08 and 0.22-0.29 on "
        "2023-02-21, at MAE 3.28-3.32 there.",
        "- Static exclusion changes almost nothing here: the lab PCs are switched on for the "
        "class only (2 to 4 hours), which is what people's laptops do too. On 2024-03-31 the "
        "devices heard all day are below the signal threshold already.",
        "- Without the authors' PC list removed, the PCs (about 14 strong devices during "
        "classes) act like an offset the calibration absorbs; with it removed, fewer devices "
        "carry the same people and the per-day level varies more.",
        "- Two one-phone files estimate 0: their phones probed so seldom (every 1 to 3 "
        "minutes, a new address and counter each time) that their model never showed it "
        "resets within a file, so no chain lasted the 60 s a device needs.",
        "",
        "## One phone per file",
        "",
        "The locally administered bit ignored (the dataset's anonymiser drew random addresses), "
        "no signal threshold.",
        "",
        "| capture | distinct addresses | estimated devices (most in a window) | mean per "
        "window | windows with probes |",
        "|---|---|---|---|---|",
    ]
    for p in phones:
        out.append(
            f"| {p.name} | {p.addresses} | {p.estimated_max} | {p.estimated_mean:.2f} "
            f"| {p.windows} |"
        )
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) != 1:
        print(f"usage: {COMMAND}", file=sys.stderr)
        return 2
    sys.stdout.write(table(Path(args[0]).resolve()) + "\n" + accuracy_people.section())
    return 0


if __name__ == "__main__":
    sys.exit(main())
