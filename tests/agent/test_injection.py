"""The membership oracle, attacked (issue 17): can a published figure tell whether a phone
was here earlier today?

The attacker stands near a sensor in a quiet window and sends three probe requests under a
candidate address, then reads the counts the agent publishes. If any figure differs between
"the address was heard earlier today" and "the address is new", the attacker learns that the
phone was here (this is what ``devices_epoch``, unique devices so far today, used to give away).

The harness replays a real capture twice with the same three frames added in its quietest
window: once under an address the capture holds (heard more than an hour before, so no visit
of its is open), once under a new one. Both replays draw the same keys, so the only thing
that differs is the address. It then compares **every field of every published counts
message** (flattened, whatever the schema version: a field added later is compared too):

* without noise, the two runs must publish exactly the same messages, at the default *k* and
  at the lowest *k* a setting allows (2), so that suppression hides no difference;
* with noise, the fields the noise covers may differ, before noise, by at most the policy's
  stated sensitivity in L1 over the window (what the noise is scaled to hide), and every other
  field must be equal.

In ``strict`` mode the key changes every window and device ids are truncated, so the only
thing one address can do that another cannot is share its truncated id with someone else in
the window: a matter of the key, not of the past. The new address is therefore chosen with the
same truncated id as the known one under that window's key (a coupling of the two runs' keys);
what remains must be equal.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from firmware_agent.cli import BUNDLED_SAMPLE
from firmware_agent.service.config import AgentConfig
from firmware_agent.settings import load_config
from firmware_agent.stages import anonymize, pipeline
from firmware_agent.stages.batch import (
    LINKTYPE_IEEE802_11,
    LINKTYPE_RADIOTAP,
    NS,
    FrameBatch,
    WindowCounts,
)
from firmware_agent.stages.capture import CaptureReader
from firmware_agent.stages.pipeline import Pipeline
from firmware_agent.stages.privacy import MODES, SUPPRESS_FLOOR, PrivacyPolicy, flatten_counts
from tests.support.shared import SHARED

_M64 = (1 << 64) - 1
_GROUND_TRUTH = sorted(
    p.name.replace("_ver-99.csv", "_anonymized.pcap")
    for p in (SHARED / "data" / "pcaps").glob("*_ver-99.csv")
)
CAPTURES = ["<bundled sample>", *_GROUND_TRUTH]
INJECTED = 3  # frames the attacker sends
# Seconds between them: a burst (as one phone probes), or lingering (190 s in all, more than
# min_dwell_s: a visitor, whose visit ends and has a dwell).
SPACINGS_S = {"burst": 0.3, "linger": 95.0}


@dataclass(frozen=True, slots=True)
class Frame:
    ts_ns: int
    link: int
    data: bytes


def _dot11(link: int, data: bytes) -> bytes | None:
    if link == LINKTYPE_RADIOTAP and len(data) >= 4:
        return data[struct.unpack_from("<H", data, 2)[0] :]
    return data if link == LINKTYPE_IEEE802_11 else None


def _sender(frame: Frame) -> bytes | None:
    """The transmitter address of a probe request (None for any other frame)."""
    dot11 = _dot11(frame.link, frame.data)
    if dot11 is None or len(dot11) < 24 or dot11[0] != 0x40:
        return None
    return dot11[10:16]


def _probe(link: int, mac: bytes, seq: int) -> bytes:
    """A wildcard probe request from ``mac`` at -40 dBm (radiotap) or without a radio header."""
    body = (
        b"\x40\x00\x00\x00" + b"\xff" * 6 + mac + b"\xff" * 6 + struct.pack("<H", seq << 4)
    ) + b"\x00\x00\x01\x04\x02\x04\x0b\x16"
    if link == LINKTYPE_IEEE802_11:
        return body
    return struct.pack("<BBHI", 0, 0, 9, 1 << 5) + struct.pack("<b", -40) + body


class Keys:
    """Deterministic epoch keys: both replays of a pair draw the same sequence, and the key
    under which the injected frames were hashed is recorded."""

    def __init__(self) -> None:
        self.drawn = 0
        self.watch: tuple[bytes, set[int]] | None = None
        self.seen: np.ndarray | None = None

    def reset(self, watch: tuple[bytes, set[int]] | None = None) -> None:
        self.drawn, self.watch, self.seen = 0, watch, None

    def draw(self, key: anonymize.EpochKey) -> None:
        self.drawn += 1
        key.words[:] = [(0x9E3779B97F4A7C15 * self.drawn) & _M64, self.drawn]

    def observe(self, probes: Any, key: anonymize.EpochKey) -> None:
        if self.watch is None or self.seen is not None:
            return
        mac, times = self.watch
        rows = np.flatnonzero(np.isin(probes.ts_ns, list(times)))
        if any(bytes(probes.mac[i]) == mac for i in rows):
            self.seen = key.words.copy()


@pytest.fixture
def keys(monkeypatch: pytest.MonkeyPatch) -> Keys:
    state = Keys()
    original_init = anonymize.EpochKey.__init__
    original_anonymize = pipeline.anonymize

    def init(self: anonymize.EpochKey) -> None:
        original_init(self)
        state.draw(self)

    def watched(probes: Any, key: anonymize.EpochKey) -> Any:
        state.observe(probes, key)
        return original_anonymize(probes, key)

    monkeypatch.setattr(anonymize.EpochKey, "__init__", init)
    monkeypatch.setattr(pipeline, "anonymize", watched)
    return state


def _read(path: Path) -> list[Frame]:
    with CaptureReader(path) as reader:
        return [
            Frame(int(t), int(lt), bytes(batch.data[o : o + n]))
            for batch in reader
            for o, n, t, lt in zip(
                batch.offsets, batch.lengths, batch.ts_ns, batch.link_types, strict=True
            )
        ]


def _batches(frames: list[Frame], size: int = 4096) -> Iterator[FrameBatch]:
    for at in range(0, len(frames), size):
        part = frames[at : at + size]
        lengths = np.array([len(f.data) for f in part], np.int32)
        offsets = np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64)
        data = np.frombuffer(b"".join(f.data for f in part), np.uint8).copy()
        yield FrameBatch(
            data,
            offsets,
            lengths,
            np.array([f.ts_ns for f in part], np.int64),
            np.array([f.link for f in part], np.uint16),
        )


@dataclass(frozen=True, slots=True)
class Attack:
    """Where the attacker injects, and the address heard earlier."""

    known: bytes
    times: tuple[int, ...]
    link: int

    def frames(self, frames: list[Frame], mac: bytes) -> list[Frame]:
        added = [Frame(t, self.link, _probe(self.link, mac, 100 + i)) for i, t in
                 enumerate(self.times)]  # fmt: skip
        return sorted(frames + added, key=lambda f: f.ts_ns)


def plan(frames: list[Frame], window_s: int, spacing_s: float) -> Attack:
    """The quietest window at least an hour after some address was last heard (and not the
    capture's first or last), and that address: the earliest-leaving one."""
    last: dict[bytes, int] = {}
    for frame in frames:
        mac = _sender(frame)
        if mac is not None and mac[0] & 1 == 0:
            last[mac] = max(last.get(mac, 0), frame.ts_ns)
    w = window_s * NS
    known, left = min(last.items(), key=lambda kv: kv[1])
    per_window: dict[int, int] = {}
    for frame in frames:
        per_window[frame.ts_ns // w] = per_window.get(frame.ts_ns // w, 0) + 1
    first, final = min(per_window), max(per_window)
    after = max(left + 3600 * NS, left + 2 * w) // w + 1
    candidates = [i for i in range(after, final) if i > first]
    assert candidates, "the capture is too short for an address to leave and come back"
    quiet = min(candidates, key=lambda i: (per_window.get(i, 0), i))
    start = quiet * w + 30 * NS  # past the lateness: the window's own key hashes them
    times = tuple(start + int(k * spacing_s * NS) for k in range(INJECTED))
    links = {f.link for f in frames if _sender(f) is not None}
    return Attack(known, times, LINKTYPE_RADIOTAP if LINKTYPE_RADIOTAP in links else min(links))


def new_address(
    attack: Attack, frames: list[Frame], key: np.ndarray | None, bits: int | None
) -> bytes:
    """An address the capture never holds, with the known one's first byte (so the same
    randomised flag) and, for truncated ids, the same truncated id under ``key``."""
    heard = {_sender(f) for f in frames}
    rng = np.random.default_rng(17)
    tails = rng.integers(0, 256, (1 << 18, 5), dtype=np.uint8)
    macs = np.concatenate((np.full((len(tails), 1), attack.known[0], np.uint8), tails), axis=1)
    if bits is None or key is None:
        matches = np.arange(len(macs))
    else:
        mask = np.uint64((1 << bits) - 1)
        wanted = np.empty(1, np.uint64)
        anonymize.siphash24_mac(np.frombuffer(attack.known, np.uint8).reshape(1, 6).copy(),
                                key, wanted)  # fmt: skip
        hashed = np.empty(len(macs), np.uint64)
        anonymize.siphash24_mac(macs.copy(), key, hashed)
        matches = np.flatnonzero((hashed & mask) == (wanted[0] & mask))
    for i in matches:
        mac = bytes(macs[i])
        if mac not in heard:
            return mac
    raise AssertionError("no new address with the known one's truncated id")


def replay(config: AgentConfig, frames: list[Frame]) -> list[tuple[int | None, WindowCounts]]:
    """Every window of a replay, with the start of the epoch it was counted in."""
    run = Pipeline(config)
    out = []
    for batch in _batches(frames):
        out += [(run.epoch_start, w) for w in run.feed(batch)]
    out += [(run.epoch_start, w) for w in run.finish()]
    return out


def published(
    policy: PrivacyPolicy, windows: list[tuple[int | None, WindowCounts]]
) -> list[dict[str, object]]:
    """Every field of every counts message, flattened (the epoch's start stands for its label:
    the label is a function of it and the agent's public key)."""
    return [{"epoch": epoch} | flatten_counts(policy.release(w)) for epoch, w in windows]


def differences(a: list[dict[str, object]], b: list[dict[str, object]]) -> list[str]:
    assert len(a) == len(b), f"{len(a)} windows against {len(b)}"
    return [
        f"window {i} {name}: {x.get(name)} against {y.get(name)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True))
        for name in sorted(set(x) | set(y))
        if x.get(name) != y.get(name)
    ]


def noised_differences(
    policy: PrivacyPolicy,
    a: list[tuple[int | None, WindowCounts]],
    b: list[tuple[int | None, WindowCounts]],
) -> list[str]:
    """Under noise: the noised counts within the sensitivity (L1, before noise), every other
    field exactly equal. ``no_data`` is read off the noised frame counts (post-processing):
    what it reads besides them, whether the sensor normally hears, must be equal."""
    out = []
    for i, ((ea, wa), (eb, wb)) in enumerate(zip(a, b, strict=True)):
        na, nb = policy.noised_counts(wa), policy.noised_counts(wb)
        l1 = sum(abs(na.get(k, 0) - nb.get(k, 0)) for k in set(na) | set(nb))
        if l1 > policy.sensitivity:
            out.append(f"window {i}: the noised counts move by {l1} > {policy.sensitivity}")
        rest = [
            {"epoch": e, "silence_is_gap": w.silence_is_gap}
            | {k: v for k, v in flatten_counts(policy.release(w)).items() if k not in n}
            for e, w, n in ((ea, wa, na), (eb, wb, nb))
        ]
        out += differences([rest[0] | {"no_data": None}], [rest[1] | {"no_data": None}])
    return out


def _path(name: str) -> Path:
    return BUNDLED_SAMPLE if name == "<bundled sample>" else SHARED / "data" / "pcaps" / name


@pytest.mark.shared
@pytest.mark.parametrize("attack_kind", SPACINGS_S)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", CAPTURES)
def test_no_published_figure_tells_a_known_address_from_a_new_one(
    name: str, mode: str, attack_kind: str, keys: Keys
) -> None:
    config = load_config(
        None, environ={"FOOTFALL_EPOCH_TIMEZONE": "UTC", "FOOTFALL_PRIVACY_MODE": mode}
    )
    frames = _read(_path(name))
    attack = plan(frames, config.count.window_s, SPACINGS_S[attack_kind])
    keys.reset((attack.known, set(attack.times)))
    known = replay(config, attack.frames(frames, attack.known))
    assert keys.seen is not None, "the injected frames were not hashed"
    fresh = new_address(attack, frames, keys.seen, config.privacy.id_bits)
    keys.reset()
    new = replay(config, attack.frames(frames, fresh))
    if mode == "standard":  # not vacuous: the count kept on the agent tells them apart
        assert new[-1][1].devices_epoch == known[-1][1].devices_epoch + 1
    # At the default k and at the lowest any setting allows: suppression hides nothing here.
    for policy in (config.privacy, replace(config.privacy, suppress_below=SUPPRESS_FLOOR)):
        assert differences(published(policy, known), published(policy, new)) == []
        noised = replace(policy, dp_epsilon=1.0)
        assert noised_differences(noised, known, new) == []


@pytest.mark.shared
@pytest.mark.parametrize("name", CAPTURES)
def test_no_published_figure_is_a_running_total_whose_rise_shows_one_arrival(name: str) -> None:
    """Passively: a figure that only grows through an epoch (devices so far today) rises by
    exactly one when one device arrives alone (16 of 709 window pairs of the real captures).
    Every published figure must be the window's own: none is non-decreasing over the
    windows of an epoch while rising in several of them."""
    config = load_config(None, environ={"FOOTFALL_EPOCH_TIMEZONE": "UTC"})
    messages = published(config.privacy, replay(config, _read(_path(name))))
    epochs: dict[object, list[dict[str, object]]] = {}
    for message in messages:
        epochs.setdefault(message["epoch"], []).append(message)
    totals = set()
    for windows in epochs.values():
        for field in set().union(*windows) - {"epoch", "window_start", "window_s"}:
            values = [w.get(field) for w in windows]
            if any(not isinstance(v, int) for v in values):
                continue
            steps = np.diff(np.array(values, np.int64))
            if len(values) >= 6 and (steps >= 0).all() and (steps > 0).sum() >= 3:
                totals.add(field)
    assert totals == set()
