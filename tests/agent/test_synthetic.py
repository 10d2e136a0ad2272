"""The synthetic capture generator: scapy reads what it writes, and its truth is the file's."""

from __future__ import annotations

import itertools
import json
import struct
import tempfile
import zlib
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.dot11 import Dot11, Dot11Elt, Dot11FCS, Dot11ProbeReq, RadioTap
from scapy.utils import rdpcap

from firmware_agent import BUNDLED_SAMPLE
from firmware_agent.contract.errors import ConfigError
from firmware_agent.tools.synthetic import (
    SAMPLE_SPEC,
    PeopleSpec,
    SyntheticSpec,
    SyntheticTruth,
    main,
    write_synthetic_capture,
)
from tests.support.phone_signal import JUMP_DB, pooled, signal, synthetic_phones

SMALL = SyntheticSpec(frames=1_500, devices=60, static_devices=3, duration_s=3600, seed=5)
FREQ_CHANNEL = {2412: 1, 2437: 6, 2462: 11}
BROADCAST = "ff:ff:ff:ff:ff:ff"


def _records(path: Path) -> tuple[int, list[tuple[int, bytes]]]:
    """(link type, [(timestamp ns, frame bytes)]) read with struct alone."""
    data = path.read_bytes()
    magic, _, _, _, _, _, link_type = struct.unpack_from("<IHHiIII", data)
    assert magic == 0xA1B2C3D4
    pos, out = 24, []
    while pos < len(data):
        sec, usec, incl, orig = struct.unpack_from("<IIII", data, pos)
        assert incl == orig
        out.append(((sec * 10**6 + usec) * 1000, data[pos + 16 : pos + 16 + incl]))
        pos += 16 + incl
    assert pos == len(data)
    return link_type, out


def _count(packets: Any) -> dict[str, Any]:
    """Independent count with scapy of what SyntheticTruth claims, plus per-frame checks."""
    addresses: set[str] = set()
    wildcard = directed = 0
    dbms: list[int] = []
    times: list[int] = []
    for pkt in packets:
        dot11 = pkt[Dot11]
        assert (dot11.type, dot11.subtype) == (0, 4)
        assert dot11.addr1 == dot11.addr3 == BROADCAST
        assert dot11.SC & 0xF == 0  # fragment 0
        assert pkt.haslayer(Dot11ProbeReq)
        ssid = pkt[Dot11Elt]
        assert ssid.ID == 0
        directed += bool(ssid.info)
        wildcard += not ssid.info
        addresses.add(dot11.addr2)
        elements = _elements(pkt)
        if pkt.haslayer(RadioTap):
            radio = pkt[RadioTap]
            assert radio.len == 24
            assert elements[3] == bytes([FREQ_CHANNEL[radio.ChannelFrequency]])
            dbms.append(radio.dBm_AntSignal)
        else:
            assert elements[3][0] in FREQ_CHANNEL.values()
        times.append(int(pkt.time * 10**6) * 1000)
    local = {a for a in addresses if int(a[:2], 16) & 0x02}
    assert all(int(a[:2], 16) & 0x01 == 0 for a in addresses)  # never a group address
    return {
        "frames": len(packets),
        "addresses": len(addresses),
        "addresses_local": len(local),
        "wildcard_probes": wildcard,
        "directed_probes": directed,
        "dbm_min": min(dbms) if dbms else None,
        "dbm_max": max(dbms) if dbms else None,
        "first_ts_ns": min(times),
        "last_ts_ns": max(times),
    }


def _elements(pkt: Any) -> dict[int, bytes]:
    """Element ID -> body of its first occurrence, in frame order."""
    elt, out = pkt.getlayer(Dot11Elt), dict[int, bytes]()
    while isinstance(elt, Dot11Elt):
        out.setdefault(elt.ID, bytes(elt)[2 : 2 + elt.len])
        elt = elt.payload
    return out


