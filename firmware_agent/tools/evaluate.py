"""Measured, not claimed: the agent's estimates against ground truth, and site calibration.

A **truth file** is CSV with the header ``timestamp,people``: ISO 8601 timestamps with a UTC
offset (``2023-02-08T11:01:00+01:00`` or ``...Z``), in time order, one row per change or per
minute. A row's value holds until the next row; the last one for a minute. One file may cover
several days, so one file can serve the evaluated captures and the calibration captures.

A window's truth is the time-weighted mean of people over the window; a window the truth
covers for less than half is not scored. Captures are replayed through the agent's own
pipeline (:class:`~firmware_agent.stages.pipeline.Pipeline`), so what is scored is what the agent
would publish.

**Scores** over the scored windows: mean absolute error (people), MAPE over the windows with
at least :data:`MAPE_MIN_PEOPLE` people, RMSE, Pearson's r (None when either side is
constant) and the number of windows. The scores are of ``people_est`` (devices present in the
window, what the calibration is fitted on); the table also shows each window's published
``occupancy_mean`` (people present, time-weighted, through the same calibration), which
``tests/support/accuracy_people.py`` scores against synthetic truth.

**Calibration**: a least-squares line people = factor x people_est + offset over the windows
of the calibration captures; its error is the mean absolute error of the calibrated (rounded,
never negative) counts on those same windows. ``footfall-agent calibrate`` writes it into the
agent's TOML file (:func:`write_calibration`), keeping everything else in the file as it was.

**Site threshold** (``calibrate --site-threshold``): what the sensor hears while the room is
empty is, by definition, outside it. Among the windows the truth says are empty (at least
:data:`EMPTY_MIN_WINDOWS`: the installer's empty hour), the site threshold is the weakest one in
:data:`SITE_THRESHOLDS` at which at least half of them read no device; the factor and offset
are then fitted at that threshold. On the 101 lab days an empty hour before a class picks -66
dBm (docs/ACCURACY.md), where the learnt threshold's Otsu split follows whoever is heard.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import re
import tempfile
import tomllib
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from firmware_agent.contract.errors import ConfigError, TruthError
from firmware_agent.service.config import AgentConfig
from firmware_agent.settings import DEFAULT_CONFIG, load_config
from firmware_agent.stages.batch import ProbeBatch, WindowCounts
from firmware_agent.stages.capture import CaptureReader
from firmware_agent.stages.config import Calibration
from firmware_agent.stages.pipeline import Pipeline, parse_frames

__all__ = [
    "MAPE_MIN_PEOPLE",
    "SITE_THRESHOLDS",
    "Replay",
    "Scores",
    "Truth",
    "fit_calibration",
    "pooled",
    "replay",
    "score",
    "site_threshold",
    "write_calibration",
]

log = logging.getLogger("footfall.agent")

MAPE_MIN_PEOPLE = 3
SITE_THRESHOLDS = tuple(range(-90, -49, 2))  # dBm tried by --site-threshold, weakest first
EMPTY_MIN_WINDOWS = 6  # windows with no one in that --site-threshold needs (half an hour)
_LAST_ROW_S = 60  # how long the last row of a truth file holds


@dataclass(frozen=True, slots=True)
class Truth:
    """People present over time: a step function from a ``timestamp,people`` CSV file."""

    times: NDArray[np.int64]  # Unix seconds, ascending
    people: NDArray[np.float64]

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> Truth:
        try:
            with open(path, newline="") as fh:
                rows = list(csv.reader(fh))
        except OSError as exc:
            raise TruthError(f"{path}: cannot read the truth file: {exc.strerror}") from exc
        if not rows or [c.strip() for c in rows[0]] != ["timestamp", "people"]:
            raise TruthError(f"{path}: the first line must be the header 'timestamp,people'")
        times: list[int] = []
        people: list[float] = []
        for line, row in enumerate(rows[1:], start=2):
            if not row:
                continue
            if len(row) != 2:
                raise TruthError(f"{path}:{line}: expected 'timestamp,people', got {row!r}")
            try:
                when = datetime.fromisoformat(row[0].strip())
                count = float(row[1])
            except ValueError:
                raise TruthError(
                    f"{path}:{line}: expected an ISO 8601 time and a number, got {row!r}"
                ) from None
            if when.tzinfo is None:
                raise TruthError(
                    f"{path}:{line}: {row[0]!r} has no UTC offset; write it as "
                    "2023-02-08T11:01:00+01:00 or 2023-02-08T10:01:00Z"
                )
            if not (math.isfinite(count) and count >= 0):
                raise TruthError(f"{path}:{line}: people must be 0 or more, got {row[1]!r}")
            seconds = int(when.timestamp())
            if times and seconds < times[-1]:
                raise TruthError(f"{path}:{line}: {row[0]} goes back in time; sort the rows")
            times.append(seconds)
            people.append(count)
        if not times:
            raise TruthError(f"{path}: no rows after the header")
        return cls(np.array(times, np.int64), np.array(people, np.float64))

    def window(self, start: int, window_s: int) -> float | None:
        """Mean people over [start, start + window_s), or None if covered for under half."""
        ends = np.append(self.times[1:], self.times[-1] + _LAST_ROW_S)
        lo = np.maximum(self.times, start)
        hi = np.minimum(ends, start + window_s)
        covered = np.clip(hi - lo, 0, None)
        seconds = int(covered.sum())
        if 2 * seconds < window_s:
            return None
        return float((covered * self.people).sum() / seconds)


@dataclass(frozen=True, slots=True)
class Scores:
    """How close estimates came to the truth over a set of windows."""

    mae: float
    mape: float | None  # percent, over windows with MAPE_MIN_PEOPLE people or more
    rmse: float
    r: float | None  # Pearson; None if the estimate or the truth is constant
    windows: int

    def as_dict(self) -> dict[str, float | int | None]:
        return {"mae": self.mae, "mape": self.mape, "rmse": self.rmse, "r": self.r,
                "windows": self.windows}  # fmt: skip

    def __str__(self) -> str:
        mape = "n/a" if self.mape is None else f"{self.mape:.1f} %"
        r = "n/a" if self.r is None else f"{self.r:.3f}"
        return (
            f"MAE {self.mae:.2f} people, MAPE {mape}, RMSE {self.rmse:.2f}, r {r}, "
            f"{self.windows} windows"
        )


def score(estimates: Sequence[float], truths: Sequence[float]) -> Scores:
    """Scores of estimates against the truth, window by window."""
    if len(estimates) != len(truths) or not truths:
        raise TruthError("no window of the captures is covered by the truth file")
    est = np.asarray(estimates, np.float64)
    tru = np.asarray(truths, np.float64)
    error = est - tru
    busy = tru >= MAPE_MIN_PEOPLE
    mape = float(np.mean(np.abs(error[busy]) / tru[busy]) * 100) if busy.any() else None
    r = None
    if est.std() > 0 and tru.std() > 0:
        r = float(np.corrcoef(est, tru)[0, 1])
    return Scores(
        mae=float(np.mean(np.abs(error))),
        mape=mape,
        rmse=float(np.sqrt(np.mean(error**2))),
        r=r,
        windows=len(tru),
    )


def fit_calibration(people_est: Sequence[int], truths: Sequence[float]) -> Calibration:
    """Least-squares people = factor x people_est + offset, with its error on those windows."""
    if len(people_est) < 2:
        raise TruthError("calibration needs at least 2 windows covered by the truth file")
    x = np.asarray(people_est, np.float64)
    y = np.asarray(truths, np.float64)
    if x.std() == 0:
        raise TruthError(
            "cannot calibrate: people_est is the same in every window; calibrate on captures "
            "where the number of people changes"
        )
    factor, offset = np.polyfit(x, y, 1)
    if factor <= 0:
        raise TruthError(
            f"cannot calibrate: people_est falls as people rise (factor {factor:.3f}); check "
            "the truth file's times against the captures"
        )
    fitted = Calibration(float(factor), float(offset), mae=0.0, windows=len(x))
    mae = float(np.mean(np.abs([fitted.people(int(v)) - t for v, t in zip(x, y, strict=True)])))
    return replace(fitted, mae=mae)


def site_threshold(empty_reads: Callable[[int], Sequence[int]]) -> int:
    """The weakest threshold of SITE_THRESHOLDS at which at least half of the empty windows
    read no device; ``empty_reads(dbm)``: people_est of those windows at that threshold."""
    for dbm in SITE_THRESHOLDS:
        reads = list(empty_reads(dbm))
        if len(reads) < EMPTY_MIN_WINDOWS:
            raise TruthError(
                f"a site threshold needs {EMPTY_MIN_WINDOWS} windows or more with no one in "
                f"(the empty hour of the visit); the truth file gives {len(reads)}"
            )
        if 2 * sum(1 for r in reads if r == 0) >= len(reads):
            return dbm
    return SITE_THRESHOLDS[-1]


@dataclass(frozen=True, slots=True)
class Replay:
    """The windows of one capture replayed through the pipeline, and the threshold used."""

    capture: str
    windows: list[WindowCounts]
    threshold_note: str | None

    def scored(self, truth: Truth) -> list[tuple[WindowCounts, float]]:
        """(window, truth) for every window the truth covers."""
        pairs = []
        for window in self.windows:
            value = truth.window(window.window_start, window.window_s)
            if value is not None:
                pairs.append((window, value))
        return pairs


def replay(
    capture: str | os.PathLike[str],
    config: AgentConfig,
    *,
    drop_addresses: Collection[bytes] = (),
) -> Replay:
    """Replay a capture through the agent's pipeline (parse, anonymize, count, estimate).

    ``drop_addresses`` (6-byte transmitter addresses) are removed before hashing: a dataset's
    list of devices its authors exclude, to score with and without them. They are never
    printed or logged.
    """
    pipeline = Pipeline(config)
    windows: list[WindowCounts] = []
    with CaptureReader(capture) as reader:
        for batch in reader:
            probes = parse_frames(batch)
            if drop_addresses:
                probes = _without(probes, drop_addresses)
            windows += pipeline.count(probes)
    windows += pipeline.finish()
    return Replay(str(capture), windows, pipeline.threshold_note)


def _without(probes: ProbeBatch, addresses: Collection[bytes]) -> ProbeBatch:
    """The rows of a batch whose transmitter is not in ``addresses``; the original is wiped."""
    keys = np.array([int.from_bytes(a, "big") for a in addresses], np.uint64)
    weights = np.uint64(1) << np.arange(40, -8, -8, dtype=np.uint64)
    own = (probes.mac.astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64)
    keep = ~np.isin(own, keys)
    kept = replace(
        probes,
        kind=probes.kind[keep],
        ts_ns=probes.ts_ns[keep],
        mac=probes.mac[keep],
        seq=probes.seq[keep],
        rssi=probes.rssi[keep],
        freq_mhz=probes.freq_mhz[keep],
        ssid=probes.ssid[keep],
        fp=probes.fp[keep],
    )
    probes.mac.fill(0)
    own.fill(0)
    return kept


def _toml_value(value: float | int) -> str:
    return str(value) if isinstance(value, int) else repr(float(value))


def write_calibration(
    path: Path, calibration: Calibration, threshold_dbm: int | None = None
) -> list[str]:
    """Write ``calibration`` (and a site threshold) into the ``[estimate]`` table of a TOML
    file; what changed.

    Only the calibration lines (and ``rssi_threshold_dbm``) are replaced or added; every other
    line (comments, order, other tables) stays as it was. The file is replaced atomically,
    keeping its mode.
    """
    values = {
        "calibration_factor": _toml_value(round(calibration.factor, 4)),
        "calibration_offset": _toml_value(round(calibration.offset, 4)),
        "calibration_mae": _toml_value(round(calibration.mae, 3)),
        "calibration_windows": _toml_value(calibration.windows),
    }
    if threshold_dbm is not None:
        values["rssi_threshold_dbm"] = _toml_value(threshold_dbm)
    try:
        text = path.read_text() if path.exists() else ""
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from exc
    new_text, changes = _set_table_values(text, "estimate", values)
    try:
        tomllib.loads(new_text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            f"{path}: writing the calibration would break the file ({exc}); set the "
            "estimate.calibration_* keys by hand"
        ) from exc
    mode = path.stat().st_mode & 0o7777 if path.exists() else 0o644
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "w") as fh:
            fh.write(new_text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise ConfigError(f"{path}: cannot write config file: {exc.strerror}") from exc
    return changes


_HEADER = re.compile(r"^\s*\[\s*([A-Za-z0-9_.-]+)\s*\]\s*(#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_-]+)\s*=\s*(.*?)\s*$")


def _set_table_values(text: str, table: str, values: dict[str, str]) -> tuple[str, list[str]]:
    """Set ``key = value`` lines (TOML literals) in ``[table]`` of a TOML text."""
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    start = next(
        (i for i, line in enumerate(lines) if (m := _HEADER.match(line)) and m[1] == table), None
    )
    changes = []
    if start is None:
        block = [f"{key} = {value}\n" for key, value in values.items()]
        lines += (["\n"] if lines and lines[-1].strip() else []) + [f"[{table}]\n", *block]
        changes = [f"{table}.{key}: (unset) -> {value}" for key, value in values.items()]
        return "".join(lines), changes
    end = next((i for i in range(start + 1, len(lines)) if _HEADER.match(lines[i])), len(lines))
    last = start
    for i in range(start + 1, end):
        if lines[i].strip():
            last = i
    for key, value in values.items():
        at, old = next(
            ((i, m) for i in range(start + 1, end) if (m := _KEY.match(lines[i])) and m[1] == key),
            (None, None),
        )
        if at is None or old is None:
            last += 1
            end += 1
            lines.insert(last, f"{key} = {value}\n")
            changes.append(f"{table}.{key}: (unset) -> {value}")
            continue
        if old[2] != value:
            changes.append(f"{table}.{key}: {old[2]} -> {value}")
        lines[at] = f"{key} = {value}\n"
    return "".join(lines), changes


def pooled(replays: Iterable[Replay], truth: Truth) -> list[tuple[WindowCounts, float]]:
    """Every scored (window, truth) of several replays, in order."""
    return [pair for r in replays for pair in r.scored(truth)]


# The command line: footfall-agent evaluate / calibrate (their options: firmware_agent/cli.py).


def _config(args: argparse.Namespace) -> AgentConfig:
    config = load_config(args.config, overrides=dict(args.set or []))
    if args.ignore_local_bit:
        config = replace(config, estimate=replace(config.estimate, assume_randomised=True))
    return config


def _replays(captures: Sequence[str], config: AgentConfig) -> list[Replay]:
    replays = []
    for capture in captures:
        replays.append(replay(capture, config))
        log.info("replayed %s: signal threshold %s", capture, replays[-1].threshold_note)
    return replays


def _utc(start: int) -> str:
    return datetime.fromtimestamp(start, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Per-window estimate against truth, then the scores."""
    both = set(args.captures) & set(args.calibrate_on or ())
    if both:
        raise TruthError(
            f"{sorted(both)[0]} is both evaluated and calibrated on: calibrate on other captures"
        )
    config = _config(args)
    truth = Truth.read(args.truth)
    calibration = config.calibration
    if args.calibrate_on:
        fitted = pooled(_replays(args.calibrate_on, config), truth)
        calibration = fit_calibration(
            [int(w.people_est or 0) for w, _ in fitted], [t for _, t in fitted]
        )
    replays = _replays(args.captures, config)
    pairs = pooled(replays, truth)
    if not pairs:
        raise TruthError(f"{args.truth}: covers no window of the evaluated captures")
    people = [int(w.people_est or 0) for w, _ in pairs]
    estimates = [calibration.people(p) if calibration else p for p in people]
    scores = score(estimates, [t for _, t in pairs])
    if args.json:
        print(json.dumps(scores.as_dict()))
        return 0
    for r in replays:
        print(f"# {r.capture}: signal threshold {r.threshold_note}")
    print(
        f"{'window_start':<20}  {'truth':>6}  {'estimate':>8}  {'people_est':>10}  "
        f"{'occupancy':>9}  devices"
    )
    for (window, value), estimate in zip(pairs, estimates, strict=True):
        occupancy = window.figures.occupancy_mean if window.figures else float("nan")
        print(
            f"{_utc(window.window_start):<20}  {value:>6.1f}  {estimate:>8}  "
            f"{window.people_est:>10}  {occupancy:>9.2f}  {window.devices:>7}"
        )
    if calibration is None:
        print("estimate: people_est (no calibration)")
    else:
        where = "fitted on --calibrate-on" if args.calibrate_on else "from the config"
        print(
            f"estimate: people = {calibration.factor:.4f} x people_est {calibration.offset:+.4f} "
            f"({where}: {calibration.windows} windows, MAE {calibration.mae:.2f} people)"
        )
    print(f"summary: {scores}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Fit the site's calibration on captures with truth; write it into the config file."""
    config = _config(args)
    truth = Truth.read(args.truth)
    threshold = None
    if args.site_threshold:

        def empty_reads(dbm: int) -> list[int]:
            at = replace(config, estimate=replace(config.estimate, rssi_threshold_dbm=dbm))
            pairs = pooled((replay(c, at) for c in args.captures), truth)
            return [int(w.people_est or 0) for w, t in pairs if t == 0]

        threshold = site_threshold(empty_reads)
        config = replace(config, estimate=replace(config.estimate, rssi_threshold_dbm=threshold))
        print(
            f"site threshold: {threshold} dBm, the weakest at which half of the windows with "
            "no one in read no device"
        )
    replays = _replays(args.captures, config)
    fitted = pooled(replays, truth)
    calibration = fit_calibration(
        [int(w.people_est or 0) for w, _ in fitted], [t for _, t in fitted]
    )
    for r in replays:
        print(f"# {r.capture}: signal threshold {r.threshold_note}")
    print(
        f"people = {calibration.factor:.4f} x people_est {calibration.offset:+.4f}: "
        f"MAE {calibration.mae:.2f} people over {calibration.windows} windows"
    )
    path = args.config or DEFAULT_CONFIG
    if args.dry_run:
        print(f"not written (--dry-run); {path} would get it in [estimate]")
        return 0
    changes = write_calibration(path, calibration, threshold)
    print(f"wrote {path}:" if changes else f"{path} already holds this calibration")
    for change in changes:
        print(f"  {change}")
    log.info("calibration written to %s (%d windows)", path, calibration.windows)
    return 0
