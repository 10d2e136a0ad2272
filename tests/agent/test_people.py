"""The people stage: its kernel equals its plain-Python twin, its figures are additive over
time whatever ``window_s`` is, a window without data is a gap, and no figure tells whether a
phone was heard before (the returning-or-new injection check on the bundled capture)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

import numpy as np
import pytest

from firmware_agent.cli import BUNDLED_SAMPLE
from firmware_agent.contract.errors import ConfigError
from firmware_agent.service.config import AgentConfig
from firmware_agent.settings import load_config
from firmware_agent.stages.batch import (
    KIND_PROBE,
    NS,
    RSSI_MISSING,
    ProbeBatch,
    WindowCounts,
    WindowPeople,
)
from firmware_agent.stages.capture import CaptureReader
from firmware_agent.stages.people import PeopleCounter, PeopleSettings
from firmware_agent.stages.pipeline import Pipeline, parse_frames
from tests.support.reference_people import reference_people
from tests.support.shared import shared_path

FIXED = {"FOOTFALL_ESTIMATE_RSSI_THRESHOLD_DBM": "-75", "FOOTFALL_EPOCH_TIMEZONE": "UTC"}


def _rows(seed: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows in time order: 40 chains, each heard in a few bursts of visits, some signal
    missing, some chains heard again after long silences; the threshold in force moves
    every 5 minutes (as a learnt one does)."""
    rng = np.random.default_rng(seed)
    start = 1_709_625_600 * NS
    ts = start + np.sort(rng.integers(0, 3 * 3600 * NS, n))
    chain = rng.integers(0, 40, n)
    chain[rng.random(n) < 0.3] = rng.integers(0, 4)  # a few busy chains, heard all along
    rssi = rng.integers(-95, -40, n).astype(np.int16)
    rssi[rng.random(n) < 0.1] = RSSI_MISSING
    steps = rng.integers(-80, -65, 3 * 12 + 1).astype(np.int16)
    return ts, chain.astype(np.int64), rssi, steps[(ts - start) // (300 * NS)]


@pytest.mark.parametrize(("seed", "window_s", "batch"), [(1, 300, 97), (2, 60, 1000), (3, 900, 31)])
def test_the_kernel_equals_its_plain_python_twin(seed: int, window_s: int, batch: int) -> None:
    settings = PeopleSettings(
        window_s=window_s, lateness_s=0, min_dwell_s=60, visit_gap_s=600, static_min_s=3600
    )
    ts, chain, rssi, thresholds = _rows(seed, 3000)
    kind = np.full(len(ts), KIND_PROBE, np.uint8)
    counter = PeopleCounter(settings, capacity=8)  # grows as the chains come
    got: list[WindowPeople] = []
    for lo in range(0, len(ts), batch):
        part = slice(lo, lo + batch)
        got += counter.add(kind[part], ts[part], chain[part], rssi[part], thresholds[part])
    until = int(ts[-1]) // (window_s * NS) * (window_s * NS) + window_s * NS
    got += counter.close_until(until, end_visits=True)
    rows = zip(ts.tolist(), chain.tolist(), rssi.tolist(), thresholds.tolist(), strict=True)
    want = reference_people(rows, settings, until)
    assert got == want
    arrivals = sum(w.arrivals for w in got)
    assert 0 < arrivals - sum(w.visits_ended for w in got) < arrivals  # some became static
    assert arrivals > 20 and sum(w.passersby for w in got) > 0
    assert max(w.occupancy_peak for w in got) > 2


def _people_of(frames: list[tuple[int, int, int]]) -> list[WindowPeople]:
    """The people stage's windows (5 minutes, 60 s minimum dwell) for ``frames`` (s after the
    hour's start, chain, dBm) at a -75 dBm threshold, the input ending an hour after its
    start; checked against the plain-Python twin."""
    settings = PeopleSettings(window_s=300, lateness_s=0, min_dwell_s=60, visit_gap_s=600)
    start = 1_709_625_600 * NS
    end = start + 3600 * NS
    frames = sorted(frames)
    ts = np.array([start + s * NS for s, _, _ in frames], np.int64)
    chain = np.array([c for _, c, _ in frames], np.int64)
    rssi = np.array([r for _, _, r in frames], np.int16)
    thresholds = np.full(len(ts), -75, np.int16)
    counter = PeopleCounter(settings)
    got = counter.add(np.full(len(ts), KIND_PROBE, np.uint8), ts, chain, rssi, thresholds)
    got += counter.close_until(end, end_visits=True)
    rows = zip(ts.tolist(), chain.tolist(), rssi.tolist(), thresholds.tolist(), strict=True)
    assert got == reference_people(rows, settings, end)
    return got


def test_a_visit_the_input_cuts_short_arrives_at_its_end() -> None:
    """Strong for 30 s when the input ends: cut short, not walking past, so it arrives in the
    last window (the twin agrees); weak then, or strong but gone long before: passers-by."""
    frames = [  # (s since start, chain, dBm)
        *((s, 0, -60) for s in (600, 615)),  # strong, heard 15 s, an hour before the end
        *((s, 1, -60) for s in (3570, 3585, 3599)),  # strong, the last 30 s
        *((s, 2, -90) for s in (3575, 3590)),  # weak, the last 25 s
    ]
    got = _people_of(frames)
    last = got[-1]
    assert (last.arrivals, last.visits_ended, last.passersby) == (1, 1, 1)
    assert last.dwell_minutes["lt5"] == 1 and last.occupancy_peak == 0
    assert sum(w.arrivals for w in got) == 1 and sum(w.passersby for w in got) == 2


def test_a_visit_arrives_only_once_heard_in_the_venue_for_the_minimum_dwell() -> None:
    """One strong frame, then weak ones for 5 minutes (an outsider whose phone peaked once):
    a passer-by. Strong for under the minimum dwell, then weak: a passer-by. Weak, then strong
    for the minimum dwell: it arrives at the strong frame 60 s after its first strong one."""
    frames = [  # (s since start, chain, dBm)
        (0, 0, -60), *((s, 0, -90) for s in range(20, 320, 20)),
        *((s, 1, -60) for s in (0, 20, 40)), *((s, 1, -90) for s in range(60, 320, 20)),
        *((s, 2, -90) for s in range(0, 300, 20)), *((s, 2, -60) for s in range(300, 400, 20)),
    ]  # fmt: skip
    got = _people_of(frames)
    assert [w.arrivals for w in got[:2]] == [0, 1]  # chain 2, at 360 s
    assert sum(w.arrivals for w in got) == 1 and sum(w.passersby for w in got) == 2


def test_a_hold_longer_than_the_visit_gap_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"must be from 1 s to count\.visit_gap_s"):
        PeopleSettings(visit_gap_s=60, hold_s=120)


