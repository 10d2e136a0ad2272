"""The settings of the stages that compile numba kernels (count, estimate, live capture), the
epoch clock and the calibration, each declared once on its field (:func:`setting`).

They sit here rather than in their stage's module because those modules compile kernels when
imported: ``footfall-agent config show``, the settings registry (:mod:`firmware_agent.settings`)
and the privacy report read these classes without loading numba (``import
firmware_agent.settings`` took 1.3-1.4 s with the stages' modules, numba and llvmlite; 0.4-0.55 s
now, mostly numpy, on the 2-core test machine; tests/agent/test_settings.py holds it). The
privacy stage's settings stay on its own :class:`~firmware_agent.stages.privacy.PrivacyPolicy`
(that module compiles nothing), the service's on its modules' classes. Each class checks its
values where it is made, naming the setting.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from typing import Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np
from numpy.typing import NDArray

from firmware_agent.contract.errors import ConfigError
from firmware_agent.contract.resolve import setting
from firmware_agent.stages.batch import (
    LINKTYPE_AVS,
    LINKTYPE_IEEE802_11,
    LINKTYPE_PRISM,
    LINKTYPE_RADIOTAP,
    NS,
)
from firmware_agent.stages.privacy import STANDARD_MAX_KEY_S

__all__ = [
    "AUTO",
    "FILTERED_LINK_TYPES",
    "Calibration",
    "CountSettings",
    "EpochClock",
    "EstimateSettings",
    "LiveSettings",
    "hop_channels",
]

AUTO = -1000  # estimate.rssi_threshold_dbm: learn it
# The link types live capture has a kernel probe-request filter for (live.PROBE_REQUEST_FILTERS,
# held to this list by tests/agent/test_live.py).
FILTERED_LINK_TYPES: Final = (LINKTYPE_IEEE802_11, LINKTYPE_PRISM, LINKTYPE_RADIOTAP, LINKTYPE_AVS)
_LINK_TYPE_NAMES: Final = {"radiotap": LINKTYPE_RADIOTAP, "802.11": LINKTYPE_IEEE802_11}


@dataclass(frozen=True, slots=True)
class CountSettings:
    """How frames become counts; checked where made."""

    window_s: int = setting(300, "Window length in seconds; a divisor of 3600, 60 to 3600.")
    lateness_s: int = setting(
        10, "How far (s) a frame's timestamp may go back and still count in its own window."
    )
    rssi_threshold_dbm: int = setting(
        -75, "Signal (dBm) at or above which a device can be a visitor rather than a passer-by."
    )
    min_dwell_s: int = setting(120, "Presence (s) a device needs before it counts as a visitor.")
    visit_gap_s: int = setting(600, "Silence (s) after which a device's visit has ended.")
    max_devices: int = setting(
        250_000, "Ceiling of the device table (rows); at it, the longest silent rows are evicted."
    )

    def __post_init__(self) -> None:
        if not (60 <= self.window_s <= 3600 and 3600 % self.window_s == 0):
            raise ConfigError(
                f"window_s must be a divisor of 3600 between 60 and 3600, got {self.window_s}"
            )
        if not 0 <= self.lateness_s < self.window_s:
            raise ConfigError(
                f"lateness_s must be at least 0 and less than window_s ({self.window_s}), "
                f"got {self.lateness_s}"
            )
        if not -120 <= self.rssi_threshold_dbm <= 0:
            raise ConfigError(
                f"rssi_threshold_dbm must be between -120 and 0 dBm, got {self.rssi_threshold_dbm}"
            )
        if self.min_dwell_s < 0:
            raise ConfigError(f"min_dwell_s must be 0 or more seconds, got {self.min_dwell_s}")
        if self.visit_gap_s < 60:
            raise ConfigError(f"visit_gap_s must be at least 60 seconds, got {self.visit_gap_s}")
        if not 1024 <= self.max_devices <= 100_000_000:
            raise ConfigError(
                f"max_devices must be between 1024 and 100000000, got {self.max_devices}"
            )


def _epoch_length(text: str) -> int | None:
    """``epoch.length``: None for midnight, else seconds (a multiple of the window: checked by
    :class:`EpochClock`, which knows the window)."""
    length = text.strip()
    if length == "midnight":
        return None
    try:
        seconds = int(length)
    except ValueError:
        seconds = 0
    if seconds < 60:
        raise ConfigError(
            "epoch.length must be 'midnight' or seconds, at least 60, that are a multiple "
            f"of count.window_s, got {length!r}"
        )
    return seconds


def _zone(name: str) -> ZoneInfo | None:
    """``epoch.timezone``: None (empty) for the system's local zone."""
    if not name:
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ConfigError(
            f"epoch.timezone must be an IANA zone such as 'Europe/Paris', got {name!r}"
        ) from exc


