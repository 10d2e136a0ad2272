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
- ``re-arrival``: one device back after a silence over ``visit_gap_s``: an earlier visit of
  its chain arrived in the epoch, or its address was heard earlier in the epoch and, silent
  longer than the gap, was linked afresh into a new chain (the estimator's forgetting rule; on
  the 101 days every re-arrival is of this kind, since no chain takes back a forgotten address);
- ``weak``: its frames at or above the threshold span less than ``min_dwell_s`` (none
  arrives so today; ``--rule best=1``);
- ``brief``: it lasted under 5 minutes;
- ``empty day``: any other on a day the room stayed empty (an outsider above the threshold);
- ``other``: any other (a class's people, and what linking splits).

**The truth's arrivals** are the rises of the minute occupancy (the sum of its positive steps,
from 0 at the day's first minute): a lower bound, since one person leaving and one coming in
the same minute cancel. Per local hour the table pairs the agent's arrivals with the truth's
rises, binned by the hour's mean truth (hours with no truth minutes are ``none``).

**Why "other".** The rows carry, from the bench only (:class:`Labels`; the keyed ids and
fingerprints they are drawn from stay in memory), each row's model (the fingerprint's order of
coming in the epoch), its address kind (global, random of a model that keeps its counter or
has learnt to reset) and, for a row that began its chain, how long since its address was last
heard. For each class-day "other" arrival the last table gives its *predecessor*: the chain of
its model that was in the venue and fell silent last before it began, and the gap from that
chain's last frame at or above the threshold; with the address, the predecessor's arrival, the
signal step, the model's other chains heard then and how long the new chain lasted. On the 101
days (today's agent), before ``re-arrival`` took in the addresses linked afresh: 1,705 "other"
arrivals; 33 began within 60 s of a predecessor, 58 60-300 s, 519 300-900 s, 1,095 none within
15 minutes; 623 were an address back after over ``visit_gap_s`` of silence, 1,033 a new
address. Now 735 class-day arrivals are re-arrivals and 1,082 "other": a phone split at an
address change it missed is rare (a same-model chain fell silent within 60 s before 14 of
them), while 288 arrivals of models that reset came 5-15 minutes after their model's
chain fell silent (phones that sleep and wake with a new address, past ``cadence_gap_s``).

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
from firmware_agent.stages.batch import KIND_PROBE, NS, RSSI_MISSING, DeviceBatch
from firmware_agent.stages.estimate import Estimator, _resets
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
ROWS_VERSION = 2  # of Rows.parts, in the cache's path
BRIEF_S = 300
LEVELS = (("0", 0.0, 0.0), ("1-2", 1e-9, 3.0), ("3-9", 3.0, 10.0), ("10+", 10.0, 1e9))


@dataclass
class Rows:
    """The rows the people stage was given in one replay, per epoch."""

    epochs: list[int]  # starts (ns) of the epochs after the first (a replay's first has none)
    # (epoch index, ts, chain, fresh, rssi, thr, model, kind, since): see Labels
    parts: list[tuple[Any, ...]]


@dataclass
class Labels:
    """What the bench adds to each row the people stage is given (bench only, never an id):
    ``model``, the fingerprint's order of first coming in the epoch (1, 2, ...; 0: none);
    ``kind``, :data:`KINDS` (whether the model had learnt to reset, after the row's batch);
    ``since``, for a row that began its chain, seconds since its address was last heard in
    the epoch (-1: never; -2 for the other rows). The keyed ids and fingerprints they are
    drawn from stay in memory, wiped with the epoch."""

    models: dict[int, int]
    heard: dict[int, int]
    last: tuple[NDArray[Any], ...] = ()

    def of(self, est: Estimator, batch: DeviceBatch) -> None:
        """Label the rows of ``batch`` the estimator just took."""
        fp, dev, ts = batch.fp.tolist(), batch.device.tolist(), batch.ts_ns
        model = np.array([self.models.setdefault(f, len(self.models) + 1) if f else 0
                          for f in fp], np.int32)  # fmt: skip
        slots = {int(k): i for i, k in enumerate(est._fps.keys.tolist()) if k}
        st, prm = est._fps.rows, est._params
        resets = {f: bool(_resets(st[i], prm)) for f, i in slots.items()}
        rnd = batch.randomised.tolist()
        kind = np.array([0 if not r else 1 if not f else 3 if resets.get(f) else 2
                         for f, r in zip(fp, rnd, strict=True)], np.uint8)  # fmt: skip
        since = np.full(len(batch), -2, np.int32)
        fresh = est.row_fresh.tolist()
        for i, (d, t) in enumerate(zip(dev, ts.tolist(), strict=True)):
            if fresh[i]:
                last = self.heard.get(d)
                since[i] = -1 if last is None else (t - last) // NS
            self.heard[d] = t
        self.last = (model, kind, since)

    def wipe(self) -> None:
        self.models.clear()
        self.heard.clear()


KINDS = ("global", "random, no model", "random, keeps its counter", "random, learnt to reset")


@contextmanager
def recording(rows: Rows) -> Iterator[None]:
    """Record what every PeopleCounter is given while inside, with :class:`Labels`."""
    add, new_epoch, est_add = PeopleCounter.add, PeopleCounter.new_epoch, Estimator.add
    labels = Labels({}, {})

    def rec_est(self: Estimator, batch: DeviceBatch) -> Any:
        out = est_add(self, batch)
        labels.of(self, batch)
        return out

    def rec_add(self: PeopleCounter, kind: Any, ts: Any, chains: Any, rssi: Any, thr: Any,
                fresh: Any = None) -> Any:  # fmt: skip
        keep = (kind == KIND_PROBE) & (chains >= 0)
        f = np.zeros(len(chains), np.uint8) if fresh is None else fresh
        part = (ts[keep], chains[keep], f[keep], rssi[keep], thr[keep],
                *(x[keep] for x in labels.last))  # fmt: skip
        rows.parts.append((len(rows.epochs) - 1, *(np.array(x) for x in part)))
        return add(self, kind, ts, chains, rssi, thr, fresh)

    def rec_epoch(self: PeopleCounter, start_ns: int, *, follows: bool = False) -> None:
        rows.epochs.append(start_ns)
        labels.wipe()
        new_epoch(self, start_ns, follows=follows)

    PeopleCounter.add = rec_add  # type: ignore[method-assign]
    PeopleCounter.new_epoch = rec_epoch  # type: ignore[method-assign]
    Estimator.add = rec_est  # type: ignore[method-assign]
    try:
        yield
    finally:
        PeopleCounter.add = add  # type: ignore[method-assign]
        PeopleCounter.new_epoch = new_epoch  # type: ignore[method-assign]
        Estimator.add = est_add  # type: ignore[method-assign]
        labels.wipe()


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
    model: int  # Labels.model of its first row (0: none)
    kind: int  # Labels.kind of its first row
    since: int  # Labels.since of its first row (-2: not a row that began a chain)
    near_last: int  # ns, its last frame at or above the threshold (first frame: none)
    rssi: tuple[int, int]  # signal of its first and of its last frame at or above the threshold


def visits_of(rows: Rows, gap_s: int, dwell_s: int, first_ns: int, best: bool) -> list[Visit]:
    """Every visit of the replay, rebuilt from the rows as the people stage cuts them and
    judges their arrival (``best``: by the rule before, the visit's best signal)."""
    if not rows.parts:
        return []
    ep, ts, ch, fr, rs, th, md, kd, sn = (
        np.concatenate([p[k] if k else np.full(len(p[1]), p[0]) for p in rows.parts])
        for k in range(9)
    )
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
    md, kd, sn = md[idx], kd[idx], sn[idx]
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
        last_near = int(np.flatnonzero(near)[-1]) if near.any() else 0
        near = t[near]
        u = int(uid[a])
        epoch = rows.epochs[int(ep[a])] if int(ep[a]) >= 0 else first_ns
        out.append(Visit(epoch, int(ep[a]) + 1, u, int(t[0]), int(t[-1]), arrival,
                         int(near[-1] - near[0]) if near.size else -1, seen[u],
                         int(md[a]), int(kd[a]), int(sn[a]), int(t[last_near]),
                         (int(r[0]), int(r[last_near]))))  # fmt: skip
        seen[u] += arrival is not None
    return out


def rows_of(day: LabDay, config: AgentConfig) -> tuple[Rows, int]:
    """The day's rows and published arrivals, replayed or from the cache of the same code."""
    where = (
        CACHE
        / f"{code_digest(config)}-{ROWS_VERSION}"
        / f"{day.date}-{day.path.stat().st_size}.pkl"
    )
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
    if earlier or v.since >= gap_s:  # whole seconds: over the gap
        return "re-arrival"
    if v.near_span < dwell_s * NS:
        return "weak"
    if v.last - v.first < BRIEF_S * NS:
        return "brief"
    return "empty day" if empty_day else "other"


GAPS = (("<= 10 s", 10), ("10-60 s", 60), ("60-300 s", 300), ("300-900 s", 900))
AROUND_S = 60  # a chain heard this close to a visit's first frame was heard "then"
LASTED = (("< 15 min", 900), ("15-60 min", 3600), ("1 h+", 1 << 30))
TRUTH_NEAR_S = 600  # "truth rose": the truth's occupancy rose within this of a visit's start


def split_of(v: Visit, others: list[Visit], truth: Truth, gap_s: int) -> dict[str, str]:
    """What an arrived visit ``v`` looks like beside the other visits of its model in its
    epoch (``others``, by first frame): its *predecessor* is the visit of the model that was in
    the venue (a frame at or above the threshold) and fell silent last before ``v`` began (heard
    no later than AROUND_S after), the *gap* from its last such frame to ``v``'s first. An
    address heard before and silent over ``gap_s`` was linked afresh (a new chain)."""
    pred: Visit | None = None
    around = 0
    for o in others:
        if o.chain == v.chain or o.first >= v.first:
            continue
        if o.last > v.first + AROUND_S * NS:
            around += o.first <= v.first + AROUND_S * NS
        elif o.near_span >= 0 and (pred is None or o.near_last > pred.near_last):
            pred = o
    gap = (v.first - pred.near_last) // NS if pred else None
    gaps = next((n for n, hi in GAPS if gap is not None and gap <= hi), "none within 900 s")
    diff = abs(v.rssi[0] - pred.rssi[1]) if pred else None
    since = "new address" if v.since == -1 else "address heard before" if v.since >= 0 else "-"
    if v.since >= gap_s:  # whole seconds, floored: over gap_s
        since = f"back after {gap_s // 60}-30 min" if v.since < 1800 else "back after 30 min+"
    lo, hi = np.searchsorted(
        truth.times, [v.first // NS - TRUTH_NEAR_S, v.first // NS + TRUTH_NEAR_S]
    )
    rose = bool((np.diff(truth.people[max(lo - 1, 0) : hi]) > 0).any())
    return {
        "kind": KINDS[v.kind],
        "gap": gaps,
        "predecessor": "-" if pred is None else "arrived" if pred.arrival else "not arrived",
        "signal step": "-" if diff is None else "<= 15 dB" if diff <= 15 else "> 15 dB",
        "others heard": "3+" if around >= 3 else str(around),
        "lasted": next(n for n, hi in LASTED if v.last - v.first < hi * NS),
        "address": since,
        "truth rose": "yes" if rose else "no",
    }


def print_splits(splits: list[dict[str, str]]) -> None:
    """The class days' \"other\" arrivals by each feature of :func:`split_of`, and by kind
    against the gap."""
    print(f"\n\"other\" arrivals on class days ({len(splits)}), by the gap from the last "
          "in-venue frame of their model's latest chain that fell silent before they "
          "began")  # fmt: skip
    for feature in ("kind", "gap", "predecessor", "signal step", "others heard", "lasted",
                    "address"):  # fmt: skip
        split = Counter(s[feature] for s in splits)
        print(f"{feature}: " + ", ".join(f"{k} {n}" for k, n in sorted(split.items())))
    gaps = [n for n, _ in GAPS] + ["none within 900 s"]
    print(f"\n{'kind':<26}" + "".join(f"{g:>18}" for g in gaps))
    for kind in KINDS:
        row = Counter(s["gap"] for s in splits if s["kind"] == kind)
        print(f"{kind:<26}" + "".join(f"{row[g]:>18}" for g in gaps))
    for feature in ("address", "predecessor", "signal step", "others heard", "lasted",
                    "truth rose"):  # fmt: skip
        values = sorted({s[feature] for s in splits})
        print(f"\n{feature + ' / gap':<26}" + "".join(f"{g:>18}" for g in gaps))
        for value in values:
            row = Counter(s["gap"] for s in splits if s[feature] == value)
            print(f"{value:<26}" + "".join(f"{row[g]:>18}" for g in gaps))
    print(f"\n{'address / kind':<26}" + "".join(f"{k[:17]:>18}" for k in KINDS))
    for value in sorted({s["address"] for s in splits}):
        row = Counter(s["kind"] for s in splits if s["address"] == value)
        print(f"{value:<26}" + "".join(f"{row[k]:>18}" for k in KINDS))


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
    splits: list[dict[str, str]] = []
    at_start = {"class": 0.0, "empty": 0.0}  # the truth's people at each day's first minute
    for i, day in enumerate(days, 1):
        rows, arrivals = rows_of(day, config)
        published["empty" if day.max_people == 0 else "class"] += arrivals
        first = min((int(p[1][0]) for p in rows.parts if len(p[1])), default=0)
        empty = day.max_people == 0
        kind = "empty" if empty else "class"
        hours: Counter[int] = Counter()
        arrived_before: Counter[int] = Counter()
        visits = sorted(
            visits_of(rows, gap_s, dwell_s, first, bool(rule.get("best"))), key=lambda v: v.first
        )
        by_model: dict[tuple[int, int], list[Visit]] = defaultdict(list)
        for v in visits:
            by_model[v.epoch, v.model].append(v)
        for v in visits:
            if v.arrival is None:
                continue
            if not rule.get("best") and v.epoch and v.first - v.epoch_start <= gap_s * NS:
                continue  # heard across midnight, the site closed: static from the start
            why = cause(v, arrived_before[v.chain], empty, gap_s, dwell_s, static_s)
            causes[kind][why] += 1
            if why == "other" and v.model:
                splits.append(split_of(v, by_model[v.epoch, v.model], truth, gap_s))
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
    print_splits(splits)
    return 0


if __name__ == "__main__":
    sys.exit(main())
