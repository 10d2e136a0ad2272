"""The 101 lab days (``../shared/data/lab``): replay, score out of sample, and the doc's section.

Every day is replayed through the agent's own pipeline
(:func:`firmware_agent.tools.evaluate.replay`,
epochs at Prague midnight), and each window's ``people_est`` is kept in a per-day cache
(``bench/out/lab/<digest>/<date>.json``; the digest covers the replay's code, the estimate
settings and the capture's size), so re-scoring, re-calibrating or regenerating the doc after a
change elsewhere takes seconds.

**Scored windows**: 5-minute windows whose start is 06:00-22:00 Prague time and whose truth
covers at least half of them (``Truth.window``). A window the agent marks ``no_data`` (nothing
heard while the epoch's median window with frames holds at least
:data:`~firmware_agent.stages.pipeline.NORMAL_FRAMES`: a zero is then an outage, P < 5e-5 for a
Poisson count) is **missing**: it is counted as such and not scored, never as an empty room.

**Out of sample**: the days in date order are dealt into :data:`FOLDS` folds (day ``i`` into
fold ``i % FOLDS``); each fold is scored with the calibration fitted on the other folds' days
(all their scored windows, or one short visit: :func:`visit_windows`). Nothing is fitted on the
day it scores, and the estimator's rules have no per-day constants.

**Scores**, pooled over the scored days and per day: occupied windows (truth >= 3 people) MAE
and MAPE, r over all windows, empty windows (truth 0) mean and 95th percentile of the estimate,
and the error by truth level (:data:`LEVELS`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from firmware_agent.service.config import AgentConfig
from firmware_agent.settings import load_config
from firmware_agent.stages.config import Calibration
from firmware_agent.tools.evaluate import Truth, fit_calibration, replay, site_threshold
from tests.support.truth_fryza import LAB_ZONE

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / "bench" / "out" / "lab"
CACHED = ("start", "people_est", "probes", "no_data")  # a cached day's columns, per window
FOLDS = 2
HOURS = (6, 22)  # local hours scored, [start, end)
OCCUPIED = 3  # people: an occupied window (MAE and MAPE)
LEVELS: tuple[tuple[str, float, float], ...] = (
    ("0", 0.0, 0.0),
    ("1-2", 1e-9, 3.0),
    ("3-5", 3.0, 6.0),
    ("6-9", 6.0, 10.0),
    ("10-14", 10.0, 15.0),
    ("15+", 15.0, float("inf")),
)
VISIT_WINDOWS = 24  # one short calibration visit: two counted hours of 5-minute windows
GOAL_MAE, GOAL_MAPE, GOAL_R = 1.5, 15.0, 0.9
GOAL_EMPTY_MEAN, GOAL_EMPTY_P95, GOAL_DAY_MAE = 0.2, 1.0, 3.0


@dataclass(frozen=True, slots=True)
class LabDay:
    date: str
    path: Path
    max_people: float


def lab_days(lab: Path) -> list[LabDay]:
    """The days of ``days.csv``, in date order."""
    with (lab / "days.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    days = [LabDay(r["date"], lab / r["file"], float(r["max_people"])) for r in rows]
    return sorted(days, key=lambda d: d.date)


def lab_config(**estimate: object) -> AgentConfig:
    """The agent's defaults, epochs at Prague midnight, ``estimate`` settings overridden."""
    config = load_config(None, environ={"FOOTFALL_EPOCH_TIMEZONE": LAB_ZONE.key})
    return replace(config, estimate=replace(config.estimate, **estimate))  # type: ignore[arg-type]