@dataclass(frozen=True, slots=True)
class EpochClock:
    """Where epochs end: local midnight in a zone (or 24 hours after the epoch began, if
    sooner: the 25-hour autumn day has a one-hour epoch before midnight), or every
    ``length_s`` seconds. ``next_boundary`` is asked at the start of each epoch.

    A boundary is always a window boundary (midnight rounded up to the next window start,
    which matters only for zones off the hour with 30- or 60-minute windows).
    """

    length_s: int | None = setting(  # None: midnight
        "midnight",
        "When the hashing key and device table are replaced: 'midnight' (local, and at most "
        "24 h) or seconds, 60 to 86400, a multiple of the window. Strict mode: every window.",
        key="length",
        parse=_epoch_length,
    )
    zone: ZoneInfo | None = setting(  # None: system local
        "",
        "IANA time zone of the site for midnight epochs (empty: the system's local zone).",
        key="timezone",
        parse=_zone,
    )
    window_s: int = 300  # count.window_s

    def __post_init__(self) -> None:
        if self.length_s is not None and self.length_s % self.window_s:
            raise ConfigError(
                "epoch.length must be 'midnight' or seconds, at least 60, that are a multiple "
                f"of count.window_s ({self.window_s}), got {self.length_s}"
            )

    def next_boundary(self, t_ns: int) -> int:
        """First epoch boundary strictly after ``t_ns``, in ns since the Unix epoch."""
        w = self.window_s * NS
        if self.length_s is not None:
            step = self.length_s * NS
            return (t_ns // step + 1) * step
        local = datetime.fromtimestamp(t_ns / NS, self.zone).astimezone(self.zone)
        midnight = datetime.combine(local.date() + timedelta(days=1), time(0), self.zone)
        if self.zone is None:
            midnight = midnight.astimezone()
        b = int(midnight.timestamp()) * NS
        # A key never lives more than a day, not even on a 25-hour daylight-saving day.
        return min(-(-b // w) * w, t_ns // w * w + STANDARD_MAX_KEY_S * NS)


def _threshold(text: str) -> int:
    """``estimate.rssi_threshold_dbm``: :data:`AUTO` or whole dBm."""
    threshold = text.strip().lower()
    try:
        return AUTO if threshold == "auto" else int(threshold)
    except ValueError:
        raise ConfigError(
            "estimate.rssi_threshold_dbm must be 'auto' or whole dBm between -120 (off) "
            f"and 0, got {threshold!r}"
        ) from None


@dataclass(frozen=True, slots=True)
class EstimateSettings:
    """How addresses become an estimate of devices present; checked where made."""

    window_s: int = 300  # count.window_s
    lateness_s: int = 10  # count.lateness_s
    rssi_threshold_dbm: int = setting(  # AUTO, or -120 (off) .. 0
        "auto",
        "Signal (dBm) at or above which a device counts as in the venue for people_est; "
        "-120 counts all; 'auto' learns it from the signal of devices that linger (logged).",
        parse=_threshold,
    )
    min_dwell_s: int = setting(60, "How long (s) a device must have been heard to count.")
    link_gap_s: int = setting(
        60, "Silence (s) within which a new random address may continue an old one's counter."
    )
    seq_max_delta: int = setting(
        64,
        "Largest step of the sequence number from an old random address to a new one that "
        "links them.",
    )
    cadence_gap_s: int = setting(
        300,
        "Silence (s) within which a phone model that resets its sequence numbers may link a "
        "new random address to a chain by timing and signal.",
    )
    rssi_link_db: int = setting(
        30, "Largest signal difference (dB) between a chain and a new address linked by timing."
    )
    reset_min: int = setting(
        5,
        "Address changes of a phone model seen before it may be judged to reset its sequence "
        "numbers.",
    )
    reset_share_pct: int = setting(
        25,
        "A model resets its sequence numbers if fewer than this % of its address changes "
        "continued one (beyond chance).",
    )
    static_min_s: int = setting(  # 0: no static exclusion
        3600,
        "A device first heard while the site is closed (estimate.static_closed_h), then heard "
        "over at least this long (s) and in most windows, is static (a PC, a printer) and left "
        "out; 0 turns static exclusion off.",
    )
    static_share_pct: int = setting(
        80, "Share (%) of the windows since it appeared a static device must have been heard in."
    )
    static_closed_h: int = setting(  # the site is closed until this local hour; 24: any time
        6,
        "The site is closed from local midnight until this hour: only a device first heard "
        "then can be static, so a person who stays all day is never taken for a PC (24: any "
        "device, whenever first heard).",
    )
    max_fingerprints: int = setting(
        16_384,
        "Ceiling of the model fingerprints the estimator holds in an epoch; at it, the eighth "
        "heard longest ago are evicted (counted in status).",
    )
    link: bool = True  # False: every address is a device (the evaluation's stages)
    assume_randomised: bool = False  # True: ignore the locally administered bit (datasets)
    visit_gap_s: int = 600  # count.visit_gap_s: an address silent longer is linked afresh
    max_devices: int = 250_000  # count.max_devices: the ceiling of live addresses and chains

    def __post_init__(self) -> None:
        if self.rssi_threshold_dbm != AUTO and not -120 <= self.rssi_threshold_dbm <= 0:
            raise ConfigError(
                "estimate.rssi_threshold_dbm must be 'auto' or between -120 (off) and 0 dBm, "
                f"got {self.rssi_threshold_dbm}"
            )
        bounds = {
            "min_dwell_s": (0, 3600, self.min_dwell_s),
            "link_gap_s": (1, 3600, self.link_gap_s),
            "seq_max_delta": (1, 2048, self.seq_max_delta),
            "cadence_gap_s": (0, 3600, self.cadence_gap_s),
            "rssi_link_db": (0, 120, self.rssi_link_db),
            "reset_min": (1, 1_000_000, self.reset_min),
            "reset_share_pct": (0, 100, self.reset_share_pct),
            "static_min_s": (0, 7 * 86400, self.static_min_s),
            "static_share_pct": (1, 100, self.static_share_pct),
            "static_closed_h": (0, 24, self.static_closed_h),
            "max_fingerprints": (64, 10_000_000, self.max_fingerprints),
        }
        for name, (lo, hi, value) in bounds.items():
            if not lo <= value <= hi:
                raise ConfigError(f"estimate.{name} must be between {lo} and {hi}, got {value}")
        if not 1024 <= self.max_devices <= 100_000_000:
            raise ConfigError(
                f"max_devices must be between 1024 and 100000000, got {self.max_devices}"
            )
        if 0 < self.static_min_s < self.window_s:
            raise ConfigError(
                f"estimate.static_min_s must be 0 (off) or at least one window "
                f"({self.window_s} s), got {self.static_min_s}"
            )

    def params(self) -> NDArray[np.int64]:
        return np.array(
            [
                self.window_s * NS,
                self.lateness_s * NS,
                self.link_gap_s * NS,
                self.seq_max_delta,
                self.cadence_gap_s * NS,
                self.rssi_link_db,
                self.reset_min,
                self.reset_share_pct,
                self.min_dwell_s * NS,
                self.rssi_threshold_dbm,
                self.static_min_s * NS,
                self.static_share_pct,
                int(self.assume_randomised),
                int(self.link),
                self.visit_gap_s * NS,
                self.max_devices,
                self.max_fingerprints,
            ],
            np.int64,
        )

    @property
    def horizon_ns(self) -> int:
        """How long after its last frame a chain or an address can still change a figure: the
        longest gap that links (``link_gap_s``, ``cadence_gap_s``) or keeps a visit
        (``visit_gap_s``, which the people stage shares), and one window more for frames that
        come late. Past it they are retired (see
        :class:`~firmware_agent.stages.estimate.Estimator`)."""
        gap = max(self.link_gap_s, self.cadence_gap_s, self.visit_gap_s)
        return (gap + self.window_s) * NS


def _calibration_number(name: str) -> Callable[[str], float]:
    """The reader of ``estimate.calibration_<name>``: a number (empty: 0)."""

    def number(text: str) -> float:
        try:
            return float(text.strip() or "0")
        except ValueError:
            raise ConfigError(
                f"estimate.calibration_{name} must be a number, got {text.strip()!r}"
            ) from None

    return number


@dataclass(frozen=True, slots=True)
class Calibration:
    """A site's linear calibration: people = factor * people_est + offset, and its fit. The
    settings hold none while ``estimate.calibration_factor`` is empty."""

    factor: float = setting(
        "",
        "Site calibration, people = factor * people_est + offset; written by 'footfall-agent "
        "calibrate' (empty: not calibrated, no 'people' in the counts).",
        key="calibration_factor",
        parse=_calibration_number("factor"),
    )
    offset: float = setting(
        "0",
        "Offset (people) of the site calibration.",
        key="calibration_offset",
        parse=_calibration_number("offset"),
    )
    mae: float = setting(  # mean absolute error of the fit on its own windows (people)
        "",
        "Mean absolute error (people) of the calibration on the windows it was fitted on.",
        key="calibration_mae",
        parse=_calibration_number("mae"),
    )
    windows: int = setting(0, "Windows the calibration was fitted on.", key="calibration_windows")

    def __post_init__(self) -> None:
        for name in ("factor", "offset", "mae"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"estimate.calibration_{name} must be a finite number")
        if not 0 < self.factor <= 1000:
            raise ConfigError(
                f"estimate.calibration_factor must be above 0 and at most 1000, got {self.factor}"
            )

    def people(self, people_est: int) -> int:
        """Calibrated people for an estimate: rounded, never below 0."""
        return max(0, math.floor(self.factor * people_est + self.offset + 0.5))


def _link_type(text: str) -> int | None:
    """``source.link_type``: None (auto: from the interface), or a pcap link type."""
    name = text.strip().lower()
    if name == "auto":
        return None
    if name in _LINK_TYPE_NAMES:
        return _LINK_TYPE_NAMES[name]
    if name.isdigit():
        return int(name)
    raise ConfigError(
        f"source.link_type must be 'auto', 'radiotap', '802.11' or a number, got {text!r}"
    )


def hop_channels(text: str) -> tuple[int, ...]:
    """``source.hop_channels`` (and ``footfall-agent survey --channels``): channel numbers."""
    try:
        return tuple(int(c) for c in text.replace(" ", "").split(",") if c)
    except ValueError:
        raise ConfigError(
            f"source.hop_channels must be channel numbers separated by commas such as "
            f"'1,6,11', got {text!r}"
        ) from None


@dataclass(frozen=True, slots=True)
class LiveSettings:
    """How a live interface is read; checked where made."""

    link_type: int | None = setting(  # None: from the interface
        "auto",
        "Link type of a live interface's frames: 'auto' (from the interface: radiotap in "
        "monitor mode), 'radiotap', '802.11' or a pcap link type number.",
        parse=_link_type,
    )
    ring_mb: int = setting(
        8, "Memory (MiB, 1 to 256) of the kernel ring a live interface is read through."
    )
    hop: bool = setting(False, "Hop a live interface over source.hop_channels: 'on' or 'off'.")
    hop_channels: tuple[int, ...] = setting(
        "1,6,11",
        "Channels to hop over, separated by commas (with source.hop = 'on'; needs iw).",
        parse=hop_channels,
    )
    hop_dwell_ms: int = setting(200, "Time (ms, 50 to 60000) spent on each channel.")

    def __post_init__(self) -> None:
        if not 1 <= self.ring_mb <= 256:
            raise ConfigError(f"source.ring_mb must be between 1 and 256 MiB, got {self.ring_mb}")
        if self.link_type is not None and self.link_type not in FILTERED_LINK_TYPES:
            raise ConfigError(
                "source.link_type must be 'auto', 'radiotap', '802.11' or one of "
                f"{sorted(FILTERED_LINK_TYPES)}, got {self.link_type}"
            )
        if not 50 <= self.hop_dwell_ms <= 60_000:
            raise ConfigError(
                f"source.hop_dwell_ms must be between 50 and 60000 ms, got {self.hop_dwell_ms}"
            )
        if self.hop and not self.hop_channels:
            raise ConfigError("source.hop_channels must list at least one channel to hop over")
        bad = [c for c in self.hop_channels if not 1 <= c <= 233]
        if bad:
            raise ConfigError(f"source.hop_channels must be channel numbers 1 to 233, got {bad[0]}")
