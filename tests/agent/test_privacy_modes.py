"""Privacy modes, small-count suppression and noise: the rules hold in code.

The audit (``firmware_agent.tools.audit``) is the independent checker of what the privacy stage
releases: it re-derives every hidden count by subtraction from the published message.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import resource
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import nacl.encoding
import nacl.hash
import nacl.signing
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_agent.cli import BUNDLED_SAMPLE
from firmware_agent.contract.errors import ConfigError
from firmware_agent.contract.fields import DWELL_BANDS
from firmware_agent.contract.messages import AgentId, SiteId, counts_payload, meta_payload, seal
from firmware_agent.service.config import AgentConfig
from firmware_agent.service.run import agent_meta
from firmware_agent.settings import load_config
from firmware_agent.stages import anonymize
from firmware_agent.stages.batch import NS, WindowCounts, WindowPeople
from firmware_agent.stages.capture import CaptureReader
from firmware_agent.stages.pipeline import Pipeline
from firmware_agent.stages.privacy import (
    COLLISION_FLOOR,
    STANDARD_PUBLISHES,
    PrivacyPolicy,
    discrete_laplace,
    epoch_label,
    flatten_counts,
    linear_count,
    shared_share,
)
from firmware_agent.tools.audit import Audit
from firmware_agent.tools.privacy_report import privacy_report
from tests.support.shared import shared_path

UTC_ENV = {"FOOTFALL_EPOCH_TIMEZONE": "UTC"}


def _config(**env: str) -> AgentConfig:
    return load_config(None, environ=UTC_ENV | {f"FOOTFALL_{k.upper()}": v for k, v in env.items()})


def _windows(config: AgentConfig, capture: Path = BUNDLED_SAMPLE) -> list[WindowCounts]:
    pipeline = Pipeline(config)
    with CaptureReader(capture) as reader:
        return list(pipeline.run(reader))


@pytest.mark.parametrize(
    ("env", "rule"),
    [
        (
            {"privacy_mode": "strict", "count_window_s": "900"},
            "count.window_s 900 breaks that rule",
        ),
        ({"privacy_mode": "strict", "epoch_length": "86400"}, "epoch.length must be left unset"),
        (
            {"privacy_mode": "strict", "count_window_s": "600", "count_lateness_s": "60"},
            "count.window_s + count.lateness_s must be at most 600 s",
        ),
        ({"epoch_length": "90000"}, "keeps a key and device ids for at most 24 hours"),
        (  # it gave 16-bit ids, 99.7 % of them unique (issue 17)
            {"privacy_mode": "strict", "privacy_expected_devices": "65536"},
            "'strict' keeps ids of at most 12 bits, so that most devices share theirs",
        ),
        ({"privacy_suppress_below": "1"}, "a count of one device is that device"),
        ({"privacy_dp_epsilon": "lots"}, "privacy.dp_epsilon must be 'off' or a number"),
        ({"privacy_dp_epsilon": "50"}, "at most 10"),
        ({"privacy_mode": "lenient"}, "privacy.mode must be 'standard' or 'strict'"),
    ],
)
def test_a_setting_that_weakens_a_mode_is_refused_naming_the_rule(
    env: dict[str, str], rule: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(rule)):
        _config(**env)


def test_strict_mode_keys_every_window_and_truncates_ids() -> None:
    config = _config(privacy_mode="strict", privacy_expected_devices="100")
    assert config.epoch.length_s == config.count.window_s == 300
    meta = agent_meta(config)["privacy"]
    assert meta == config.privacy.meta()
    assert (meta["mode"], meta["key_lifetime_s"], meta["id_bits"]) == ("strict", 300, 6)
    widest = _config(privacy_mode="strict", privacy_expected_devices="8191")
    assert agent_meta(widest)["privacy"]["id_bits"] == 12  # the most strict declares
    assert 0.75 < (config.privacy.shared_share() or 0) < 0.85  # most devices share their id


def test_a_key_never_lives_more_than_a_day_even_on_the_25_hour_day() -> None:
    config = load_config(None, environ={"FOOTFALL_EPOCH_TIMEZONE": "Europe/Paris"})
    paris = ZoneInfo("Europe/Paris")
    autumn = int(datetime(2024, 10, 27, 0, 0, tzinfo=paris).timestamp()) * NS
    boundary = config.epoch.next_boundary(autumn)
    assert boundary - autumn == 86400 * NS  # 23:00 local, an hour before midnight
    assert config.epoch.next_boundary(boundary) == int(
        datetime(2024, 10, 28, 0, 0, tzinfo=paris).timestamp() * NS
    )
    spring = int(datetime(2024, 3, 31, 0, 0, tzinfo=paris).timestamp()) * NS
    assert config.epoch.next_boundary(spring) - spring == 23 * 3600 * NS


def _window(
    devices: int, randomised: int, visitors: int, bands: list[int], epoch: int
) -> WindowCounts:
    return WindowCounts(
        window_start=1_709_631_000,
        window_s=300,
        probe_requests=500,
        malformed=0,
        late_frames=0,
        devices=devices,
        devices_randomised=randomised,
        visitors=visitors,
        passersby=devices - visitors,
        visits_ended=sum(bands),
        dwell_minutes=dict(zip(DWELL_BANDS, bands, strict=True)),
        devices_epoch=epoch,
        probe_requests_clipped=2 * devices,
        people_est=visitors,
        static_excluded=min(2, devices),
        figures=WindowPeople(
            window_start=1_709_631_000,
            arrivals=visitors,
            passersby=devices - visitors,
            visits_ended=sum(bands),
            dwell_minutes=dict(zip(DWELL_BANDS, bands, strict=True)),
            occupancy_mean=round(visitors * 0.75, 2),
            occupancy_peak=visitors,
        ),
    )


@st.composite
def windows(draw: st.DrawFn) -> WindowCounts:
    devices = draw(st.integers(0, 40))
    return _window(
        devices,
        draw(st.integers(0, devices)),
        draw(st.integers(0, devices)),
        draw(st.lists(st.integers(0, 12), min_size=5, max_size=5)),
        devices + draw(st.integers(0, 100)),
    )


def _audited(policy: PrivacyPolicy, released: dict[str, object]) -> list[str]:
    site, agent = SiteId("s1"), AgentId("a1")
    meta = meta_payload(
        site, agent, agent_version="0", window_s=300, epoch_length="midnight",
        epoch_timezone="UTC", privacy=policy.meta(),
        thresholds={"rssi_threshold_dbm": -75, "min_dwell_s": 120, "visit_gap_s": 600,
                    "lateness_s": 10, "presence_hold_s": 120},
    )  # fmt: skip
    audit = Audit()
    key = nacl.signing.SigningKey.generate()
    for payload in (meta, counts_payload(site, agent, 1, "0" * 16, released)):
        audit.add(f"footfall/v1/s1/a1/{payload['kind']}", seal(payload, key))
    return [f.reason for f in audit.findings() if f.level == "fail"]


@settings(max_examples=400, deadline=None)
@given(windows(), st.integers(2, 10))
def test_released_counts_give_no_small_count_back_by_subtraction(
    window: WindowCounts, k: int
) -> None:
    policy = PrivacyPolicy(suppress_below=k)
    released = policy.release(window)
    assert _audited(policy, released) == []
    for name, value in released.items():
        if name == "dwell_minutes":
            assert isinstance(value, dict)
            assert all(v is None or v == 0 or v >= k for v in value.values())
        elif isinstance(value, int) and name not in ("probe_requests", "window_s"):
            assert value == 0 or value >= k, name


def test_suppression_is_null_not_zero_and_complements_its_relations() -> None:
    released = PrivacyPolicy().release(_window(20, 18, 3, [0, 9, 1, 0, 0], 80))
    assert released["arrivals"] is None and released["passersby"] == 17
    assert released["devices_randomised"] is None  # else 20 - 18 = 2 global devices
    assert released["devices"] == 20 and "devices_epoch" not in released
    bands = released["dwell_minutes"]
    assert bands == {"lt5": 0, "5-15": None, "15-30": None, "30-60": 0, "ge60": 0}
    assert released["occupancy_peak"] is None  # 3 people at most
    assert released["occupancy_mean"] is None  # at most the peak: as small


def test_a_window_without_data_is_a_gap_of_nulls_not_zeros() -> None:
    quiet = replace(
        _window(0, 0, 0, [0, 0, 0, 0, 0], 80), probe_requests=0, static_excluded=0, no_data=True
    )
    released = PrivacyPolicy(dp_epsilon=1.0).release(quiet) | PrivacyPolicy().release(quiet)
    assert released["no_data"] is True and released["probe_requests"] == 0
    figures = {k: v for k, v in flatten_counts(released).items() if k.split(".")[0] in
               STANDARD_PUBLISHES and k != "calibrated"}  # fmt: skip
    assert figures and set(figures.values()) == {None}
    assert not PrivacyPolicy().release(_window(0, 0, 0, [0] * 5, 80))["no_data"]


def test_strict_release_publishes_the_device_diagnostics_only() -> None:
    released = PrivacyPolicy(mode="strict", key_lifetime_s=300).release(
        _window(40, 20, 30, [5, 5, 5, 5, 5], 90)
    )
    assert set(released) == {
        "window_start", "window_s", "no_data", "probe_requests", "malformed", "late_frames",
        "devices", "devices_randomised",
    }  # fmt: skip


def test_discrete_laplace_noise_has_its_distribution() -> None:
    scale = 0.5  # epsilon / sensitivity
    draws = np.array([discrete_laplace(scale) for _ in range(40_000)])
    a = math.exp(-scale)
    assert abs(draws.mean()) < 0.06
    assert draws.var() == pytest.approx(2 * a / (1 - a) ** 2, rel=0.06)
    for x in range(-4, 5):
        expected = (1 - a) / (1 + a) * a ** abs(x)
        assert (draws == x).mean() == pytest.approx(expected, abs=0.01), x


def test_noise_is_fresh_every_window() -> None:
    policy = PrivacyPolicy(dp_epsilon=1.0, suppress_below=2)
    window = _window(400, 200, 300, [50, 50, 50, 50, 50], 2000)
    # 10,000 draws: the variance's relative error is about 2 %, so 12 % is over 5 sigma away.
    noise = np.array([int(policy.release(window)["devices"]) - 400 for _ in range(10_000)])  # type: ignore[call-overload]
    assert len(set(noise.tolist())) > 20
    lag1 = np.corrcoef(noise[:-1], noise[1:])[0, 1]
    assert abs(lag1) < 0.06
    a = math.exp(-1.0 / policy.sensitivity)
    assert noise.var() == pytest.approx(2 * a / (1 - a) ** 2, rel=0.12)
    assert policy.dp_epsilon_day == 288.0


def test_linear_counting_corrects_the_collisions_of_strict_ids() -> None:
    rng = np.random.default_rng(7)
    for n in (20, 64, 100, 150):
        occupied = [len(set(rng.integers(0, 64, n).tolist())) for _ in range(300)]
        estimates = [linear_count(o, 64) for o in occupied]
        assert np.mean(estimates) == pytest.approx(n, rel=0.08), n


def test_strict_replay_counts_close_to_standard_and_publishes_no_per_device_fields() -> None:
    """Each replay draws its own keys, so its collisions differ: over 150 replays of the
    sample, strict's MAPE against standard was 16 % on average, 24 % at worst, and one replay
    in 14 was above 20 % (the test failed that often when it judged one replay). Judged on the
    mean of five replays, whose spread is a third of one's."""
    standard = _windows(_config())
    strict_config = _config(privacy_mode="strict", privacy_expected_devices="64")
    errors = []
    for _ in range(5):
        strict = [strict_config.privacy.correct(w) for w in _windows(strict_config)]
        assert [w.window_start for w in strict] == [w.window_start for w in standard]
        assert all(w.people_est is None for w in strict)  # the estimator is off in strict mode
        pairs = zip(standard, strict, strict=True)
        busy = [(a.devices, b.devices) for a, b in pairs if a.devices >= 5]
        errors.append(np.mean([abs(b - a) / a for a, b in busy]))
    error = np.mean(errors)
    assert error < 0.2, f"strict devices depart from standard by {error:.1%} on average"