def _same_fields(truth: SyntheticTruth, counted: dict[str, Any]) -> None:
    claimed = {k: v for k, v in asdict(truth).items() if k in counted}
    assert claimed == counted


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SyntheticTruth, Any]:
    """A small capture, its truth and scapy's packets."""
    path = tmp_path_factory.mktemp("synthetic") / "small.pcap"
    truth = write_synthetic_capture(path, SMALL)
    return path, truth, rdpcap(str(path))


def test_every_frame_is_a_probe_request_and_truth_matches_scapy(
    small: tuple[Path, SyntheticTruth, Any],
) -> None:
    _, truth, packets = small
    _same_fields(truth, _count(packets))
    assert truth.devices == SMALL.devices
    assert truth.addresses > truth.addresses_local > 0  # randomising and global devices
    assert truth.directed_probes > 0


def test_realistic_layout(small: tuple[Path, SyntheticTruth, Any]) -> None:
    _, _, packets = small
    radio = packets[0][RadioTap]
    assert radio.present == "TSFT+Flags+Rate+Channel+dBm_AntSignal+Antenna"
    assert not radio.Flags.FCS
    layouts = {tuple(_elements(p)) for p in packets if not p[Dot11Elt].info}
    assert len(layouts) >= 6  # device models differ in their information elements
    assert any(255 in ids for ids in layouts) and any(191 in ids for ids in layouts)
    channels = {p[RadioTap].ChannelFrequency for p in packets}
    assert channels == set(FREQ_CHANNEL)


def test_sequence_numbers_and_time_order(small: tuple[Path, SyntheticTruth, Any]) -> None:
    path, _, _ = small
    _, records = _records(path)
    times = [ts for ts, _ in records]
    back = [a - b for a, b in itertools.pairwise(times) if b < a]
    assert 0 < len(back) < 0.03 * len(times)  # merged sniffers: a few frames late...
    assert max(back) < 500_000_000  # ...by under half a second
    by_address: dict[bytes, list[tuple[int, int]]] = defaultdict(list)
    for ts, frame in records:
        dot11 = frame[24:]
        by_address[dot11[10:16]].append((ts, struct.unpack_from("<H", dot11, 22)[0] >> 4))
    for frames in by_address.values():
        seqs = [seq for _, seq in sorted(frames)]
        steps = {(b - a) % 4096 for a, b in itertools.pairwise(seqs)}
        assert steps <= set(range(1, 9))  # +1 within a burst, a small jump between bursts


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    spec = SyntheticSpec(frames=500, devices=20)
    truths = [write_synthetic_capture(tmp_path / f"{i}.pcap", spec) for i in range(2)]
    assert truths[0] == truths[1]
    assert (tmp_path / "0.pcap").read_bytes() == (tmp_path / "1.pcap").read_bytes()
    write_synthetic_capture(tmp_path / "2.pcap", SyntheticSpec(frames=500, devices=20, seed=2))
    assert (tmp_path / "2.pcap").read_bytes() != (tmp_path / "0.pcap").read_bytes()


def test_bare_802_11(tmp_path: Path) -> None:
    path = tmp_path / "bare.pcap"
    truth = write_synthetic_capture(path, SyntheticSpec(frames=500, devices=30, link_type=105))
    assert _records(path)[0] == 105
    assert not rdpcap(str(path))[0].haslayer(RadioTap)
    assert truth.dbm_min is None and truth.dbm_max is None
    _same_fields(truth, _count(rdpcap(str(path))))