def replay_sources() -> list[Path]:
    """The agent's modules a replay runs: firmware_agent/tools/evaluate.py and what it imports from
    the package, transitively (read from the import lines, so it is the same in every
    process)."""
    package = REPO / "firmware_agent"
    found: set[Path] = set()
    todo = [package / "tools" / "evaluate.py", package / "__init__.py"]
    while todo:
        path = todo.pop()
        if path in found or not path.exists():
            continue
        found.add(path)
        text = path.read_text()
        for module in re.findall(r"^\s*from firmware_agent\.([\w.]+) import", text, re.M):
            where = package.joinpath(*module.split("."))
            todo += [where.with_suffix(".py"), where / "__init__.py"]
        for parent, names in re.findall(
            r"^\s*from firmware_agent(\.[\w.]+)? import ([\w, ]+)", text, re.M
        ):
            where = package.joinpath(*parent.strip(".").split(".")) if parent else package
            todo += [where / f"{m.strip()}.py" for m in names.split(",")]
    return sorted(found)


def code_digest(config: AgentConfig) -> str:
    """Digest of the replay's code, the estimate settings and the cached columns: what a cached
    replay depends on (a change elsewhere in the agent, the MQTT client say, keeps the cache
    and the doc)."""
    h = hashlib.sha256(repr(config.estimate).encode())
    h.update(repr(config.epoch).encode())
    h.update(repr(CACHED).encode())
    for path in replay_sources():
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class DayWindows:
    """One day replayed: per window its start (Unix s), people_est, probe requests and
    whether the agent marked it no data (an outage)."""

    date: str
    start: NDArray[np.int64]
    people_est: NDArray[np.int64]
    probes: NDArray[np.int64]
    no_data: NDArray[np.bool_]
    seconds: float  # the replay's time (0 when read from the cache)


