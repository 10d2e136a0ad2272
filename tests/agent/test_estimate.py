"""The estimator links one device's random addresses, leaves out what is not footfall, and its
numba kernel equals the plain-Python twin in tests/support/reference_estimate.py."""

from __future__ import annotations

import itertools
import logging
from dataclasses import replace
from datetime import UTC
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firmware_agent.cli import BUNDLED_SAMPLE
from firmware_agent.contract.errors import ConfigError
from firmware_agent.contract.messages import AgentId, SiteId, counts_payload, validate
from firmware_agent.service.config import AgentConfig
from firmware_agent.settings import load_config
from firmware_agent.stages.anonymize import EpochKey, anonymize
from firmware_agent.stages.batch import (
    KIND_MALFORMED,
    KIND_PROBE,
    RSSI_MISSING,
    DeviceBatch,
    WindowCounts,
    WindowPeople,
)
from firmware_agent.stages.capture import CaptureReader
from firmware_agent.stages.config import AUTO, Calibration, EstimateSettings
from firmware_agent.stages.estimate import AUTO_FALLBACK_DBM, Estimator, WindowEstimate, otsu_split
from firmware_agent.stages.parse import parse_batch
from firmware_agent.stages.people import PeopleCounter, PeopleSettings
from firmware_agent.stages.pipeline import Pipeline
from firmware_agent.tools.synthetic import SyntheticSpec, write_synthetic_capture
from tests.support.reference_estimate import Row, otsu_reference, reference_estimates
from tests.support.shared import shared_path

NS = 1_000_000_000
T0 = 1_699_999_200 * NS  # a whole hour
FIXED = EstimateSettings(rssi_threshold_dbm=-120)  # no threshold: what links and dwells counts


def batch(rows: list[Row]) -> DeviceBatch:
    n = len(rows)
    col = list(zip(*rows, strict=True)) if rows else [()] * 7
    return DeviceBatch(
        kind=np.array(col[0], np.uint8),
        ts_ns=np.array(col[1], np.int64),
        device=np.array(col[2], np.uint64),
        randomised=np.array(col[3], np.uint8),
        seq=np.array(col[6], np.uint16),
        rssi=np.array(col[4], np.int16),
        fp=np.array(col[5], np.uint64),
        frames=n,
    )


def estimate(
    rows: list[Row], s: EstimateSettings, cuts: tuple[int, ...] = ()
) -> list[WindowEstimate]:
    """The kernel's windows for rows fed in batches split at ``cuts``."""
    est = Estimator(s, capacity=16, zone=UTC)  # tiny: the tables must grow
    out: list[WindowEstimate] = []
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(rows)), len(rows)]
    for lo, hi in itertools.pairwise(bounds):
        out += est.add(batch(rows[lo:hi]))
    return out + est.close_all()


class Ids:
    """Fresh device ids (stand-ins for keyed hashes)."""

    def __init__(self) -> None:
        self.next = 1000

    def __call__(self) -> int:
        self.next += 7919
        return self.next


def phone(
    ids: Ids,
    rng: np.random.Generator,
    *,
    fp: int,
    start_s: float,
    end_s: float,
    every_s: float,
    rssi: int,
    new_address: str = "burst",  # "burst", "frame" or "never"
    keeps_counter: bool = True,
    burst: int = 3,
    randomised: int = 1,
) -> list[Row]:
    """Probe bursts of one device: ``burst`` frames 20 ms apart every ``every_s`` seconds."""
    rows: list[Row] = []
    counter = int(rng.integers(0, 4096))
    dev = ids()
    t = start_s
    while t < end_s:
        if new_address == "burst":
            dev = ids()
            if not keeps_counter:
                counter = int(rng.integers(0, 4096))
        counter += int(rng.integers(5, 20))  # frames sent on channels not heard
        for k in range(burst):
            if new_address == "frame":
                dev = ids()
                if not keeps_counter:
                    counter = int(rng.integers(0, 4096))
            counter += 1
            ts = T0 + int((t + 0.02 * k) * NS)
            rows.append((KIND_PROBE, ts, dev, randomised, rssi + int(rng.integers(-3, 4)), fp,
                         counter % 4096))  # fmt: skip
        t += every_s * float(rng.uniform(0.8, 1.2))
    return rows


def merged(*devices: list[Row]) -> list[Row]:
    return sorted((r for rows in devices for r in rows), key=lambda r: r[1])


