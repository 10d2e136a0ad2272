"""Count stage: device ids in, per-window counts out (numba).

A device table (:class:`~firmware_agent.kernels.table.KeyedRows`, numpy arrays the numba kernel
updates in place) holds, for the current epoch only, one row per device id: last seen,
randomised flag, the current visit, and per-window presence, best signal and frames. Nothing
else: the keyed fingerprint and sequence number that the estimate stage reads are not kept
here (least necessary state), nor first seen, best signal or frames over the epoch, which no
figure reads.

Windows are aligned to the clock (multiples of ``window_s`` since the Unix epoch) and
close on the frames' own clock: a watermark trails the newest timestamp seen by
``lateness_s``, and a window closes once the watermark passes its end. A frame older than
the oldest open window (a merged sniffer running late) is counted in that window and in
``late_frames``. So a replay of a capture gives the same counts every time, and a live
run gives the counts a replay of its capture would.

When a window closes, one pass over the table yields:

* ``devices``: distinct device ids seen in the window, ``devices_randomised`` of them
  from locally administered addresses;
* ``visitors``: those whose best signal in the window is at or above
  ``rssi_threshold_dbm`` (or unknown: bare 802.11 captures carry no signal) and whose
  current visit has lasted at least ``min_dwell_s``; the rest are ``passersby``;
* ``visits_ended``: visits of visitors whose device has been silent for ``visit_gap_s``
  by the window's end, with a histogram of their dwell (< 5, 5-15, 15-30, 30-60, >= 60
  min); at the end of an epoch (the table is wiped) every open visit ends;
* ``devices_epoch``: distinct devices since the epoch began (never published: it is a
  membership oracle, see :mod:`firmware_agent.stages.privacy`);
* ``probe_requests_clipped``: the window's probe requests with each device's share capped at
  :data:`FRAMES_PER_DEVICE`: what noise goes on, since one device moves it by at most that.

Only ``devices`` and ``devices_randomised`` leave the agent (counts v2's diagnostics): the
rest is per address, and one phone under rotating addresses makes several "visitors" and
"visits". What a merchant reads, people, comes from the estimate and people stages, which the
pipeline joins to the same window (``people_est``, ``static_excluded``, ``figures``; see
:mod:`firmware_agent.stages.estimate` and :mod:`firmware_agent.stages.people`); a counter alone
leaves them
None.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
from numpy.typing import NDArray

from firmware_agent.kernels import kernel
from firmware_agent.kernels.table import KeyedRows, slot
from firmware_agent.stages.batch import (
    DWELL_BANDS,
    DWELL_EDGES_MIN,
    FRAMES_PER_DEVICE,
    KIND_PROBE,
    NS,
    RSSI_MISSING,
    DeviceBatch,
    WindowCounts,
)
from firmware_agent.stages.config import CountSettings

log = logging.getLogger("footfall.agent")

__all__ = ["WindowCounter"]

# Device table columns (int64): last frame, start of the current visit (or _NONE), flags
# (_F_RANDOM: its last frame's address was locally administered; _F_VISITOR: a visitor in its
# current visit), and for each open-window slot (two: by parity) one word: the window index
# (signed, bits 32-63; -1: none), the best signal in it (int16, bits 16-31) and its frames
# (bits 0-15, saturating: only up to FRAMES_PER_DEVICE is read).
# A row is 5 x 8 bytes and its key 8 (10 columns, 88 bytes, before issue 18's packing); with
# the slot lists (12 bytes a slot) and the table between a quarter and a half full, a device
# costs 120-240 bytes here. Growth and eviction move rows within the same arrays (reserved at
# the ceiling's size): at the ceiling only the eviction's sort comes on top (about 10 MB at the
# default 250,000 rows).
_LAST, _VISIT_START, _FLAGS, _W = range(4)  # _W: two slots
_NCOLS = 5
_F_RANDOM, _F_VISITOR = 1, 2
_WIN_SHIFT = 32
_RSSI_SHIFT = 16
_FRAMES_MAX = 0xFFFF
_NO_WINDOW = -1 << _WIN_SHIFT  # a window word of no window

# Window accumulator columns (int64), one row per open-window slot (two: by parity).
_A_PROBES, _A_MALFORMED, _A_LATE, _A_ENDED = range(4)
_A_DWELL = 4  # five dwell bands
_NACC = 9

# Output row columns (int64).
_O_START, _O_PROBES, _O_MALFORMED, _O_LATE, _O_DEVICES, _O_RANDOM = range(6)
_O_VISITORS, _O_PASSERS, _O_ENDED = 6, 7, 8
_O_DWELL = 9
_O_EPOCH = 14
_O_CLIPPED = 15
_NOUT = 16

# Clock state (int64): newest timestamp, start of the oldest open window (or _NONE),
# devices in the table, open visits (the length of the open-visit list), and the length of
# each open window's list of devices heard in it (two: by parity).
_C_MAX, _C_OLDEST, _C_USED, _C_OPEN_VISITS = range(4)
_C_HEARD = 4  # two slots
_C_EVICTED = 6  # rows evicted at the ceiling this epoch
_NCLOCK = 7

# Slot lists (int64), each of capacity // 2 + 1 entries: the slots heard in each open window
# (rows 0 and 1, by parity) and the slots with an open visit (row 2). A window's close walks
# these, not the table: its cost follows the devices heard lately, not the epoch's.
_L_OPEN = 2
_NONE = np.iinfo(np.int64).min


@kernel(inline=True)
def _window(word: int) -> int:
    """A window word's window index (-1: none)."""
    return word >> _WIN_SHIFT