def _replay(config: AgentConfig) -> list[WindowCounts]:
    with CaptureReader(BUNDLED_SAMPLE) as reader:
        return list(Pipeline(config).run(reader))


def _hourly(windows: list[WindowCounts]) -> dict[int, tuple[dict[str, int], float, int]]:
    sums: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    means: dict[int, list[float]] = defaultdict(list)
    peaks: dict[int, int] = defaultdict(int)
    for w in windows:
        f = w.figures
        assert f is not None
        hour = w.window_start // 3600 * 3600
        for name in ("arrivals", "passersby", "visits_ended"):
            sums[hour][name] += getattr(f, name)
        for band, n in f.dwell_minutes.items():
            sums[hour][band] += n
        means[hour].append(f.occupancy_mean)
        peaks[hour] = max(peaks[hour], f.occupancy_peak)
    return {h: (dict(sums[h]), sum(means[h]) / len(means[h]), peaks[h]) for h in sums}


@pytest.mark.parametrize("threshold", ["-75", "auto"])
def test_an_hour_is_the_sum_of_its_windows_whatever_window_s(threshold: str) -> None:
    """Replayed at 300 s and 3600 s windows, every hour of the bundled capture has the same
    arrivals, passers-by, visits and dwell bands, the same peak, and a mean that agrees to
    the rounding of the twelve 5-minute means (each to 2 decimals): with a site's threshold
    and with the learnt one (the default), learnt at the same instants for both."""
    environ = FIXED | {"FOOTFALL_ESTIMATE_RSSI_THRESHOLD_DBM": threshold}
    five = _hourly(_replay(load_config(None, environ=environ)))
    hour = _hourly(
        _replay(load_config(None, environ=environ | {"FOOTFALL_COUNT_WINDOW_S": "3600"}))
    )
    assert five.keys() == hour.keys() and len(five) == 3
    for h in five:
        (sums5, mean5, peak5), (sums60, mean60, peak60) = five[h], hour[h]
        assert sums5 == sums60 and peak5 == peak60, h
        assert abs(mean5 - mean60) <= 0.01, (h, mean5, mean60)
    assert all(s["arrivals"] >= 10 for s, _, _ in five.values())