def replay_day(day: LabDay, config: AgentConfig, cache: Path | None = CACHE) -> DayWindows:
    """The day through the agent's pipeline, or from the cache of an identical replay."""
    where = None
    if cache is not None:
        where = cache / code_digest(config) / f"{day.date}-{day.path.stat().st_size}.json"
        if where.exists():
            start, people, probes, no_data = (json.loads(where.read_text())[k] for k in CACHED)
            return DayWindows(
                day.date, np.array(start, np.int64), np.array(people, np.int64),
                np.array(probes, np.int64), np.array(no_data, np.bool_), 0.0,
            )  # fmt: skip
    began = time.perf_counter()
    result = replay(day.path, config)
    seconds = time.perf_counter() - began
    start = [w.window_start for w in result.windows]
    people = [int(w.people_est or 0) for w in result.windows]
    probes = [w.probe_requests for w in result.windows]
    no_data = [w.no_data for w in result.windows]
    if where is not None:
        where.parent.mkdir(parents=True, exist_ok=True)
        columns = (start, people, probes, no_data)
        where.write_text(json.dumps(dict(zip(CACHED, columns, strict=True))))
    return DayWindows(
        day.date, np.array(start, np.int64), np.array(people, np.int64),
        np.array(probes, np.int64), np.array(no_data, np.bool_), seconds,
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Scored:
    """A day's scored windows: people_est and the truth; and its missing windows."""

    date: str
    people_est: NDArray[np.int64]
    truth: NDArray[np.float64]
    missing: int  # windows 06-22 with truth that the agent marked no data: not scored


def scored(day: DayWindows, truth: Truth, window_s: int = 300) -> Scored:
    """The day's windows 06-22 local that the truth covers; the windows the agent marked no
    data (outages) left out and counted."""
    if day.start.size:  # the rows that can cover the day: window() is linear in the rows
        lo = max(int(np.searchsorted(truth.times, day.start[0], "right")) - 1, 0)
        hi = int(np.searchsorted(truth.times, day.start[-1] + window_s, "right")) + 1
        truth = Truth(truth.times[lo:hi], truth.people[lo:hi])
    est: list[int] = []
    tru: list[float] = []
    missing = 0
    for start, people, no_data in zip(day.start, day.people_est, day.no_data, strict=True):
        hour = datetime.fromtimestamp(int(start), LAB_ZONE).hour
        if not HOURS[0] <= hour < HOURS[1]:
            continue
        value = truth.window(int(start), window_s)
        if value is None:
            continue
        if no_data:
            missing += 1
            continue
        est.append(int(people))
        tru.append(value)
    return Scored(day.date, np.array(est, np.int64), np.array(tru, np.float64), missing)


def folds_of(days: Sequence[str]) -> dict[str, int]:
    """Day -> fold: the days in date order dealt into FOLDS folds."""
    return {d: i % FOLDS for i, d in enumerate(sorted(days))}


def visit_windows(day: Scored) -> tuple[NDArray[np.int64], NDArray[np.float64]] | None:
    """One short visit (the README's procedure): the hour before a class, the room empty,
    and the hour from the first window with OCCUPIED people or more (VISIT_WINDOWS in all)."""
    busy = np.flatnonzero(day.truth >= OCCUPIED)
    half = VISIT_WINDOWS // 2
    if busy.size == 0 or busy[0] < half or (day.truth[busy[0] - half : busy[0]] > 0).any():
        return None
    at = int(busy[0])
    return day.people_est[at - half : at + half], day.truth[at - half : at + half]


def calibrations_on(days: Sequence[Scored]) -> Calibration:
    """The calibration fitted on every scored window of ``days``."""
    x = np.concatenate([d.people_est for d in days])
    y = np.concatenate([d.truth for d in days])
    return fit_calibration(x.tolist(), y.tolist())


def calibrations(days: Sequence[Scored]) -> dict[int, Calibration]:
    """Fold -> the calibration fitted on every scored window of the other folds."""
    fold = folds_of([d.date for d in days])
    return {k: calibrations_on([d for d in days if fold[d.date] != k]) for k in range(FOLDS)}


@dataclass(frozen=True, slots=True)
class Report:
    """Every scored day's estimate (calibrated out of sample) against the truth."""

    days: tuple[Scored, ...]
    estimate: tuple[NDArray[np.int64], ...]  # per day, people per scored window
    calibration: dict[int, Calibration]
    thresholds: dict[int, int]  # fold -> site threshold (dBm) from a visit; {}: the config's

    def pooled(self) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        return (
            np.concatenate(self.estimate).astype(np.float64),
            np.concatenate([d.truth for d in self.days]),
        )


def report(days: Sequence[Scored]) -> Report:
    """Each fold calibrated on every scored window of the other folds."""
    cal = calibrations(days)
    fold = folds_of([d.date for d in days])
    est = tuple(
        np.array([cal[fold[d.date]].people(int(p)) for p in d.people_est], np.int64) for d in days
    )
    return Report(tuple(days), est, cal, {})


def visit_thresholds(
    days: Sequence[LabDay], base: Sequence[Scored], at: Callable[[LabDay, int], Scored]
) -> dict[int, tuple[int, Calibration]]:
    """Fold -> (site threshold, calibration) from one visit to a day of the other folds, as
    README's procedure and ``calibrate --site-threshold`` do: the site threshold from the
    visit's empty hour, then the factor and offset on its two hours at that threshold. The
    visit day is the first of the other folds with 10 people or more and an empty hour before
    its class (``base``: the days scored with the defaults; ``at(day, dbm)``: a day scored at a
    fixed threshold)."""
    fold = folds_of([d.date for d in base])
    by_date = {d.date: d for d in days}
    half = VISIT_WINDOWS // 2
    out = {}
    for k in range(FOLDS):
        visit_day = next(
            (
                by_date[d.date]
                for d in base
                if fold[d.date] != k and d.truth.max(initial=0) >= 10 and visit_windows(d)
            ),
            None,
        )
        if visit_day is None:
            raise LookupError(
                f"no day outside fold {k} has a class of 10 or more with an empty hour before "
                "it: no visit to calibrate from"
            )

        def empty_reads(dbm: int, day: LabDay = visit_day) -> list[int]:
            visit = visit_windows(at(day, dbm))
            return [] if visit is None else visit[0][:half].tolist()

        dbm = site_threshold(empty_reads)
        visit = visit_windows(at(visit_day, dbm))
        assert visit is not None
        out[k] = (dbm, fit_calibration(visit[0].tolist(), visit[1].tolist()))
    return out


def threshold_report(
    days: Sequence[LabDay],
    base: Sequence[Scored],
    at: Callable[[LabDay, int], Scored],
    visits: dict[int, tuple[int, Calibration]],
    *,
    from_visit: bool,
) -> Report:
    """Each fold replayed at its visit's site threshold and calibrated by the visit
    (``from_visit``) or on every scored window of the other folds at that threshold."""
    fold = folds_of([d.date for d in base])
    by_date = {d.date: d for d in days}
    cal = {}
    for k, (dbm, visit_cal) in visits.items():
        others = [at(by_date[d.date], dbm) for d in base if fold[d.date] != k]
        cal[k] = visit_cal if from_visit else calibrations_on(others)
    scored_days = [at(by_date[d.date], visits[fold[d.date]][0]) for d in base]
    est = tuple(
        np.array([cal[fold[d.date]].people(int(p)) for p in d.people_est], np.int64)
        for d in scored_days
    )
    return Report(tuple(scored_days), est, cal, {k: v[0] for k, v in visits.items()})


@dataclass(frozen=True, slots=True)
class Summary:
    """Scores of a set of windows (people)."""

    windows: int
    occupied: int
    mae_occupied: float | None
    mape_occupied: float | None
    r: float | None
    empty: int
    empty_mean: float | None
    empty_p95: float | None
    mae: float | None


def summarise(est: NDArray[np.float64], tru: NDArray[np.float64]) -> Summary:
    occ = tru >= OCCUPIED
    empty = tru == 0
    err = np.abs(est - tru)
    r = None
    if est.size > 1 and est.std() > 0 and tru.std() > 0:
        r = float(np.corrcoef(est, tru)[0, 1])
    return Summary(
        windows=int(tru.size),
        occupied=int(occ.sum()),
        mae_occupied=float(err[occ].mean()) if occ.any() else None,
        mape_occupied=float((err[occ] / tru[occ]).mean() * 100) if occ.any() else None,
        r=r,
        empty=int(empty.sum()),
        empty_mean=float(est[empty].mean()) if empty.any() else None,
        empty_p95=float(np.percentile(est[empty], 95)) if empty.any() else None,
        mae=float(err.mean()) if tru.size else None,
    )


def by_level(
    est: NDArray[np.float64], tru: NDArray[np.float64]
) -> list[tuple[str, int, float | None, float | None]]:
    """Per truth level: windows, mean error (bias) and mean absolute error (people)."""
    out: list[tuple[str, int, float | None, float | None]] = []
    for name, lo, hi in LEVELS:
        sel = tru == 0 if hi == 0 else (tru >= lo) & (tru < hi)
        if not sel.any():
            out.append((name, 0, None, None))
            continue
        e = est[sel] - tru[sel]
        out.append((name, int(sel.sum()), float(e.mean()), float(np.abs(e).mean())))
    return out


def goals(s: Summary, worst_day_mae: float) -> dict[str, tuple[float | None, bool]]:
    """Each pooled goal: the value and whether it is met."""

    def ok(v: float | None, test: Callable[[float], bool]) -> tuple[float | None, bool]:
        return v, v is not None and test(v)

    return {
        "occupied MAE <= 1.5": ok(s.mae_occupied, lambda v: v <= GOAL_MAE),
        "occupied MAPE < 15 %": ok(s.mape_occupied, lambda v: v < GOAL_MAPE),
        "r >= 0.9": ok(s.r, lambda v: v >= GOAL_R),
        "empty mean <= 0.2": ok(s.empty_mean, lambda v: v <= GOAL_EMPTY_MEAN),
        "empty p95 <= 1": ok(s.empty_p95, lambda v: v <= GOAL_EMPTY_P95),
        "no day MAE > 3": ok(worst_day_mae, lambda v: v <= GOAL_DAY_MAE),
    }


def day_mae(rep: Report) -> list[tuple[str, float, int]]:
    """Per day: MAE over all its scored windows, and its windows."""
    return [
        (d.date, float(np.abs(e - d.truth).mean()), int(d.truth.size))
        for d, e in zip(rep.days, rep.estimate, strict=True)
        if d.truth.size
    ]
