"""Estimate stage: device ids in, an estimate of the devices present per window out (numba).

Since iOS 14 and Android 10 a phone probes from random (locally administered) addresses that
change often, some with every burst or even every frame, so distinct addresses over-count
people several times. This stage links the addresses of one device into a *chain*, using only
what the anonymize stage hands on: the keyed device id, the keyed model fingerprint (``fp``),
the sequence number, the signal and the time. It never sees an address. It is fed the same
:class:`~firmware_agent.stages.batch.DeviceBatch` rows as the counter and closes the same
windows
(the same watermark rule), so the pipeline can join the two by window start.

**Linking.** A global address is a chain of its own. A random address seen for the first
time, with fingerprint ``F``, joins an existing chain by the first rule that holds:

1. *continuity*, for a fingerprint that keeps its counter: one of the :data:`RING` random
   addresses with fingerprint ``F`` it remembers was heard at most ``link_gap_s`` before, and the
   new address's sequence number is 1 to ``seq_max_delta`` above that address's last one
   (modulo 4096): the same radio counting on under a new address. The smallest step wins.
2. *cadence*, for a fingerprint that has *learnt* to reset: one of those addresses' chains
   was heard at most ``cadence_gap_s`` before, with a signal within ``rssi_link_db`` of the
   new frame's; the oldest such chain wins (so the chains of one phone converge on one; the
   most recent on a tie). Some phones draw a new address *and* a new sequence number for every
   burst or frame; nothing but the model, the timing and the signal ties their addresses.

*A phone never goes back to an address it has left.* An address heard again after it had
fallen silent, when a newer address has joined its chain since, shows the chain holds two
devices: the newest address leaves it for a chain of its own (first heard when it joined; the
people stage sees a new chain from its next frame). This undoes a wrong link whatever made it.
On the synthetic people captures of tests/support/accuracy_people.py (40 visitors an hour, half
of them with phones that rotate their address every 3-15 minutes), a fingerprint of such a
model learnt to reset in the first 15-30 minutes, while only new persons' addresses had come
(none of them continues a counter), and cadence linking then merged up to 9 visitors into one
chain until it unlearnt an hour later: the worst hour's arrivals were 41 % below the truth
over six seeds, 19 % with this rule. The 101 lab days did not move (occupied MAE 2.36, MAPE
20.66 -> 20.55 %, worst day 5.34). Concurrent phones of a per-burst model are not caught (no
address of theirs is heard twice) and still merge when their signals are alike.

A fingerprint remembers :data:`RING` random addresses; when a new one comes and all are taken,
the one heard longest ago makes room (the oldest on a tie). It was the oldest to come: on the
synthetic people captures a busy model's new addresses (passers-by, new visitors) pushed a
phone's address out while it was still heard, before the phone moved on to its next one, which
then continued no counter and began a new chain (seeds 1-4: 37 of the 630 visitors with a
rotating phone that keeps its counter were split into several chains; 21 with this rule). The
101 lab days did not move. A longer ring of the oldest to come (32 or 64) did as much for the
synthetic captures but made the one-phone capture baccichet_iPhone11-M read 3 devices.

A fingerprint has learnt to reset once ``reset_min`` of its new addresses arrived while some
address of it had been heard within ``cadence_gap_s`` (or ``link_gap_s`` if longer), and fewer
than ``reset_share_pct`` % of them continued one by sequence number, after taking off the
matches expected by chance (a random number lands within ``seq_max_delta`` above one of ``K``
addresses heard within ``link_gap_s`` with probability ``K * seq_max_delta / 4096``); from then
on a counter that matches is taken for chance. (Counting the new addresses over the cadence
gap, and 5 of them, is what lets a phone that probes only every 1-3 minutes, a new address and
counter each time, learn it within a visit: with ``link_gap_s`` and 10, two of the nine
one-phone captures never did, and read 0 devices.) Models that keep their counter across
addresses never learn it, so two phones of such a model side by side stay two chains; two
phones of a resetting model at the same spot cannot be told apart and may become one.
(``link`` off: every address is a device of its own, as the evaluation's first stages count;
``assume_randomised``: every address is taken for a random one, for datasets whose anonymiser
drew random addresses.)

**Forgetting** (for the people stage, which judges visits: docs/messages.md). An address heard
again after a silence longer than ``visit_gap_s`` (``count.visit_gap_s``) is linked afresh, as a
new address would be: where it goes never depends on whether it was heard before, outside the
current visit, so no published figure does (the membership check of tests/agent/test_people.py and
priv17's injection harness). Its old chain keeps what it had.

**Counting.** When a window closes, a chain heard in it counts towards ``people_est`` if its
best signal in the window is at or above the signal threshold (or unknown: bare 802.11
captures carry none), it is not static, and it has lasted at least ``min_dwell_s`` (first to
last frame): one burst from the street or the corridor is not a person in the venue.

**Static devices.** A chain first heard while the site is closed (from local midnight until
``static_closed_h``, in the zone the estimator is given: the epoch's), then heard over at least
``static_min_s`` and in at least ``static_share_pct`` % of the windows since it appeared
(desktop PCs, printers, smart TVs left on) is infrastructure: it is left out of ``people_est``
and counted in ``static_excluded`` (``static_min_s`` 0: no static exclusion;
``static_closed_h`` 24: any chain, whenever first heard). What tells a machine from a person
is that it was there through the night: on the 101 lab days a rule by duration alone (4 h)
took a class that stayed 5 hours for PCs (2023-10-04, 15-17 people from 13:00 for nearly 5
hours: day MAE 5.95 then, under 3 now; docs/ACCURACY.md), and a person's laptop or phone in a
class is as steady as a PC. The lab's own PCs are switched on with the class and off after it,
so they are never static; they then count like a class's devices and the site calibration
absorbs them (taking the authors' 14 PCs out by address makes the 101 days worse: occupied MAE
4.02 against 2.44).

**Signal threshold.** Fixed per site (``rssi_threshold_dbm``), or learnt (:data:`AUTO`): at
each *step instant* (every :data:`AUTO_STEP_S`, 300 s, on multiples of it since the Unix epoch,
whatever ``window_s`` is; learnt once the watermark passes it, before a window that ends there
closes), Otsu's split of the best signal of every chain of the epoch that has
lasted ``min_dwell_s`` (devices in the venue against those beyond its walls), once there are
``AUTO_MIN_CHAINS`` of them; until then :data:`AUTO_FALLBACK_DBM`. The split is kept within
``AUTO_RANGE_DBM``, whose floor is the fallback, -70 dBm: Otsu splits whoever is heard, so on
a day with nobody inside it split the corridor and the next room, at -80 to -90 dBm, and the
stronger outsiders counted (the 101 lab days' empty windows: mean 0.43 people and 95th
percentile 3 before this floor and the closed-hours static rule, 0.23 and 1 with both). A
site threshold from an empty hour (``footfall-agent calibrate --site-threshold``) does better
still (0.15).
A window counts with the threshold in force at its end, and the people stage judges each
frame with the one in force when it came (:attr:`Estimator.row_thresholds`). Learning at
window closes made the people figures depend on ``window_s``: the bundled capture's first hour
had 24 arrivals in 5-minute windows and 26 in one hour-long window; with fixed step instants
they are the same (tests/agent/test_people.py). For 5-minute windows nothing changed: the steps are
their ends. A new epoch starts from the fallback.

Everything here (ids, fingerprints, chains, sequence numbers, per-device signal) stays in
memory, is wiped with the epoch (or retired sooner: :class:`Estimator`) and is never logged;
only the per-window counts leave.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, time, timedelta, tzinfo

import numpy as np
from numpy.typing import NDArray

from firmware_agent.kernels import kernel
from firmware_agent.kernels.table import KeyedRows, rehash, slot
from firmware_agent.stages.batch import KIND_PROBE, RSSI_MISSING, DeviceBatch
from firmware_agent.stages.config import AUTO, EstimateSettings

__all__ = [
    "AUTO_FALLBACK_DBM",
    "AUTO_MIN_CHAINS",
    "AUTO_RANGE_DBM",
    "AUTO_STEP_S",
    "RING",
    "Estimator",
    "WindowEstimate",
    "otsu_split",
]

log = logging.getLogger("footfall.agent")

NS = 1_000_000_000
AUTO_FALLBACK_DBM = -70
AUTO_MIN_CHAINS = 30
AUTO_RANGE_DBM = (AUTO_FALLBACK_DBM, -50)
AUTO_STEP_S = 300  # the threshold is learnt at multiples of this since the Unix epoch
RING = 16  # random addresses remembered per fingerprint (the longest silent make room)
_HIST_LO = -120  # signal histogram bins: -120 .. 0 dBm
_HIST_BINS = 121

# Address table columns (int64): chain, last timestamp, last sequence number.
_A_CHAIN, _A_LAST, _A_SEQ = range(3)
_ACOLS = 3

# Chain table columns (int64).
_C_FIRST, _C_LAST, _C_RSSI, _C_BEST, _C_NWIN, _C_LASTWIN = range(6)
_C_WIN, _C_WBEST = 6, 8  # two slots each, by window parity
_C_JOINED, _C_NEWEST = 10, 11  # when its newest address joined, and that address (0: none)
_C_UNSEEN = 12  # 1: split off an address that has sent no frame since (see _estimate)
_CCOLS = 13

_FREE_ROW = -2  # _C_LASTWIN of a retired chain's row, on the free stack for reuse

# Fingerprint table columns (int64): new addresses with a recent one of the same fingerprint,
# of them continued by sequence number, chance matches expected (x 4096), the ring's length,
# the ring (oldest first), for each ring entry whose address was retired its chain + 1 (0:
# none, or retired too) and when it was last heard, and when the newest address came (what
# the ceiling's eviction orders by, with the ring's).
_F_NEW, _F_CONT, _F_EXPECT, _F_LEN = range(4)
_F_RING = 4
_F_TOMB = _F_RING + RING
_F_TLAST = _F_TOMB + RING
_F_LAST = _F_TLAST + RING
_FCOLS = _F_LAST + 1

# Clock and sizes (int64): newest timestamp, oldest open window start, chains, addresses,
# fingerprints, chains behind the last learnt threshold, when the site opens on the epoch's
# day (a chain first heard before it may be static), the threshold in force, the next step
# instant at which it is learnt; chain rows on the free stack, chains made this epoch.
_K_MAX, _K_OLDEST, _K_CHAINS, _K_ADDRS, _K_FPS, _K_THR_N, _K_OPENS, _K_THR, _K_STEP = range(9)
_K_FREE, _K_MADE = 9, 10
_NCLOCK = 11
_NONE = np.iinfo(np.int64).min

# Parameters (int64), in this order.
(
    _P_W,
    _P_LATE,
    _P_LINK_GAP,
    _P_SEQ_DELTA,
    _P_CADENCE,
    _P_RSSI_LINK,
    _P_RESET_MIN,
    _P_RESET_PCT,
    _P_DWELL,
    _P_THR,
    _P_STATIC_MIN,
    _P_STATIC_PCT,
    _P_ALL_RANDOM,
    _P_LINK,
    _P_FORGET,
    _P_MAX,
    _P_MAX_FP,
) = range(17)

# Output row columns (int64).
_O_START, _O_PEOPLE, _O_STATIC, _O_THR = range(4)
_NOUT = 4


@dataclass(frozen=True, slots=True)
class WindowEstimate:
    """The estimate for one closed window; nothing in it identifies a device."""

    window_start: int  # Unix seconds, like WindowCounts.window_start
    people_est: int
    static_excluded: int
    rssi_threshold_dbm: int  # the threshold used (learnt or set)


@kernel(export="i8(i8[:], i8)", gil=True)
def otsu_split(hist: NDArray[np.int64], lo: int) -> int:
    """Otsu's threshold of a histogram whose bin ``k`` holds value ``lo + k``.

    The returned value is the first one of the upper class; ``lo`` if the histogram cannot be
    split. The between-class variance is compared as ``(m0 * w1 - m1 * w0)^2 / (w0 * w1)``,
    cross-multiplied; where it is flat at its maximum (empty bins between the classes) the
    split goes to the middle of the flat run, not to its edge.
    """
    total = 0
    moment = 0
    for k in range(hist.shape[0]):
        total += hist[k]
        moment += k * hist[k]
    best_num = -1.0
    best_den = 1.0
    first = -1
    last = -1
    w0 = 0
    m0 = 0
    for k in range(hist.shape[0] - 1):
        w0 += hist[k]
        m0 += k * hist[k]
        w1 = total - w0
        if w0 == 0 or w1 == 0:
            continue
        diff = float(m0 * w1 - (moment - m0) * w0)
        num = diff * diff
        den = float(w0) * float(w1)
        if num * best_den > best_num * den:
            best_num = num
            best_den = den
            first = last = k
        elif k == last + 1 and num * best_den == best_num * den:
            last = k
    if first < 0:
        return lo
    return lo + (first + last) // 2 + 1


@kernel(inline=True)
def _lingering(s: NDArray[np.int64], params: NDArray[np.int64], hist: NDArray[np.int64]) -> int:
    """Put a chain that lingered ``min_dwell_s`` with a known signal into ``hist`` (1), or
    not (0): what the learnt threshold splits. A free row has no signal."""
    if s[_C_LAST] - s[_C_FIRST] >= params[_P_DWELL] and s[_C_BEST] != RSSI_MISSING:
        hist[min(max(s[_C_BEST], _HIST_LO), _HIST_LO + _HIST_BINS - 1) - _HIST_LO] += 1
        return 1
    return 0


@kernel()
def _learn(
    chains: NDArray[np.int64],
    clock: NDArray[np.int64],
    params: NDArray[np.int64],
    hist: NDArray[np.int64],
) -> None:
    """The step instant ``clock[_K_STEP]`` has passed: learn the threshold there (if it is
    learnt) from every chain of the epoch so far (those retired are in ``hist[1]``), and move
    on to the next step."""
    clock[_K_STEP] += AUTO_STEP_S * NS
    if params[_P_THR] != AUTO:
        return
    hist[0, :] = hist[1, :]  # the retired chains'
    lingering = 0
    for b in range(_HIST_BINS):
        lingering += hist[1, b]
    for c in range(clock[_K_CHAINS]):
        lingering += _lingering(chains[c], params, hist[0])
    thr = AUTO_FALLBACK_DBM
    if lingering >= AUTO_MIN_CHAINS:
        thr = min(max(otsu_split(hist[0], _HIST_LO), AUTO_RANGE_DBM[0]), AUTO_RANGE_DBM[1])
    clock[_K_THR] = thr
    clock[_K_THR_N] = lingering


@kernel()
def _close_window(
    chains: NDArray[np.int64],
    clock: NDArray[np.int64],
    params: NDArray[np.int64],
    hist: NDArray[np.int64],
    out: NDArray[np.int64],
    row: int,
) -> None:
    """Emit the oldest open window into out[row] and advance the clock past it."""
    w = params[_P_W]
    dwell = params[_P_DWELL]
    start = clock[_K_OLDEST]
    widx = start // w
    p = widx & 1
    end = start + w
    n = clock[_K_CHAINS]
    thr = clock[_K_THR]
    people = 0
    static = 0
    for c in range(n):
        s = chains[c]
        if s[_C_WIN + p] != widx:
            continue
        best = s[_C_WBEST + p]
        if best != RSSI_MISSING and best < thr:
            continue
        if (
            params[_P_STATIC_MIN] > 0
            and s[_C_FIRST] < clock[_K_OPENS]
            and end - s[_C_FIRST] >= params[_P_STATIC_MIN]
        ):
            windows = (end - s[_C_FIRST] // w * w) // w
            if s[_C_NWIN] * 100 >= params[_P_STATIC_PCT] * windows:
                static += 1
                continue
        if s[_C_LAST] - s[_C_FIRST] >= dwell:
            people += 1
    o = out[row]
    o[_O_START] = start
    o[_O_PEOPLE] = people
    o[_O_STATIC] = static
    o[_O_THR] = thr
    clock[_K_OLDEST] = end


@kernel(inline=True)
def _advance(
    chains: NDArray[np.int64],
    clock: NDArray[np.int64],
    params: NDArray[np.int64],
    hist: NDArray[np.int64],
    out: NDArray[np.int64],
    rows: int,
    due: int,
) -> int:
    """Learn at every step instant and close every window that ends at or before ``due``, in
    time order (the step at a window's end first), until out is full; rows of out filled."""
    while True:
        end = clock[_K_OLDEST] + params[_P_W]
        if clock[_K_STEP] <= due and clock[_K_STEP] <= end:
            _learn(chains, clock, params, hist)
        elif end <= due and rows < out.shape[0]:
            _close_window(chains, clock, params, hist, out, rows)
            rows += 1
        else:
            return rows


@kernel(inline=True)
def _heard(
    st: NDArray[np.int64], e: int, addr_keys: NDArray[np.uint64], addrs: NDArray[np.int64]
) -> int:
    """When the address of ring entry ``e`` was last heard (kept in the ring once retired)."""
    j = slot(addr_keys, np.uint64(st[_F_RING + e]))
    last: int = addrs[j, _A_LAST] if addr_keys[j] != 0 else st[_F_TLAST + e]
    return last


@kernel(inline=True)
def _resets(st: NDArray[np.int64], params: NDArray[np.int64]) -> bool:
    """Whether the fingerprint of row ``st`` has learnt to reset its counter: ``reset_min`` of
    its new addresses came while another of it was heard, and fewer than ``reset_share_pct`` %
    of them continued a counter beyond the matches expected by chance (module docstring)."""
    new, cont, expect = st[_F_NEW], st[_F_CONT], st[_F_EXPECT]
    learnt: bool = new >= params[_P_RESET_MIN] and (
        100 * (cont * 4096 - expect) < params[_P_RESET_PCT] * new * 4096
    )
    return learnt


@kernel(inline=True)
def _link(
    t: int,
    dev: np.uint64,
    fp: np.uint64,
    s: int,
    r: int,
    addr_keys: NDArray[np.uint64],
    addrs: NDArray[np.int64],
    chains: NDArray[np.int64],
    fp_keys: NDArray[np.uint64],
    fps: NDArray[np.int64],
    clock: NDArray[np.int64],
    params: NDArray[np.int64],
) -> int:
    """The chain a new random address joins (-1: a new one); remembers the address."""
    f = slot(fp_keys, fp)
    if fp_keys[f] == 0:
        fp_keys[f] = fp
        clock[_K_FPS] += 1
        fps[f, :] = 0
    st = fps[f]
    n = st[_F_LEN]
    recent = 0
    heard = False
    best_delta = 4096
    chain = -1
    for k in range(n):  # newest first
        j = slot(addr_keys, np.uint64(st[_F_RING + n - 1 - k]))
        if addr_keys[j] == 0:  # retired: heard longer ago than either gap
            continue
        a = addrs[j]
        gap = abs(t - a[_A_LAST])
        heard |= gap <= max(params[_P_LINK_GAP], params[_P_CADENCE])
        if gap <= params[_P_LINK_GAP]:
            recent += 1
            delta = (s - a[_A_SEQ]) & 4095
            if 1 <= delta <= params[_P_SEQ_DELTA] and delta < best_delta:
                best_delta = delta
                chain = a[_A_CHAIN]
    if heard:
        st[_F_NEW] += 1
        st[_F_EXPECT] += min(4096, recent * params[_P_SEQ_DELTA])
        if chain >= 0:
            st[_F_CONT] += 1
    if _resets(st, params):  # a counter that matched did so by chance: link by cadence
        chain = -1
        for k in range(n):
            e = n - 1 - k
            j = slot(addr_keys, np.uint64(st[_F_RING + e]))
            c = addrs[j, _A_CHAIN] if addr_keys[j] != 0 else st[_F_TOMB + e] - 1
            if c < 0:  # retired with its chain
                continue
            cs = chains[c]
            if abs(t - cs[_C_LAST]) > params[_P_CADENCE]:
                continue
            known = r != RSSI_MISSING and cs[_C_RSSI] != RSSI_MISSING
            if known and abs(r - cs[_C_RSSI]) > params[_P_RSSI_LINK]:
                continue
            if chain < 0 or cs[_C_FIRST] < chains[chain, _C_FIRST]:
                chain = c
    if n == RING:  # full: the entry heard longest ago (the oldest on a tie) leaves
        gone = 0
        for e in range(1, RING):
            if _heard(st, e, addr_keys, addrs) < _heard(st, gone, addr_keys, addrs):
                gone = e
        for e in range(gone, RING - 1):
            st[_F_RING + e] = st[_F_RING + e + 1]
            st[_F_TOMB + e] = st[_F_TOMB + e + 1]
            st[_F_TLAST + e] = st[_F_TLAST + e + 1]
        n -= 1
    st[_F_RING + n] = np.int64(dev)
    st[_F_TOMB + n] = 0
    st[_F_LEN] = n + 1
    st[_F_LAST] = max(st[_F_LAST], t)
    return chain


@kernel(inline=True)
def _new_chain(
    chains: NDArray[np.int64], clock: NDArray[np.int64], free: NDArray[np.int64], t: int, r: int
) -> int:
    """A new chain, first and last heard at ``t`` with signal ``r``, in no window yet: on a
    retired chain's row if one is free (see :func:`_retire_chains`), else on the next row."""
    if clock[_K_FREE] > 0:
        clock[_K_FREE] -= 1
        chain: int = free[clock[_K_FREE]]
    else:
        chain = clock[_K_CHAINS]
        clock[_K_CHAINS] += 1
    clock[_K_MADE] += 1
    cs = chains[chain]
    cs[:] = 0
    cs[_C_FIRST] = t
    cs[_C_LAST] = t
    cs[_C_RSSI] = r
    cs[_C_BEST] = r
    cs[_C_LASTWIN] = -1
    cs[_C_WIN] = -1
    cs[_C_WIN + 1] = -1
    return chain


@kernel(
    export=(
        "UniTuple(i8, 2)(u1[:], i8[:], u8[:], u1[:], i2[:], u8[:], u2[:], i8, u8[:], "
        "i8[:, :], i8[:, :], u8[:], i8[:, :], i8[:], i8[:], i8[:, :], i8[:], i8[:, :], i8, "
        "i8[:], i2[:], u1[:])"
    )
)
def _estimate(
    kind: NDArray[np.uint8],
    ts: NDArray[np.int64],
    device: NDArray[np.uint64],
    randomised: NDArray[np.uint8],
    rssi: NDArray[np.int16],
    fp: NDArray[np.uint64],
    seq: NDArray[np.uint16],
    begin: int,
    addr_keys: NDArray[np.uint64],
    addrs: NDArray[np.int64],
    chains: NDArray[np.int64],
    fp_keys: NDArray[np.uint64],
    fps: NDArray[np.int64],
    clock: NDArray[np.int64],
    params: NDArray[np.int64],
    hist: NDArray[np.int64],
    free: NDArray[np.int64],
    out: NDArray[np.int64],
    rows: int,
    row_chain: NDArray[np.int64],
    row_thr: NDArray[np.int16],
    row_fresh: NDArray[np.uint8],
) -> tuple[int, int]:
    """Link and place rows begin.. until done, a table needs room, or out is full.

    The clock and windows follow the counter's rule exactly: every row (malformed or not)
    moves the watermark, and a row older than the oldest open window counts in that window.
    ``row_chain[i]`` gets the chain of probe row ``i``, ``row_thr[i]`` the signal threshold
    in force when it came and ``row_fresh[i]`` 1 if it began its chain (the people stage's
    input: a chain's row may be one a retired or evicted chain had).
    Returns (next row, rows of out filled).
    """
    w, lateness = params[_P_W], params[_P_LATE]
    addr_limit = min(addr_keys.shape[0] // 2, params[_P_MAX])
    fp_limit = min(fp_keys.shape[0] // 2, params[_P_MAX_FP])
    chain_limit = chains.shape[0]
    i = begin
    n = kind.shape[0]
    while i < n:
        if (
            clock[_K_ADDRS] >= addr_limit
            or clock[_K_FPS] >= fp_limit
            or (clock[_K_CHAINS] >= chain_limit and clock[_K_FREE] == 0)
        ):
            break
        t = ts[i]
        if clock[_K_OLDEST] == _NONE:
            clock[_K_OLDEST] = t // w * w
            clock[_K_MAX] = t
            clock[_K_STEP] = t // (AUTO_STEP_S * NS) * (AUTO_STEP_S * NS) + AUTO_STEP_S * NS
        clock[_K_MAX] = max(clock[_K_MAX], t)
        rows = _advance(chains, clock, params, hist, out, rows, clock[_K_MAX] - lateness)
        if clock[_K_MAX] - lateness >= clock[_K_OLDEST] + w:
            return i, rows  # out is full
        if kind[i] != KIND_PROBE:
            i += 1
            continue
        wstart = max(t // w * w, clock[_K_OLDEST])
        widx = wstart // w
        p = widx & 1
        dev = device[i]
        if dev == 0:
            dev = np.uint64(1)
        r = np.int64(rssi[i])
        s = np.int64(seq[i])
        j = slot(addr_keys, dev)
        known = addr_keys[j] != 0
        if not known or t - addrs[j, _A_LAST] > params[_P_FORGET]:  # new, or linked afresh
            chain = -1
            if params[_P_LINK] and (randomised[i] or params[_P_ALL_RANDOM]) and fp[i] != 0:
                chain = _link(
                    t, dev, fp[i], s, r, addr_keys, addrs, chains, fp_keys, fps, clock, params
                )
            if chain < 0:
                chain = _new_chain(chains, clock, free, t, r)
                row_fresh[i] = 1  # people stage hook
            chains[chain, _C_JOINED] = t
            chains[chain, _C_NEWEST] = np.int64(dev)
            if not known:
                addr_keys[j] = dev
                clock[_K_ADDRS] += 1
            addrs[j, _A_CHAIN] = chain
            addrs[j, _A_LAST] = t
        else:
            cs = chains[addrs[j, _A_CHAIN]]
            if addrs[j, _A_LAST] < cs[_C_JOINED] < t:  # back to an address it had left
                k = slot(addr_keys, np.uint64(cs[_C_NEWEST]))
                split = _new_chain(chains, clock, free, cs[_C_JOINED], cs[_C_RSSI])
                chains[split, _C_UNSEEN] = 1  # its first row marks it fresh (people stage)
                addrs[k, _A_CHAIN] = split
                cs[_C_JOINED] = cs[_C_NEWEST] = 0
            addrs[j, _A_LAST] = max(addrs[j, _A_LAST], t)
        addrs[j, _A_SEQ] = s
        cs = chains[addrs[j, _A_CHAIN]]
        if cs[_C_UNSEEN]:
            cs[_C_UNSEEN] = 0
            row_fresh[i] = 1
        cs[_C_FIRST] = min(cs[_C_FIRST], t)
        cs[_C_LAST] = max(cs[_C_LAST], t)
        if r != RSSI_MISSING:
            cs[_C_RSSI] = r if cs[_C_RSSI] == RSSI_MISSING else (3 * cs[_C_RSSI] + r) // 4
            cs[_C_BEST] = r if cs[_C_BEST] == RSSI_MISSING else max(cs[_C_BEST], r)
        if cs[_C_WIN + p] != widx:
            cs[_C_WIN + p] = widx
            cs[_C_WBEST + p] = r
        elif r != RSSI_MISSING:
            wb = cs[_C_WBEST + p]
            cs[_C_WBEST + p] = r if wb == RSSI_MISSING else max(wb, r)
        if widx > cs[_C_LASTWIN]:  # windows heard in, as they come (not a late one again)
            cs[_C_LASTWIN] = widx
            cs[_C_NWIN] += 1
        row_chain[i] = addrs[j, _A_CHAIN]  # people stage hook
        row_thr[i] = clock[_K_THR]  # people stage hook
        i += 1
    return i, rows


@kernel(export="i8(i8[:, :], i8[:], i8[:], i8[:, :], i8[:], i8, b1)")
def _retire_chains(
    chains: NDArray[np.int64],
    clock: NDArray[np.int64],
    params: NDArray[np.int64],
    hist: NDArray[np.int64],
    free: NDArray[np.int64],
    cutoff: int,
    busy_too: bool,
) -> int:
    """Free the rows of the chains last heard before ``cutoff`` and (unless ``busy_too``: an
    eviction) in no open window; the retired histogram ``hist[1]`` keeps what the learnt
    threshold needs of them. Returns how many were freed."""
    oldest = clock[_K_OLDEST] // params[_P_W]
    freed = 0
    for c in range(clock[_K_CHAINS]):
        s = chains[c]
        if s[_C_LASTWIN] == _FREE_ROW or s[_C_LAST] >= cutoff:
            continue
        if not busy_too and (s[_C_WIN] >= oldest or s[_C_WIN + 1] >= oldest):
            continue
        _lingering(s, params, hist[1])
        s[:] = 0
        s[_C_BEST] = RSSI_MISSING  # a free row is not learnt from
        s[_C_WIN] = -1  # nor counted
        s[_C_WIN + 1] = -1
        s[_C_LASTWIN] = _FREE_ROW
        free[clock[_K_FREE]] = c
        clock[_K_FREE] += 1
        freed += 1
    return freed


@kernel(export="void(u8[:], i8[:, :], b1[:], i8[:, :], u8[:], i8[:, :])")
def _tombstones(
    addr_keys: NDArray[np.uint64],
    addrs: NDArray[np.int64],
    keep: NDArray[np.bool_],
    chains: NDArray[np.int64],
    fp_keys: NDArray[np.uint64],
    fps: NDArray[np.int64],
) -> None:
    """Before the addresses not kept leave the table, every ring entry naming one keeps the
    chain it is in (the cadence rule reads it); an entry whose chain was freed keeps none."""
    for f in range(fp_keys.shape[0]):
        if fp_keys[f] == 0:
            continue
        st = fps[f]
        for e in range(st[_F_LEN]):
            j = slot(addr_keys, np.uint64(st[_F_RING + e]))
            if addr_keys[j] != 0:
                if keep[j]:
                    continue
                st[_F_TOMB + e] = addrs[j, _A_CHAIN] + 1
                st[_F_TLAST + e] = addrs[j, _A_LAST]
            c = st[_F_TOMB + e] - 1
            if c >= 0 and chains[c, _C_LASTWIN] == _FREE_ROW:
                st[_F_TOMB + e] = 0


@kernel(export="void(u8[:], i8[:, :], u8[:], i8[:, :], i8[:])")
def _fingerprints_heard(
    addr_keys: NDArray[np.uint64],
    addrs: NDArray[np.int64],
    fp_keys: NDArray[np.uint64],
    fps: NDArray[np.int64],
    heard: NDArray[np.int64],
) -> None:
    """``heard[f]``: when fingerprint slot ``f`` was last heard, its newest address's arrival
    or the last frame of an address of its ring still held, whichever is later."""
    for f in range(fp_keys.shape[0]):
        if fp_keys[f] == 0:
            continue
        st = fps[f]
        last = st[_F_LAST]
        for e in range(st[_F_LEN]):
            other = np.uint64(st[_F_RING + e])
            if other == 0:
                continue
            j = slot(addr_keys, other)
            if addr_keys[j] != 0:
                last = max(last, addrs[j, _A_LAST])
        heard[f] = last


@kernel(export="i8(i8[:, :], i8[:], i8[:], i8[:, :], i8, i8[:, :])")
def _flush(
    chains: NDArray[np.int64],
    clock: NDArray[np.int64],
    params: NDArray[np.int64],
    hist: NDArray[np.int64],
    until: int,
    out: NDArray[np.int64],
) -> int:
    """Learn at every step instant and close every open window up to ``until``."""
    if clock[_K_OLDEST] == _NONE:
        return 0
    return _advance(chains, clock, params, hist, out, 0, until)


class Estimator:
    """Feeds device batches through the estimating kernel; returns closed windows' estimates.

    It closes exactly the windows a :class:`~firmware_agent.stages.count.WindowCounter` with the
    same
    ``window_s`` and ``lateness_s`` closes, at the same rows.

    **Bounded memory.** Whenever the address table is half full or every chain row is taken,
    the addresses and chains last heard more than :attr:`EstimateSettings.horizon_ns` before
    the oldest open window (20 minutes by default) are *retired*: nothing that comes can
    change them any more (a frame of such an address is linked afresh either way, and neither
    linking rule reaches that far back), and their windows are closed. A retired chain's row
    goes on a free stack for the next new chain, with what the learnt threshold needs of it
    kept in a histogram; a retired address leaves the table, which is rebuilt at four times
    the addresses left (down to ``capacity``; a fingerprint's ring keeps a retired address's
    chain for the cadence rule). So the tables follow the devices of the last twenty minutes,
    not of the day, and every figure is the one an unbounded store gives (the kernel is held
    to its plain-Python twin, tests/support/reference_estimate.py, over hours of chains
    coming and going; only a frame that comes more than one window behind the oldest open
    window could tell them apart). Through a day of 2 million addresses (bench/bench_scale.py,
    kernels built ahead of time) the replay's peak RSS went from 349 to 189 MB: the estimate
    and people stages take 13 MB of it instead of 173 (without them, 176 MB: the process and
    the count stage's table at its ceiling).

    **Ceiling.** At most ``max_devices`` (``count.max_devices``) live addresses and as many
    chains. Past it the longest silent are *evicted*: addresses down to three quarters of it
    (their chains stay), chains an eighth at a time (with their addresses; the people stage
    ends their visits, :attr:`row_fresh`). Fingerprints are not retired (a model's learnt
    reset counts for the whole epoch) but stop at ``max_fingerprints``
    (``estimate.max_fingerprints``): there the eighth heard longest ago (the newest address
    of each, or the last frame of an address of its ring still held) are evicted; an evicted
    fingerprint heard again starts afresh, unlearnt, and its addresses still held keep their
    chains. Evictions are counted (:attr:`evicted_total`, ``footfall_estimate_evicted_total``;
    :attr:`evictions`, the rounds, in ``status``) and the first of an epoch is logged:
    figures of a venue past a ceiling may differ from an unbounded store's.
    """

    def __init__(
        self,
        settings: EstimateSettings,
        capacity: int = 4096,
        zone: tzinfo | None = None,
        *,
        suppress_below: int = 5,
    ) -> None:
        self.settings = settings
        self._zone = zone  # the site's, for its closed hours (None: the system's)
        self._k = suppress_below  # the log obeys the privacy stage's small-count rule
        self._params = settings.params()
        self._capacity = capacity
        self._addrs = KeyedRows(capacity, _ACOLS)
        self._chains = np.zeros((capacity, _CCOLS), np.int64)
        self._free = np.zeros(capacity, np.int64)
        self._fps = KeyedRows(max(capacity // 8, 64), _FCOLS)
        self._clock = np.zeros(_NCLOCK, np.int64)
        self._clock[[_K_MAX, _K_OLDEST, _K_OPENS, _K_STEP]] = _NONE
        self._hist = np.zeros((2, _HIST_BINS), np.int64)  # learnt from; of retired chains
        self._out = np.zeros((256, _NOUT), np.int64)
        self._clock[_K_THR] = self._initial_threshold()
        self._threshold_said: int | None = None
        self._evicted = 0  # this epoch
        self.evicted_total = 0
        """Addresses, chains and fingerprints evicted at a ceiling since this estimator
        began."""
        self.evictions = 0
        """Eviction rounds since this estimator began: the times it found a table at its
        ceiling and evicted (what ``status`` publishes: rounds, not rows)."""
        self.row_chains = np.zeros(0, np.int64)
        """People stage hook: the chain of each row of the last batch added (-1: none)."""
        self.row_thresholds = np.zeros(0, np.int16)
        """People stage hook: the signal threshold in force at each row of the last batch."""
        self.row_fresh = np.zeros(0, np.uint8)
        """People stage hook: 1 for a row of the last batch that began its chain (the row may
        be one a retired or evicted chain had)."""
        self.threshold_note = (
            f"{settings.rssi_threshold_dbm} dBm (set: estimate.rssi_threshold_dbm)"
            if settings.rssi_threshold_dbm != AUTO
            else f"{AUTO_FALLBACK_DBM} dBm (auto: nothing heard yet)"
        )
        """The signal threshold in use and why (aggregates only), for reports."""

    @property
    def threshold_dbm(self) -> int:
        """The signal threshold in force (set, or the last one learnt)."""
        return int(self._clock[_K_THR])

    @property
    def chains(self) -> int:
        """Chains (estimated devices) made so far this epoch."""
        return int(self._clock[_K_MADE])

    @property
    def live(self) -> tuple[int, int]:
        """Addresses and chains held now (neither retired nor evicted)."""
        return int(self._clock[_K_ADDRS]), int(self._clock[_K_CHAINS] - self._clock[_K_FREE])

    @property
    def fingerprints(self) -> tuple[int, int]:
        """Fingerprints held now, and the slots of their table."""
        return int(self._clock[_K_FPS]), self._fps.capacity

    def add(self, batch: DeviceBatch) -> list[WindowEstimate]:
        """Estimate a batch; return the windows its rows closed."""
        closed: list[WindowEstimate] = []
        self.row_chains = np.full(len(batch), -1, np.int64)
        self.row_thresholds = np.zeros(len(batch), np.int16)
        self.row_fresh = np.zeros(len(batch), np.uint8)
        if self._clock[_K_OPENS] == _NONE and len(batch):
            self._clock[_K_OPENS] = self._opens(int(batch.ts_ns[0]))
        i = 0
        while i < len(batch):
            i, rows = _estimate(
                batch.kind,
                batch.ts_ns,
                batch.device,
                batch.randomised,
                batch.rssi,
                batch.fp,
                batch.seq,
                i,
                self._addrs.keys,
                self._addrs.rows,
                self._chains,
                self._fps.keys,
                self._fps.rows,
                self._clock,
                self._params,
                self._hist,
                self._free,
                self._out,
                0,
                self.row_chains,
                self.row_thresholds,
                self.row_fresh,
            )
            closed += self._emit(rows)
            self._room()
        self._note()
        return closed

    def close_until(self, until_ns: int) -> list[WindowEstimate]:
        """Close every window ending at or before ``until_ns``."""
        closed: list[WindowEstimate] = []
        while True:
            rows = _flush(self._chains, self._clock, self._params, self._hist, until_ns, self._out)
            closed += self._emit(rows)
            if rows < self._out.shape[0]:
                self._note()
                return closed

    def close_all(self) -> list[WindowEstimate]:
        """End of input: close every open window."""
        if self._clock[_K_MAX] == _NONE:
            return []
        w = int(self._params[_P_W])
        return self.close_until(int(self._clock[_K_MAX]) // w * w + w)

    def new_epoch(self, start_ns: int) -> None:
        """Forget every address, fingerprint and chain; windows go on from ``start_ns``.

        The wiped tables are let go for small ones: a busy day's memory goes back."""
        self.wipe()
        self._addrs = KeyedRows(self._capacity, _ACOLS)
        self._chains = np.zeros((self._capacity, _CCOLS), np.int64)
        self._free = np.zeros(self._capacity, np.int64)
        self._fps = KeyedRows(max(self._capacity // 8, 64), _FCOLS)
        self._clock[_K_OLDEST] = start_ns
        self._clock[_K_OPENS] = self._opens(start_ns)
        step = AUTO_STEP_S * NS
        self._clock[_K_STEP] = start_ns // step * step + step

    def _opens(self, t_ns: int) -> int:
        """When the site opens (``static_closed_h``, local) on the day of ``t_ns``."""
        local = datetime.fromtimestamp(t_ns / NS, self._zone).astimezone(self._zone)
        midnight = datetime.combine(local.date(), time(0), local.tzinfo)
        opens = midnight + timedelta(hours=self.settings.static_closed_h)
        return int(opens.timestamp()) * NS

    def wipe(self) -> None:
        """Overwrite every table in place (ids, fingerprints, chains, signal)."""
        self._addrs.wipe()
        self._fps.wipe()
        self._chains.fill(0)
        self._free.fill(0)
        self._hist.fill(0)
        self.row_chains.fill(-1)  # people stage hook
        self._clock[_K_CHAINS] = self._clock[_K_ADDRS] = self._clock[_K_FPS] = 0
        self._clock[_K_FREE] = self._clock[_K_MADE] = 0
        self._evicted = 0
        self._clock[_K_THR_N] = 0
        self._clock[_K_OPENS] = _NONE
        self._clock[_K_THR] = self._initial_threshold()

    def _room(self) -> None:
        """Make room for the kernel to go on: retire (see the class), grow, or evict; one
        eviction round if anything was evicted."""
        before = self.evicted_total
        self._make_room()
        if self.evicted_total > before:
            self.evictions += 1

    def _make_room(self) -> None:
        if self._clock[_K_FPS] >= self.settings.max_fingerprints:
            self._evict_fingerprints()
        elif self._clock[_K_FPS] >= self._fps.capacity // 2:
            self._fps = self._fps.grown()
        ceiling = self.settings.max_devices
        addrs_full = self._clock[_K_ADDRS] >= min(self._addrs.capacity // 2, ceiling)
        rows = len(self._chains)
        chains_full = self._clock[_K_CHAINS] >= rows and self._clock[_K_FREE] == 0
        if not (addrs_full or chains_full):
            return
        cutoff = int(self._clock[_K_OLDEST]) - self.settings.horizon_ns
        self._retire_chains(cutoff, busy_too=False)
        spare = int(self._clock[_K_FREE]) + rows - int(self._clock[_K_CHAINS])
        if spare < rows // 4 and rows < ceiling:
            self._grow_chains(min(2 * rows, ceiling))
        elif not spare:  # every row taken, at the ceiling
            live = self._chains[:, _C_LASTWIN] != _FREE_ROW
            lasts = self._chains[live, _C_LAST]
            k = max(1, ceiling // 8)
            self._evict(self._retire_chains(int(np.partition(lasts, k - 1)[k - 1]) + 1, True))
        self._retire_addresses(cutoff)

    def _evict_fingerprints(self) -> None:
        """At ``max_fingerprints``: the eighth heard longest ago leave the table (wiped), the
        rest are rehashed in place."""
        keys, rows = self._fps.keys, self._fps.rows
        heard = np.zeros(len(keys), np.int64)
        _fingerprints_heard(self._addrs.keys, self._addrs.rows, keys, rows, heard)
        used = np.flatnonzero(keys)
        drop = used[np.argsort(heard[used], kind="stable")[: max(1, len(used) // 8)]]
        keys[drop] = 0
        rows[drop] = 0
        self._fps.rehash_in_place()
        self._clock[_K_FPS] -= len(drop)
        self._evict(len(drop))

    def _retire_chains(self, cutoff: int, busy_too: bool) -> int:
        return int(
            _retire_chains(
                self._chains, self._clock, self._params, self._hist, self._free, cutoff, busy_too
            )
        )

    def _grow_chains(self, size: int) -> None:
        bigger = np.zeros((size, _CCOLS), np.int64)
        rows = len(self._chains)
        bigger[:rows] = self._chains
        free = np.zeros(size, np.int64)
        free[:rows] = self._free
        self._chains.fill(0)
        self._chains, self._free = bigger, free

    def _retire_addresses(self, cutoff: int) -> None:
        """Take out of the address table those heard before ``cutoff`` or whose chain was
        freed, and the longest silent past three quarters of the ceiling; rebuild it. The rings
        forget freed chains even if no address goes (a chain's addresses may all have gone
        before it: one relinked elsewhere after a silence)."""
        keys, rows = self._addrs.keys, self._addrs.rows
        used = keys != 0
        chain_freed = self._chains[rows[:, _A_CHAIN], _C_LASTWIN] == _FREE_ROW
        keep = used & ~chain_freed & (rows[:, _A_LAST] >= cutoff)
        evicted = int(np.count_nonzero(used & chain_freed & (rows[:, _A_LAST] >= cutoff)))
        ceiling = self.settings.max_devices
        kept = int(np.count_nonzero(keep))
        if kept > ceiling * 7 // 8:
            lasts = rows[keep, _A_LAST]
            k = kept - ceiling * 3 // 4
            keep &= rows[:, _A_LAST] > np.partition(lasts, k - 1)[k - 1]
            evicted += kept - int(np.count_nonzero(keep))
            kept = int(np.count_nonzero(keep))
        self._evict(evicted)
        capacity = self._addrs.capacity
        if kept >= capacity // 4:
            capacity *= 2
        while capacity > self._capacity and kept < capacity // 16:
            capacity //= 2
        capacity = min(capacity, 1 << (2 * ceiling - 1).bit_length())
        _tombstones(keys, rows, keep, self._chains, self._fps.keys, self._fps.rows)
        if kept == int(np.count_nonzero(used)) and capacity == self._addrs.capacity:
            return
        table = KeyedRows(capacity, _ACOLS)
        kept_keys = np.where(keep, keys, np.uint64(0))
        rehash(kept_keys, rows, table.keys, table.rows)
        kept_keys.fill(0)  # device ids: wiped like the tables
        self._addrs.wipe()
        self._addrs = table
        self._clock[_K_ADDRS] = kept

    def _evict(self, n: int) -> None:
        if not n:
            return
        if not self._evicted:
            log.warning(
                "estimator at its ceiling (count.max_devices = %d, estimate.max_fingerprints "
                "= %d): the longest silent addresses, chains or fingerprints are evicted from "
                "now on in this epoch (footfall_estimate_evicted_total)",
                self.settings.max_devices,
                self.settings.max_fingerprints,
            )
        self._evicted += n
        self.evicted_total += n

    def _initial_threshold(self) -> int:
        """The threshold before anything is learnt in an epoch: the set one, or the fallback."""
        dbm = self.settings.rssi_threshold_dbm
        return dbm if dbm != AUTO else AUTO_FALLBACK_DBM

    def _emit(self, rows: int) -> list[WindowEstimate]:
        return [
            WindowEstimate(
                window_start=int(o[_O_START]) // NS,
                people_est=int(o[_O_PEOPLE]),
                static_excluded=int(o[_O_STATIC]),
                rssi_threshold_dbm=int(o[_O_THR]),
            )
            for o in self._out[:rows]
        ]

    def _note(self) -> None:
        """Say a learnt threshold that changed (threshold_note, the log)."""
        threshold = self.threshold_dbm
        if self.settings.rssi_threshold_dbm == AUTO and threshold != self._threshold_said:
            self._threshold_said = threshold
            self.threshold_note = self._why(threshold)
            log.info("signal threshold %s", self.threshold_note)

    def _why(self, threshold: int) -> str:
        """What the learnt threshold is and why, in aggregates only (a count of devices from
        1 to k-1 is not printed: logs obey the same small-count rule as the counts)."""
        lingering = int(self._clock[_K_THR_N])
        dwell = self.settings.min_dwell_s
        if lingering < AUTO_MIN_CHAINS:
            return (
                f"{threshold} dBm (auto: the fallback until {AUTO_MIN_CHAINS} devices have been "
                f"heard for {dwell} s or more; {self._count(lingering)} so far)"
            )
        values = np.arange(_HIST_LO, _HIST_LO + _HIST_BINS)
        inside = self._hist[0, values >= threshold]
        outside = self._hist[0, values < threshold]
        return (
            f"{threshold} dBm (auto: Otsu's split of the best signal of the "
            f"{self._count(lingering)} devices heard for {dwell} s or more: "
            f"{self._side('at or above it', values[values >= threshold], inside)}; "
            f"{self._side('below', values[values < threshold], outside)}; kept within "
            f"{AUTO_RANGE_DBM[0]}..{AUTO_RANGE_DBM[1]} dBm)"
        )

    def _count(self, n: int) -> str:
        return str(n) if n == 0 or n >= self._k else f"fewer than {self._k}"

    def _side(self, where: str, values: NDArray[np.int64], weights: NDArray[np.int64]) -> str:
        """How many devices lie on one side of the split and, for k or more, their median
        signal (the median of fewer could be one device's own)."""
        n = int(weights.sum())
        if n < self._k:
            return f"{self._count(n)} {where}"
        return f"{n} {where}, median {_median(values, weights)} dBm"


def _median(values: NDArray[np.int64], weights: NDArray[np.int64]) -> int:
    cumulative = np.cumsum(weights)
    return int(values[int(np.searchsorted(cumulative, (cumulative[-1] + 1) // 2))])