def test_fcs(tmp_path: Path) -> None:
    spec = SyntheticSpec(frames=500, devices=30)
    plain = write_synthetic_capture(tmp_path / "plain.pcap", spec)
    path = tmp_path / "fcs.pcap"
    truth = write_synthetic_capture(path, SyntheticSpec(frames=500, devices=30, fcs=True))
    assert truth == plain  # the same frames, with an FCS
    packets = rdpcap(str(path))
    _same_fields(truth, _count(packets))
    assert all(p[RadioTap].Flags.FCS and p.haslayer(Dot11FCS) for p in packets)
    for (_, with_fcs), (_, without) in zip(
        _records(path)[1], _records(tmp_path / "plain.pcap")[1], strict=True
    ):
        dot11 = with_fcs[24:-4]
        assert dot11 == without[24:]
        assert with_fcs[-4:] == zlib.crc32(dot11).to_bytes(4, "little")


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    devices=st.integers(1, 40),
    extra=st.integers(0, 400),
    share=st.sampled_from([0.0, 0.3, 1.0]),
)
def test_truth_invariants(seed: int, devices: int, extra: int, share: float) -> None:
    spec = SyntheticSpec(frames=devices + extra, devices=devices, randomised_share=share, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.pcap"
        truth = write_synthetic_capture(path, spec)
        _, records = _records(path)
    assert truth.frames == len(records) == truth.wildcard_probes + truth.directed_probes
    assert truth.addresses >= devices
    if share == 0.0:
        assert truth.addresses_local == 0
    if share == 1.0:
        assert truth.addresses_local == truth.addresses
    window = (spec.start_ns, spec.start_ns + int(spec.duration_s * 10**9))
    assert window[0] <= truth.first_ts_ns <= truth.last_ts_ns < window[1]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"frames": 5, "devices": 10},
        {"devices": 0},
        {"randomised_share": 1.5},
        {"static_devices": 150, "randomised_share": 0.5},
        {"link_type": 1},
        {"link_type": 105, "fcs": True},
        {"duration_s": 10},
    ],
)
def test_bad_specs(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        SyntheticSpec(**kwargs)


def test_command_line_prints_truth(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.pcap"
    args = [str(out), "--frames", "400", "--devices", "25", "--seed", "9", "--link-type", "105"]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    spec = SyntheticSpec(frames=400, devices=25, seed=9, link_type=105)
    assert printed == asdict(write_synthetic_capture(tmp_path / "api.pcap", spec))
    assert out.read_bytes() == (tmp_path / "api.pcap").read_bytes()
    assert main([str(out), "--link-type", "105", "--fcs"]) == 2
    with pytest.raises(SystemExit):
        main(["--sample", str(out), "--frames", "500"])


def test_bundled_sample_is_reproducible(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert BUNDLED_SAMPLE.is_file(), "run: python -m firmware_agent.tools.synthetic --sample"
    assert BUNDLED_SAMPLE.stat().st_size < 2_000_000
    fresh = tmp_path / "sample.pcap"
    assert main(["--sample", str(fresh)]) == 0
    truth = json.loads(capsys.readouterr().out)
    assert fresh.read_bytes() == BUNDLED_SAMPLE.read_bytes()
    assert truth["frames"] == SAMPLE_SPEC.frames and truth["devices"] == SAMPLE_SPEC.devices
    assert 2 * 3600 <= (truth["last_ts_ns"] - truth["first_ts_ns"]) / 1e9 <= 4 * 3600


def test_the_persons_phones_jump_in_signal_as_the_real_ones_do() -> None:
    """bench/bench_signal.py: on the one-phone captures a new address's first frame lands over
    8 dB from its phone's running level in 14 % of the bursts (p90 10.7 dB), and 17 % of the
    steps within a burst are over 15 dB; the synthetic phones did so in 3 % (p90 6.0 dB), with
    no such step, before their signal followed the real ones'."""
    spec = PeopleSpec(rates=(40.0,), duration_s=2 * 3600, seed=5)
    phones = pooled(signal(frames) for frames in synthetic_phones(spec))
    assert phones.new_bursts > 300
    assert 0.08 <= np.mean(phones.jumps > JUMP_DB) <= 0.2
    assert 7 <= np.quantile(phones.jumps, 0.9) <= 14
    assert 0.05 <= np.mean(phones.steps > 15) <= 0.2
