"""The live source against the kernel: real captures sent through a veth pair
(``tests/support/netns.py``).

What is asserted, and why that is "the counts equal a replay of the same capture":

1. **Frames**: the agent receives exactly the capture's probe requests, byte for byte (as a
   multiset: two cores may reorder a few), and the kernel dropped none of them. The kernel
   filter kept nothing else, even from a capture full of beacons and data frames.
2. **Counts**: the windows the pipeline closes on the live source equal a replay (``Pipeline``
   over ``CaptureReader``) of a pcap holding the received frames with their live timestamps.
   The frames are the capture's own (1), so the only difference from replaying the capture
   is the clock; totals that do not depend on it (probe requests, malformed) equal the
   replay of the original capture too. These runs leave the wall clock out (``clock=None``):
   ticks close windows exactly as frames do (``tests/agent/test_wall_clock.py``), but a run that
   happens to straddle a window boundary would then close one more, empty, window.
"""

from __future__ import annotations

import os
import shutil
import signal
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from firmware_agent.cli import BUNDLED_SAMPLE
from firmware_agent.contract.errors import ChannelHopError, LiveCaptureError
from firmware_agent.settings import load_config
from firmware_agent.stages.batch import NS, FrameBatch, WindowCounts
from firmware_agent.stages.capture import CaptureReader
from firmware_agent.stages.config import LiveSettings
from firmware_agent.stages.live import LiveCapture
from firmware_agent.stages.pipeline import Pipeline
from tests.agent.test_live import is_probe_request
from tests.agent.test_privacy import _secrets_of
from tests.integration.test_privacy_memory import _memory, found
from tests.support.agent_harness import prepare_agent, scrape, unique_id
from tests.support.mqtt_broker import Mosquitto, Subscriber, wait_for
from tests.support.netns import Veth, require
from tests.support.ports import free_port

UTC = {"FOOTFALL_EPOCH_TIMEZONE": "UTC"}
RADIOTAP = LiveSettings(link_type=127)


def capture_frames(path: Path) -> tuple[list[bytes], list[int]]:
    """Every frame of a capture, and the link type of each."""
    frames, links = [], []
    with CaptureReader(path) as reader:
        for batch in reader:
            for i in range(len(batch)):
                start = int(batch.offsets[i])
                frames.append(batch.data[start : start + int(batch.lengths[i])].tobytes())
                links.append(int(batch.link_types[i]))
    return frames, links


class LiveRun:
    """The live source and pipeline over a veth while a capture is sent into it."""

    def __init__(self, veth: Veth, **live: Any) -> None:
        self.frames: list[bytes] = []
        self.ts_ns: list[int] = []
        self.source = LiveCapture(veth.agent, RADIOTAP, idle_s=0.05, **live)

    def tee(self) -> Iterator[FrameBatch]:
        """The batches, after a copy of their frames and timestamps (the test's record)."""
        for batch in self.source:
            for i in range(len(batch)):
                start = int(batch.offsets[i])
                self.frames.append(batch.data[start : start + int(batch.lengths[i])].tobytes())
                self.ts_ns.append(int(batch.ts_ns[i]))
            yield batch

    def count(self, send: threading.Thread, expected: int) -> list[WindowCounts]:
        """Run the pipeline until ``send`` is done and ``expected`` frames came (or 20 s)."""

        def stop_when_done() -> None:
            send.join()
            deadline = time.monotonic() + 20
            while self.source.records_read < expected and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.3)  # anything more (there must be nothing) would come now
            self.source.stop()

        stopper = threading.Thread(target=stop_when_done)
        with self.source:
            send.start()
            stopper.start()
            windows = list(Pipeline(load_config(None, environ=UTC)).run(self.tee()))
            stopper.join()
        return windows


def write_pcap(path: Path, frames: list[bytes], ts_ns: list[int]) -> None:
    """A nanosecond pcap of radiotap frames."""
    with path.open("wb") as out:
        out.write(struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 262144, 127))
        for frame, ts in zip(frames, ts_ns, strict=True):
            sec, nsec = divmod(ts, NS)
            out.write(struct.pack("<IIII", sec, nsec, len(frame), len(frame)) + frame)


def replay(path: Path) -> list[WindowCounts]:
    with CaptureReader(path) as reader:
        return list(Pipeline(load_config(None, environ=UTC)).run(reader))


def check_live_equals_replay(
    veth: Veth, capture: Path, tmp_path: Path, *, use_ring: bool = True
) -> LiveRun:
    frames, links = capture_frames(capture)
    probes = [f for f, lt in zip(frames, links, strict=True) if is_probe_request(lt, f)]
    run = LiveRun(veth, use_ring=use_ring)
    send = threading.Thread(target=veth.replay, args=(capture, tmp_path), kwargs={"pps": 20000})
    windows = run.count(send, len(probes))
    stats = run.source.kernel_stats()
    # 1. exactly the capture's probe requests, none dropped
    assert len(run.frames) == len(probes) and sorted(run.frames) == sorted(probes)
    assert (stats.packets, stats.drops) == (len(probes), 0)
    # 2. the counts of a replay of the same frames with the live timestamps
    received = tmp_path / "received.pcap"
    write_pcap(received, run.frames, run.ts_ns)
    assert windows == replay(received)
    original = replay(capture)
    for total in ("probe_requests", "malformed"):
        assert sum(getattr(w, total) for w in windows) == sum(getattr(w, total) for w in original)
    return run