def test_two_sensors_in_one_room_publish_nothing_that_links_a_device() -> None:
    config = _config()
    a, b = Pipeline(config), Pipeline(config)
    labels_a: set[str] = set()
    labels_b: set[str] = set()
    signing = [nacl.signing.SigningKey.generate().verify_key.encode() for _ in range(2)]
    released = []
    for pipeline, labels, public in ((a, labels_a, signing[0]), (b, labels_b, signing[1])):
        out = []
        with CaptureReader(BUNDLED_SAMPLE) as reader:  # parsing zeroes each batch: read twice
            for batch in reader:
                out += [config.privacy.release(w) for w in pipeline.feed(batch)]
                labels.add(epoch_label(public, pipeline.epoch_start or 0))
        out += [config.privacy.release(w) for w in pipeline.finish()]
        released.append(out)
    # Different keys, the same published counts: what leaves depends on what happened in
    # the room, not on any device's id, so nothing in it can match a device across sensors.
    assert released[0] == released[1]
    assert not labels_a & labels_b


def _locked_kb(address: int) -> int:
    """``Locked:`` (kB) of the mapping of this process that holds ``address`` (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if not head.endswith(":"):  # a mapping's first line: start-end perms ...
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside and head == "Locked:":
            return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


def test_the_epoch_key_is_on_a_locked_page_until_it_is_wiped() -> None:
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if os.geteuid() != 0 and soft != resource.RLIM_INFINITY and soft < 64 * mmap.PAGESIZE:
        pytest.skip(f"RLIMIT_MEMLOCK is {soft} bytes and this is not root: mlock may fail")
    key = anonymize.EpochKey()
    address = key.words.__array_interface__["data"][0]
    assert key.words.any()
    assert _locked_kb(address) >= mmap.PAGESIZE // 1024  # never paged out to swap
    key.wipe()
    assert not key.words.any()
    assert _locked_kb(address) == 0  # unlocked once zeroed


_UNLOCKABLE_CHILD = textwrap.dedent(
    """
    import logging
    from firmware_agent.stages.anonymize import EpochKey
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    keys = [EpochKey(), EpochKey()]
    print(all(key.words.any() for key in keys))
    """
)


def test_a_key_whose_page_cannot_be_locked_is_used_with_one_warning() -> None:
    def no_memlock() -> None:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, 0))

    command = [sys.executable, "-c", _UNLOCKABLE_CHILD]
    if os.geteuid() == 0:  # root locks regardless of the limit, unless it lacks CAP_IPC_LOCK
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("setpriv (util-linux) is needed to drop CAP_IPC_LOCK as root")
        command = [setpriv, "--inh-caps", "-ipc_lock", "--bounding-set", "-ipc_lock", *command]
    result = subprocess.run(
        command, preexec_fn=no_memlock, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "True"
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1, result.stderr
    assert "could not lock the epoch key's memory page" in warnings[0]
    assert "RLIMIT_MEMLOCK" in warnings[0]


_LAB_DAYS = ("2022-10-19", "2022-11-24", "2023-02-16")  # a class day, an empty day, a short one


@pytest.mark.shared
def test_strict_ids_are_shared_by_most_devices_in_every_window_of_the_lab_days() -> None:
    """The id width follows each window's own crowd: at the width its counts are taken at,
    at least COLLISION_FLOOR of its devices share their id (measured from the window's own
    counts), in every window with two devices or more; a window with fewer publishes no
    device count. On main the width was fixed by privacy.expected_devices (6 bits): in quiet
    windows most devices kept an id of their own."""
    config = _config(privacy_mode="strict")
    policy = config.privacy
    shares = []
    for day in _LAB_DAYS:
        lab = shared_path("data", "lab", f"fryza_p1_sc6-61_{day}_anonymized.pcap.gz")
        for window in _windows(config, lab):
            bits = window.id_bits or policy.id_bits or 0
            share = shared_share(bits, linear_count(window.devices, 1 << bits))
            assert window.shared in (None, pytest.approx(share))
            released = policy.release(window)
            if share < COLLISION_FLOOR:  # a crowd too small to share: no device count
                assert released["devices"] in (0, None)
            else:
                shares.append(share)
    # Not vacuous: 50 to 62 of the ~95 windows with two devices or more publish a device count
    # (measured over 7 random epoch keys; which windows share depends on the key).
    assert len(shares) >= 30
    assert min(shares) >= COLLISION_FLOOR


def test_privacy_report_words_small_counts_and_states_strict_collisions() -> None:
    """k = 2 is 'a count of one device', not 'from 1 to 1'; with a capture, strict states the
    share of devices sharing their id that it achieved there, per window."""
    report = privacy_report(_config(privacy_suppress_below="2"))
    assert "from 1 to 1" not in report and "A count of one person, visit or device is" in report
    assert "from 1 to 4" in privacy_report(_config())
    config = _config(privacy_mode="strict")
    measured = privacy_report(config, ("sample.pcap", _windows(config)))
    line = measured.split("Measured on sample.pcap: in the ")[1]
    low = int(line.split("device counts, ")[1].split("%")[0])
    assert low >= COLLISION_FLOOR * 100