def full_windows(windows: list[WindowEstimate], start_s: float, end_s: float) -> list[int]:
    """people_est of the windows that lie wholly after ``start_s + 300`` and before ``end_s``."""
    lo, hi = T0 // NS + start_s + 300, T0 // NS + end_s
    return [w.people_est for w in windows if lo <= w.window_start and w.window_start + 300 <= hi]


# -- the twin -------------------------------------------------------------------------------

rows_strategy = st.lists(
    st.tuples(
        st.sampled_from([KIND_PROBE] * 9 + [KIND_MALFORMED]),
        st.integers(0, 3 * 3600),  # seconds after T0
        st.integers(0, 999),  # ms
        st.integers(1, 40),  # device
        st.integers(0, 1),  # randomised
        st.sampled_from([-90, -75, -60, -45, RSSI_MISSING]),
        st.integers(0, 3),  # fingerprint (0: none)
        st.integers(0, 4095),
    ),
    max_size=200,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows_strategy,
    st.lists(st.integers(0, 200), max_size=3),
    st.sampled_from([AUTO, -120, -70]),
    st.sampled_from([0, 300, 900]),
    st.booleans(),
    st.booleans(),
    st.sampled_from([1, 10]),
    st.sampled_from([0, 23, 24]),
)
def test_kernel_equals_twin_on_random_rows(
    raw: list[tuple[int, int, int, int, int, int, int, int]],
    cuts: list[int],
    threshold: int,
    static_min_s: int,
    link: bool,
    assume_randomised: bool,
    reset_min: int,
    closed_h: int,
) -> None:
    raw.sort(key=lambda r: (r[1], r[2]))  # mostly in time order, as captures are
    rows: list[Row] = []
    for kind, s, ms, dev, rnd, rssi, fp, seq in raw:
        jitter = -2 * NS if (s + ms) % 13 == 0 else 0  # now and then a late frame
        rows.append((kind, T0 + s * NS + ms * 1_000_000 + jitter, dev, rnd, rssi, fp, seq))
    s = EstimateSettings(
        rssi_threshold_dbm=threshold,
        static_min_s=static_min_s,
        static_share_pct=50,
        min_dwell_s=30,
        link=link,
        assume_randomised=assume_randomised,
        reset_min=reset_min,
        cadence_gap_s=120,
        static_closed_h=closed_h,
    )
    assert estimate(rows, s, tuple(cuts)) == reference_estimates(rows, s)


@pytest.mark.parametrize("window_s", [300, 3600])
def test_kernel_equals_twin_on_a_synthetic_capture(tmp_path: Path, window_s: int) -> None:
    """Windows and the learnt threshold at every probe row (learnt every AUTO_STEP_S of the
    frames' clock, whatever window_s is) are the twin's."""
    capture = tmp_path / "s.pcap"
    write_synthetic_capture(capture, SyntheticSpec(frames=6000, devices=120, seed=5,
                                                   static_devices=4))  # fmt: skip
    key = EpochKey()
    rows: list[Row] = []
    settings = EstimateSettings(window_s=window_s)
    est = Estimator(settings, zone=UTC)
    kernel: list[WindowEstimate] = []
    thresholds: list[int] = []
    with CaptureReader(capture, batch_frames=1000) as reader:
        for frames in reader:
            b = anonymize(parse_batch(frames), key)
            kernel += est.add(b)
            thresholds += est.row_thresholds[b.kind == KIND_PROBE].tolist()
            rows += zip(*(a.tolist() for a in (b.kind, b.ts_ns, b.device, b.randomised, b.rssi,
                                                b.fp, b.seq)), strict=True)  # fmt: skip
    kernel += est.close_all()
    want: list[int] = []
    assert kernel == reference_estimates(rows, settings, thresholds=want)
    assert thresholds == want and len(set(want)) > 1  # learnt, and it moved
    assert any(w.people_est for w in kernel)


def test_otsu_split_equals_brute_force() -> None:
    rng = np.random.default_rng(3)
    for _ in range(50):
        values = np.concatenate(
            [rng.normal(-85, 4, rng.integers(1, 40)), rng.normal(-55, 6, rng.integers(1, 40))]
        )
        values = np.clip(np.round(values), -120, 0).astype(int).tolist()
        hist = np.bincount(np.array(values) + 120, minlength=121).astype(np.int64)
        expected = otsu_reference(values)
        assert otsu_split(hist, -120) == (-120 if expected is None else expected)


