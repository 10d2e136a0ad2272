"""Benchmark of the live path: frames sent through a veth pair into a running agent.

Runs the real agent (``footfall-agent run --source iface:<veth>``, publishing to a Mosquitto
this bench starts, metrics on a local port) on one end of a veth pair whose other end, in a
network namespace of its own, ``tcpreplay`` feeds with a synthetic capture's radiotap frames
(``tests/support/netns.py``). Needs root, ``ip``, ``tcpreplay`` and ``mosquitto``.

For each rate (10k, 50k, 100k, 200k frames/s, then ``--topspeed``) it sends ``rate x seconds``
frames and reports what the agent received, what the kernel dropped (``PACKET_STATISTICS``,
read from the agent's metrics), and the agent's CPU (user + system time of its process over
the sending time) as a share of one core, and per 10,000 frames/s. The baseline, measured in
the same run: the same frames replayed from the file in process (``Pipeline`` over
``CaptureReader``), CPU per 10,000 frames/s; the ratio is what capturing live adds.

Then the footprint: a fresh agent is sent a capture of 100,000 devices, and its resident
memory (VmRSS) is read once every frame is in, with the device count the last window reports.

Both are measured for each way the kernels are compiled (``--kernels``): numba's JIT (the
baseline, as without a build) and the ahead-of-time build (``footfall-agent build-kernels``,
made here into ``bench/out/kernels``; firmware_agent/kernels.py), which spares the agent
importing numba. The agent runs with the environment its systemd unit sets
(``hardware/systemd/footfall-agent.service``'s ``Environment=`` lines).

Usage: ``sudo .venv/bin/python bench/bench_live.py [--seconds 5] [--kernels jit,aot]``
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the test harness: veth pair, broker, agent files

from firmware_agent.settings import load_config  # noqa: E402
from firmware_agent.stages.capture import CaptureReader  # noqa: E402
from firmware_agent.stages.pipeline import Pipeline  # noqa: E402
from firmware_agent.tools.synthetic import SyntheticSpec, write_synthetic_capture  # noqa: E402
from tests.support.agent_harness import AgentFiles, prepare_agent, scrape  # noqa: E402
from tests.support.mqtt_broker import (  # noqa: E402
    Mosquitto,
    Subscriber,
    TestCertificates,
    find_mosquitto,
    wait_for,
)
from tests.support.netns import Veth, veth_pair  # noqa: E402
from tests.support.ports import free_port  # noqa: E402

OUT = REPO / "bench" / "out"
UNIT = REPO / "hardware" / "systemd" / "footfall-agent.service"
SITE, AGENT = "bench", "live"
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS, VmHWM (peak), RssAnon and RssFile (shared libraries' pages) in MB."""
    status = Path(f"/proc/{pid}/status").read_text()
    pattern = r"(VmRSS|VmHWM|RssAnon|RssFile):\s+(\d+)"
    return {k: int(v) / 1024 for k, v in re.findall(pattern, status)}


def kernels_loaded(pid: int) -> str:
    """What the agent's kernels run on, from its memory map: the AOT build or numba's JIT."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    aot = "footfall_kernels_" in maps
    jit = "llvmlite" in maps
    return {(True, False): "AOT build", (False, True): "numba JIT"}.get((aot, jit), "both?")


def unit_environment() -> dict[str, str]:
    """The ``Environment=`` settings of the agent's systemd unit (the cache directory aside)."""
    pairs = re.findall(r"^Environment=(\w+)=(.*)$", UNIT.read_text(), re.M)
    return {k: v for k, v in pairs if k != "NUMBA_CACHE_DIR"}


def kernels_dir(kernels: str) -> Path:
    """FOOTFALL_KERNELS_DIR for a mode: an empty directory (JIT), or one with the AOT build."""
    directory = OUT / ("kernels" if kernels == "aot" else "no-kernels")
    directory.mkdir(parents=True, exist_ok=True)
    if kernels == "aot":
        print(f"building the kernels ahead of time into {directory} ...", file=sys.stderr)
        agent = Path(sys.executable).with_name("footfall-agent")
        env = os.environ | {"FOOTFALL_KERNELS_DIR": str(directory)}
        subprocess.run([str(agent), "build-kernels"], env=env, check=True)
    return directory


def capture(name: str, spec: SyntheticSpec) -> Path:
    path = OUT / name
    if not path.exists():
        OUT.mkdir(parents=True, exist_ok=True)
        write_synthetic_capture(path, spec)
    return path


