"""The people stage's arrivals on the lab days against the truth's, by cause: one command.

    .venv/bin/python bench/bench_arrivals.py [LAB_DIR] [--days N] [--rule NAME=VALUE ...]
        [--set NAME=VALUE ...]

Replays each day of ``../shared/data/lab`` through the agent's pipeline (cached per day under
``bench/out/arrivals/``, keyed as bench_lab's cache) and records the rows the
people stage is given (time, chain, whether it begins the chain, signal, threshold in force;
never an address). From them it rebuilds every visit as the people stage defines it
(firmware_agent/stages/people.py: frames of one chain with no silence over ``visit_gap_s``; it
arrives at the first frame at which it has lasted ``min_dwell_s`` with its best signal at or
above the threshold) and gives each arrived visit one cause, the first that applies:

- ``capture start``: its first frame is within ``visit_gap_s`` of the replay's first frame
  (the truth counts the people there then as rises from 0 too);
- ``epoch start``: its first frame is within ``visit_gap_s`` of a later epoch's start (a
  device heard across midnight, when the chains are wiped);
- ``static``: it lasted ``static_min_s`` without a break (a PC, a machine of the room);
- ``re-arrival``: an earlier visit of the same chain arrived in the epoch (one device back
  after a silence over ``visit_gap_s``);
- ``weak``: its frames at or above the threshold span less than ``min_dwell_s`` (none
  arrives so today; ``--rule best=1``);
- ``brief``: it lasted under 5 minutes;
- ``empty day``: any other on a day the room stayed empty (an outsider above the threshold);
- ``other``: any other (a class's people, and what linking splits).

**The truth's arrivals** are the rises of the minute occupancy (the sum of its positive steps,
from 0 at the day's first minute): a lower bound, since one person leaving and one coming in
the same minute cancel. Per local hour the table pairs the agent's arrivals with the truth's
rises, binned by the hour's mean truth (hours with no truth minutes are ``none``).

``--rule`` tries a candidate rule on the rebuilt visits (no replay): ``best=1`` the rules before
this bench (a visit arrived once it had lasted ``min_dwell_s`` with its *best* signal at or
above the threshold, and one heard across midnight arrived), ``gap=S`` a visit gap of S s,
``dwell=S`` a minimum dwell of S s. The days in date order are dealt into two folds; each fold's
ratio is printed (a rule is chosen on one and scored on the other). ``--set`` replays with an
estimate setting (``--set rssi_link_db=15``), as bench_lab's does.
"""

from __future__ import annotations

import argparse
import itertools
import pickle
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_lab import add_settings_option

from firmware_agent.service.config import AgentConfig
from firmware_agent.stages.batch import KIND_PROBE, NS, RSSI_MISSING
from firmware_agent.stages.people import PeopleCounter
from firmware_agent.tools.evaluate import Truth, replay
from tests.support.lab_days import CACHE as LAB_CACHE
from tests.support.lab_days import LabDay, code_digest, folds_of, lab_config, lab_days

DEFAULT = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "lab"
CAUSES = (
    "capture start",
    "epoch start",
    "static",
    "re-arrival",
    "weak",
    "brief",
    "empty day",
    "other",
)
CACHE = LAB_CACHE.parent / "arrivals"  # per day, the rows the people stage was given
BRIEF_S = 300
LEVELS = (("0", 0.0, 0.0), ("1-2", 1e-9, 3.0), ("3-9", 3.0, 10.0), ("10+", 10.0, 1e9))


@dataclass
class Rows:
    """The rows the people stage was given in one replay, per epoch."""

    epochs: list[int]  # starts (ns) of the epochs after the first (a replay's first has none)
    parts: list[tuple[int, NDArray[Any], ...]]  # (epoch index, ts, chain, fresh, rssi, thr)


@contextmanager
def recording(rows: Rows) -> Iterator[None]:
    """Record what every PeopleCounter is given while inside."""
    add, new_epoch = PeopleCounter.add, PeopleCounter.new_epoch

    def rec_add(self: PeopleCounter, kind: Any, ts: Any, chains: Any, rssi: Any, thr: Any,
                fresh: Any = None) -> Any:  # fmt: skip
        keep = (kind == KIND_PROBE) & (chains >= 0)
        f = np.zeros(len(chains), np.uint8) if fresh is None else fresh
        part = (ts[keep], chains[keep], f[keep], rssi[keep], thr[keep])
        rows.parts.append((len(rows.epochs) - 1, *(np.array(x) for x in part)))
        return add(self, kind, ts, chains, rssi, thr, fresh)

    def rec_epoch(self: PeopleCounter, start_ns: int, *, follows: bool = False) -> None:
        rows.epochs.append(start_ns)
        new_epoch(self, start_ns, follows=follows)

    PeopleCounter.add = rec_add  # type: ignore[method-assign]
    PeopleCounter.new_epoch = rec_epoch  # type: ignore[method-assign]
    try:
        yield
    finally:
        PeopleCounter.add = add  # type: ignore[method-assign]
        PeopleCounter.new_epoch = new_epoch  # type: ignore[method-assign]


