"""People stage: the estimator's linked chains in, people-level figures per window out (numba).

The estimate stage links the random addresses of one phone into a *chain* and hands on, for
every probe request, the chain it belongs to (:attr:`Estimator.row_chains
<firmware_agent.stages.estimate.Estimator.row_chains>`). This stage turns those chains into what a
shop owner reads (counts v2, docs/messages.md): arrivals, passers-by, visits ended with their
dwell, and occupancy. It sees chain numbers, times and signal; never an address or a device id.

**Instants, not windows.** Every figure is tied to an instant that does not depend on
``window_s``, and a window reports what falls inside it; so twelve 5-minute windows give
exactly the figures of the hour (sums of arrivals, visits and dwell bands; the mean of the
occupancy means; the max of the peaks), and a test checks it on a replay.

* A chain's *visit* is a run of its frames with no silence longer than ``visit_gap_s``. A
  frame after a longer silence starts a new visit, judged afresh: nothing of the earlier one
  carries over, so no figure tells whether a phone was heard before (a membership oracle).
* A frame is *near* if its signal is at or above the threshold in force at it (the
  estimator's, learnt at fixed step instants: not at window closes) or unknown. A visit
  *arrives* at the first of its near frames that comes ``min_dwell_s`` or more after its first
  near frame: it has been heard in the venue for the minimum dwell. (With the best signal of
  the visit instead, one strong frame let any visit that lasted ``min_dwell_s`` arrive: on the
  101 lab days, 810 of the 3,649 arrivals were such visits, 178 of the 387 on the 45 days the
  room stayed empty; bench/bench_arrivals.py.) That instant, not the visit's first frame, is
  the one counted: windows close ``lateness_s`` after their end and are never held
  back, and it is the first instant at which the agent knows. For a person who stays it comes
  ``min_dwell_s`` after the first frame.
* An arrived visit is *present* over ``[f, f + hold_s)`` for each of its frames ``f`` from its
  arrival on. Occupancy is sampled every :data:`SAMPLE_S` seconds on instants that are
  multiples of it since the Unix epoch (the same instants for every ``window_s``):
  ``occupancy_mean`` is the mean of a window's samples, ``occupancy_peak`` their maximum.
* A visit *ends* at its last frame + ``visit_gap_s`` (or at the epoch's end, or the end of the
  input): if it arrived, in ``visits_ended`` and one dwell band; if not, in ``passersby``. One
  with a near frame that the epoch's or the input's end cuts before it could arrive (its first
  near frame less than ``min_dwell_s`` before the end) has not walked past: it was cut short,
  and it arrives at the end (in the last window's ``arrivals``, then its ``visits_ended``;
  never present in a sample). Counted as
  passers-by, the people who walked in during a capture's last minute were lost: on the
  synthetic people captures with global addresses (linking perfect), seed 3's last hour read
  32 arrivals for 36 (11.1 %); 35 with this rule, and every hour of seeds 1-6 within 8.3 %.
  Its length is last frame - first frame plus the visit's own probing interval (that span over
  its gaps between bursts, :data:`BURST_S`): a person is there about half an interval before
  the first frame heard and half after the last. With ``hold_s`` (60 s) in its place, every
  visit read about 23 s long on the synthetic people captures (phones probing every 15-55 s),
  and the band edges moved visits: with global addresses (linking perfect) the worst band was
  10-17 % off the truth over eight seeds, 2-7 % with the interval. (``hold_s`` still stands in
  for a visit heard in a single burst.)
* A visit that has lasted ``static_min_s`` (4 hours) without a break is a *static device*
  (a PC, a printer, a TV) from its frame that reaches it: it leaves the occupancy there, and
  its end counts as nothing. Its arrival, hours before, stays counted: it was not known then.
  (The estimator's ``static_excluded`` diagnostic uses its own rule, first heard while the
  site is closed: a rule of local hours.)
* A visit that begins at most ``visit_gap_s`` after the start of an epoch that follows
  another (chains are wiped at the boundary), while the site is closed then
  (``closed_at_epoch``: midnight epochs and the estimator's closed hours), is a device heard
  across the boundary: a static device from its first frame, counted in nothing until a
  silence over ``visit_gap_s`` ends it. A printer or a till inside a shop otherwise arrived at
  every midnight and was present until ``static_min_s`` had passed (the demo's shops: about 2
  arrivals at 00:00 and 1.3 people until 04:00 each day). A person who came in during those
  minutes is not counted until they leave and come back: the site is closed.

Events are kept per sample slot in a ring (``ring``) that spans the open windows and as far
ahead as a hold reaches; a window's close sums the slots it covers. Occupancy is a
difference array over the same slots: an arrived visit's presence run adds +1 at its start
and -1 at its end, and moving the end is two additions. At each window's close the visits
table is scanned once for visits whose end instant has passed. A frame more than
``lateness_s`` late (older than the oldest open window) counts in the oldest open window, as
the counter counts it.

Memory: one row of five integers per row of the estimator's chain table and the ring (a few
hundred rows); both are wiped with the epoch, with the estimator's chains. The estimator reuses
the rows of chains it retired (silent past every gap: their visits have ended) or evicted at its
ceiling, and marks the row that begins a chain (``fresh``): a visit still open there (an evicted
chain's) ends then, counted as if its device had gone silent at its last frame. So the table
follows the chains of the last twenty minutes or so, and each window close walks only those.
Nothing here is logged.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from numpy.typing import NDArray

from firmware_agent.contract.errors import ConfigError
from firmware_agent.contract.fields import DWELL_BANDS, DWELL_EDGES_MIN
from firmware_agent.kernels import kernel
from firmware_agent.stages.batch import (
    KIND_PROBE,
    NS,
    RSSI_MISSING,
    WindowPeople,
)
from firmware_agent.stages.config import (
    Calibration,
    CountSettings,
    EpochClock,
    EstimateSettings,
)

__all__ = [
    "BURST_S",
    "SAMPLE_S",
    "PeopleCounter",
    "PeopleSettings",
    "calibrated",
]

SAMPLE_S = 10
"""Occupancy samples: every 10 s, on multiples of 10 s since the Unix epoch (divides every
``window_s``, a divisor of 3600 of at least 60)."""

# Visit table columns (int64), one row per chain: state, first frame, last frame, first near
# frame (_NONE: none yet), end of the current presence run, silences between bursts.
_V_STATE, _V_FIRST, _V_LAST, _V_NEAR, _V_RUN, _V_GAPS = range(6)
_VCOLS = 6
_NOVISIT, _PENDING, _ARRIVED, _STATIC = 0, 1, 2, 3

# Ring columns (int64), one row per sample slot: occupancy difference, arrivals, passers-by,
# visits ended, five dwell bands.
_R_DIFF, _R_ARR, _R_PASS, _R_END = range(4)
_R_BAND = 4
_RCOLS = 9

# Clock (int64): newest timestamp, oldest open window start, occupancy level, visit rows used,
# start of the epoch if it followed another (_NONE: the input's first).
_K_MAX, _K_OLDEST, _K_LEVEL, _K_USED, _K_EPOCH = range(5)
_NONE = np.iinfo(np.int64).min

# Parameters (int64): window, lateness, hold, visit gap, minimum dwell (ns), sample (ns), ring
# rows, static visit length (ns, 0: none), 1 if the site is closed when an epoch begins.
_P_W, _P_LATE, _P_HOLD, _P_GAP, _P_DWELL, _P_SAMPLE, _P_RING, _P_STATIC, _P_CLOSED = range(9)

# Output row columns (int64): window start, arrivals, passers-by, visits ended, five dwell
# bands, sum of occupancy samples, samples, peak.
_O_START, _O_ARR, _O_PASS, _O_END = range(4)
_O_BAND = 4
_O_SUM, _O_SAMPLES, _O_PEAK = 9, 10, 11
_NOUT = 12


BURST_S = 1
"""Frames of a visit less than 1 s after its newest one are one burst (a phone's probes on the
channels of one scan); a longer silence is a gap between bursts, whose mean is a visit's
probing interval (its dwell's allowance)."""


@dataclass(frozen=True, slots=True)
class PeopleSettings:
    """How chains become people figures; checked where made."""

    window_s: int = 300
    lateness_s: int = 10
    min_dwell_s: int = 60
    visit_gap_s: int = 600
    hold_s: int = 60
    static_min_s: int = 4 * 3600  # 0: no static devices
    closed_at_epoch: bool = False  # the site is closed when an epoch begins (local midnight)

    def __post_init__(self) -> None:
        if not 1 <= self.hold_s <= self.visit_gap_s:
            raise ConfigError(
                f"the presence hold ({self.hold_s} s) must be from 1 s to count.visit_gap_s "
                f"({self.visit_gap_s} s): a visit still present after it ended would count twice"
            )
        if self.window_s % SAMPLE_S:
            raise ConfigError(f"window_s must be a multiple of {SAMPLE_S} s, got {self.window_s}")

    @classmethod
    def from_config(
        cls, count: CountSettings, estimate: EstimateSettings, epoch: EpochClock | None = None
    ) -> PeopleSettings:
        """The counter's windows and visit gap, the estimator's minimum dwell; the hold is the
        estimator's ``link_gap_s`` (or the visit gap, if shorter): a phone that probes more
        often than that keeps one address chain and is present without a break; one silent
        for longer has likely gone (or will be a new chain anyway). The site is closed when
        an epoch begins if epochs begin at local midnight and the estimator's closed hours
        (``static_closed_h``) follow it."""
        return cls(
            window_s=count.window_s,
            lateness_s=count.lateness_s,
            min_dwell_s=estimate.min_dwell_s,
            visit_gap_s=count.visit_gap_s,
            hold_s=min(estimate.link_gap_s, count.visit_gap_s),
            closed_at_epoch=epoch is not None
            and epoch.length_s is None
            and estimate.static_closed_h > 0,
        )

    def params(self) -> NDArray[np.int64]:
        reach = self.window_s + self.lateness_s + self.visit_gap_s
        return np.array(
            [
                self.window_s * NS,
                self.lateness_s * NS,
                self.hold_s * NS,
                self.visit_gap_s * NS,
                self.min_dwell_s * NS,
                SAMPLE_S * NS,
                reach // SAMPLE_S + 4,
                self.static_min_s * NS,
                int(self.closed_at_epoch),
            ],
            np.int64,
        )


def calibrated(window: WindowPeople, calibration: Calibration) -> WindowPeople:
    """Occupancy through the site's calibration (fitted on people_est against counted
    people): the mean to 2 decimals, the peak rounded, neither below 0. Arrivals and visits
    are counts of chains and stay as they are."""
    mean = calibration.factor * window.occupancy_mean + calibration.offset
    return replace(
        window,
        occupancy_mean=max(0.0, round(mean, 2)),
        occupancy_peak=calibration.people(window.occupancy_peak),
    )


@kernel(inline=True)
def _up(x: int, s: int) -> int:
    """The first sample slot at or after instant ``x`` (ns)."""
    return -((-x) // s)


@kernel()
def _end_visit(v: NDArray[np.int64], acc: NDArray[np.int64], params: NDArray[np.int64]) -> None:
    """Count a visit that ended into ``acc`` (a ring row or a window's totals) and forget it
    (a static device's visit counts as nothing)."""
    if v[_V_STATE] == _ARRIVED:
        span = v[_V_LAST] - v[_V_FIRST]
        unheard = span // v[_V_GAPS] if v[_V_GAPS] else params[_P_HOLD]
        minutes = (span + unheard) // (60 * NS)
        band = 0
        while band < 4 and minutes >= DWELL_EDGES_MIN[band]:
            band += 1
        acc[_R_END] += 1
        acc[_R_BAND + band] += 1
    elif v[_V_STATE] == _PENDING:
        acc[_R_PASS] += 1
    v[_V_STATE] = _NOVISIT


@kernel()
def _close_window(
    visits: NDArray[np.int64],
    ring: NDArray[np.int64],
    clock: NDArray[np.int64],
    params: NDArray[np.int64],
    end_visits: bool,
    out: NDArray[np.int64],
    row: int,
) -> None:
    """Emit the oldest open window into out[row] and advance the clock past it; with
    ``end_visits``, every open visit ends in it."""
    w, s, gap, n = params[_P_W], params[_P_SAMPLE], params[_P_GAP], params[_P_RING]
    dwell = params[_P_DWELL]
    start = clock[_K_OLDEST]
    end = start + w
    first = start // s
    o = out[row]
    o[:] = 0
    o[_O_START] = start
    for c in range(clock[_K_USED]):
        v = visits[c]
        if v[_V_STATE] == _NOVISIT or not (end_visits or v[_V_LAST] + gap < end):
            continue
        if end_visits and v[_V_STATE] == _ARRIVED and v[_V_RUN] > end:
            ring[_up(v[_V_RUN], s) % n, _R_DIFF] += 1  # presence stops with the epoch
            ring[_up(end, s) % n, _R_DIFF] -= 1
        k = max(min(v[_V_LAST] + gap, end - 1), start) // s
        near = v[_V_NEAR]
        if end_visits and v[_V_STATE] == _PENDING and near != _NONE and end - near < dwell:
            v[_V_STATE] = _ARRIVED  # cut short by the end, not gone: it arrives there
            ring[k % n, _R_ARR] += 1
        _end_visit(v, ring[k % n], params)
    level = clock[_K_LEVEL]
    peak = 0
    total = 0
    for k in range(first, end // s):
        r = ring[k % n]
        level += r[_R_DIFF]
        total += level
        peak = max(peak, level)
        for col in range(_R_ARR, _RCOLS):
            o[col] += r[col]
        r[:] = 0
    clock[_K_LEVEL] = level
    o[_O_SUM] = total
    o[_O_SAMPLES] = end // s - first
    o[_O_PEAK] = peak
    clock[_K_OLDEST] = end


@kernel(
    export=(
        "UniTuple(i8, 2)(u1[:], i8[:], i8[:], u1[:], i2[:], i2[:], i8, i8[:, :], i8[:, :], "
        "i8[:], i8[:], i8[:, :], i8)"
    )
)
def _people(
    kind: NDArray[np.uint8],
    ts: NDArray[np.int64],
    chain: NDArray[np.int64],
    fresh: NDArray[np.uint8],
    rssi: NDArray[np.int16],
    thresholds: NDArray[np.int16],
    begin: int,
    visits: NDArray[np.int64],
    ring: NDArray[np.int64],
    clock: NDArray[np.int64],
    params: NDArray[np.int64],
    out: NDArray[np.int64],
    rows: int,
) -> tuple[int, int]:
    """Place rows begin.. until done, a chain outgrows ``visits``, or out is full.

    The clock and windows follow the counter's rule exactly: every row moves the watermark.
    Row ``i`` is judged against the signal threshold ``thresholds[i]`` (the estimator's when
    the row came); with ``fresh[i]`` it begins its chain, so a visit still open on that row
    (of an evicted chain) ends as if its device had gone silent. Returns (next row, rows of
    out filled).
    """
    w, lateness, hold, gap = params[_P_W], params[_P_LATE], params[_P_HOLD], params[_P_GAP]
    dwell, s, n = params[_P_DWELL], params[_P_SAMPLE], params[_P_RING]
    i = begin
    while i < kind.shape[0]:
        t = ts[i]
        c = chain[i]
        if c >= visits.shape[0]:
            break
        if clock[_K_OLDEST] == _NONE:
            clock[_K_OLDEST] = t // w * w
            clock[_K_MAX] = t
        clock[_K_MAX] = max(clock[_K_MAX], t)
        while clock[_K_MAX] - lateness >= clock[_K_OLDEST] + w:
            if rows == out.shape[0]:
                return i, rows
            _close_window(visits, ring, clock, params, False, out, rows)
            rows += 1
        if kind[i] != KIND_PROBE or c < 0:
            i += 1
            continue
        oldest = clock[_K_OLDEST]
        here = max(t, oldest)  # a frame later than lateness counts in the oldest open window
        clock[_K_USED] = max(clock[_K_USED], c + 1)
        v = visits[c]
        r = rssi[i]
        if v[_V_STATE] != _NOVISIT and (fresh[i] or t - v[_V_LAST] > gap):
            _end_visit(v, ring[(max(v[_V_LAST] + gap, oldest) // s) % n], params)
        if v[_V_STATE] == _NOVISIT:
            v[_V_STATE] = _PENDING
            if params[_P_CLOSED] and clock[_K_EPOCH] != _NONE and t - clock[_K_EPOCH] <= gap:
                v[_V_STATE] = _STATIC  # heard across the boundary while closed: a machine
            v[_V_FIRST] = t
            v[_V_LAST] = t
            v[_V_NEAR] = _NONE
            v[_V_GAPS] = 0
        else:
            if t > v[_V_LAST]:
                if t - v[_V_LAST] > BURST_S * NS:
                    v[_V_GAPS] += 1
                if v[_V_STATE] == _ARRIVED:
                    if here <= v[_V_RUN]:  # the run goes on: move its end
                        ring[_up(v[_V_RUN], s) % n, _R_DIFF] += 1
                    else:  # a new run
                        ring[_up(here, s) % n, _R_DIFF] += 1
                    ring[_up(here + hold, s) % n, _R_DIFF] -= 1
                    v[_V_RUN] = here + hold
                v[_V_LAST] = t
            v[_V_FIRST] = min(v[_V_FIRST], t)
        near = r == RSSI_MISSING or r >= thresholds[i]
        if near:
            v[_V_NEAR] = t if v[_V_NEAR] == _NONE else min(v[_V_NEAR], t)
        if v[_V_STATE] == _PENDING and near and t - v[_V_NEAR] >= dwell:
            v[_V_STATE] = _ARRIVED
            at = max(v[_V_LAST], oldest)
            ring[(at // s) % n, _R_ARR] += 1
            ring[_up(at, s) % n, _R_DIFF] += 1
            ring[_up(at + hold, s) % n, _R_DIFF] -= 1
            v[_V_RUN] = at + hold
        static = params[_P_STATIC]
        if v[_V_STATE] == _ARRIVED and static > 0 and v[_V_LAST] - v[_V_FIRST] >= static:
            v[_V_STATE] = _STATIC  # present for hours without a break: not a person
            ring[_up(v[_V_RUN], s) % n, _R_DIFF] += 1
            ring[_up(here, s) % n, _R_DIFF] -= 1
        i += 1
    return i, rows


@kernel(export="i8(i8[:, :], i8[:, :], i8[:], i8[:], i8, b1, i8[:, :])")
def _flush(
    visits: NDArray[np.int64],
    ring: NDArray[np.int64],
    clock: NDArray[np.int64],
    params: NDArray[np.int64],
    until: int,
    end_visits: bool,
    out: NDArray[np.int64],
) -> int:
    """Close every open window that ends at or before ``until`` (at most out's rows); with
    ``end_visits``, every open visit ends in the one that ends at ``until``."""
    rows = 0
    w = params[_P_W]
    if clock[_K_OLDEST] == _NONE:
        return 0
    while clock[_K_OLDEST] + w <= until and rows < out.shape[0]:
        last = clock[_K_OLDEST] + w == until
        _close_window(visits, ring, clock, params, end_visits and last, out, rows)
        rows += 1
    return rows


class PeopleCounter:
    """Feeds rows and their chains through the people kernel; returns closed windows' figures.

    It closes exactly the windows a :class:`~firmware_agent.stages.count.WindowCounter` with the
    same
    ``window_s`` and ``lateness_s`` closes, at the same rows.
    """

    def __init__(self, settings: PeopleSettings, capacity: int = 4096) -> None:
        self.settings = settings
        self._params = settings.params()
        self._capacity = capacity
        self._visits = np.zeros((capacity, _VCOLS), np.int64)
        self._ring = np.zeros((int(self._params[_P_RING]), _RCOLS), np.int64)
        self._clock = np.array([_NONE, _NONE, 0, 0, _NONE], np.int64)
        self._out = np.zeros((256, _NOUT), np.int64)

    def add(
        self,
        kind: NDArray[np.uint8],
        ts_ns: NDArray[np.int64],
        chains: NDArray[np.int64],
        rssi: NDArray[np.int16],
        thresholds: NDArray[np.int16],
        fresh: NDArray[np.uint8] | None = None,
    ) -> list[WindowPeople]:
        """Place a batch's rows (``chains``: each row's chain, -1 for none); return the windows
        they closed. Each row is judged against its signal threshold (``thresholds``: the
        estimator's when the row came), so neither batching nor ``window_s`` changes it.
        ``fresh`` marks the rows that began their chain (:attr:`Estimator.row_fresh
        <firmware_agent.stages.estimate.Estimator.row_fresh>`; None: no chain's row is
        reused)."""
        if fresh is None:
            fresh = np.zeros(len(chains), np.uint8)
        if len(chains) and int(chains.max()) >= len(self._visits):
            self._grow(int(chains.max()) + 1)
        closed: list[WindowPeople] = []
        i = 0
        while i < len(kind):
            i, rows = _people(
                kind,
                ts_ns,
                chains,
                fresh,
                rssi,
                thresholds,
                i,
                self._visits,
                self._ring,
                self._clock,
                self._params,
                self._out,
                0,
            )
            closed += self._emit(rows)
        return closed

    def close_until(self, until_ns: int, *, end_visits: bool) -> list[WindowPeople]:
        """Close every window ending at or before ``until_ns``; with ``end_visits`` (the
        epoch's or the input's end) every open visit ends in the last of them."""
        closed: list[WindowPeople] = []
        while True:
            rows = _flush(
                self._visits,
                self._ring,
                self._clock,
                self._params,
                until_ns,
                end_visits,
                self._out,
            )
            closed += self._emit(rows)
            if rows < self._out.shape[0]:
                return closed

    def new_epoch(self, start_ns: int, *, follows: bool = False) -> None:
        """Forget every visit; windows go on from ``start_ns``. The wiped visits are let go
        for a small table: a busy day's memory goes back. ``follows``: the epoch begins where
        the one before ended (its boundary, frames heard up to it), so a device heard soon
        after was likely there across it."""
        self.wipe()
        self._visits = np.zeros((self._capacity, _VCOLS), np.int64)
        self._clock[_K_OLDEST] = start_ns
        self._clock[_K_EPOCH] = start_ns if follows else _NONE

    def wipe(self) -> None:
        """Overwrite the visits and the ring in place."""
        self._visits.fill(0)
        self._ring.fill(0)
        self._clock[_K_LEVEL] = self._clock[_K_USED] = 0

    def _grow(self, needed: int) -> None:
        size = len(self._visits)
        while size < needed:
            size *= 2
        bigger = np.zeros((size, _VCOLS), np.int64)
        bigger[: len(self._visits)] = self._visits
        self._visits.fill(0)
        self._visits = bigger

    def _emit(self, rows: int) -> list[WindowPeople]:
        return [
            WindowPeople(
                window_start=int(o[_O_START]) // NS,
                arrivals=int(o[_O_ARR]),
                passersby=int(o[_O_PASS]),
                visits_ended=int(o[_O_END]),
                dwell_minutes={band: int(o[_O_BAND + b]) for b, band in enumerate(DWELL_BANDS)},
                occupancy_mean=round(int(o[_O_SUM]) / int(o[_O_SAMPLES]), 2),
                occupancy_peak=int(o[_O_PEAK]),
            )
            for o in self._out[:rows]
        ]