# -- what the estimate means ----------------------------------------------------------------


def test_two_phones_of_one_model_side_by_side_stay_two() -> None:
    """Same fingerprint, same signal, a new address every burst: only their sequence
    counters tell them apart, and that is enough."""
    rng, ids = np.random.default_rng(1), Ids()
    a = phone(ids, rng, fp=77, start_s=0, end_s=3600, every_s=30, rssi=-55)
    b = phone(ids, rng, fp=77, start_s=10, end_s=3600, every_s=30, rssi=-55)
    windows = estimate(merged(a, b), FIXED)
    assert len({r[2] for r in a + b}) > 200  # distinct addresses
    assert set(full_windows(windows, 0, 3600)) == {2}


def test_a_phone_with_a_new_address_and_counter_every_frame_counts_once() -> None:
    """Like the iPhone that shows up as 465 addresses: nothing but its model, its timing and
    its signal ties them; its model learns that it resets, then they link."""
    rng, ids = np.random.default_rng(2), Ids()
    rows = phone(ids, rng, fp=5, start_s=0, end_s=3600, every_s=25, rssi=-60,
                 new_address="frame", keeps_counter=False)  # fmt: skip
    windows = estimate(rows, FIXED)
    assert len({r[2] for r in rows}) == len(rows) > 400
    assert set(full_windows(windows, 0, 3600)) == {1}


def test_resetting_phones_of_one_model_far_apart_in_signal_stay_two() -> None:
    rng, ids = np.random.default_rng(3), Ids()
    near = phone(ids, rng, fp=5, start_s=0, end_s=3600, every_s=25, rssi=-40,
                 keeps_counter=False)  # fmt: skip
    far = phone(ids, rng, fp=5, start_s=5, end_s=3600, every_s=25, rssi=-85,
                keeps_counter=False)  # fmt: skip
    assert set(full_windows(estimate(merged(near, far), FIXED), 0, 3600)) == {2}


def test_a_model_that_wrongly_learnt_to_reset_does_not_merge_phones_that_keep_an_address() -> None:
    """Eight phones of one model walk in a minute apart, each keeping its random address: none
    continues another's counter, so the model learns to reset after five and cadence links the
    next ones into the first phone's chain; that phone is heard again under its own address, so
    each is split out (a phone never goes back to an address it has left). Without the rule: 5.
    (A chain remembers its newest address only: two wrong links within one probing interval
    leave the first in place; 20 s apart here, 7 of the 8.)"""
    rng, ids = np.random.default_rng(6), Ids()
    phones = [phone(ids, rng, fp=9, start_s=60 * k, end_s=3600, every_s=30, rssi=-55,
                    new_address="never") for k in range(8)]  # fmt: skip
    assert set(full_windows(estimate(merged(*phones), FIXED), 420, 3600)) == {8}