@pytest.mark.parametrize("use_ring", [True, False], ids=["ring", "receive-loop"])
def test_live_counts_of_the_bundled_sample_equal_its_replay(
    use_ring: bool, veth: Veth, tmp_path: Path
) -> None:
    run = check_live_equals_replay(veth, BUNDLED_SAMPLE, tmp_path, use_ring=use_ring)
    assert run.source.mode == ("ring" if use_ring else "recv")
    assert len(run.frames) == 12000


@pytest.mark.shared
@pytest.mark.parametrize(
    "name",
    [
        "fryza_p1_sc6-61_2024-03-31_anonymized.pcap",  # ESP32 sensor, radiotap
        "gianlucavigo_01_iPadApple_01.pcap",  # laptop NIC with FCS; 2 % of frames are probes
    ],
)
def test_live_counts_of_a_real_capture_equal_its_replay(
    name: str, pcaps_dir: Path, veth: Veth, tmp_path: Path
) -> None:
    check_live_equals_replay(veth, pcaps_dir / name, tmp_path)


def test_quiet_air_still_closes_windows_on_the_wall_clock(veth: Veth) -> None:
    """No frame at all: empty batches keep coming, and each tick of a (fast) clock closes the
    windows it passes, with zeros."""
    w = 300 * NS
    start = time.time_ns() // w * w + 20 * NS
    calls = iter(range(1_000_000))

    def clock() -> int:
        return start + next(calls) * w  # five minutes pass at every tick

    source = LiveCapture(veth.agent, RADIOTAP, idle_s=0.02)
    windows = []
    with source:
        for window in Pipeline(load_config(None, environ=UTC)).run(source, clock=clock):
            windows.append(window)
            if len(windows) == 3:
                source.stop()
    assert [w.window_start for w in windows[:3]] == [
        (start // w * w + k * w) // NS for k in range(3)
    ]
    assert all(w.probe_requests == w.devices == w.devices_epoch == 0 for w in windows)


def test_interface_errors_name_the_interface_and_the_fix(veth: Veth) -> None:
    with pytest.raises(LiveCaptureError, match=r"interface 'ffnone0' does not exist"):
        LiveCapture("ffnone0")
    with pytest.raises(LiveCaptureError, match=rf"interface '{veth.agent}' is not in monitor "
                       r"mode \(it is Ethernet\).*source.link_type"):  # fmt: skip
        LiveCapture(veth.agent)
    os.system(f"ip link set {veth.agent} down")
    with pytest.raises(LiveCaptureError, match=rf"interface '{veth.agent}' is down: 'ip link"):
        LiveCapture(veth.agent, RADIOTAP)


def test_hopping_on_a_radio_that_refuses_is_an_error_naming_channel_and_interface(
    veth: Veth,
) -> None:
    require(shutil.which("iw") is not None, "iw is not installed (.ci/run installs it)")
    settings = LiveSettings(link_type=127, hop=True, hop_channels=(1, 6, 11))
    with pytest.raises(ChannelHopError, match=rf"iw refused channel 1 on {veth.agent}: "):
        LiveCapture(veth.agent, settings)


def test_agent_run_on_an_interface_publishes_its_counts_and_metrics(
    veth: Veth,
    start_broker: Any,
    sample_windows: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    site, agent = unique_id("s"), "a1"
    broker: Mosquitto = start_broker({(site, agent): f"pw-{agent}"})
    port = free_port()
    files = prepare_agent(tmp_path, broker, site, agent, {
        "source.path": f"iface:{veth.agent}", "source.link_type": "radiotap",
        "metrics.port": port,
    })  # fmt: skip
    sub = Subscriber(broker)
    run = files.start()
    try:

        def metrics_up() -> bool:
            assert run.poll() is None, files.log_text()
            try:
                return scrape(port)["footfall_broker_connected"] == 1
            except OSError:
                return False

        wait_for(metrics_up, 30, "the agent's metrics endpoint")
        veth.replay(BUNDLED_SAMPLE, tmp_path, pps=20000)
        wait_for(lambda: scrape(port)["footfall_frames_total"] == 12000, 20, "12000 frames")
        metrics = scrape(port)
        assert metrics["footfall_probe_requests_total"] == 12000
        assert metrics["footfall_kernel_packets_total"] == 12000
        assert metrics["footfall_kernel_drops_total"] == 0
        # Issue 17: the running agent's memory holds none of the frames' addresses or SSIDs.
        macs, ssids = _secrets_of(BUNDLED_SAMPLE)
        assert found(_memory(run.pid), macs | ssids) == set()
        run.send_signal(signal.SIGTERM)
        assert run.wait(30) == 0, files.log_text()
        wait_for(
            lambda: any(e.payload["cause"] == "stopped" for e in sub.envelopes("/status")),
            10,
            "the offline status",
        )
        windows = sub.windows()
    finally:
        if run.poll() is None:
            run.kill()
        sub.close()
    assert sum(w["probe_requests"] for w in windows) == 12000
    assert sum(w["probe_requests"] for w in sample_windows) == 12000
    for window in windows:
        window_start = int(time.mktime(time.strptime(window["window_start"], "%Y-%m-%dT%H:%M:%SZ")))
        assert abs(window_start - time.time() + time.timezone) < 3600  # live time, not 2024
    assert f"capturing on {veth.agent}: link type radiotap, kernel ring" in files.log_text()