def _batches() -> list[ProbeBatch]:
    with CaptureReader(BUNDLED_SAMPLE) as reader:
        return [parse_frames(batch) for batch in reader]


def _with_rows(batches: list[ProbeBatch], extra: ProbeBatch) -> ProbeBatch:
    """One batch of every row, ``extra`` among them, in time order."""
    names = ("kind", "ts_ns", "mac", "seq", "rssi", "freq_mhz", "ssid", "fp")
    parts = [*batches, extra]
    merged = {n: np.concatenate([getattr(b, n) for b in parts]) for n in names}
    order = np.argsort(merged["ts_ns"], kind="stable")
    frames = sum(b.frames for b in parts)
    return ProbeBatch(**{n: merged[n][order] for n in names}, frames=frames)


def test_no_figure_tells_whether_a_phone_was_here_before() -> None:
    """The injection check: a phone with a global address seen early in the capture comes
    back an hour after it left for five minutes, strong; the same frames from an address never
    heard before must give the same published counts in every window."""
    batches = _batches()
    probes = _with_rows(batches, _none())  # every row, in time order
    global_rows = (probes.kind == KIND_PROBE) & ((probes.mac[:, 0] & 0x02) == 0)
    macs, first = np.unique(probes.mac[global_rows], axis=0, return_index=True)
    ts_global = probes.ts_ns[global_rows]
    last = np.array([ts_global[np.all(probes.mac[global_rows] == m, axis=1)].max() for m in macs])
    early = int(np.argmin(last))  # left earliest
    row = int(np.flatnonzero(global_rows)[first[early]])
    back = int(last[early]) + 3600 * NS
    assert back < int(probes.ts_ns.max()) - 900 * NS
    k = 12
    extra = ProbeBatch(
        kind=np.full(k, KIND_PROBE, np.uint8),
        ts_ns=back + np.arange(k, dtype=np.int64) * 25 * NS,
        mac=np.repeat(probes.mac[row : row + 1], k, axis=0),
        seq=(np.arange(k) * 7 % 4096).astype(np.uint16),
        rssi=np.full(k, -50, np.int16),
        freq_mhz=np.full(k, 2437, np.uint16),
        ssid=np.repeat(probes.ssid[row : row + 1], k),
        fp=np.repeat(probes.fp[row : row + 1], k),
        frames=k,
    )
    stranger = replace(extra, mac=extra.mac.copy())
    stranger.mac[:, 3:] = [0x5A, 0x17, 0xC3]  # the same vendor, an address never heard
    assert not np.any(np.all(probes.mac == stranger.mac[0], axis=1))
    config = load_config(None, environ=FIXED)
    released = []
    for injected in (extra, stranger):
        pipeline = Pipeline(config)
        windows = [*pipeline.count(_with_rows(_batches(), injected)), *pipeline.finish()]
        released.append([config.privacy.release(w) for w in windows])
    assert released[0] == released[1]
    plain = Pipeline(config)
    without = [*plain.count(_with_rows(_batches(), _none())), *plain.finish()]
    assert [config.privacy.release(w) for w in without] != released[0]  # the phone counts