@dataclass(frozen=True, slots=True)
class Visit:
    epoch_start: int  # ns
    epoch: int  # 0: the replay's first epoch
    chain: int  # unique per (epoch, chain row, generation)
    first: int
    last: int
    arrival: int | None  # ns, None: did not arrive
    near_span: int  # ns between the first and last frame at or above the threshold
    rank: int  # its place among the chain's visits (0: first)


def visits_of(rows: Rows, gap_s: int, dwell_s: int, first_ns: int, best: bool) -> list[Visit]:
    """Every visit of the replay, rebuilt from the rows as the people stage cuts them and
    judges their arrival (``best``: by the rule before, the visit's best signal)."""
    if not rows.parts:
        return []
    ep, ts, ch, fr, rs, th = (np.concatenate([p[k] if k else np.full(len(p[1]), p[0])
                                              for p in rows.parts]) for k in range(6))  # fmt: skip
    key = ep.astype(np.int64) * (1 << 32) + ch
    order = np.argsort(key, kind="stable")
    key, fr = key[order], fr[order].astype(np.int64)
    gen = np.cumsum(fr)
    starts = np.r_[True, key[1:] != key[:-1]]
    gen -= np.maximum.accumulate(np.where(starts, gen - fr, 0))
    uid = np.unique(np.stack([key, gen]), axis=1, return_inverse=True)[1].reshape(-1)
    o2 = np.lexsort((ts[order], uid))
    idx = order[o2]
    uid = uid[o2]
    ts, rs, th, ep = ts[idx], rs[idx].astype(np.int64), th[idx].astype(np.int64), ep[idx]
    gap, dwell = gap_s * NS, dwell_s * NS
    cut = np.flatnonzero(np.r_[True, (uid[1:] != uid[:-1]) | (np.diff(ts) > gap), True])
    out: list[Visit] = []
    seen: Counter[int] = Counter()
    for a, b in itertools.pairwise(cut):
        t, r, h = ts[a:b], rs[a:b], th[a:b]
        near = (r == RSSI_MISSING) | (r >= h)
        if best:  # the rule before: lasted min_dwell_s, best signal at or above the threshold
            top = np.maximum.accumulate(np.where(r == RSSI_MISSING, -(1 << 20), r))
            ok = ((top == -(1 << 20)) | (top >= h)) & (t - t[0] >= dwell)
        else:
            ok = near & (t - t[np.argmax(near)] >= dwell) & near.any()
        arrival = int(t[np.argmax(ok)]) if ok.any() else None
        near = t[near]
        u = int(uid[a])
        epoch = rows.epochs[int(ep[a])] if int(ep[a]) >= 0 else first_ns
        out.append(Visit(epoch, int(ep[a]) + 1, u, int(t[0]), int(t[-1]), arrival,
                         int(near[-1] - near[0]) if near.size else -1, seen[u]))  # fmt: skip
        seen[u] += arrival is not None
    return out


def rows_of(day: LabDay, config: AgentConfig) -> tuple[Rows, int]:
    """The day's rows and published arrivals, replayed or from the cache of the same code."""
    where = CACHE / code_digest(config) / f"{day.date}-{day.path.stat().st_size}.pkl"
    if where.exists():
        with where.open("rb") as fh:
            cached: tuple[Rows, int] = pickle.load(fh)
        return cached
    rows = Rows([], [])
    with recording(rows):
        result = replay(day.path, config)
    arrivals = sum(w.figures.arrivals for w in result.windows if w.figures)
    where.parent.mkdir(parents=True, exist_ok=True)
    with where.open("wb") as fh:
        pickle.dump((rows, arrivals), fh)
    return rows, arrivals


def cause(v: Visit, earlier: int, empty_day: bool, gap_s: int, dwell_s: int, static_s: int) -> str:
    if v.first - v.epoch_start < gap_s * NS:
        return "epoch start" if v.epoch else "capture start"
    if v.last - v.first >= static_s * NS:
        return "static"
    if earlier:
        return "re-arrival"
    if v.near_span < dwell_s * NS:
        return "weak"
    if v.last - v.first < BRIEF_S * NS:
        return "brief"
    return "empty day" if empty_day else "other"