def test_a_busy_models_ring_keeps_the_addresses_still_heard() -> None:
    """A phone that keeps its counter and moves to a new address every 5 minutes, while a new
    address of its model comes every 5 s from the corridor (35 dB weaker): a ring of the last
    RING new addresses had forgotten the phone's address before it moved on, and each move
    began a new chain; the ring lets go of the address heard longest ago instead."""
    rng, ids = np.random.default_rng(8), Ids()
    rows: list[Row] = []
    counter = 100
    for k in range(6):
        dev = ids()
        for t in range(300 * k, 300 * k + 300, 30):
            counter += 5
            rows += [(KIND_PROBE, T0 + (t * 1000 + 20 * f) * 1_000_000, dev, 1, -55, 11,
                      counter + f) for f in range(3)]  # fmt: skip
    phone_rows = len(rows)
    rows += [(KIND_PROBE, T0 + t * NS + NS // 2, ids(), 1, -90, 11, int(rng.integers(0, 4096)))
             for t in range(0, 1800, 5)]  # fmt: skip
    order = sorted(range(len(rows)), key=lambda i: rows[i][1])
    est = Estimator(FIXED, capacity=16, zone=UTC)
    est.add(batch([rows[i] for i in order]))
    chain_of = dict(zip(order, est.row_chains.tolist(), strict=True))
    assert len({chain_of[i] for i in range(phone_rows)}) == 1
    assert chain_of[0] not in {chain_of[i] for i in range(phone_rows, len(rows))}


def test_global_addresses_count_as_themselves_and_must_dwell() -> None:
    rng, ids = np.random.default_rng(4), Ids()
    laptops = [phone(ids, rng, fp=9, start_s=0, end_s=1800, every_s=40, rssi=-60,
                     new_address="never", randomised=0) for _ in range(3)]  # fmt: skip
    passer = phone(ids, rng, fp=9, start_s=900, end_s=930, every_s=60, rssi=-60,
                   new_address="never", randomised=0)  # fmt: skip
    windows = estimate(merged(*laptops, passer), FIXED)
    assert set(full_windows(windows, 0, 1800)) == {3}


def test_static_devices_are_left_out_and_reported() -> None:
    """A machine is what was heard while the site is closed (before 06:00) and ever since; a
    person who arrives at opening and stays all day is never taken for one."""
    rng, ids = np.random.default_rng(5), Ids()
    night = 7 * 3600  # T0 + 7 h is 05:00 UTC, an hour before the site opens
    printer = phone(ids, rng, fp=3, start_s=night, end_s=night + 8 * 3600, every_s=60,
                    rssi=-50, new_address="never", randomised=0)  # fmt: skip
    stayer = phone(ids, rng, fp=4, start_s=night + 3600, end_s=night + 8 * 3600, every_s=60,
                   rssi=-50, new_address="never", randomised=0)  # fmt: skip
    windows = estimate(merged(printer, stayer), FIXED)
    by_start = {w.window_start - T0 // NS: w for w in windows}
    first_hour = by_start[night + 1800]
    assert first_hour.people_est == 1 and first_hour.static_excluded == 0  # not yet an hour
    for later in range(night + 2 * 3600, night + 8 * 3600 - 300, 300):
        assert (by_start[later].people_est, by_start[later].static_excluded) == (1, 1)
    anytime = estimate(merged(printer, stayer), replace(FIXED, static_closed_h=24))
    assert {w.people_est for w in anytime if w.window_start - T0 // NS > night + 3 * 3600} == {0}
    off = estimate(merged(printer, stayer), replace(FIXED, static_min_s=0))
    assert {w.static_excluded for w in off} == {0}


def test_signal_threshold_fixed_and_learnt(caplog: pytest.LogCaptureFixture) -> None:
    rng, ids = np.random.default_rng(6), Ids()
    inside = [phone(ids, rng, fp=10 + k, start_s=0, end_s=1800, every_s=40, rssi=-52)
              for k in range(35)]  # fmt: skip
    outside = [phone(ids, rng, fp=60 + k, start_s=0, end_s=1800, every_s=40, rssi=-88)
               for k in range(35)]  # fmt: skip
    rows = merged(*inside, *outside)
    everyone = full_windows(estimate(rows, FIXED), 0, 1800)
    assert set(everyone) == {70}
    assert set(full_windows(estimate(rows, replace(FIXED, rssi_threshold_dbm=-70)), 0, 1800)) == {
        35
    }
    est = Estimator(EstimateSettings())
    with caplog.at_level(logging.INFO, logger="footfall.agent"):
        windows = est.add(batch(rows)) + est.close_all()
    learnt = windows[-1].rssi_threshold_dbm
    assert -80 < learnt < -60  # the middle of the gap between -85 and -49
    assert {w.people_est for w in windows[:-1]} == {35}
    assert "Otsu" in est.threshold_note and str(learnt) in est.threshold_note
    assert any("signal threshold" in r.message for r in caplog.records)
    early = [r for r in rows if r[1] < T0 + 50 * NS]  # nobody has lingered a minute yet
    assert {w.rssi_threshold_dbm for w in estimate(early, EstimateSettings())} == {
        AUTO_FALLBACK_DBM
    }


def test_wipe_forgets_every_device() -> None:
    rng, ids = np.random.default_rng(7), Ids()
    est = Estimator(EstimateSettings(), capacity=16)
    est.add(batch(phone(ids, rng, fp=1, start_s=0, end_s=600, every_s=20, rssi=-60)))
    assert est.chains > 0
    est.new_epoch(T0 + 3600 * NS)
    assert est.chains == 0
    addrs, fps = est._addrs, est._fps
    tables = (addrs.keys, addrs.rows, est._chains, fps.keys, fps.rows)
    assert all(not t.any() for t in tables)


# -- settings, calibration, pipeline --------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"rssi_threshold_dbm": -130}, "estimate.rssi_threshold_dbm must be 'auto' or between"),
        ({"min_dwell_s": -1}, "estimate.min_dwell_s must be between 0 and 3600, got -1"),
        ({"static_min_s": 10}, "estimate.static_min_s must be 0 (off) or at least one window"),
        ({"reset_share_pct": 101}, "estimate.reset_share_pct must be between 0 and 100"),
    ],
)
def test_settings_refuse_bad_values(overrides: dict[str, int], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        EstimateSettings(**overrides)


def test_settings_come_from_the_registry() -> None:
    config = load_config(None, environ={"FOOTFALL_ESTIMATE_RSSI_THRESHOLD_DBM": "-72"})
    assert config.estimate.rssi_threshold_dbm == -72
    assert load_config(None, environ={}).estimate.rssi_threshold_dbm == AUTO
    assert load_config(None, environ={}).calibration is None
    with pytest.raises(ConfigError, match="'auto' or whole dBm"):
        load_config(None, environ={"FOOTFALL_ESTIMATE_RSSI_THRESHOLD_DBM": "loud"})
    calibrated = load_config(
        None,
        environ={
            "FOOTFALL_ESTIMATE_CALIBRATION_FACTOR": "0.75",
            "FOOTFALL_ESTIMATE_CALIBRATION_OFFSET": "-0.5",
        },
    )
    assert calibrated.calibration == Calibration(0.75, -0.5, 0.0, 0)
    with pytest.raises(ConfigError, match=r"estimate\.calibration_factor must be above 0"):
        load_config(None, environ={"FOOTFALL_ESTIMATE_CALIBRATION_FACTOR": "-1"})


def test_calibration_rounds_half_up_and_never_goes_below_zero() -> None:
    c = Calibration(factor=0.5, offset=-1.0, mae=0.0, windows=10)
    assert [c.people(n) for n in (0, 1, 2, 3, 5)] == [0, 0, 0, 1, 2]


def _windows(config: AgentConfig, *, estimate: bool = True) -> list[WindowCounts]:
    pipeline = Pipeline(config, estimate=estimate)
    with CaptureReader(BUNDLED_SAMPLE) as reader:
        return list(pipeline.run(reader))


def test_windows_carry_the_estimate_and_calibrated_occupancy_only_when_calibrated() -> None:
    plain = _windows(load_config(None, environ={"FOOTFALL_EPOCH_LENGTH": "3600"}))
    assert all(w.as_dict()["calibrated"] is False and not w.calibrated for w in plain)
    assert all(w.people_est is not None and w.people_est <= w.devices for w in plain)
    assert sum(w.people_est or 0 for w in plain) < sum(w.devices for w in plain)
    calibrated = _windows(load_config(None, environ={"FOOTFALL_ESTIMATE_CALIBRATION_FACTOR": "2"}))
    raw = _windows(load_config(None, environ={}))
    for c, w in zip(calibrated, raw, strict=True):
        assert c.calibrated and c.figures is not None and w.figures is not None
        assert c.figures.occupancy_peak == 2 * w.figures.occupancy_peak
        assert c.figures.occupancy_mean == round(2 * w.figures.occupancy_mean, 2)
        assert c.figures.arrivals == w.figures.arrivals  # counts of chains: not calibrated
    payload = counts_payload(SiteId("s1"), AgentId("a1"), 1, "0" * 16, calibrated[3].as_dict())
    validate(payload)  # the counts schema knows the new fields


def test_without_the_estimate_stage_windows_are_the_counters() -> None:
    config = load_config(None, environ={})
    counted = _windows(config, estimate=False)
    assert all(w.people_est is None and "arrivals" not in w.as_dict() for w in counted)
    estimated = _windows(config)
    assert [
        replace(w, people_est=None, static_excluded=None, figures=None) for w in estimated
    ] == counted


def test_the_threshold_note_prints_no_count_of_devices_from_1_to_k_minus_1() -> None:
    """The log obeys suppression: one lingering device is not '1 so far' (issue 17)."""
    rng, ids = np.random.default_rng(4), Ids()
    rows = phone(ids, rng, fp=7, start_s=0, end_s=900, every_s=30, rssi=-50, new_address="never")
    est = Estimator(EstimateSettings(), suppress_below=5)
    est.add(batch(rows))
    est.close_all()
    assert "fewer than 5 so far" in est.threshold_note, est.threshold_note
    assert " 1 so far" not in est.threshold_note


def test_the_threshold_note_prints_no_median_signal_of_fewer_than_k_devices() -> None:
    """Forty devices far off and one near: Otsu's split leaves the near one alone above it,
    and the median signal of one device is that device's signal (it was printed)."""
    rng, ids = np.random.default_rng(4), Ids()
    rows = [
        row
        for i in range(40)
        for row in phone(
            ids,
            rng,
            fp=100 + i,
            start_s=0,
            end_s=900,
            every_s=30,
            rssi=-85 + i % 3,
            new_address="never",
        )
    ]
    rows += phone(ids, rng, fp=7, start_s=0, end_s=900, every_s=30, rssi=-52, new_address="never")
    est = Estimator(EstimateSettings(), suppress_below=5)
    est.add(batch(sorted(rows, key=lambda r: r[1])))
    est.close_all()
    note = est.threshold_note
    assert "fewer than 5 at or above it; 40 below, median -81 dBm;" in note, note
    assert note.count("median") == 1, note


# -- bounded memory -------------------------------------------------------------------------


class Renumbered:
    """Chains renumbered so that no number serves twice: a row that began its chain
    (``row_fresh``) gets a new one. What the people stage would see from an unbounded store."""

    def __init__(self) -> None:
        self.current: dict[int, int] = {}
        self.made = 0

    def __call__(self, chains: np.ndarray, fresh: np.ndarray) -> np.ndarray:
        out = np.full(len(chains), -1, np.int64)
        for i, (c, new) in enumerate(zip(chains.tolist(), fresh.tolist(), strict=True)):
            if c < 0:
                continue
            if new:
                self.current[c] = self.made
                self.made += 1
            out[i] = self.current[c]
        return out


def test_retiring_chains_changes_no_figure_on_a_real_day() -> None:
    """The busiest shared capture (the lab, a working day) through tables of 16 rows: chains
    and addresses silent past the horizon are retired all day long and their rows reused, and
    the windows are the unbounded twin's; the people stage, handed reused chain numbers with
    their fresh rows, gives what it gives with numbers never reused."""
    path = shared_path("data", "pcaps", "fryza_p1_sc6-61_2023-02-21_anonymized.pcap")
    settings = load_config(None, environ={"FOOTFALL_EPOCH_TIMEZONE": "UTC"})
    est = Estimator(settings.estimate, capacity=16, zone=UTC)
    people = PeopleSettings.from_config(settings.count, settings.estimate)
    reused, unique = PeopleCounter(people), PeopleCounter(people)
    renumber = Renumbered()
    key = EpochKey()
    rows: list[Row] = []
    kernel: list[WindowEstimate] = []
    figures: tuple[list[WindowPeople], list[WindowPeople]] = ([], [])
    most = widest = 0
    with CaptureReader(path, batch_frames=2000) as reader:
        for frames in reader:
            b = anonymize(parse_batch(frames), key)
            kernel += est.add(b)
            most = max(most, len(est._chains))
            widest = max(widest, est._addrs.capacity)
            args = (b.kind, b.ts_ns)
            figures[0].extend(reused.add(*args, est.row_chains, b.rssi, est.row_thresholds,
                                         est.row_fresh))  # fmt: skip
            ids = renumber(est.row_chains, est.row_fresh)
            figures[1].extend(unique.add(*args, ids, b.rssi, est.row_thresholds))
            rows += zip(*(a.tolist() for a in (b.kind, b.ts_ns, b.device, b.randomised, b.rssi,
                                                b.fp, b.seq)), strict=True)  # fmt: skip
    kernel += est.close_all()
    until = (kernel[-1].window_start + settings.count.window_s) * NS
    for counter, out in zip((reused, unique), figures, strict=True):
        out.extend(counter.close_until(until, end_visits=True))
    assert kernel == reference_estimates(rows, settings.estimate)
    assert figures[0] == figures[1] and sum(w.arrivals for w in figures[0]) > 50
    assert est.evicted_total == 0
    assert est.chains > 3 * most and est.live[1] < most  # rows reused over and over
    assert len({r[2] for r in rows}) > widest


def test_past_the_ceiling_the_longest_silent_go_and_are_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """3,000 laptops (global addresses) that stay an hour, arriving within ten minutes: more
    than the ceiling (1,024) within the horizon. The tables stay at the ceiling, the evictions
    are counted and said once, and every visit the people stage saw arrive still ends once
    (an evicted chain's visit ends when its row is taken by a new chain)."""
    rng, ids = np.random.default_rng(18), Ids()
    laptops = [phone(ids, rng, fp=9, start_s=float(rng.uniform(0, 600)), end_s=4200,
                     every_s=60, rssi=-50, new_address="never", randomised=0, burst=1)
               for _ in range(3000)]  # fmt: skip
    rows = merged(*laptops)
    s = replace(FIXED, max_devices=1024)
    est = Estimator(s, capacity=16, zone=UTC)
    counter = PeopleCounter(PeopleSettings(min_dwell_s=s.min_dwell_s))
    figures: list[WindowPeople] = []
    with caplog.at_level(logging.WARNING, logger="footfall.agent"):
        for lo in range(0, len(rows), 5000):
            b = batch(rows[lo : lo + 5000])
            est.add(b)
            assert est.live[0] <= 1024 and est.live[1] <= 1024
            figures += counter.add(b.kind, b.ts_ns, est.row_chains, b.rssi,
                                   est.row_thresholds, est.row_fresh)  # fmt: skip
    windows = est.close_all()
    figures += counter.close_until((windows[-1].window_start + 300) * NS, end_visits=True)
    assert len(est._chains) == 1024 and est._addrs.capacity == 2048
    assert est.evicted_total > 3000
    said = [r.message for r in caplog.records if "estimator at its ceiling" in r.message]
    assert said == [
        "estimator at its ceiling (count.max_devices = 1024, estimate.max_fingerprints = "
        "16384): the longest silent addresses, chains or fingerprints are evicted from now on "
        "in this epoch (footfall_estimate_evicted_total)"
    ]
    assert 0 < est.evictions < est.evicted_total  # rounds, each of many rows
    arrived = sum(w.arrivals for w in figures)
    assert arrived == sum(w.visits_ended for w in figures) > 500  # fewer: evicted ones start over


def fingerprint_day(models: int) -> list[Row]:
    """Phones of ``models`` distinct models (fingerprints), a new random address every burst,
    arriving one after another over four hours, each for ten minutes: a few dozen models heard
    at any time, every one of them heard in the epoch."""
    rng, ids = np.random.default_rng(21), Ids()
    return merged(*(phone(ids, rng, fp=10_000 + m, start_s=m * 14_400 / models,
                          end_s=m * 14_400 / models + 600, every_s=30, rssi=-50)
                    for m in range(models)))  # fmt: skip


def test_the_fingerprint_table_stops_at_its_ceiling_and_counts_its_evictions() -> None:
    """1,000 models in an epoch against a ceiling of 128: the capture runs to the end with the
    fingerprint table never above the ceiling (nor its slots above twice it), the evictions
    counted (rows and rounds); with the ceiling not reached (one above the models heard) the
    estimates are the ones of a ceiling far above, and nothing is evicted. The models heard
    last are the ones kept (the oldest silent go first)."""
    rows = merged(fingerprint_day(1000))
    bounded = Estimator(replace(FIXED, max_fingerprints=128), capacity=16, zone=UTC)
    out: list[WindowEstimate] = []
    most = 0
    for lo in range(0, len(rows), 2000):
        out += bounded.add(batch(rows[lo : lo + 2000]))
        held, slots = bounded.fingerprints
        assert held <= 128 and slots <= 256
        most = max(most, held)
    out += bounded.close_all()
    assert most > 128 - 128 // 8
    assert bounded.evicted_total >= 1000 - 128 and bounded.evictions >= (1000 - 128) // 16
    assert out[-1].window_start == (rows[-1][1] // NS) // 300 * 300
    recent = {r[5] for r in rows[-200:]}
    kept = set(bounded._fps.keys[bounded._fps.keys != 0].tolist())
    assert recent <= kept
    exact = replace(FIXED, max_fingerprints=1001)
    assert estimate(rows, exact) == estimate(rows, replace(FIXED, max_fingerprints=1_000_000))
    at_ceiling = Estimator(exact, capacity=16, zone=UTC)
    at_ceiling.add(batch(rows))
    assert (at_ceiling.fingerprints[0], at_ceiling.evicted_total, at_ceiling.evictions) == (
        1000,
        0,
        0,
    )
