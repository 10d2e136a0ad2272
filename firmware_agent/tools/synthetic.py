"""Synthetic probe-request captures with known ground truth.

Real captures carry bystanders' addresses and cannot be shipped, so the demo capture
bundled with the package (``firmware_agent/data/sample.pcap``) and the benchmarks'
million-frame captures are made here. They are built to be awkward in the ways real
ones are:

* every physical device has one of eight models whose information elements differ like
  real phones, laptops and printers (rates, DS parameter set, HT/VHT/HE capabilities,
  extended capabilities, WPS, Apple, Broadcom and Wi-Fi Alliance vendor elements);
* devices are passers-by (seconds to a minute, weak signal), visitors (5-90 minutes,
  stronger signal) or static (PCs and printers present throughout, global addresses);
* they probe in bursts of 1-4 frames on channels 1/6/11, mostly with the wildcard SSID,
  some also directed at a remembered network; the 12-bit sequence number counts on
  across bursts and wraps at 4096;
* randomising devices take a new locally administered address every few minutes and keep
  their sequence counter, global devices keep one vendor-like address;
* about 1 % of frames are written a few hundred milliseconds late, as when the outputs of
  several sniffers are merged, so timestamps occasionally go backwards;
* the persons' phones (:func:`write_people_capture`) jump in signal as real phones do. On the
  nine one-phone captures ``baccichet_*`` of ../shared/data/pcaps (222 bursts, 194 of them
  begun by a new address; bench/bench_signal.py), a new address's first frame lies p50 2.7,
  p90 10.7, p99 27.6 dB from its phone's running level (EWMA 1/4 over bursts), over 8 dB in 14
  % of those bursts (0-67 % by phone, 17-67 % in five of the eight with new addresses). Most
  of it is one frame heard twice, by the neighbouring channel's radio 15-60 dB weaker, the
  weaker copy sometimes written first: with the strongest copy alone, 2.1 / 5.7 / 10.4 dB and 5
  %. Within a burst 17 % of the steps from one frame to the next are over 15 dB (1 % with one
  copy). A sensor hears what it hears, so the model has it: a burst lies about the phone's
  mean by a Laplace offset (scale 1.5 dB), a frame about its burst's by a normal one (sd 2 dB),
  and 6 % of frames are heard 15-45 dB weaker (uniform). That gives 2.9 / 10.1 / 34.3 dB and
  14 % over 8 dB, steps over 15 dB 11 %; the normal offsets before (sd 3 dB a burst, 1.5 dB a
  frame) gave 2.5 / 6.0 / 9.4 dB, 3 %, and no such step. (A sensor of one radio on one
  channel, as the lab's, hears no copies: there the devices that keep a global address, mostly
  machines, give 3.2 / 7.7 / 13.3 dB and 9 %; a Laplace offset of scale 3 dB alone would give
  2.8 / 7.9 / 16.3 dB and 10 %, and the same worst hour and band on docs/ACCURACY.md's people
  captures.) The means stay where they were
  (visitors -70..-50 dBm, passers-by -92..-80): the captures' phones, at medians of -66 to
  -23 dBm, one each, say nothing of a venue's spread.

Speed comes from building each (model, SSID) frame once with scapy and assembling all
records with numpy: a gather from the template pool, then the per-frame fields (timestamps,
TSFT, channel, signal, transmitter address, sequence control, DS channel) are patched in.
The optional FCS is vectorised too: CRC-32 is affine over GF(2), so it is the template's
CRC XOR one precomputed table entry per patched byte. Output depends only on the spec
(and the numpy version); ``python -m firmware_agent.tools.synthetic --sample`` rewrites the
bundled sample byte for byte.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import BinaryIO

import numpy as np
from numpy.typing import NDArray

from firmware_agent import BUNDLED_SAMPLE
from firmware_agent.contract.errors import ConfigError
from firmware_agent.contract.fields import DWELL_BANDS

I64 = NDArray[np.int64]
U8 = NDArray[np.uint8]


_CHANNELS = np.array([1, 6, 11], dtype=np.int64)
_FREQS = np.array([2412, 2437, 2462], dtype=np.int64)
_SSIDS = (b"CafeGuest", b"HomeNet", b"TrainWiFi", b"Office-2G", b"Library Free WiFi", b"Hotel")
_PASSER_SHARE = 0.55  # of the devices that come and go
_LATE_SHARE = 0.01  # frames written a few hundred ms late
_DIRECTED_SHARE = 0.25  # devices that also probe for a remembered network
_CHUNK = 1 << 15  # frames assembled per write
_US = 1_000_000

_ADDR2_SC = (*range(10, 16), 22, 23)  # 802.11 header bytes patched per frame
_HDR = 16  # pcap record header
_RADIOTAP = 24  # TSFT, Flags, Rate, Channel, dBm_AntSignal, Antenna


@dataclass(frozen=True, slots=True)
class SyntheticSpec:
    """What to generate. ``static_devices`` and the randomised ones are among ``devices``."""

    frames: int = 20_000
    devices: int = 200
    randomised_share: float = 0.5
    start_ns: int = 1_709_625_600 * 10**9  # Tuesday 2024-03-05 08:00 UTC (floored to µs)
    duration_s: float = 4 * 3600
    seed: int = 1
    link_type: int = 127
    fcs: bool = False
    static_devices: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.devices < 1 or self.frames < self.devices:
            problems.append("need 1 <= devices <= frames (every device sends a frame)")
        if not 0.0 <= self.randomised_share <= 1.0:
            problems.append("randomised_share must be within [0, 1]")
        if not 0 <= self.static_devices <= self.devices:
            problems.append("static_devices must be within [0, devices]")
        elif self.randomised_devices > self.devices - self.static_devices:
            problems.append("static devices use global addresses: too few left to randomise")
        if not 60 <= self.duration_s <= 366 * 86400:
            problems.append("duration_s must be within [60 s, a year]")
        if not 0 <= self.start_ns < (2**32 - 366 * 86400) * 10**9:
            problems.append("start_ns must fit pcap's 32-bit seconds")
        if self.link_type not in (105, 127):
            problems.append("link_type must be 105 (802.11) or 127 (radiotap)")
        elif self.fcs and self.link_type != 127:
            problems.append("fcs needs link_type 127: only radiotap's Flags can announce it")
        if problems:
            raise ConfigError("bad synthetic spec: " + "; ".join(problems))

    @property
    def randomised_devices(self) -> int:
        """How many devices probe from random, locally administered addresses."""
        return round(self.randomised_share * self.devices)


@dataclass(frozen=True, slots=True)
class SyntheticTruth:
    """What was written, counted from the frames themselves."""

    frames: int
    devices: int
    addresses: int
    addresses_local: int
    wildcard_probes: int
    directed_probes: int
    dbm_min: int | None
    dbm_max: int | None
    first_ts_ns: int  # earliest timestamp (not necessarily the first record)
    last_ts_ns: int  # latest timestamp


SAMPLE_SPEC = SyntheticSpec(
    frames=12_000,
    devices=150,
    randomised_share=0.6,
    duration_s=3 * 3600,
    seed=2024,
    static_devices=6,
)


@dataclass(frozen=True, slots=True)
class _Model:
    ouis: tuple[int, ...]
    rate_mbps: int  # 1 (CCK) or 6 (OFDM)
    elements: tuple[tuple[int, str], ...]  # (ID, info hex) after the SSID; ID 3 is patched
    mobile_weight: float  # share among devices that come and go
    randomises: bool
    static: bool  # can be a device present all the time


_HT_APPLE = "2d401bff" + "00" * 22
_HE_APPLE = "23010808180080203002000d009f08000000fdfffdff391cc7711c07"


def _wps(category: int) -> str:
    """A WPS (Microsoft OUI, type 4) element: version, request type, config methods, primary
    device type (computer 1, printer 3), RF bands, association state, config error, device
    password ID, Wi-Fi Alliance vendor extension (version 2.0)."""
    return (
        f"0050f204104a000110103a00010010080002200810540008{category:04x}0050f2040001"
        "103c0001011002000200001009000200001012000200001049000600372a000120"
    )


_MODELS = (
    _Model(  # recent iPhone
        ouis=(0xF01898, 0xA483E7),
        rate_mbps=1,
        elements=(
            (1, "82848b96"),
            (50, "0c1218243048606c"),
            (3, ""),
            (45, _HT_APPLE),
            (127, "0000080400000040000020"),
            (255, _HE_APPLE),
        ),
        mobile_weight=0.26,
        randomises=True,
        static=False,
    ),
    _Model(  # older iPhone
        ouis=(0xF01898, 0x3C22FB),
        rate_mbps=1,
        elements=(
            (1, "82848b96"),
            (50, "0c1218243048606c"),
            (3, ""),
            (45, _HT_APPLE),
            (127, "0000080400000040"),
            (221, "0017f20a00010400000000"),
            (221, "00101802000010000000"),
        ),
        mobile_weight=0.10,
        randomises=True,
        static=False,
    ),
    _Model(  # Samsung flagship
        ouis=(0x8CF5A3, 0x5C497D),
        rate_mbps=1,
        elements=(
            (1, "82848b96"),
            (50, "0c1218243048606c"),
            (3, ""),
            (45, "2d001bffff" + "00" * 21),
            (127, "04004880014000400021"),
            (255, "020014"),
            (255, "23010808180080203002800d019e000c0000f5fff5ff391cc7711c07"),
            (221, "00904c0408bf0c7678910ffaff0000faff0020"),
            (221, "0050f208001200"),
            (221, "00101802000010000000"),
            (221, "506f9a16030102650101"),
        ),
        mobile_weight=0.14,
        randomises=True,
        static=False,
    ),
    _Model(  # Qualcomm Android
        ouis=(0x94652D, 0x64A2F9),
        rate_mbps=1,
        elements=(
            (1, "02040b16"),
            (50, "0c1218243048606c"),
            (3, ""),
            (45, "ef0113ffff" + "00" * 19 + "0100"),
            (127, "00000a8200400000000120"),
            (191, "92f19033faff6203faff6203"),
            (221, "0050f208002800"),
            (255, "2303010002400006304c090d008008020000fafffaff191cc771"),
            (221, "506f9a16030101650101"),
        ),
        mobile_weight=0.10,
        randomises=True,
        static=False,
    ),
    _Model(  # MediaTek Android
        ouis=(0x3C286D, 0x64098C),
        rate_mbps=1,
        elements=(
            (1, "02040b160c121824"),
            (50, "3048606c"),
            (3, ""),
            (45, "e70917ffff" + "00" * 21),
            (127, "0400c880014000000000"),
            (221, "506f9a16030103"),
        ),
        mobile_weight=0.20,
        randomises=True,
        static=False,
    ),
    _Model(  # tablet
        ouis=(0x00E0FC, 0x48DB50),
        rate_mbps=1,
        elements=(
            (1, "82848b0c12961824"),
            (3, ""),
            (50, "3048606c"),
            (45, "6f0117ff" + "00" * 11 + "01" + "00" * 6 + "04060a00"),
            (127, "0100008000000040"),
        ),
        mobile_weight=0.10,
        randomises=True,
        static=False,
    ),
    _Model(  # Windows laptop
        ouis=(0x3CA9F4, 0x7C5CF8),
        rate_mbps=6,
        elements=(
            (1, "0c121824"),
            (50, "3048606c"),
            (3, ""),
            (45, "ef0917ffff" + "00" * 21),
            (127, "0400000000000040"),
            (191, "b2798933faff0c03faff0c03"),
            (221, _wps(1)),
        ),
        mobile_weight=0.10,
        randomises=False,
        static=True,
    ),
    _Model(  # network printer
        ouis=(0x3CD92B, 0x001599),
        rate_mbps=1,
        elements=(
            (1, "82848b96"),
            (50, "0c1218243048606c"),
            (3, ""),
            (45, "2c0103ff" + "00" * 22),
            (221, _wps(3)),
        ),
        mobile_weight=0.0,
        randomises=False,
        static=True,
    ),
)


@dataclass(frozen=True, slots=True)
class _Templates:
    """Every (model, SSID) record, concatenated, with the patched fields zeroed."""

    pool: U8
    start: I64
    length: I64
    ds_pos: I64  # DS channel byte, from the record start
    fcs_base: NDArray[np.uint32]  # CRC-32 of the frame with patched bytes zero
    fcs_tables: NDArray[np.uint32]  # [template, patched byte, value] -> CRC contribution


@functools.cache
def _build_templates(link_type: int, fcs: bool) -> _Templates:
    from scapy.layers.dot11 import (  # noqa: PLC0415 (scapy is slow to import)
        Dot11,
        Dot11Elt,
        Dot11EltDSSSet,
        Dot11EltRates,
        Dot11EltVendorSpecific,
        Dot11ProbeReq,
        RadioTap,
    )

    records, ds_pos, bases, tables = [], [], [], []
    for model in _MODELS:
        body = Dot11ProbeReq()
        for ident, info_hex in model.elements:
            info = bytes.fromhex(info_hex)
            if ident in (1, 50):
                body /= Dot11EltRates(ID=ident, rates=list(info))
            elif ident == 3:
                body /= Dot11EltDSSSet(channel=0)
            elif ident == 221:
                body /= Dot11EltVendorSpecific(oui=int.from_bytes(info[:3]), info=info[3:])
            else:
                body /= Dot11Elt(ID=ident, info=info)
        for ssid in (b"", *_SSIDS):
            frame = bytes(
                Dot11(
                    type=0,
                    subtype=4,
                    addr1="ff:ff:ff:ff:ff:ff",
                    addr2="00:00:00:00:00:00",
                    addr3="ff:ff:ff:ff:ff:ff",
                    SC=0,
                )
                / Dot11ProbeReq()
                / Dot11Elt(ID=0, info=ssid)
                / body.payload
            )
            pos, frame_ds = 24, -1
            while pos < len(frame):  # walk the elements to the DS parameter set
                if frame[pos] == 3:
                    frame_ds = pos + 2
                pos += 2 + frame[pos + 1]
            radio = b""
            if link_type == 127:
                radio = bytes(
                    RadioTap(
                        present="TSFT+Flags+Rate+Channel+dBm_AntSignal+Antenna",
                        mac_timestamp=0,
                        Flags="FCS" if fcs else 0,
                        Rate=model.rate_mbps,
                        ChannelFrequency=0,
                        ChannelFlags="CCK+2GHz" if model.rate_mbps == 1 else "OFDM+2GHz",
                        dBm_AntSignal=0,
                        Antenna=0,
                    )
                )
                if len(radio) != _RADIOTAP:  # the kernels' offsets assume this size
                    raise RuntimeError(
                        f"scapy built a {len(radio)}-byte radiotap header, not {_RADIOTAP}"
                    )
            if fcs:
                bases.append(zlib.crc32(frame))
                tables.append(_crc_tables(len(frame), (*_ADDR2_SC, frame_ds)))
            size = len(radio) + len(frame) + 4 * fcs
            header = np.array([0, 0, size, size], dtype="<u4").tobytes()
            records.append(header + radio + frame + b"\0" * (4 * fcs))
            ds_pos.append(_HDR + len(radio) + frame_ds)
    length = np.array([len(r) for r in records], dtype=np.int64)
    return _Templates(
        pool=np.frombuffer(b"".join(records), dtype=np.uint8),
        start=np.cumsum(length) - length,
        length=length,
        ds_pos=np.array(ds_pos, dtype=np.int64),
        fcs_base=np.array(bases, dtype=np.uint32),
        fcs_tables=np.array(tables, dtype=np.uint32),
    )


def _crc_tables(size: int, positions: Sequence[int]) -> list[list[int]]:
    """For each position, the CRC-32 change caused by each byte value there (linear part)."""
    zero = zlib.crc32(bytes(size))
    values = np.arange(256)
    out = []
    for pos in positions:
        table = np.zeros(256, dtype=np.uint32)
        for bit in range(8):
            probe = bytearray(size)
            probe[pos] = 1 << bit
            table ^= np.where((values >> bit) & 1, zlib.crc32(probe) ^ zero, 0).astype(np.uint32)
        out.append(table.tolist())
    return out


def _put(buf: U8, pos: I64, value: I64, width: int, *, big: bool = False) -> None:
    """Write ``width``-byte integers at ``pos`` (little-endian unless ``big``)."""
    for k in range(width):
        shift = 8 * (width - 1 - k if big else k)
        buf[pos + k] = (value >> shift) & 0xFF


@dataclass(frozen=True, slots=True)
class _Frames:
    """Per-frame fields, in file order."""

    ts_us: I64  # since 1970
    tsft_us: I64
    template: I64
    addr: I64
    seq: I64
    channel: I64  # index into _CHANNELS
    dbm: I64
    directed: NDArray[np.bool_]
    person: I64  # who sent it: a device or person index (-1: a people capture's static device)


def _simulate(spec: SyntheticSpec) -> _Frames:
    rng = np.random.default_rng(spec.seed)
    n, d, n_static = spec.frames, spec.devices, spec.static_devices
    dur = int(spec.duration_s * _US)
    static = np.arange(d) < n_static

    # Who: randomising devices among the mobile ones, then a model for each.
    randomised = np.zeros(d, dtype=bool)
    randomised[rng.choice(np.arange(n_static, d), spec.randomised_devices, replace=False)] = True
    mobile_w = np.array([m.mobile_weight for m in _MODELS])
    weights = np.where(randomised[:, None], mobile_w * [m.randomises for m in _MODELS], mobile_w)
    weights[static] = [float(m.static) for m in _MODELS]
    cumulative = np.cumsum(weights / weights.sum(axis=1, keepdims=True), axis=1)
    model = np.minimum((cumulative < rng.random(d)[:, None]).sum(axis=1), len(_MODELS) - 1)

    # When and how close: passers-by, visitors, static devices.
    passer = ~static & (rng.random(d) < _PASSER_SHARE)
    dwell = np.where(
        passer, rng.uniform(5, 60, d), np.exp(rng.uniform(np.log(300), np.log(5400), d))
    )
    dwell_us = np.where(static, dur, np.minimum((dwell * _US).astype(np.int64), dur))
    arrive = (rng.random(d) * (dur - dwell_us)).astype(np.int64)
    mean_dbm = np.where(
        passer,
        rng.uniform(-92, -78, d),
        np.where(static, rng.uniform(-75, -45, d), rng.uniform(-82, -50, d)),
    )
    activity = rng.lognormal(0.0, 0.35, d) * np.where(static, 0.25, 1.0)
    share = dwell_us * activity
    counts = 1 + rng.multinomial(n - d, share / share.sum())
    dev = np.repeat(np.arange(d), counts)
    dev_first = np.cumsum(counts) - counts

    # Bursts of 1-4 frames, cut at device boundaries, spread over each device's stay.
    sizes = rng.choice(np.arange(1, 5), size=n, p=[0.3, 0.35, 0.2, 0.15])
    starts = np.cumsum(sizes) - sizes
    first = np.zeros(n, dtype=bool)
    first[starts[starts < n]] = True
    first[dev_first] = True
    burst = np.cumsum(first) - 1
    burst_first = np.flatnonzero(first)
    rank = np.arange(n) - burst_first[burst]
    burst_dev = dev[burst_first]
    n_bursts = len(burst_first)
    clock = np.cumsum(rng.uniform(0.5, 1.5, n_bursts))  # jittered gaps, scaled to each stay
    dev_bursts = np.bincount(burst_dev, minlength=d)
    dev_last = np.cumsum(dev_bursts) - 1
    before = np.concatenate(([0.0], clock))[dev_last - dev_bursts + 1]
    span = clock[dev_last] - before + rng.uniform(0.5, 1.5, d)
    frac = (clock - before[burst_dev]) / span[burst_dev]
    burst_t = arrive[burst_dev] + (frac * (dwell_us[burst_dev] - _US // 2)).astype(np.int64)
    spacing = rng.integers(10_000, 50_000, n_bursts)
    t = burst_t[burst] + rank * spacing[burst] + rng.integers(0, 2_000, n)

    # Addresses: random ones change every few minutes (per burst), global ones never.
    period = rng.uniform(3, 15, d) * 60 * _US
    phase = rng.random(d) * period
    epoch = np.where(  # whole rotation periods since arrival
        randomised[burst_dev],
        (burst_t - arrive[burst_dev] + phase[burst_dev]) // period[burst_dev],
        0,
    )
    pairs, pair_of_burst = np.unique(
        burst_dev * (1 << 20) + epoch.astype(np.int64), return_inverse=True
    )
    pair_dev = pairs >> 20
    oui = np.array([rng.choice(_MODELS[m].ouis) for m in model], dtype=np.int64)
    global_addr = _distinct(rng, oui, 24)
    first_octet = (rng.integers(0, 64, len(pairs)) << 2) | 0x02  # locally administered, unicast
    addr = np.where(randomised[pair_dev], _distinct(rng, first_octet, 40), global_addr[pair_dev])

    # Sequence numbers count on across bursts (frames sent on channels not heard), wrap at 4096.
    ssid = np.where(rng.random(d) < _DIRECTED_SHARE, rng.integers(1, len(_SSIDS) + 1, d), 0)
    directed = (ssid[dev] > 0) & (rank % 2 == 1)
    channel = (rng.integers(0, 3, n_bursts)[burst] + rank) % 3
    dbm = np.clip(
        np.round(mean_dbm[dev] + rng.normal(0, 3, n_bursts)[burst] + rng.normal(0, 1.5, n)),
        -96,
        -30,
    )
    order = np.lexsort((t, dev))  # keep each device's counter in time order even if bursts overlap
    inc = np.where(rank[order] == 0, rng.integers(1, 9, n), 1)
    counter = np.cumsum(inc)
    seq = (rng.integers(0, 4096, d)[dev] + counter - counter[dev_first][dev]) % 4096
    seq_in_frame_order = np.empty(n, dtype=np.int64)
    seq_in_frame_order[order] = seq

    late = rng.random(n) < _LATE_SHARE
    file_order = np.argsort(t + late * rng.integers(100_000, 500_000, n), kind="stable")
    tsf0 = int(rng.integers(10**9, 10**12))
    return _Frames(
        ts_us=(spec.start_ns // 1000 + t)[file_order],
        tsft_us=(tsf0 + t)[file_order],
        template=(model[dev] * (len(_SSIDS) + 1) + np.where(directed, ssid[dev], 0))[file_order],
        addr=addr[pair_of_burst[burst]][file_order],
        seq=seq_in_frame_order[file_order],
        channel=channel[file_order],
        dbm=dbm.astype(np.int64)[file_order],
        directed=directed[file_order],
        person=dev[file_order],
    )


def _distinct(rng: np.random.Generator, prefix: I64, bits: int) -> I64:
    """``prefix`` followed by ``bits`` random bits, redrawn until all differ (so truth is exact)."""
    out = (prefix << bits) | rng.integers(0, 1 << bits, len(prefix))
    while True:
        _, first = np.unique(out, return_index=True)
        dup = np.setdiff1d(np.arange(len(out)), first)
        if not len(dup):
            return out
        out[dup] = (prefix[dup] << bits) | rng.integers(0, 1 << bits, len(dup))


def write_synthetic_capture(path: str | os.PathLike[str], spec: SyntheticSpec) -> SyntheticTruth:
    """Write a pcap of probe requests as ``spec`` describes; return what it holds."""
    frames = _simulate(spec)
    _write(path, frames, spec.link_type, spec.fcs)
    written = np.unique(frames.addr)
    radiotap = spec.link_type == 127
    return SyntheticTruth(
        frames=spec.frames,
        devices=spec.devices,
        addresses=len(written),
        addresses_local=int(np.count_nonzero(written & (1 << 41))),
        wildcard_probes=int(np.count_nonzero(~frames.directed)),
        directed_probes=int(np.count_nonzero(frames.directed)),
        dbm_min=int(frames.dbm.min()) if radiotap else None,
        dbm_max=int(frames.dbm.max()) if radiotap else None,
        first_ts_ns=int(frames.ts_us.min()) * 1000,
        last_ts_ns=int(frames.ts_us.max()) * 1000,
    )


def _write(path: str | os.PathLike[str], frames: _Frames, link_type: int, fcs: bool) -> None:
    """A pcap file of ``frames``."""
    with open(path, "wb") as fh:
        _write_header(fh, link_type)
        _write_records(fh, frames, link_type, fcs)


def _write_header(fh: BinaryIO, link_type: int) -> None:
    fh.write(np.array([0xA1B2C3D4, 0x00040002, 0, 0, 65535, link_type], "<u4").tobytes())


def _write_records(fh: BinaryIO, frames: _Frames, link_type: int, fcs: bool) -> None:
    """Assemble every record from the template pool and patch in the per-frame fields."""
    tpl = _build_templates(link_type, fcs)
    d11 = _HDR + (_RADIOTAP if link_type == 127 else 0)
    for lo in range(0, len(frames.ts_us), _CHUNK):
        sl = slice(lo, lo + _CHUNK)
        tt = frames.template[sl]
        lens = tpl.length[tt]
        off = np.cumsum(lens) - lens
        buf = tpl.pool[np.repeat(tpl.start[tt] - off, lens) + np.arange(int(lens.sum()))]
        ts = frames.ts_us[sl]
        _put(buf, off, ts // _US, 4)
        _put(buf, off + 4, ts % _US, 4)
        chan = frames.channel[sl]
        if link_type == 127:
            _put(buf, off + _HDR + 8, frames.tsft_us[sl], 8)
            _put(buf, off + _HDR + 18, _FREQS[chan], 2)
            _put(buf, off + _HDR + 22, frames.dbm[sl] & 0xFF, 1)
        _put(buf, off + d11 + 10, frames.addr[sl], 6, big=True)
        _put(buf, off + d11 + 22, frames.seq[sl] << 4, 2)
        _put(buf, off + tpl.ds_pos[tt], _CHANNELS[chan], 1)
        if fcs:
            crc = tpl.fcs_base[tt].copy()
            patched = [off + d11 + p for p in _ADDR2_SC] + [off + tpl.ds_pos[tt]]
            for k, pos in enumerate(patched):
                crc ^= tpl.fcs_tables[tt, k, buf[pos]]
            _put(buf, off + lens - 4, crc.astype(np.int64), 4)
        fh.write(buf.data)


# --- persons with known visits ------------------------------------------------------------

_PER_BURST_MODELS = (0, 3, 4)  # draw a new address and sequence number for every burst
_ROTATING_MODELS = (1, 2, 5)  # a new address every few minutes, the counter goes on
_GLOBAL_MODELS = (1, 2, 5, 6)  # one vendor address throughout
_BANDS_MIN = (5, 15, 30, 60)  # the dwell bands' edges (counts v2's dwell_minutes)
_BURST_DB = 1.5  # Laplace scale of a burst's signal about its phone's mean (module docstring)
_FRAME_DB = 2.0  # sd of a frame's about its burst's
_OFF_CHANNEL_SHARE = 0.06  # frames heard far weaker (as by a neighbouring channel's radio)
_OFF_CHANNEL_DB = (15.0, 45.0)  # by this much (uniform)


@dataclass(frozen=True, slots=True)
class PeopleSpec:
    """Persons who come in, stay and leave (visitors) or walk past (passers-by), one phone
    each. ``rates`` are visitors arriving per hour, one value per hour since ``start_ns``,
    repeated (one value: a constant rate; 24: a daily profile; 168: a weekly one)."""

    start_ns: int = 1_709_625_600 * 10**9  # Tuesday 2024-03-05 08:00 UTC
    duration_s: int = 4 * 3600
    rates: tuple[float, ...] = (30.0,)
    passersby_per_visitor: float = 2.0
    dwell_min: tuple[float, float] = (2.0, 120.0)  # visitors' stay, log-uniform (minutes)
    burst_every_s: tuple[float, float] = (15.0, 55.0)  # between a phone's probe bursts
    per_burst_share: float = 0.1  # phones with a new address (and counter) every burst
    rotating_share: float = 0.5  # phones with a new address every 3-15 minutes
    seed: int = 1
    link_type: int = 127
    static_devices: int = 0  # next door, left on (a printer, a TV): weak, global, always heard
    silent_ns: tuple[int, int] | None = None  # [start, end): the sensor heard nothing

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.static_devices <= 100:
            problems.append("static_devices must be within [0, 100]")
        if not self.rates or min(self.rates) < 0 or max(self.rates) > 10_000:
            problems.append("rates must be 1 or more arrivals per hour within [0, 10000]")
        if not 0 <= self.passersby_per_visitor <= 100:
            problems.append("passersby_per_visitor must be within [0, 100]")
        if not 0 < self.dwell_min[0] <= self.dwell_min[1] <= 24 * 60:
            problems.append("dwell_min must be 0 < low <= high <= 1440 minutes")
        if not 1 <= self.burst_every_s[0] <= self.burst_every_s[1] <= 600:
            problems.append("burst_every_s must be 1 <= low <= high <= 600 seconds")
        shares = (self.per_burst_share, self.rotating_share)
        if min(shares) < 0 or sum(shares) > 1:
            problems.append("per_burst_share and rotating_share must be >= 0, summing to <= 1")
        if not 3600 <= self.duration_s <= 366 * 86400 or self.duration_s % 3600:
            problems.append("duration_s must be whole hours, from 1 hour to a year")
        if not 0 <= self.start_ns < (2**32 - 366 * 86400) * 10**9 or self.start_ns % 10**9:
            problems.append("start_ns must be whole seconds that fit pcap's 32-bit seconds")
        if self.link_type not in (105, 127):
            problems.append("link_type must be 105 (802.11) or 127 (radiotap)")
        if problems:
            raise ConfigError("bad people spec: " + "; ".join(problems))


@dataclass(frozen=True, slots=True)
class PeopleTruth:
    """Who was there: each person's arrival and departure (ns) and whether they came in."""

    arrive_ns: I64
    depart_ns: I64
    visitor: NDArray[np.bool_]
    frames: int
    start_ns: int
    end_ns: int
    phone: I64  # each person's: 0 a new address every burst, 1 rotating, 2 a global address
    person: I64  # each frame written's person (-1: a static device): for diagnostics

    def hourly(self) -> list[dict[str, object]]:
        """Per hour: visitors who arrived, passers-by, visits that ended (by departure,
        those still in at the end leave then) with their dwell bands, and the people
        present on average (visitors only)."""
        hour = 3600 * 10**9
        v = self.visitor
        arrive, depart = self.arrive_ns[v], self.depart_ns[v]
        minutes = (depart - arrive) // (60 * 10**9)
        band = np.searchsorted(np.array(_BANDS_MIN), minutes, side="right")
        out: list[dict[str, object]] = []
        for start in range(self.start_ns, self.end_ns, hour):
            end = start + hour
            ended = (depart >= start) & (depart < end)
            if end == self.end_ns:
                ended |= depart == end
            overlap = np.clip(np.minimum(depart, end) - np.maximum(arrive, start), 0, None)
            out.append(
                {
                    "hour_start": start // 10**9,
                    "arrivals": int(np.count_nonzero((arrive >= start) & (arrive < end))),
                    "passersby": int(
                        np.count_nonzero(~v & (self.arrive_ns >= start) & (self.arrive_ns < end))
                    ),
                    "visits_ended": int(np.count_nonzero(ended)),
                    "dwell_minutes": {
                        name: int(np.count_nonzero(ended & (band == b)))
                        for b, name in enumerate(DWELL_BANDS)
                    },
                    "occupancy_mean": round(float(overlap.sum()) / hour, 2),
                }
            )
        return out


