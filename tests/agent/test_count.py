"""The numba window counter equals a plain-Python twin, and its counts mean what they say."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_agent.contract.errors import ConfigError
from firmware_agent.kernels.table import KeyedRows
from firmware_agent.stages.batch import (
    DWELL_BANDS,
    FRAMES_PER_DEVICE,
    KIND_MALFORMED,
    KIND_PROBE,
    NS,
    RSSI_MISSING,
    DeviceBatch,
    WindowCounts,
)
from firmware_agent.stages.config import CountSettings
from firmware_agent.stages.count import WindowCounter

T0 = 1_699_999_200 * NS  # a whole hour


@dataclass
class _Device:
    first: int
    last: int
    randomised: int
    visit_start: int | None = None
    visitor: bool = False
    windows: dict[int, int] = field(default_factory=dict)  # window start -> best rssi
    frames: dict[int, int] = field(default_factory=dict)  # window start -> frames


def reference_windows(
    rows: Iterable[tuple[int, int, int, int, int]], s: CountSettings
) -> list[WindowCounts]:
    """Plain-Python twin of the kernel: rows are (kind, ts_ns, device, randomised, rssi)."""
    w, lateness, gap = s.window_s * NS, s.lateness_s * NS, s.visit_gap_s * NS
    devices: dict[int, _Device] = {}
    acc: dict[int, list[int]] = {}
    out: list[WindowCounts] = []
    oldest: int | None = None
    newest = 0

    def close(start: int, end_all: bool) -> None:
        a = acc.pop(start, [0, 0, 0, 0, 0, 0, 0, 0, 0])
        n = rand = visitors = clipped = 0
        for d in devices.values():
            if start in d.windows:
                n += 1
                rand += d.randomised
                clipped += min(d.frames.pop(start), FRAMES_PER_DEVICE)
                r = d.windows.pop(start)
                if (
                    (r >= s.rssi_threshold_dbm or r == RSSI_MISSING)
                    and d.visit_start is not None
                    and (d.last - d.visit_start >= s.min_dwell_s * NS)
                ):
                    visitors += 1
                    d.visitor = True
            if d.visit_start is not None and (end_all or d.last + gap <= start + w):
                if d.visitor:
                    minutes = (d.last - d.visit_start) // (60 * NS)
                    band = sum(minutes >= edge for edge in (5, 15, 30, 60))
                    a[3] += 1
                    a[4 + band] += 1
                d.visit_start = None
                d.visitor = False
        out.append(
            WindowCounts(
                window_start=start // NS,
                window_s=s.window_s,
                probe_requests=a[0],
                malformed=a[1],
                late_frames=a[2],
                devices=n,
                devices_randomised=rand,
                visitors=visitors,
                passersby=n - visitors,
                visits_ended=a[3],
                dwell_minutes=dict(zip(DWELL_BANDS, a[4:], strict=True)),
                devices_epoch=len(devices),
                probe_requests_clipped=clipped,
            )
        )

    for kind, t, dev, randomised, rssi in rows:
        if oldest is None:
            oldest, newest = t // w * w, t
        newest = max(newest, t)
        while newest - lateness >= oldest + w:
            close(oldest, False)
            oldest += w
        start = t // w * w
        a = acc.setdefault(max(start, oldest), [0, 0, 0, 0, 0, 0, 0, 0, 0])
        if start < oldest:
            a[2] += 1
            start = oldest
        if kind & KIND_PROBE:
            a[0] += 1
        if kind != KIND_PROBE:
            a[1] += 1
            continue
        d = devices.setdefault(dev or 1, _Device(t, t, randomised))
        if d.visit_start is not None and t - d.last > gap:
            d.visit_start, d.visitor = None, False
        if d.visit_start is None or t < d.visit_start:
            d.visit_start = t
        d.first, d.last, d.randomised = min(d.first, t), max(d.last, t), randomised
        d.windows[start] = max(d.windows.get(start, -32768), rssi) if start in d.windows else rssi
        d.frames[start] = d.frames.get(start, 0) + 1
    if oldest is not None:
        last_end = newest // w * w + w
        while oldest + w <= last_end:
            close(oldest, oldest + 2 * w > last_end)
            oldest += w
    return out


def _batch(rows: list[tuple[int, int, int, int, int]]) -> DeviceBatch:
    kind, ts, dev, rnd, rssi = (list(c) for c in zip(*rows, strict=True)) if rows else ([],) * 5
    n = len(rows)
    return DeviceBatch(
        kind=np.array(kind, np.uint8),
        ts_ns=np.array(ts, np.int64),
        device=np.array(dev, np.uint64),
        randomised=np.array(rnd, np.uint8),
        seq=np.zeros(n, np.uint16),
        rssi=np.array(rssi, np.int16),
        fp=np.zeros(n, np.uint64),
        frames=n,
    )


def run_counter(
    rows: list[tuple[int, int, int, int, int]], s: CountSettings, chunk: int, capacity: int = 4096
) -> list[WindowCounts]:
    counter = WindowCounter(s, capacity=capacity)
    out: list[WindowCounts] = []
    for i in range(0, len(rows), chunk):
        out += counter.add(_batch(rows[i : i + chunk]))
    out += counter.close_all()
    return out


def frame_rows(seed: int, n: int) -> list[tuple[int, int, int, int, int]]:
    """A stream with bursts, silences, clock steps back, malformed rows and a dozen devices."""
    rng = np.random.default_rng(seed)
    steps = rng.choice([0, 1, 5, 30, 90, 400, 2000, -3, -20], size=n) * NS
    ts = np.maximum(T0, T0 + rng.integers(0, 600) * NS + np.cumsum(steps + rng.integers(0, NS, n)))
    kinds = rng.choice([KIND_PROBE] * 8 + [KIND_PROBE | KIND_MALFORMED, KIND_MALFORMED], size=n)
    devs = rng.integers(0, 13, n)
    rssi = rng.choice([-90, -80, -75, -74, -60, -40, RSSI_MISSING], size=n)
    return [
        (int(k), int(t), int(d), int(d % 3 == 0), int(r))
        for k, t, d, r in zip(kinds, ts, devs, rssi, strict=True)
    ]


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32), n=st.integers(1, 300), chunk=st.sampled_from([1, 7, 1000]))
def test_kernel_equals_python_twin_on_random_streams(seed: int, n: int, chunk: int) -> None:
    rows = frame_rows(seed, n)
    s = CountSettings(window_s=60, lateness_s=10, min_dwell_s=60, visit_gap_s=300)
    assert run_counter(rows, s, chunk, capacity=4) == reference_windows(rows, s)


def test_gaps_longer_than_the_output_buffer_emit_every_empty_window() -> None:
    s = CountSettings(window_s=60)
    rows = [(KIND_PROBE, T0, 5, 0, -50), (KIND_PROBE, T0 + 20 * 3600 * NS, 5, 0, -50)]
    windows = run_counter(rows, s, chunk=2)
    assert windows == reference_windows(rows, s)
    assert len(windows) == 20 * 60 + 1
    assert sum(w.probe_requests for w in windows) == 2


def test_a_long_strong_stay_is_a_visitor_and_a_brief_weak_one_a_passerby() -> None:
    s = CountSettings(window_s=300, min_dwell_s=120, rssi_threshold_dbm=-75)
    stay = [(KIND_PROBE, T0 + k * 30 * NS, 1, 0, -60) for k in range(40)]  # 20 min, strong
    brief = [(KIND_PROBE, T0 + 10 * NS, 2, 1, -85)]  # one weak probe
    windows = run_counter(sorted(stay + brief, key=lambda r: r[1]), s, chunk=1000)
    first, second = windows[0], windows[1]
    assert (first.devices, first.devices_randomised) == (2, 1)
    assert (first.visitors, first.passersby) == (1, 1)  # dwell reached 120 s within window 1
    assert (second.devices, second.visitors) == (1, 1)
    assert sum(w.visits_ended for w in windows) == 1
    assert windows[-1].dwell_minutes["15-30"] == 1  # 19.5 minutes
    assert all(w.devices_epoch == 2 for w in windows)


def test_a_visit_ends_after_the_gap_and_reports_its_dwell() -> None:
    s = CountSettings(window_s=60, min_dwell_s=60, visit_gap_s=300)
    rows = [(KIND_PROBE, T0 + k * 20 * NS, 7, 0, -50) for k in range(19)]  # 6 minutes
    rows.append((KIND_PROBE, T0 + 3600 * NS, 8, 0, -50))  # another device keeps time moving
    windows = run_counter(rows, s, chunk=1000)
    ended = [w for w in windows if w.visits_ended]
    assert len(ended) == 1
    assert ended[0].window_start == T0 // NS + 600  # last seen at 360 s, silent for 300 s
    assert ended[0].dwell_minutes == {"lt5": 0, "5-15": 1, "15-30": 0, "30-60": 0, "ge60": 0}


def test_late_frames_count_in_the_oldest_open_window() -> None:
    s = CountSettings(window_s=60, lateness_s=5)
    rows = [
        (KIND_PROBE, T0 + 50 * NS, 1, 0, -50),
        (KIND_PROBE, T0 + 70 * NS, 2, 0, -50),  # watermark 65: window 0 closes
        (KIND_PROBE, T0 + 55 * NS, 3, 0, -50),  # too late for window 0
    ]
    windows = run_counter(rows, s, chunk=1000)
    assert [(w.probe_requests, w.late_frames, w.devices) for w in windows] == [(1, 0, 1), (2, 1, 2)]


def test_frames_within_lateness_count_in_their_own_window() -> None:
    s = CountSettings(window_s=60, lateness_s=10)
    rows = [
        (KIND_PROBE, T0 + 58 * NS, 1, 0, -50),
        (KIND_PROBE, T0 + 62 * NS, 2, 0, -50),
        (KIND_PROBE, T0 + 59 * NS, 3, 0, -50),  # back 3 s: still window 0
    ]
    windows = run_counter(rows, s, chunk=1000)
    assert [(w.probe_requests, w.late_frames) for w in windows] == [(2, 0), (1, 0)]


def test_malformed_rows_are_counted_and_skipped() -> None:
    s = CountSettings(window_s=60)
    rows = [(KIND_PROBE | KIND_MALFORMED, T0, 1, 0, -50), (KIND_MALFORMED, T0 + NS, 0, 0, -50)]
    (window,) = run_counter(rows, s, chunk=1000)
    assert (window.probe_requests, window.malformed, window.devices) == (1, 2, 0)


def test_table_growth_keeps_every_device() -> None:
    s = CountSettings(window_s=300)
    rows = [(KIND_PROBE, T0 + k * NS // 100, k + 1, k & 1, -60) for k in range(20_000)]
    (window,) = run_counter(rows, s, chunk=4096, capacity=4)
    assert window.devices == window.devices_epoch == 20_000
    assert window.probe_requests_clipped == window.probe_requests == 20_000
    assert window.devices_randomised == 10_000


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"window_s": 7}, "window_s must be a divisor of 3600 between 60 and 3600, got 7"),
        ({"window_s": 7200}, "got 7200"),
        ({"lateness_s": 300}, "lateness_s must be at least 0 and less than window_s"),
        ({"rssi_threshold_dbm": 10}, "rssi_threshold_dbm must be between -120 and 0 dBm"),
        ({"visit_gap_s": 5}, "visit_gap_s must be at least 60 seconds"),
    ],
)
def test_bad_count_settings_are_refused_with_the_rule(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        CountSettings(**kwargs)


def test_the_ceiling_evicts_the_longest_silent_devices_and_nothing_published_changes() -> None:
    """20,000 addresses over a day, 1,024 rows at most: every window is the twin's (but for
    devices_epoch, which counts an evicted address again), the table stays at its ceiling,
    the evictions are counted, and a new epoch gives the memory back."""
    s = CountSettings(window_s=300, min_dwell_s=60, visit_gap_s=600, max_devices=1024)
    rng = np.random.default_rng(18)
    ts = np.sort(rng.integers(0, 86_400, 60_000)) * NS + T0
    devs = (np.arange(60_000) // 3 + rng.integers(0, 2, 60_000)) % 20_000 + 1
    rssi = rng.choice([-80, -60, RSSI_MISSING], size=60_000)
    rows = [
        (KIND_PROBE, int(t), int(d), int(d & 1), int(r))
        for t, d, r in zip(ts, devs, rssi, strict=True)
    ]
    counter = WindowCounter(s, capacity=64)
    windows: list[WindowCounts] = []
    for i in range(0, len(rows), 5000):
        windows += counter.add(_batch(rows[i : i + 5000]))
        assert counter.table.capacity <= 2048
    windows += counter.close_all()
    twin = reference_windows(rows, s)
    assert [replace(w, devices_epoch=0) for w in windows] == [
        replace(w, devices_epoch=0) for w in twin
    ]
    evicted = counter.evicted
    assert evicted == counter.evicted_total > 15_000
    counter.new_epoch(T0 + 86_400 * NS)
    assert (counter.table.capacity, counter.evicted, counter.evicted_total) == (64, 0, evicted)


def test_rehash_in_place_leaves_every_row_where_a_lookup_finds_it() -> None:
    """Eviction's in-place rehash: random tables with clusters that wrap around the end, a
    random third of the keys zeroed, then rehashed in place: every kept key is found by
    linear probing from its home (no empty slot before it) with its own row, every empty
    slot's row is zeros, and nothing else is in the table."""
    rng = np.random.default_rng(18)
    for _ in range(300):
        table = KeyedRows(64, 3)
        keys = rng.integers(1, 2**63, 40, dtype=np.uint64)
        keys[: rng.integers(0, 40)] |= np.uint64(56)  # homes 56-63: clusters wrap to slot 0
        rows = {}
        for key in np.unique(keys):
            i = int(key) & 63
            while table.keys[i]:
                i = (i + 1) & 63
            table.keys[i] = key
            table.rows[i] = rows[int(key)] = rng.integers(-9, 9, 3)
        for i in np.flatnonzero(rng.random(64) < 1 / 3):
            rows.pop(int(table.keys[i]), None)
            table.keys[i] = 0
            table.rows[i] = 0
        table.rehash_in_place()
        for key, row in rows.items():
            i = key & 63
            while table.keys[i] != key:
                assert table.keys[i] != 0
                i = (i + 1) & 63
            assert list(table.rows[i]) == list(row)
        assert sorted(int(k) for k in table.keys if k) == sorted(rows)
        assert not table.rows[table.keys == 0].any()