def _none() -> ProbeBatch:
    return ProbeBatch(
        kind=np.zeros(0, np.uint8),
        ts_ns=np.zeros(0, np.int64),
        mac=np.zeros((0, 6), np.uint8),
        seq=np.zeros(0, np.uint16),
        rssi=np.zeros(0, np.int16),
        freq_mhz=np.zeros(0, np.uint16),
        ssid=np.zeros(0, np.uint8),
        fp=np.zeros(0, np.uint64),
        frames=0,
    )


def test_a_silent_window_is_published_as_no_data() -> None:
    """The radio stops for 30 minutes in the middle of the capture (which normally hears
    hundreds of frames a window): those windows say no_data with every figure null (a gap),
    and the frame counts say 0."""
    config = load_config(None, environ=FIXED)
    probes = _with_rows(_batches(), _none())
    cut_from = (int(probes.ts_ns.min()) // (300 * NS) + 12) * 300 * NS
    keep = (probes.ts_ns < cut_from) | (probes.ts_ns >= cut_from + 1800 * NS)
    names = ("kind", "ts_ns", "mac", "seq", "rssi", "freq_mhz", "ssid", "fp")
    silent = replace(probes, **{n: getattr(probes, n)[keep] for n in names})
    pipeline = Pipeline(config)
    released = [config.privacy.release(w) for w in [*pipeline.count(silent), *pipeline.finish()]]
    gaps = [r for r in released if r["no_data"]]
    assert len(gaps) == 6 and len(released) == 36
    for r in gaps:
        assert r["probe_requests"] == 0 and r["arrivals"] is None and r["devices"] is None
        assert r["occupancy_mean"] is None and set(r["dwell_minutes"].values()) == {None}
    assert not any(r["no_data"] for r in released if r not in gaps)


@pytest.mark.shared
def test_a_silent_window_at_a_quiet_sensor_is_zero_people_not_a_gap() -> None:
    """The lab's empty Sunday (2024-03-31, a median of about 9 frames a window) has 3
    windows without a frame: a quiet room, published as zeros, not as no data."""
    capture = shared_path("data", "pcaps", "fryza_p1_sc6-61_2024-03-31_anonymized.pcap")
    config = load_config(None, environ={"FOOTFALL_EPOCH_TIMEZONE": "Europe/Prague"})
    with CaptureReader(capture) as reader:
        windows = list(Pipeline(config).run(reader))
    silent = [w for w in windows if w.frames == 0]
    assert len(silent) == 3 and len(windows) == 275
    assert not any(w.no_data for w in windows)
    for w in silent:
        released = config.privacy.release(w)
        assert released["no_data"] is False and released["devices"] == 0
        assert released["arrivals"] == 0 and released["occupancy_peak"] is not None


@pytest.mark.parametrize(("closed", "follows"), [(True, True), (True, False), (False, True)])
def test_a_device_heard_across_midnight_while_closed_is_static(closed: bool, follows: bool) -> None:
    """A till heard every 30 s from the epoch's start (chains were wiped at midnight) and a
    phone that comes at 00:20: with the site closed at a boundary the till is in nothing and
    the phone arrives; at the input's first epoch, or a site open at midnight, both arrive."""
    settings = PeopleSettings(
        window_s=300, lateness_s=0, min_dwell_s=60, visit_gap_s=600, closed_at_epoch=closed
    )
    start = 1_709_625_600 * NS
    end = start + 3600 * NS
    frames = [*((s, 0) for s in range(5, 3600, 30)), *((s, 1) for s in range(1200, 1500, 20))]
    frames.sort()
    ts = np.array([start + s * NS for s, _ in frames], np.int64)
    chain = np.array([c for _, c in frames], np.int64)
    rssi = np.full(len(ts), -50, np.int16)
    counter = PeopleCounter(settings)
    counter.new_epoch(start, follows=follows)
    kind = np.full(len(ts), KIND_PROBE, np.uint8)
    got = counter.add(kind, ts, chain, rssi, np.full(len(ts), -75, np.int16))
    got += counter.close_until(end, end_visits=True)
    static = closed and follows
    assert sum(w.arrivals for w in got) == (1 if static else 2)
    assert max(w.occupancy_peak for w in got[:4]) == (0 if static else 1)