@kernel(inline=True)
def _heard(widx: int, rssi: int, frames: int) -> int:
    """The window word of window ``widx`` with its best signal and frames."""
    return (widx << _WIN_SHIFT) | ((rssi & 0xFFFF) << _RSSI_SHIFT) | min(frames, _FRAMES_MAX)


@kernel(inline=True)
def _signal(word: int) -> int:
    """A window word's best signal (int16)."""
    r = (word >> _RSSI_SHIFT) & 0xFFFF
    return r - 0x10000 if r >= 0x8000 else r


@kernel()
def _close_window(
    keys: NDArray[np.uint64],
    state: NDArray[np.int64],
    acc: NDArray[np.int64],
    clock: NDArray[np.int64],
    params: NDArray[np.int64],
    lists: NDArray[np.int64],
    end_all_visits: bool,
    out: NDArray[np.int64],
    row: int,
) -> None:
    """Emit the oldest open window into out[row] and advance the clock past it."""
    w, _lateness, thr, min_dwell, gap = params[0], params[1], params[2], params[3], params[4]
    start = clock[_C_OLDEST]
    widx = start // w
    p = widx & 1
    end = start + w
    devices = 0
    randomised = 0
    visitors = 0
    clipped = 0
    for k in range(clock[_C_HEARD + p]):
        s = state[lists[p, k]]
        word = s[_W + p]
        if _window(word) == widx:
            devices += 1
            randomised += s[_FLAGS] & _F_RANDOM
            clipped += min(word & _FRAMES_MAX, FRAMES_PER_DEVICE)
            r = _signal(word)
            if (r >= thr or r == RSSI_MISSING) and s[_LAST] - s[_VISIT_START] >= min_dwell:
                visitors += 1
                s[_FLAGS] |= _F_VISITOR
    clock[_C_HEARD + p] = 0
    kept = 0
    for k in range(clock[_C_OPEN_VISITS]):
        i = lists[_L_OPEN, k]
        s = state[i]
        if end_all_visits or s[_LAST] + gap <= end:
            if s[_FLAGS] & _F_VISITOR:
                dwell_min = (s[_LAST] - s[_VISIT_START]) // (60 * NS)
                band = 0
                while band < 4 and dwell_min >= DWELL_EDGES_MIN[band]:
                    band += 1
                acc[p, _A_ENDED] += 1
                acc[p, _A_DWELL + band] += 1
            s[_VISIT_START] = _NONE
            s[_FLAGS] &= _F_RANDOM
        else:
            lists[_L_OPEN, kept] = i
            kept += 1
    clock[_C_OPEN_VISITS] = kept
    o = out[row]
    o[_O_START] = start
    o[_O_PROBES] = acc[p, _A_PROBES]
    o[_O_MALFORMED] = acc[p, _A_MALFORMED]
    o[_O_LATE] = acc[p, _A_LATE]
    o[_O_DEVICES] = devices
    o[_O_RANDOM] = randomised
    o[_O_VISITORS] = visitors
    o[_O_PASSERS] = devices - visitors
    o[_O_ENDED] = acc[p, _A_ENDED]
    for b in range(5):
        o[_O_DWELL + b] = acc[p, _A_DWELL + b]
    o[_O_EPOCH] = clock[_C_USED] + clock[_C_EVICTED]
    o[_O_CLIPPED] = clipped
    acc[p, :] = 0
    clock[_C_OLDEST] = end


