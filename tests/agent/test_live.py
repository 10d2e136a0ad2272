"""The live source without an interface: the kernel filter, the ring walk, settings, hopping.

The classic-BPF programs are run by a small interpreter here, over every frame of real
captures of each link type, and must keep exactly the probe requests; the ring walk is fed a
ring laid out as ``linux/if_packet.h`` says. The kernel itself runs them in
``tests/integration/test_live_netns.py``.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from firmware_agent.cli import BUNDLED_SAMPLE
from firmware_agent.contract.errors import ChannelHopError, ConfigError
from firmware_agent.settings import load_config
from firmware_agent.stages.batch import (
    LINKTYPE_AVS,
    LINKTYPE_IEEE802_11,
    LINKTYPE_PRISM,
    LINKTYPE_RADIOTAP,
)
from firmware_agent.stages.capture import CaptureReader
from firmware_agent.stages.channels import ChannelHopper
from firmware_agent.stages.config import FILTERED_LINK_TYPES, LiveSettings
from firmware_agent.stages.live import PROBE_REQUEST_FILTERS, _release_blocks, _take_blocks
from tests.support.netns import require

SNAPLEN = 0x40000


def run_bpf(program: tuple[tuple[int, int, int, int], ...], frame: bytes) -> int:
    """What the kernel's classic-BPF interpreter returns for ``frame`` (the subset libpcap
    emits for these filters); a load past the end rejects the frame, as in the kernel."""
    a = x = pc = 0
    scratch = [0] * 16
    while True:
        code, jt, jf, k = program[pc]
        pc += 1
        cls, size, mode = code & 0x07, code & 0x18, code & 0xE0
        if cls in (0x00, 0x01):  # ld, ldx
            if mode == 0x00:  # imm
                value = k
            elif mode == 0x60:  # mem
                value = scratch[k]
            else:  # abs (0x20) or ind (0x40)
                at = k + (x if mode == 0x40 else 0)
                width = {0x00: 4, 0x08: 2, 0x10: 1}[size]
                if at + width > len(frame):
                    return 0
                value = int.from_bytes(frame[at : at + width], "big")
            if cls == 0x00:
                a = value
            else:
                x = value
        elif cls == 0x02:  # st
            scratch[k] = a
        elif cls == 0x04:  # alu with k or x
            operand = x if code & 0x08 else k
            op = code & 0xF0
            a = {0x00: a + operand, 0x40: a | operand, 0x50: a & operand,
                 0x60: a << operand, 0x70: a >> operand}[op] & 0xFFFFFFFF  # fmt: skip
        elif cls == 0x05:  # jmp
            if code & 0xF0 == 0x00:  # ja
                pc += k
            else:
                assert code & 0xF0 == 0x10, hex(code)  # jeq
                pc += jt if a == k else jf
        elif cls == 0x06:  # ret
            return k
        elif cls == 0x07:  # misc: tax (0x07) or txa (0x87)
            if code == 0x07:
                x = a
            else:
                a = x
        else:
            raise AssertionError(f"instruction {code:#x} not handled")


def header_length(link_type: int, frame: bytes) -> int | None:
    """Where the 802.11 header starts, as each link type defines it (None: cannot tell)."""
    if link_type == LINKTYPE_IEEE802_11:
        return 0
    if link_type == LINKTYPE_RADIOTAP:
        return struct.unpack_from("<H", frame, 2)[0] if len(frame) >= 4 else None
    if link_type in (LINKTYPE_PRISM, LINKTYPE_AVS):
        if len(frame) < 8:
            return None
        avs = struct.unpack_from(">I", frame)[0] & 0xFFFFF000 == 0x80211000
        if link_type == LINKTYPE_PRISM and not avs:
            return 144
        return int(struct.unpack_from(">I", frame, 4)[0])
    raise AssertionError(link_type)


def is_probe_request(link_type: int, frame: bytes) -> bool:
    start = header_length(link_type, frame)
    return start is not None and start < len(frame) and frame[start] & 0xFC == 0x40


def test_kernel_filter_keeps_every_frame_of_the_bundled_sample() -> None:
    with CaptureReader(BUNDLED_SAMPLE) as reader:
        for batch in reader:
            for i in range(len(batch)):
                start = int(batch.offsets[i])
                frame = batch.data[start : start + int(batch.lengths[i])].tobytes()
                assert run_bpf(PROBE_REQUEST_FILTERS[LINKTYPE_RADIOTAP], frame) == SNAPLEN
    for other in (bytes([0, 0, 8, 0, 0, 0, 0, 0, 0x80]), bytes([0, 0, 8, 0]), b""):
        assert run_bpf(PROBE_REQUEST_FILTERS[LINKTYPE_RADIOTAP], other) == 0


@pytest.mark.parametrize("link_type", sorted(PROBE_REQUEST_FILTERS))
def test_filter_constants_are_what_libpcap_compiles(link_type: int, tmp_path: Path) -> None:
    require(shutil.which("tcpdump") is not None, "tcpdump is not installed (.ci/run installs it)")
    empty = tmp_path / "empty.pcap"
    empty.write_bytes(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, SNAPLEN, link_type))
    done = subprocess.run(
        ["tcpdump", "-r", str(empty), "-dd", "type mgt subtype probe-req"],
        capture_output=True,
        text=True,
        check=True,
    )
    compiled = tuple(
        tuple(int(v, 0) for v in m)
        for m in re.findall(r"\{ (\S+), (\d+), (\d+), (\S+) \}", done.stdout)
    )
    assert compiled == PROBE_REQUEST_FILTERS[link_type]


# A ring as the kernel lays it out: blocks of tpacket_block_desc + tpacket3_hdr frames.
BLOCK = 4096
FIRST_FRAME = 48  # offset_to_first_pkt
MAC_OFFSET = 82  # tp_mac: where the frame starts after its tpacket3_hdr


def fill_block(ring: np.ndarray, block: int, frames: list[tuple[bytes, int]], ready: bool) -> None:
    base = block * BLOCK
    p = FIRST_FRAME
    for k, (frame, ts) in enumerate(frames):
        step = (MAC_OFFSET + len(frame) + 15) // 16 * 16
        last = k == len(frames) - 1
        header = struct.pack(
            "<IIIIIIHH", 0 if last else step, ts // 10**9, ts % 10**9, len(frame), len(frame),
            1, MAC_OFFSET, MAC_OFFSET,
        )  # fmt: skip
        ring[base + p : base + p + len(header)] = np.frombuffer(header, np.uint8)
        ring[base + p + MAC_OFFSET : base + p + MAC_OFFSET + len(frame)] = np.frombuffer(
            frame, np.uint8
        )
        end = p + MAC_OFFSET + len(frame)
        p += step
    desc = struct.pack("<IIIIII", 3, 0, int(ready), len(frames), FIRST_FRAME, end)
    ring[base : base + len(desc)] = np.frombuffer(desc, np.uint8)


def walk(ring: np.ndarray, first: int, most: int = 8) -> tuple[list[bytes], list[int], int]:
    cap = 64
    offsets, lengths = np.zeros(cap, np.int64), np.zeros(cap, np.int32)
    ts_ns, links = np.zeros(cap, np.int64), np.zeros(cap, np.uint16)
    n, taken = _take_blocks(
        ring.view(np.uint32), BLOCK, len(ring) // BLOCK, first, most, LINKTYPE_RADIOTAP,
        offsets, lengths, ts_ns, links,
    )  # fmt: skip
    assert set(links[:n].tolist()) <= {LINKTYPE_RADIOTAP}
    frames = [ring[o : o + ln].tobytes() for o, ln in zip(offsets[:n], lengths[:n], strict=True)]
    return frames, ts_ns[:n].tolist(), taken


def test_ring_walk_reads_ready_blocks_in_order_and_stops_at_the_kernels() -> None:
    ring = np.zeros(3 * BLOCK, np.uint8)
    t = 1_709_625_628_712_058_123
    fill_block(ring, 0, [(b"\x00\x00\x08\x00probe-a", t), (b"x" * 300, t + 5)], ready=True)
    fill_block(ring, 1, [(b"\x00\x00\x08\x00probe-b", t + 9)], ready=True)
    fill_block(ring, 2, [(b"not yet", t + 11)], ready=False)
    frames, stamps, taken = walk(ring, 0)
    assert frames == [b"\x00\x00\x08\x00probe-a", b"x" * 300, b"\x00\x00\x08\x00probe-b"]
    assert stamps == [t, t + 5, t + 9] and taken == 2
    assert walk(ring, 0, most=1)[2] == 1
    assert walk(ring, 2) == ([], [], 0)  # the kernel still owns block 2


def test_released_blocks_are_zeroed_and_handed_back_wrapping_round() -> None:
    ring = np.zeros(3 * BLOCK, np.uint8)
    fill_block(ring, 2, [(b"\xaa" * 100, 1)], ready=True)
    fill_block(ring, 0, [(b"\xbb" * 100, 2)], ready=True)
    frames, _, taken = walk(ring, 2)
    assert frames == [b"\xaa" * 100, b"\xbb" * 100] and taken == 2
    _release_blocks(ring, ring.view(np.uint32), BLOCK, 3, 2, taken)
    for block in (2, 0):
        base = block * BLOCK
        assert ring.view(np.uint32)[base // 4 + 2] == 0  # TP_STATUS_KERNEL
        assert not ring[base + FIRST_FRAME : base + BLOCK].any()  # no frame byte is left
    assert walk(ring, 2) == ([], [], 0)


def test_ring_walk_never_reads_outside_a_block_with_a_corrupt_header() -> None:
    ring = np.zeros(2 * BLOCK, np.uint8)
    fill_block(ring, 0, [(b"ok", 1), (b"ok", 2)], ready=True)
    ring.view(np.uint32)[(FIRST_FRAME + 12) // 4] = 10**6  # a captured length past the block
    frames, _, taken = walk(ring, 0)
    assert frames == [] and taken == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"link_type": "ethernet"}, "source.link_type must be 'auto', 'radiotap', '802.11'"),
        ({"link_type": "1"}, "source.link_type must be 'auto', 'radiotap', '802.11' or one of"),
        ({"hop": "yes"}, "source.hop must be 'on' or 'off', got 'yes'"),
        ({"channels": "1;6"}, "source.hop_channels must be channel numbers separated by commas"),
        ({"channels": "1,300"}, "source.hop_channels must be channel numbers 1 to 233, got 300"),
        ({"hop": "on", "channels": ""}, "source.hop_channels must list at least one channel"),
        ({"dwell_ms": 10}, "source.hop_dwell_ms must be between 50 and 60000 ms, got 10"),
        ({"ring_mb": 0}, "source.ring_mb must be between 1 and 256 MiB, got 0"),
    ],
)
def test_live_settings_refuse_bad_values_naming_the_setting(
    kwargs: dict[str, object], message: str
) -> None:
    names = {"link_type": "LINK_TYPE", "ring_mb": "RING_MB", "hop": "HOP"}
    names |= {"channels": "HOP_CHANNELS", "dwell_ms": "HOP_DWELL_MS"}
    environ = {f"FOOTFALL_SOURCE_{names[k]}": str(v) for k, v in kwargs.items()}
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, environ=environ)


def _live(**environ: str) -> LiveSettings:
    return load_config(None, environ={f"FOOTFALL_SOURCE_{k}": v for k, v in environ.items()}).live


def test_live_settings_read_names_and_numbers() -> None:
    assert _live(LINK_TYPE="radiotap", HOP="on", HOP_CHANNELS="1, 6,11").link_type == (
        LINKTYPE_RADIOTAP
    )
    assert _live(LINK_TYPE="105").link_type == LINKTYPE_IEEE802_11
    settings = _live(RING_MB="16", HOP="ON", HOP_CHANNELS="36,40", HOP_DWELL_MS="500")
    assert (settings.link_type, settings.hop, settings.hop_channels) == (None, True, (36, 40))


def test_the_settings_allow_the_link_types_live_capture_filters() -> None:
    assert sorted(FILTERED_LINK_TYPES) == sorted(PROBE_REQUEST_FILTERS)


@pytest.fixture
def fake_iw(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An ``iw`` on PATH that logs its arguments and refuses channel 14, as a radio would."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "iw.log"
    script = bin_dir / "iw"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {calls}\n'
        'if [ "$5" = 14 ]; then echo "command failed: Invalid argument (-22)" >&2; exit 240; fi\n'
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return calls


def test_hopper_checks_each_channel_then_hops_in_order(fake_iw: Path) -> None:
    hopper = ChannelHopper("mon0", (1, 6, 11), 50)
    hopper.start()
    try:
        deadline = time.monotonic() + 5
        while hopper.hops < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        hopper.stop()
    calls = fake_iw.read_text().split("\n")
    channels = [int(line.split()[-1]) for line in calls if line]
    assert all(line.startswith("dev mon0 set channel") for line in calls if line)
    assert channels[:7] == [1, 6, 11, 1, 6, 11, 1] and hopper.error is None


def test_refused_channel_is_an_error_naming_it_and_the_interface(fake_iw: Path) -> None:
    hopper = ChannelHopper("mon0", (1, 14), 200)
    with pytest.raises(ChannelHopError, match=r"iw refused channel 14 on mon0: command failed"):
        hopper.start()


def test_missing_iw_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ChannelHopError, match=r"channel hopping on mon0 needs iw.*apt-get install"):
        ChannelHopper("mon0", (1, 6, 11), 200)
