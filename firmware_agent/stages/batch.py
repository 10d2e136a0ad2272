"""The batches that flow between the stages, and the constants their columns hold.

capture -> FrameBatch -> parse -> ProbeBatch -> anonymize -> DeviceBatch -> count, estimate,
people -> WindowCounts (with WindowPeople) -> privacy. Each stage imports the types it takes
and makes from here rather than from the stage that makes them, so that no stage imports
another for its types, and a module that only reads batches (the privacy stage, the service,
the tools) loads no numba kernel with them. numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
from numpy.typing import NDArray

from firmware_agent.contract.fields import DWELL_BANDS, DWELL_EDGES_MIN

__all__ = [
    "DWELL_BANDS",
    "DWELL_EDGES_MIN",
    "FRAMES_PER_DEVICE",
    "KIND_FCS_BAD",
    "KIND_MALFORMED",
    "KIND_NO_SA",
    "KIND_PROBE",
    "LINKTYPE_AVS",
    "LINKTYPE_IEEE802_11",
    "LINKTYPE_PPI",
    "LINKTYPE_PRISM",
    "LINKTYPE_RADIOTAP",
    "NS",
    "RSSI_MISSING",
    "SSID_DIRECTED",
    "SSID_NONE",
    "SSID_WILDCARD",
    "DeviceBatch",
    "FrameBatch",
    "ProbeBatch",
    "WindowCounts",
    "WindowPeople",
]

NS = 1_000_000_000

# FrameBatch.link_types: the pcap link types of the 802.11 frames the parser reads.
LINKTYPE_IEEE802_11 = 105
LINKTYPE_PRISM = 119
LINKTYPE_RADIOTAP = 127
LINKTYPE_AVS = 163
LINKTYPE_PPI = 192

# ProbeBatch.kind: what a row is (bits).
KIND_PROBE = 1
KIND_MALFORMED = 2
KIND_FCS_BAD = 4
KIND_NO_SA = 8

# ProbeBatch.ssid: which SSID a probe request asks for.
SSID_NONE = 0
SSID_WILDCARD = 1
SSID_DIRECTED = 2

RSSI_MISSING = -32768  # ProbeBatch.rssi where the radio header has no signal

# WindowCounts and WindowPeople: the dwell bands of ended visits, and their edges (minutes).
FRAMES_PER_DEVICE = 4  # a device's most probe requests in probe_requests_clipped per window


@dataclass(frozen=True, slots=True, eq=False)
class FrameBatch:
    """Frames in one buffer; row i is data[offsets[i]:offsets[i]+lengths[i]].

    A ``transient`` batch lies in its reader's own read buffer (``in_place`` reading): it is
    valid until the next batch is read, the next read overwrites it and closing the reader
    zeroes it. Otherwise the batch owns its buffer and whoever is done with it wipes it.
    """

    data: NDArray[np.uint8]
    offsets: NDArray[np.int64]
    lengths: NDArray[np.int32]  # captured length
    ts_ns: NDArray[np.int64]  # capture time, ns since the Unix epoch
    link_types: NDArray[np.uint16]  # per frame (pcapng may mix interfaces)
    transient: bool = False

    def __len__(self) -> int:
        return len(self.lengths)


@dataclass(frozen=True, slots=True)
class ProbeBatch:
    """Probe requests (and unreadable frames) of one frame batch, one row each.

    ``mac`` holds transmitter addresses in the clear: it lives only until the anonymize
    stage hashes and zeroes it.
    """

    kind: NDArray[np.uint8]
    ts_ns: NDArray[np.int64]
    mac: NDArray[np.uint8]  # shape (n, 6)
    seq: NDArray[np.uint16]
    rssi: NDArray[np.int16]  # dBm, RSSI_MISSING where the radio header has none
    freq_mhz: NDArray[np.uint16]  # 0 where unknown
    ssid: NDArray[np.uint8]  # SSID_NONE / SSID_WILDCARD / SSID_DIRECTED
    fp: NDArray[np.uint64]  # unkeyed model fingerprint, 0 where not parsed
    frames: int  # frames in the source batch, probes or not

    def __len__(self) -> int:
        return int(self.kind.shape[0])


@dataclass(frozen=True, slots=True)
class DeviceBatch:
    """Probe rows with keyed device ids instead of addresses, and only what later stages read
    (no frequency, no SSID kind: least necessary state)."""

    kind: NDArray[np.uint8]
    ts_ns: NDArray[np.int64]
    device: NDArray[np.uint64]  # SipHash-2-4 of the address; 0 where there is none
    randomised: NDArray[np.uint8]  # 1 if the address is locally administered
    seq: NDArray[np.uint16]
    rssi: NDArray[np.int16]
    fp: NDArray[np.uint64]  # keyed model fingerprint; 0 where not parsed
    frames: int

    def __len__(self) -> int:
        return int(self.kind.shape[0])


@dataclass(frozen=True, slots=True)
class WindowPeople:
    """People figures of one closed window; nothing in it identifies a device."""

    window_start: int  # Unix seconds, like WindowCounts.window_start
    arrivals: int
    passersby: int
    visits_ended: int
    dwell_minutes: dict[str, int]  # DWELL_BANDS -> visits ended in the window
    occupancy_mean: float  # people, at most 2 decimals
    occupancy_peak: int


@dataclass(frozen=True, slots=True)
class WindowCounts:
    """What one closed window says about footfall; nothing in it identifies a device.

    The counter's own figures are per device id (address): ``devices`` and
    ``devices_randomised`` leave the agent as diagnostics; ``visitors``, ``passersby``,
    ``visits_ended``, ``dwell_minutes`` and ``devices_epoch`` are per address and stay on the
    agent (the evaluation compares them with the people figures). The people figures come
    from the people stage (``figures``, see firmware_agent/stages/people.py).
    """

    window_start: int  # Unix seconds, UTC, a multiple of window_s
    window_s: int
    probe_requests: int
    malformed: int
    late_frames: int
    devices: int
    devices_randomised: int
    visitors: int
    passersby: int
    visits_ended: int
    dwell_minutes: dict[str, int]  # DWELL_BANDS -> visits ended in the window
    devices_epoch: int
    probe_requests_clipped: int
    # Filled in by the pipeline from the estimate and people stages (None: not estimated).
    people_est: int | None = None  # devices present, random addresses linked
    static_excluded: int | None = None  # static devices left out of people_est
    figures: WindowPeople | None = None  # people figures (occupancy calibrated if `calibrated`)
    calibrated: bool = False  # occupancy went through the site's calibration
    # Filled in by the pipeline: no frame at all in a window while the sensor normally hears
    # some (firmware_agent/stages/pipeline.py, NORMAL_FRAMES): a gap, not an empty venue.
    no_data: bool = False
    # Filled in by the pipeline: whether the sensor normally hears at this window, so that a
    # silent window would be no data (the privacy stage applies it to noised frame counts).
    silence_is_gap: bool = False
    # Strict mode, filled in by the pipeline (PrivacyPolicy.anonymise): the width the window's
    # ids were counted at, and the share of its devices that share their value with another.
    id_bits: int | None = None
    shared: float | None = None

    @property
    def frames(self) -> int:
        """Frames heard in the window: probe requests, malformed and late ones."""
        return self.probe_requests + self.malformed + self.late_frames

    def as_dict(self) -> dict[str, object]:
        """The window as counts v2 fields, before privacy (which picks what leaves): under
        ``no_data`` every people and device figure is None."""
        start = datetime.fromtimestamp(self.window_start, UTC)
        gap = self.no_data
        out: dict[str, object] = {
            "window_start": start.isoformat().replace("+00:00", "Z"),
            "window_s": self.window_s,
            "no_data": gap,
            "probe_requests": self.probe_requests,
            "malformed": self.malformed,
            "late_frames": self.late_frames,
            "devices": None if gap else self.devices,
            "devices_randomised": None if gap else self.devices_randomised,
        }
        f = self.figures
        if f is not None:
            out |= {
                "arrivals": None if gap else f.arrivals,
                "passersby": None if gap else f.passersby,
                "visits_ended": None if gap else f.visits_ended,
                "dwell_minutes": {band: None if gap else n for band, n in f.dwell_minutes.items()},
                "occupancy_mean": None if gap else f.occupancy_mean,
                "occupancy_peak": None if gap else f.occupancy_peak,
                "calibrated": self.calibrated,
            }
        if self.static_excluded is not None:
            out["static_excluded"] = None if gap else self.static_excluded
        return out