def test_a_reserve_the_system_refuses_leaves_a_table_that_grows_by_copying() -> None:
    """A reserve beyond any address space (2^43 slots) is refused: the table is the capacity
    asked for, and grows into a new table with every row."""
    table = KeyedRows(4, 2, reserve=1 << 43)
    table.keys[1], table.rows[1] = 5, (7, 8)
    bigger = table.grown()
    assert (table.capacity, bigger.capacity) == (4, 8)
    assert (int(bigger.keys[5]), list(bigger.rows[5])) == (5, [7, 8])
    assert not table.keys.any()


def test_the_counter_keeps_no_fingerprint_or_sequence_number() -> None:
    """Least necessary state (issue 17): the device table once held each device's keyed model
    fingerprint and last sequence number all day and never read them. Counted with
    distinctive ones, the windows are those counted without, and no array of the counter
    holds any of them (an epoch still open: nothing wiped yet)."""
    rows = frame_rows(17, 3000)
    rng = np.random.default_rng(17)
    marked = replace(
        _batch(rows),
        fp=rng.integers(1 << 62, 1 << 63, len(rows), dtype=np.uint64),
        seq=rng.integers(50_000, 60_000, len(rows), dtype=np.uint16),
    )
    counter = WindowCounter(CountSettings())
    windows = list(counter.add(marked))
    assert windows == list(WindowCounter(CountSettings()).add(_batch(rows)))
    arrays = [a for a in vars(counter).values() if isinstance(a, np.ndarray)]
    arrays += [counter.table.keys, counter.table.rows]
    held = np.concatenate([a.ravel().view(np.uint64) for a in arrays])
    assert len(held) > 4096 and counter.oldest_open_ns is not None
    assert not np.isin(held, marked.fp).any()
    assert not np.isin(held, marked.seq.astype(np.uint64)).any()