def _people(spec: PeopleSpec) -> tuple[_Frames, PeopleTruth]:
    rng = np.random.default_rng(spec.seed)
    end_ns = spec.start_ns + spec.duration_s * 10**9
    hours = spec.duration_s // 3600
    rates = np.resize(np.array(spec.rates, np.float64), hours)
    # Who comes: Poisson arrivals per hour, uniform within it; passers-by likewise.
    visitors = rng.poisson(rates)
    passers = rng.poisson(rates * spec.passersby_per_visitor)
    count = visitors + passers
    hour_of = np.repeat(np.arange(hours), count)
    visitor = np.concatenate(
        [np.repeat([True, False], [a, b]) for a, b in zip(visitors, passers, strict=True)]
        or [np.zeros(0, bool)]
    )
    n = len(hour_of)
    arrive = spec.start_ns + (hour_of * 3600 + rng.random(n) * 3600) * 1e9
    lo, hi = np.log(spec.dwell_min[0]), np.log(spec.dwell_min[1])
    stay_s = np.where(visitor, np.exp(rng.uniform(lo, hi, n)) * 60, rng.uniform(5, 40, n))
    arrive_ns = arrive.astype(np.int64)
    depart_ns = np.minimum(arrive_ns + (stay_s * 1e9).astype(np.int64), end_ns)
    # Which phone: a per-burst randomiser, a rotating one, or a global address.
    kind = np.searchsorted(
        np.cumsum([spec.per_burst_share, spec.rotating_share]), rng.random(n), side="right"
    )
    models = (_PER_BURST_MODELS, _ROTATING_MODELS, _GLOBAL_MODELS)
    model = np.array([rng.choice(models[k]) for k in kind], np.int64)
    mean_dbm = np.where(visitor, rng.uniform(-70, -50, n), rng.uniform(-92, -80, n))
    # Bursts: the first within one interval of arriving, then one every burst_every_s.
    a, b = spec.burst_every_s
    span = ((depart_ns - arrive_ns) / 1e9).astype(np.float64)
    most = int(np.ceil(span.max() / a)) + 1 if n else 1
    steps = rng.uniform(a, b, (n, most))
    steps[:, 0] *= rng.random(n)
    offsets = np.cumsum(steps, axis=1)
    inside = offsets < span[:, None]
    inside[:, 0] = True  # every phone is heard at least once
    person, step = np.nonzero(inside)
    last = span[person] - 0.2  # a burst lasts at most 150 ms: all of it before leaving
    burst_t = arrive_ns[person] + (np.minimum(offsets[person, step], last) * 1e9).astype(np.int64)
    bursts = len(person)
    size = rng.choice(np.arange(1, 5), bursts, p=[0.3, 0.35, 0.2, 0.15])
    burst = np.repeat(np.arange(bursts), size)
    rank = np.arange(len(burst)) - np.repeat(np.cumsum(size) - size, size)
    who = person[burst]
    t_ns = burst_t[burst] + rank * rng.integers(10_000_000, 50_000_000, bursts)[burst]
    # Addresses: per burst, per rotation period since arriving, or one for good.
    period_ns = rng.uniform(3, 15, n) * 60e9
    era = np.where(
        kind[who] == 0,
        burst,
        np.where(kind[who] == 1, ((burst_t[burst] - arrive_ns[who]) // period_ns[who]), 0),
    ).astype(np.int64)
    pairs, pair_of = np.unique(who * (1 << 32) + era, return_inverse=True)
    pair_who = pairs >> 32
    oui = np.array([rng.choice(_MODELS[m].ouis) for m in model], np.int64)
    local = (rng.integers(0, 64, len(pairs)) << 2) | 0x02
    addr = np.where(
        kind[pair_who] == 2,
        _distinct(rng, oui, 24)[pair_who],
        _distinct(rng, local, 40),
    )
    # Sequence numbers: one counter per phone, or a fresh one every burst.
    gaps = np.where(rank == 0, rng.integers(1, 9, len(burst)), 1)
    counter = (
        rng.integers(0, 4096, n)[who] + np.cumsum(gaps) - np.cumsum(gaps)[np.searchsorted(who, who)]
    )
    fresh = rng.integers(0, 4096, bursts)[burst] + rank
    seq = np.where(kind[who] == 0, fresh, counter) % 4096
    dbm = np.clip(np.round(mean_dbm[who] + _jumpy(rng, burst, bursts)), -96, -30).astype(np.int64)
    order = np.argsort(t_ns, kind="stable")
    tsf0 = int(rng.integers(10**9, 10**12))
    ts_us = t_ns // 1000
    frames = _Frames(
        ts_us=ts_us[order],
        tsft_us=(tsf0 + ts_us - spec.start_ns // 1000)[order],
        template=(model[who] * (len(_SSIDS) + 1))[order],
        addr=addr[pair_of][order],
        seq=seq[order],
        channel=((rng.integers(0, 3, bursts)[burst] + rank) % 3)[order],
        dbm=dbm[order],
        directed=np.zeros(len(order), bool),
        person=who[order],
    )
    truth = PeopleTruth(
        arrive_ns, depart_ns, visitor, len(order), spec.start_ns, end_ns, kind, who[order]
    )
    return frames, truth


def _jumpy(rng: np.random.Generator, burst: I64, bursts: int) -> NDArray[np.float64]:
    """Each frame's signal about its phone's mean (dB), ``burst`` its burst: a Laplace offset
    per burst, a normal one per frame, and now and then a frame heard far weaker (see the
    module docstring)."""
    n = len(burst)
    off = rng.random(n) < _OFF_CHANNEL_SHARE
    drop = rng.uniform(*_OFF_CHANNEL_DB, n)
    return rng.laplace(0, _BURST_DB, bursts)[burst] + rng.normal(0, _FRAME_DB, n) - off * drop


def _static(spec: PeopleSpec) -> _Frames:
    """The frames of ``spec``'s static devices (next door: global addresses, weak signal), a
    burst every 60-120 s from its start to its end; drawn apart from the persons' (whose frames
    stay the same whatever the number of static devices)."""
    rng = np.random.default_rng((spec.seed, spec.static_devices))
    n = spec.static_devices
    span_s = float(spec.duration_s)
    steps = rng.uniform(60, 120, (n, int(span_s // 60) + 1))
    steps[:, 0] *= rng.random(n)
    offsets = np.cumsum(steps, axis=1)
    device, step = np.nonzero(offsets < span_s - 1)
    size = rng.choice(np.arange(1, 4), len(device))
    burst = np.repeat(np.arange(len(device)), size)
    rank = np.arange(len(burst)) - np.repeat(np.cumsum(size) - size, size)
    who = device[burst]
    t_ns = spec.start_ns + (offsets[device, step][burst] * 1e9).astype(np.int64) + rank * 20_000_000
    model = np.array([6, 7] * n, np.int64)[:n]
    oui = np.array([_MODELS[m].ouis[0] for m in model], np.int64)
    seq = (rng.integers(0, 4096, n)[who] + np.arange(len(burst))) % 4096
    dbm = np.round(rng.uniform(-88, -82, n)[who] + rng.normal(0, 1.5, len(burst)))
    ts_us = t_ns // 1000
    return _Frames(
        ts_us=ts_us,
        tsft_us=ts_us - spec.start_ns // 1000 + 10**9,
        template=model[who] * (len(_SSIDS) + 1),
        addr=_distinct(rng, oui, 24)[who],
        seq=seq,
        channel=rank % 3,
        dbm=dbm.astype(np.int64),
        directed=np.zeros(len(burst), bool),
        person=np.full(len(burst), -1, np.int64),
    )


def _people_frames(spec: PeopleSpec) -> tuple[_Frames, PeopleTruth]:
    """The persons' frames with the static devices' among them, less those of the silent span."""
    frames, truth = _people(spec)
    if spec.static_devices:
        both = [frames, _static(spec)]
        merged = {f: np.concatenate([getattr(x, f) for x in both]) for f in _Frames.__slots__}
        order = np.argsort(merged["ts_us"], kind="stable")
        frames = _Frames(**{f: v[order] for f, v in merged.items()})
    if spec.silent_ns is not None:
        ts_ns = frames.ts_us * 1000
        heard = (ts_ns < spec.silent_ns[0]) | (ts_ns >= spec.silent_ns[1])
        frames = _Frames(**{f: getattr(frames, f)[heard] for f in _Frames.__slots__})
    return frames, replace(truth, person=frames.person)


def write_people_capture(path: str | os.PathLike[str], spec: PeopleSpec) -> PeopleTruth:
    """Write a pcap of the phones of ``spec``'s persons; return who was there (the truth)."""
    frames, truth = _people_frames(spec)
    _write(path, frames, spec.link_type, fcs=False)
    return truth


def write_people_stream(fh: BinaryIO, specs: Iterable[PeopleSpec]) -> list[PeopleTruth]:
    """Write one pcap stream of the persons of ``specs`` (one after the other, in time order,
    all of one link type) to ``fh``, a spec's frames as soon as they are made; their truths.
    Without specs, a stream of no frames (radiotap)."""
    truths: list[PeopleTruth] = []
    link_type: int | None = None
    for spec in specs:
        if link_type is None:
            link_type = spec.link_type
            _write_header(fh, link_type)
        elif spec.link_type != link_type:
            raise ConfigError("a pcap stream has one link type: the specs' differ")
        frames, truth = _people_frames(spec)
        _write_records(fh, frames, link_type, fcs=False)
        fh.flush()
        truths.append(truth)
    if link_type is None:
        _write_header(fh, 127)
    return truths


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m firmware_agent.tools.synthetic OUT [options]``: write a capture, print its
    truth."""
    parser = argparse.ArgumentParser(
        prog="python -m firmware_agent.tools.synthetic",
        description="Write a synthetic probe-request capture; print its truth as JSON.",
    )
    parser.add_argument("out", nargs="?", help="capture to write (with --sample: the bundled one)")
    parser.add_argument("--sample", action="store_true", help="(re)write the bundled demo capture")
    spec_options = parser.add_argument_group("spec (defaults: SyntheticSpec's)")
    for name, kind in (
        ("frames", int),
        ("devices", int),
        ("static-devices", int),
        ("randomised-share", float),
        ("seed", int),
        ("duration-s", float),
    ):
        spec_options.add_argument(f"--{name}", type=kind)
    spec_options.add_argument("--link-type", type=int, choices=(105, 127))
    spec_options.add_argument("--fcs", action="store_true", default=None)
    args = vars(parser.parse_args(argv))
    out, sample = args.pop("out"), args.pop("sample")
    given = {name: value for name, value in args.items() if value is not None}
    if sample and given:
        parser.error("--sample takes no spec options")
    if not sample and out is None:
        parser.error("OUT is required (or --sample)")
    try:
        spec = SAMPLE_SPEC if sample else SyntheticSpec(**given)
        truth = write_synthetic_capture(out or BUNDLED_SAMPLE, spec)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(truth)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