class Agent:
    """``footfall-agent run`` on the veth, with its metrics port."""

    def __init__(self, root: Path, broker: Mosquitto, veth: Veth) -> None:
        self.port = free_port()
        self.files: AgentFiles = prepare_agent(root, broker, SITE, AGENT, {
            "source.path": f"iface:{veth.agent}", "source.link_type": "radiotap",
            "metrics.port": self.port, "broker.stop_grace_s": 5,
        })  # fmt: skip
        self.process = self.files.start()
        wait_for(self._up, 120, "the agent's metrics endpoint")
        self.pid = self.process.pid

    def warm_up(self, veth: Veth, path: Path) -> None:
        """A few thousand frames first: the kernels load (from numba's cache) at the first batch."""
        veth.replay(path, OUT, pps=10_000, limit=5000)
        self.settle(5000)

    def _up(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError("the agent stopped:\n" + self.files.log_text())
        try:
            return scrape(self.port)["footfall_broker_connected"] == 1
        except OSError:
            return False

    def settle(self, expected: float, timeout: float = 60) -> dict[str, float]:
        """Metrics once the frame count reaches ``expected`` or stops moving for a second."""
        deadline = time.monotonic() + timeout
        last, still = -1.0, time.monotonic()
        while time.monotonic() < deadline:
            metrics = scrape(self.port)
            frames = metrics["footfall_frames_total"]
            if frames >= expected:
                return metrics
            if frames != last:
                last, still = frames, time.monotonic()
            elif time.monotonic() - still > 1.0:
                return metrics
            time.sleep(0.05)
        return scrape(self.port)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(60)


def sent_and_rate(result: subprocess.CompletedProcess[str]) -> tuple[int, float, float]:
    """(frames sent, seconds, frames/s) from tcpreplay's report."""
    actual = re.search(r"Actual: (\d+) packets .* in ([\d.]+) seconds", result.stdout)
    rated = re.search(r"Rated: [\d.]+ Bps, [\d.]+ Mbps, ([\d.]+) pps", result.stdout)
    assert actual and rated, result.stdout
    return int(actual.group(1)), float(actual.group(2)), float(rated.group(1))


def replay_baseline(path: Path, frames: int) -> float:
    """CPU seconds of the in-process replay per 10,000 frames (the same frames, from the file)."""
    config = load_config(None, environ={"FOOTFALL_EPOCH_TIMEZONE": "UTC"})
    for _ in Pipeline(config).run(CaptureReader(path, in_place=True)):
        pass  # warm the kernels
    started = time.process_time()
    for _ in Pipeline(config).run(CaptureReader(path, in_place=True)):
        pass
    return (time.process_time() - started) / frames * 10_000


@dataclass(frozen=True)
class Row:
    kernels: str  # jit or aot
    asked: int  # frames/s; 0: --topspeed
    sent_at: float  # frames/s, as tcpreplay reports it
    sent: int
    received: float
    drops: float
    cpu_s: float
    seconds: float  # sending time

    @property
    def share(self) -> float:
        """The agent's CPU over the sending time, as a share of one core."""
        return self.cpu_s / max(self.seconds, 1e-9)

    @property
    def per_10k(self) -> float:
        """CPU seconds per 10,000 frames: the share of a core at 10,000 frames/s."""
        return self.cpu_s / self.sent * 10_000


def measure(kernels: str, agent: Agent, veth: Veth, path: Path, rate: int, seconds: float) -> Row:
    limit = int(rate * seconds) if rate else 1_000_000
    before, cpu0 = scrape(agent.port), cpu_seconds(agent.pid)
    result = veth.replay(path, OUT, pps=rate or None, limit=limit)
    sent, took, achieved = sent_and_rate(result)
    after = agent.settle(before["footfall_frames_total"] + sent)

    def delta(name: str) -> float:
        return after[name] - before[name]

    return Row(
        kernels, rate, achieved, sent, delta("footfall_frames_total"),
        delta("footfall_kernel_drops_total"), cpu_seconds(agent.pid) - cpu0, took,
    )  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="sending time per rate")
    parser.add_argument(
        "--rates", default="10000,50000,100000,200000", help="frames/s, then --topspeed"
    )
    parser.add_argument(
        "--kernels", default="jit,aot", help="how the agent's kernels are compiled: jit, aot"
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_live needs root (a veth pair, a network namespace)", file=sys.stderr)
        return 2
    mosquitto = find_mosquitto()
    if mosquitto is None:
        print("bench_live needs mosquitto (apt-get install mosquitto)", file=sys.stderr)
        return 2
    rates = [int(r) for r in args.rates.split(",")] + [0]
    frames_path = capture("live_200000_2000.pcap", SyntheticSpec(frames=200_000, devices=2000))
    crowd_path = capture(
        "live_200000_100000.pcap", SyntheticSpec(frames=200_000, devices=100_000, seed=3)
    )
    baseline = replay_baseline(frames_path, 200_000)

    modes = {kernels: kernels_dir(kernels) for kernels in args.kernels.split(",")}
    os.environ.update(unit_environment())

    work = Path(tempfile.mkdtemp(prefix="bench_live-"))
    certs = TestCertificates.make(work / "certs")
    broker = Mosquitto(mosquitto, work / "broker", certs, {(SITE, AGENT): f"pw-{AGENT}"})
    broker.start()
    rows: list[Row] = []
    crowds: dict[str, Footprint] = {}
    try:
        with veth_pair() as veth:
            for kernels, directory in modes.items():
                print(f"{kernels}: rates {rates} (0: top speed), then memory", file=sys.stderr)
                os.environ["FOOTFALL_KERNELS_DIR"] = str(directory)
                agent = Agent(work / f"agent-{kernels}", broker, veth)
                try:
                    agent.warm_up(veth, frames_path)
                    rows += [
                        measure(kernels, agent, veth, frames_path, r, args.seconds) for r in rates
                    ]
                finally:
                    agent.stop()
                crowds[kernels] = footprint(
                    work / f"crowd-{kernels}", broker, veth, frames_path, crowd_path
                )
    finally:
        broker.kill()
        shutil.rmtree(work, ignore_errors=True)
    print_report(rows, baseline, crowds)
    return 0


Footprint = tuple[dict[str, float], dict[str, float], int, str]


def footprint(root: Path, broker: Mosquitto, veth: Veth, warm: Path, crowd: Path) -> Footprint:
    """Memory of a fresh agent once warm (a few thousand frames), then once sent a crowd of
    100,000 devices (steady: the last of ten samples over 3 s), and the devices it counted."""
    sub = Subscriber(broker)
    agent = Agent(root, broker, veth)
    try:
        agent.warm_up(veth, warm)
        idle = memory_mb(agent.pid)
        loaded = kernels_loaded(agent.pid)
        veth.replay(crowd, OUT, pps=50_000)
        agent.settle(205_000)
        samples = []
        for _ in range(10):
            samples.append(memory_mb(agent.pid))
            time.sleep(0.3)
    finally:
        agent.stop()
    wait_for(lambda: bool(sub.windows()), 10, "the agent's last window")
    devices = max(w["devices_epoch"] for w in sub.windows())
    sub.close()
    return idle, samples[-1] | {"VmHWM": max(s["VmHWM"] for s in samples)}, devices, loaded


def print_report(rows: list[Row], baseline: float, crowds: dict[str, Footprint]) -> None:
    print(f"live path: footfall-agent run on a veth, {os.cpu_count()} cores; baseline: the same "
          f"frames replayed in process, {baseline:.4f} CPU s per 10k frames")  # fmt: skip
    print()
    print("| kernels | asked (frames/s) | sent at (frames/s) | sent | received | kernel drops "
          "| agent CPU (% of a core) | CPU per 10k frames/s | vs replay |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        asked = f"{row.asked:,}" if row.asked else "topspeed"
        print(f"| {row.kernels} | {asked} | {row.sent_at:,.0f} | {row.sent:,} "
              f"| {row.received:,.0f} | {row.drops:,.0f} | {row.share:.1%} | {row.per_10k:.1%} "
              f"| {row.per_10k / baseline:.2f}x |")  # fmt: skip
    for kernels in dict.fromkeys(row.kernels for row in rows):
        clean = [r for r in rows if r.kernels == kernels and r.drops == 0 and r.received >= r.sent]
        if clean:
            best = max(clean, key=lambda row: row.sent_at).sent_at
            print(f"\n{kernels}: highest rate with every frame received, no kernel drop: "
                  f"{best:,.0f} frames/s")  # fmt: skip
    print("\n| kernels (mapped) | agent memory (MB) | RSS | anonymous | files (libraries) "
          "| peak |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|")
    for kernels, (idle, full, devices, loaded) in crowds.items():
        for label, m in (("warm, a few thousand devices", idle),
                         (f"{devices:,} devices in the epoch", full)):  # fmt: skip
            print(f"| {kernels} ({loaded}) | {label} | {m['VmRSS']:.0f} | {m['RssAnon']:.0f} "
                  f"| {m['RssFile']:.0f} | {m['VmHWM']:.0f} |")  # fmt: skip
    print("goal: at most 160 MB with 100,000 devices; baseline: the JIT rows")


if __name__ == "__main__":
    sys.exit(main())