@kernel(
    export=(
        "UniTuple(i8, 2)(u1[:], i8[:], u8[:], u1[:], i2[:], i8, u8[:], "
        "i8[:, :], i8[:, :], i8[:], i8[:], i8[:, :], i8[:, :], i8)"
    )
)
def _count(
    kind: NDArray[np.uint8],
    ts: NDArray[np.int64],
    device: NDArray[np.uint64],
    randomised: NDArray[np.uint8],
    rssi: NDArray[np.int16],
    begin: int,
    keys: NDArray[np.uint64],
    state: NDArray[np.int64],
    acc: NDArray[np.int64],
    clock: NDArray[np.int64],
    params: NDArray[np.int64],
    lists: NDArray[np.int64],
    out: NDArray[np.int64],
    rows: int,
) -> tuple[int, int]:
    """Count rows begin.. until done, the table is 1/2 full, or out is full.

    Returns (next row to count, rows of out filled).
    """
    w, lateness, gap = params[0], params[1], params[4]
    limit = min(keys.shape[0] // 2, params[5])
    i = begin
    n = kind.shape[0]
    while i < n:
        if clock[_C_USED] >= limit:
            break
        t = ts[i]
        if clock[_C_OLDEST] == _NONE:
            clock[_C_OLDEST] = t // w * w
            clock[_C_MAX] = t
        clock[_C_MAX] = max(clock[_C_MAX], t)
        while clock[_C_MAX] - lateness >= clock[_C_OLDEST] + w:
            if rows == out.shape[0]:
                return i, rows
            _close_window(keys, state, acc, clock, params, lists, False, out, rows)
            rows += 1
        wstart = t // w * w
        if wstart < clock[_C_OLDEST]:
            wstart = clock[_C_OLDEST]
            acc[(wstart // w) & 1, _A_LATE] += 1
        widx = wstart // w
        p = widx & 1
        k = kind[i]
        if k & KIND_PROBE:
            acc[p, _A_PROBES] += 1
        if k != KIND_PROBE:
            acc[p, _A_MALFORMED] += 1
            i += 1
            continue
        dev = device[i]
        if dev == 0:
            dev = np.uint64(1)
        j = slot(keys, dev)
        s = state[j]
        r = np.int64(rssi[i])
        if keys[j] == 0:
            keys[j] = dev
            clock[_C_USED] += 1
            s[_LAST] = t
            s[_VISIT_START] = _NONE
            s[_W] = _NO_WINDOW
            s[_W + 1] = _NO_WINDOW
        if s[_VISIT_START] == _NONE:
            s[_VISIT_START] = t
            lists[_L_OPEN, clock[_C_OPEN_VISITS]] = j
            clock[_C_OPEN_VISITS] += 1
        elif t - s[_LAST] > gap:  # silent too long: the old visit ends, a new one begins
            s[_VISIT_START] = t
            s[_FLAGS] &= _F_RANDOM
        elif t < s[_VISIT_START]:
            s[_VISIT_START] = t
        s[_LAST] = max(s[_LAST], t)
        s[_FLAGS] = (s[_FLAGS] & _F_VISITOR) | (_F_RANDOM if randomised[i] else 0)
        word = s[_W + p]
        if _window(word) != widx:
            s[_W + p] = _heard(widx, r, 1)
            lists[p, clock[_C_HEARD + p]] = j
            clock[_C_HEARD + p] += 1
        else:
            s[_W + p] = _heard(widx, max(_signal(word), r), (word & _FRAMES_MAX) + 1)
        i += 1
    return i, rows


@kernel(export="i8(u8[:], i8[:, :], i8[:, :], i8[:], i8[:], i8[:, :], i8, b1, i8[:, :])")
def _flush(
    keys: NDArray[np.uint64],
    state: NDArray[np.int64],
    acc: NDArray[np.int64],
    clock: NDArray[np.int64],
    params: NDArray[np.int64],
    lists: NDArray[np.int64],
    until: int,
    end_all_visits: bool,
    out: NDArray[np.int64],
) -> int:
    """Close every open window that ends at or before ``until``; the last one ends visits."""
    rows = 0
    w = params[0]
    if clock[_C_OLDEST] == _NONE:
        return 0
    while clock[_C_OLDEST] + w <= until and rows < out.shape[0]:
        last = clock[_C_OLDEST] + 2 * w > until
        _close_window(keys, state, acc, clock, params, lists, end_all_visits and last, out, rows)
        rows += 1
    return rows


class WindowCounter:
    """Feeds device batches through the counting kernel and yields closed windows."""

    def __init__(self, settings: CountSettings, capacity: int = 4096) -> None:
        self.settings = settings
        # The table never grows past the smallest power of two >= 2 * max_devices (it grows
        # when half full, below the ceiling): reserved at once, it grows in place.
        self._reserve = 1 << (2 * settings.max_devices - 1).bit_length()
        self.table = KeyedRows(capacity, _NCOLS, self._reserve)
        self._acc = np.zeros((2, _NACC), np.int64)
        self._clock = np.array([_NONE, _NONE] + [0] * (_NCLOCK - 2), np.int64)
        self._lists = np.zeros((3, capacity // 2 + 1), np.int64)
        self._params = np.array(
            [
                settings.window_s * NS,
                settings.lateness_s * NS,
                settings.rssi_threshold_dbm,
                settings.min_dwell_s * NS,
                settings.visit_gap_s * NS,
                settings.max_devices,
            ],
            np.int64,
        )
        self._capacity = capacity
        self.evicted_total = 0  # rows evicted at the ceiling since this counter began
        self.evictions = 0  # eviction rounds (an eighth of the ceiling each) since then
        self._out = np.zeros((256, _NOUT), np.int64)

    @property
    def watermark_ns(self) -> int | None:
        """Newest timestamp counted minus the lateness allowance (None before any frame)."""
        newest = int(self._clock[_C_MAX])
        return None if newest == _NONE else newest - int(self._params[1])

    @property
    def oldest_open_ns(self) -> int | None:
        """Start of the oldest window still open (None before any frame)."""
        oldest = int(self._clock[_C_OLDEST])
        return None if oldest == _NONE else oldest

    def add(self, batch: DeviceBatch) -> Iterator[WindowCounts]:
        """Count a batch; yield the windows its frames closed."""
        i = 0
        while i < len(batch):
            i, rows = _count(
                batch.kind,
                batch.ts_ns,
                batch.device,
                batch.randomised,
                batch.rssi,
                i,
                self.table.keys,
                self.table.rows,
                self._acc,
                self._clock,
                self._params,
                self._lists,
                self._out,
                0,
            )
            yield from self._emit(rows)
            if self._clock[_C_USED] >= self.settings.max_devices:
                self._evict()
            elif self._clock[_C_USED] >= self.table.capacity // 2:
                self.table = self.table.grown()
                self._relist()

    @property
    def evicted(self) -> int:
        """Rows evicted at the ceiling (``max_devices``) in this epoch."""
        return int(self._clock[_C_EVICTED])

    def _evict(self) -> None:
        """The table is at its ceiling: drop an eighth of its rows, the longest silent first.

        Rows heard in an open window or in an open visit go only once no other is left (a
        venue with more devices than the ceiling within ``visit_gap_s``): their window then
        counts fewer devices and their visit never ends. The rest are rehashed within the
        same arrays (rows move, so the slot lists are rebuilt): at the default ceiling a
        second table and a copy of the rows took another 66 MB for a moment (issue 18); the
        columns read here and the sort take 10 MB.
        """
        keys, rows = self.table.keys, self.table.rows
        used = np.flatnonzero(keys)
        oldest = int(self._clock[_C_OLDEST]) // int(self._params[0])
        busy = rows[used, _VISIT_START] != _NONE
        busy |= rows[used, _W] >> _WIN_SHIFT >= oldest
        busy |= rows[used, _W + 1] >> _WIN_SHIFT >= oldest
        order = np.lexsort((rows[used, _LAST], busy))  # silent first, then the longest silent
        drop = used[order[: max(1, self.settings.max_devices // 8)]]
        del used, busy, order
        keys[drop] = 0
        rows[drop] = 0
        self._clock[_C_USED] -= len(drop)
        self._clock[_C_EVICTED] += len(drop)
        self.evicted_total += len(drop)
        self.evictions += 1
        if self._clock[_C_EVICTED] == len(drop):  # the epoch's first eviction
            log.warning(
                "device table at its ceiling (count.max_devices = %d): the longest silent rows "
                "are evicted from now on in this epoch (footfall_devices_evicted_total)",
                self.settings.max_devices,
            )
        self.table.rehash_in_place()
        self._relist()

    def close_until(self, until_ns: int, *, end_visits: bool) -> Iterator[WindowCounts]:
        """Close every window ending at or before ``until_ns`` (aligned to windows).

        With ``end_visits`` the last window closed also ends every open visit: the epoch
        is over and its table is about to be wiped.
        """
        while True:
            rows = _flush(
                self.table.keys,
                self.table.rows,
                self._acc,
                self._clock,
                self._params,
                self._lists,
                until_ns,
                end_visits,
                self._out,
            )
            yield from self._emit(rows)
            if rows < self._out.shape[0]:
                return

    def close_all(self) -> Iterator[WindowCounts]:
        """End of input: close every open window, ending every visit."""
        if self._clock[_C_MAX] == _NONE:
            return
        w = int(self._params[0])
        last_end = int(self._clock[_C_MAX]) // w * w + w
        yield from self.close_until(last_end, end_visits=True)

    def closed_rows(self, window_start: int) -> tuple[NDArray[np.uint64], NDArray[np.bool_]]:
        """The device ids heard in the closed window starting at ``window_start`` (Unix s) and
        which of them had a locally administered address, read from the table before it is
        wiped: what strict mode re-counts its truncated ids from
        (:meth:`~firmware_agent.stages.privacy.PrivacyPolicy.anonymise`)."""
        widx = window_start * NS // int(self._params[0])
        rows = self.table.rows
        present = (self.table.keys != 0) & (rows[:, _W + (widx & 1)] >> _WIN_SHIFT == widx)
        return self.table.keys[present], rows[present, _FLAGS] & _F_RANDOM != 0

    def new_epoch(self, start_ns: int) -> None:
        """Wipe the table: the next frames are counted under a new key from ``start_ns``.

        The wiped table is let go and a small one takes its place: a busy day's memory goes
        back to the system (numpy returns large arrays with ``munmap``)."""
        self.table.wipe()
        self.table = KeyedRows(self._capacity, _NCOLS, self._reserve)
        self._lists = np.zeros((3, self._capacity // 2 + 1), np.int64)
        self._clock[_C_USED] = self._clock[_C_EVICTED] = 0
        self._clock[_C_OPEN_VISITS] = self._clock[_C_HEARD] = self._clock[_C_HEARD + 1] = 0
        self._clock[_C_OLDEST] = start_ns

    def _relist(self) -> None:
        """Rebuild the slot lists after the table moved its rows (grown or evicted): in place
        when the table kept its size."""
        keys, rows = self.table.keys, self.table.rows
        if self._lists.shape[1] != self.table.capacity // 2 + 1:
            self._lists = np.zeros((3, self.table.capacity // 2 + 1), np.int64)
        oldest = int(self._clock[_C_OLDEST]) // int(self._params[0])
        used = keys != 0
        for p in (0, 1):
            widx = oldest if oldest & 1 == p else oldest + 1
            self._fill(p, _C_HEARD + p, used & (rows[:, _W + p] >> _WIN_SHIFT == widx))
        self._fill(_L_OPEN, _C_OPEN_VISITS, used & (rows[:, _VISIT_START] != _NONE))

    def _fill(self, row: int, length: int, where: NDArray[np.bool_]) -> None:
        slots = np.flatnonzero(where)
        self._lists[row, : len(slots)] = slots
        self._clock[length] = len(slots)

    def _emit(self, rows: int) -> Iterator[WindowCounts]:
        w = self.settings.window_s
        for o in self._out[:rows]:
            yield WindowCounts(
                window_start=int(o[_O_START]) // NS,
                window_s=w,
                probe_requests=int(o[_O_PROBES]),
                malformed=int(o[_O_MALFORMED]),
                late_frames=int(o[_O_LATE]),
                devices=int(o[_O_DEVICES]),
                devices_randomised=int(o[_O_RANDOM]),
                visitors=int(o[_O_VISITORS]),
                passersby=int(o[_O_PASSERS]),
                visits_ended=int(o[_O_ENDED]),
                dwell_minutes={band: int(o[_O_DWELL + b]) for b, band in enumerate(DWELL_BANDS)},
                devices_epoch=int(o[_O_EPOCH]),
                probe_requests_clipped=int(o[_O_CLIPPED]),
            )