def truth_rises(truth: Truth, lo: int, hi: int) -> dict[int, float]:
    """Local hour start (Unix s) -> the truth's rises in it, and its mean people (minute rows)."""
    a, b = np.searchsorted(truth.times, [lo, hi])
    t, p = truth.times[a:b], truth.people[a:b]
    steps = np.diff(np.r_[0.0, p]).clip(0)
    out: dict[int, float] = defaultdict(float)
    for when, rise in zip(t, steps, strict=True):
        out[int(when) // 3600 * 3600] += float(rise)
    return out


def level(mean: float | None) -> str:
    if mean is None:
        return "none"
    return next(name for name, lo, hi in LEVELS if (mean == 0 if hi == 0 else lo <= mean < hi))


@dataclass
class Tally:
    agent: float = 0.0
    truth: float = 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lab", nargs="?", type=Path, default=DEFAULT)
    parser.add_argument("--days", type=int, help="only the first N days")
    parser.add_argument("--rule", action="append", default=[], metavar="NAME=VALUE")
    add_settings_option(parser, "rssi_link_db=15")
    args = parser.parse_args()
    rule = {k: int(v) for k, _, v in (r.partition("=") for r in args.rule)}
    config = lab_config(**dict(args.set))
    gap_s = rule.get("gap", config.count.visit_gap_s)
    dwell_s, static_s = rule.get("dwell", config.estimate.min_dwell_s), 4 * 3600
    truth = Truth.read(args.lab / "truth.csv")
    days: list[LabDay] = lab_days(args.lab)[: args.days]
    fold = folds_of([d.date for d in days])
    causes: dict[str, Counter[str]] = {"class": Counter(), "empty": Counter()}
    levels: dict[str, Tally] = defaultdict(Tally)
    folds: dict[int, Tally] = defaultdict(Tally)
    published = {"class": 0, "empty": 0}
    truth_total = {"class": 0.0, "empty": 0.0}
    at_start = {"class": 0.0, "empty": 0.0}  # the truth's people at each day's first minute
    for i, day in enumerate(days, 1):
        rows, arrivals = rows_of(day, config)
        published["empty" if day.max_people == 0 else "class"] += arrivals
        first = min((int(p[1][0]) for p in rows.parts if len(p[1])), default=0)
        empty = day.max_people == 0
        kind = "empty" if empty else "class"
        hours: Counter[int] = Counter()
        arrived_before: Counter[int] = Counter()
        for v in sorted(
            visits_of(rows, gap_s, dwell_s, first, bool(rule.get("best"))), key=lambda v: v.first
        ):
            if v.arrival is None:
                continue
            if not rule.get("best") and v.epoch and v.first - v.epoch_start <= gap_s * NS:
                continue  # heard across midnight, the site closed: static from the start
            causes[kind][cause(v, arrived_before[v.chain], empty, gap_s, dwell_s, static_s)] += 1
            arrived_before[v.chain] += 1
            hours[v.arrival // NS // 3600 * 3600] += 1
        lo = first // NS // 3600 * 3600
        hi = max((int(p[1][-1]) for p in rows.parts if len(p[1])), default=0) // NS + 1
        rises = truth_rises(truth, lo, hi)
        for hour in range(lo, hi, 3600):
            a, b = np.searchsorted(truth.times, [hour, hour + 3600])
            mean = float(truth.people[a:b].mean()) if b > a else None
            levels[level(mean)].agent += hours[hour]
            levels[level(mean)].truth += rises.get(hour, 0.0)
        day_truth = sum(rises.values())
        a = int(np.searchsorted(truth.times, lo))
        at_start[kind] += float(truth.people[a]) if a < truth.times.size else 0.0
        truth_total[kind] += day_truth
        folds[fold[day.date]].agent += sum(hours.values())
        folds[fold[day.date]].truth += day_truth
        print(f"[{i}/{len(days)}] {day.date}: arrivals {sum(hours.values())}, truth rises "
              f"{day_truth:g}", file=sys.stderr, flush=True)  # fmt: skip
    print(f"rule: {rule or 'none (the agent today)'}; visit gap {gap_s} s, min dwell {dwell_s} s")
    print(f"published arrivals (the agent's windows): class days {published['class']}, "
          f"empty days {published['empty']}")  # fmt: skip
    print("\narrivals by cause (rebuilt visits)")
    print(f"{'cause':<12} {'class days':>10} {'empty days':>10}")
    for c in CAUSES:
        print(f"{c:<12} {causes['class'][c]:>10} {causes['empty'][c]:>10}")
    total = {k: sum(v.values()) for k, v in causes.items()}
    print(f"{'total':<12} {total['class']:>10} {total['empty']:>10}")
    print(f"{'truth rises':<12} {truth_total['class']:>10g} {truth_total['empty']:>10g}")
    print(f"{'  at start':<12} {at_start['class']:>10g} {at_start['empty']:>10g}")
    print("\nper local hour, by the hour's mean truth (people)")
    print(f"{'truth':<6} {'agent':>7} {'truth rises':>11} {'ratio':>6}")
    for name in [n for n, _, _ in LEVELS] + ["none"]:
        t = levels[name]
        ratio = f"{t.agent / t.truth:.2f}" if t.truth else "-"
        print(f"{name:<6} {t.agent:>7g} {t.truth:>11g} {ratio:>6}")
    print("\nper fold (days in date order dealt into 2)")
    for k in sorted(folds):
        t = folds[k]
        ratio = f", ratio {t.agent / t.truth:.2f}" if t.truth else ""
        print(f"fold {k}: agent {t.agent:g}, truth rises {t.truth:g}{ratio}")
    all_agent = sum(t.agent for t in folds.values())
    all_truth = sum(t.truth for t in folds.values())
    print(f"pooled: agent {all_agent:g}, truth rises {all_truth:g}, "
          f"ratio {all_agent / all_truth:.2f}" if all_truth else "")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
