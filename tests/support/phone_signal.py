"""How jumpy one phone's signal is, as the estimator meets it: burst to burst and within a burst.

A phone's frames are grouped into bursts (one scan over the channels) by silences over
:data:`BURST_GAP_S`. Its *level* is a running mean of the bursts' first frames (EWMA, weight
:data:`EWMA`, begun at the first burst). At each burst whose first frame is a new address (what
the estimator links by timing and signal), the *jump* is |first frame's signal - level before
it|. A burst's *spread* is its strongest frame less its weakest (bursts of two frames or more),
a *step* |a frame's signal - the one before it in its burst| (which does not grow with the
burst's size: real phones send 6-96 frames a scan, the synthetic ones 1-4).

The real phones are the one-phone captures ``baccichet_*_anonymized.pcap`` of ../shared/data/
pcaps, each the frames of its most common fingerprint (:func:`capture_phone`); the synthetic ones
are the visitors of a people capture (:func:`synthetic_phones`); the lab's sensor (one radio on
one channel) is seen through the devices of a lab day that keep a global address
(:func:`global_devices`). bench/bench_signal.py prints them side by side;
tests/agent/test_synthetic.py holds the synthetic phones near the real ones.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from firmware_agent.stages.capture import CaptureReader
from firmware_agent.stages.pipeline import parse_frames
from firmware_agent.tools.synthetic import PeopleSpec, write_people_capture

BURST_GAP_S = 1.0  # real phones' frames within a scan are < 0.7 s apart, scans > 1 s apart
COPY_NS = 1_000_000  # one frame heard on two channels: same address and counter within 1 ms
EWMA = 0.25
JUMP_DB = 8

F64 = NDArray[np.float64]
I64 = NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class Frames:
    """One phone's frames in time order."""

    ts_ns: I64
    addr: I64  # the address as an integer
    seq: I64
    rssi: I64

    def one_copy(self) -> Frames:
        """Without the weaker copies of a frame heard on several channels at once."""
        order = np.lexsort((self.ts_ns, self.seq, self.addr))
        ts, addr, seq = self.ts_ns[order], self.addr[order], self.seq[order]
        copy = np.zeros(len(order), bool)
        copy[1:] = (addr[1:] == addr[:-1]) & (seq[1:] == seq[:-1]) & (np.diff(ts) < COPY_NS)
        frame = np.cumsum(~copy)  # the copies of one frame share a number
        strongest = np.lexsort((-self.rssi[order], frame))
        first = np.r_[True, np.diff(frame[strongest]) > 0]
        keep = np.sort(order[strongest[first]])
        return Frames(self.ts_ns[keep], self.addr[keep], self.seq[keep], self.rssi[keep])


@dataclass(frozen=True, slots=True)
class Signal:
    """One phone's (or several phones' pooled) bursts, jumps and spreads."""

    bursts: int
    jumps: F64  # at each burst whose first frame is a new address
    jumps_all: F64  # at every burst after the first
    spreads: I64  # per burst of 2+ frames: strongest - weakest
    steps: I64  # |a frame's signal - the one before it in its burst|

    @property
    def new_bursts(self) -> int:
        return len(self.jumps)


def signal(frames: Frames) -> Signal:
    """``frames``' bursts, jumps and spreads (see the module docstring)."""
    ts, rssi = frames.ts_ns, frames.rssi.astype(np.float64)
    start = np.flatnonzero(np.r_[True, np.diff(ts) > BURST_GAP_S * 1e9])
    ends = np.r_[start[1:], len(ts)]
    _, first_of = np.unique(frames.addr, return_index=True)
    new = np.isin(start, first_of)
    jumps = np.zeros(len(start))
    level = rssi[start[0]] if len(start) else 0.0
    for b, i in enumerate(start[1:], 1):
        jumps[b] = abs(rssi[i] - level)
        level += EWMA * (rssi[i] - level)
    spreads = np.array(
        [rssi[a:e].max() - rssi[a:e].min() for a, e in zip(start, ends, strict=True) if e - a > 1],
        np.int64,
    )
    within = np.ones(len(ts), bool)
    within[start] = False
    steps = np.abs(np.diff(frames.rssi))[within[1:]]
    later = np.arange(len(start)) > 0
    return Signal(len(start), jumps[new & later], jumps[later], spreads, steps)


def pooled(signals: Iterable[Signal]) -> Signal:
    """Several phones' signals as one."""
    s = list(signals)
    return Signal(
        sum(x.bursts for x in s),
        np.concatenate([x.jumps for x in s] or [np.zeros(0)]),
        np.concatenate([x.jumps_all for x in s] or [np.zeros(0)]),
        np.concatenate([x.spreads for x in s] or [np.zeros(0, np.int64)]),
        np.concatenate([x.steps for x in s] or [np.zeros(0, np.int64)]),
    )


def _read(path: Path) -> tuple[I64, I64, I64, I64, NDArray[np.uint64]]:
    with CaptureReader(path) as reader:
        probes = [parse_frames(batch) for batch in reader]
    mac = np.concatenate([p.mac for p in probes])
    addr = np.pad(mac, ((0, 0), (0, 2))).view("<u8")[:, 0].astype(np.int64)
    ts, seq, rssi, fp = (
        np.concatenate([getattr(p, k) for p in probes]) for k in ("ts_ns", "seq", "rssi", "fp")
    )
    order = np.argsort(ts, kind="stable")
    return (
        ts[order],
        addr[order],
        seq[order].astype(np.int64),
        rssi[order].astype(np.int64),
        fp[order],
    )


def capture_phone(path: Path) -> Frames:
    """The frames of ``path``'s most common fingerprint (a one-phone capture's phone)."""
    ts, addr, seq, rssi, fp = _read(path)
    mine = fp == Counter(fp.tolist()).most_common(1)[0][0]
    return Frames(ts[mine], addr[mine], seq[mine], rssi[mine])


def global_devices(path: Path, min_bursts: int = 20, min_dbm: int = -75) -> list[Frames]:
    """The frames of each global address of ``path`` (a lab day) heard in ``min_bursts``
    bursts or more at a median signal of ``min_dbm`` or more: devices in the room that keep
    one address (mostly machines), as one radio on one channel hears them."""
    ts, addr, seq, rssi, _ = _read(path)
    out = []
    for a in np.unique(addr[(addr & 0x02) == 0]):
        mine = addr == a
        frames = Frames(ts[mine], addr[mine], seq[mine], rssi[mine])
        if signal(frames).bursts >= min_bursts and np.median(frames.rssi) >= min_dbm:
            out.append(frames)
    return out


def synthetic_phones(spec: PeopleSpec) -> list[Frames]:
    """The frames of each visitor's phone in ``spec``'s people capture, read back."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "people.pcap"
        truth = write_people_capture(path, spec)
        ts, addr, seq, rssi, _ = _read(path)
    person = truth.person  # in file order, which is time order
    return [
        Frames(ts[m], addr[m], seq[m], rssi[m])
        for m in (person == p for p in np.flatnonzero(truth.visitor))
    ]
