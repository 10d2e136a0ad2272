"""Benchmark at a busy site's scale, on real-shaped inputs as well as synthetic ones (issue 18).

Inputs (written once to ``bench/out/``):

* ``real``: a real lab capture's frames (``--source``, the shared capture with the most probe
  requests) repeated with advancing times (each repetition starts a second after the last
  one ended) up to ``--frames``: the shape of real traffic, a few hundred probe requests per
  5-minute window from a few thousand addresses in all;
* ``synthetic``: the generator's capture (``firmware_agent.tools.synthetic``) of the same size,
  2,000 devices probing densely (what ``bench_core.py`` measures);
* ``busy day``: ``--addresses`` frames in one UTC day, each from an address of its own (the
  real capture's frames, the transmitter address rewritten), then ``quiet day``: the real
  capture once, the next day.

Tables:

1. throughput, in process (file -> parse -> hash -> count -> estimate -> people, the agent's
   pipeline; best of ``--repeat``) and whole process (``footfall-agent replay`` wall time,
   start-up included), with the kernels from numba's JIT and built ahead of time
   (``footfall-agent build-kernels``, made by the bench into ``bench/out/kernels``);
2. scapy, whole process on the real source file (``PcapReader`` and the fields the agent
   reads) against ``footfall-agent replay`` (AOT), start-up included (per frame, on frames
   already in memory: ``bench_core.py``);
3. memory: peak RSS through the busy day and RSS at the end of the quiet day that follows
   (one ``replay`` of both files in a row, ``count.max_devices`` at its default), JIT and AOT.

The machine's load average is printed: on a shared machine only the ratios measured in the
same run mean much.

Usage: ``python bench/bench_scale.py [--frames 2000000] [--addresses 2000000]``
"""

from __future__ import annotations

import argparse
import os
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from firmware_agent import BUNDLED_SAMPLE
from firmware_agent.settings import load_config
from firmware_agent.stages.batch import KIND_PROBE
from firmware_agent.stages.capture import CaptureReader
from firmware_agent.stages.parse import parse_batch
from firmware_agent.stages.pipeline import Pipeline
from firmware_agent.tools.synthetic import SyntheticSpec, write_synthetic_capture

OUT = Path(__file__).resolve().parent / "out"
SHARED = Path(__file__).resolve().parents[2] / "shared/data/pcaps"
AGENT = [sys.executable, "-m", "firmware_agent.cli"]
DAY = 86_400

# Replays its arguments in one process and prints peak RSS (MB) after each, then the RSS.
_MEMORY = """
import contextlib, os, sys
from firmware_agent import cli
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) // 1024
for path in sys.argv[1:]:
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        cli.main(["replay", path])
    print(rss("VmHWM:"), rss("VmRSS:"), flush=True)
"""

SCAPY = Path(__file__).resolve().with_name("scapy_dissect.py")


def records(path: Path) -> tuple[bytes, list[tuple[int, int, bytes]]]:
    """A little-endian microsecond pcap: its header and (seconds, microseconds, frame)."""
    data = path.read_bytes()
    if data[:4] != b"\xd4\xc3\xb2\xa1":
        raise SystemExit(f"{path}: expected a little-endian microsecond pcap")
    out = []
    at = 24
    while at + 16 <= len(data):
        sec, usec, incl, _orig = struct.unpack_from("<IIII", data, at)
        out.append((sec, usec, data[at + 16 : at + 16 + incl]))
        at += 16 + incl
    return data[:24], out


def _record(sec: int, usec: int, frame: bytes) -> bytes:
    return struct.pack("<IIII", sec, usec, len(frame), len(frame)) + frame


def _with_address(frame: bytes, n: int) -> bytes:
    """The frame with its transmitter address replaced by locally administered address n."""
    at = struct.unpack_from("<H", frame, 2)[0] + 10  # radiotap length, then addr2
    address = bytes([0x02, 0xFF]) + n.to_bytes(4, "big")
    return frame[:at] + address + frame[at + 6 :]


def write_real(source: Path, frames: int, out: Path) -> None:
    """``source`` repeated with advancing times up to ``frames`` frames."""
    header, recs = records(source)
    first, last = recs[0][0], recs[-1][0]
    span = last - first + 1
    with out.open("wb") as f:
        f.write(header)
        for i in range(frames):
            sec, usec, frame = recs[i % len(recs)]
            f.write(_record(sec + (i // len(recs)) * span, usec, frame))


def write_busy_days(source: Path, addresses: int, busy: Path, quiet: Path) -> None:
    """A day of ``addresses`` distinct addresses (one frame each), and the real capture the
    next day."""
    header, recs = records(source)
    probes = [frame for _s, _u, frame in recs if _is_probe(frame)]
    day0 = recs[0][0] // DAY * DAY + DAY
    with busy.open("wb") as f:
        f.write(header)
        for i in range(addresses):
            t_us = i * (DAY * 1_000_000 // addresses)
            frame = _with_address(probes[i % len(probes)], i)
            f.write(_record(day0 + t_us // 1_000_000, t_us % 1_000_000, frame))
    with quiet.open("wb") as f:
        f.write(header)
        shift = day0 + DAY - recs[0][0] // DAY * DAY
        for sec, usec, frame in recs:
            f.write(_record(sec + shift, usec, frame))


def _is_probe(frame: bytes) -> bool:
    at = struct.unpack_from("<H", frame, 2)[0]
    return len(frame) > at + 24 and frame[at] == 0x40


def _counted(path: Path) -> tuple[int, int]:
    frames = probes = 0
    with CaptureReader(path) as reader:
        for batch in reader:
            frames += len(batch)
            probes += int((parse_batch(batch).kind & KIND_PROBE != 0).sum())
    return frames, probes


def _in_process(path: Path, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        began = time.perf_counter()
        pipeline = Pipeline(load_config(environ={}))
        with CaptureReader(path, in_place=True) as reader:
            for _window in pipeline.run(reader):
                pass
        best = min(best, time.perf_counter() - began)
    return best


def _env(kernels: Path | None) -> dict[str, str]:
    env = os.environ | {"FOOTFALL_EPOCH_TIMEZONE": "UTC"}
    env["FOOTFALL_KERNELS_DIR"] = str(kernels or OUT / "no-kernels")  # none there: the JIT
    return env


def _wall(argv: list[str], env: dict[str, str]) -> float:
    began = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - began


def _memory(paths: list[Path], env: dict[str, str]) -> Iterator[tuple[int, int]]:
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY, *map(str, paths)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    for i in range(0, len(out), 2):
        yield int(out[i]), int(out[i + 1])


def throughput(real: Path, synthetic: Path, source: Path, repeat: int, kernels: Path) -> None:
    print("| input | frames | probe requests | in process, probes/s (JIT) | whole process, "
          "frames/s (JIT) | whole process, frames/s (AOT) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    for name, path in (("real-shaped", real), ("synthetic", synthetic)):
        frames, probes = _counted(path)
        inproc = _in_process(path, repeat)
        argv = [*AGENT, "replay", str(path)]
        jit, aot = _wall(argv, _env(None)), _wall(argv, _env(kernels))
        print(
            f"| {name} | {frames:,} | {probes:,} | {probes / inproc:,.0f} | "
            f"{frames / jit:,.0f} | {frames / aot:,.0f} |"
        )

    source_frames, _ = _counted(source)
    ours = _wall([*AGENT, "replay", str(source)], _env(kernels))
    theirs = _wall([sys.executable, str(SCAPY), str(source)], _env(None))
    print(f"\nscapy, whole process on {source.name} ({source_frames:,} frames): "
          f"scapy {theirs:.1f} s, footfall-agent replay (AOT) {ours:.2f} s: "
          f"{theirs / ours:.0f}x")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=2_000_000)
    parser.add_argument("--addresses", type=int, default=2_000_000)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--memory-only", action="store_true", help="only the memory table")
    parser.add_argument(
        "--source", type=Path, default=SHARED / "fryza_p1_sc6-61_2023-02-21_anonymized.pcap"
    )
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    (OUT / "no-kernels").mkdir(exist_ok=True)
    real = OUT / f"real_{args.source.stem}_{args.frames}.pcap"
    synthetic = OUT / f"synthetic_{args.frames}_2000.pcap"
    busy = OUT / f"busy_day_{args.addresses}.pcap"
    quiet = OUT / f"quiet_day_{args.source.stem}.pcap"
    if not real.exists():
        write_real(args.source, args.frames, real)
    if not synthetic.exists():
        spec = SyntheticSpec(frames=args.frames, devices=2000, randomised_share=0.5, seed=7)
        write_synthetic_capture(synthetic, spec)
    if not busy.exists() or not quiet.exists():
        write_busy_days(args.source, args.addresses, busy, quiet)
    kernels = OUT / "kernels"
    subprocess.run(
        [*AGENT, "build-kernels"], env=_env(kernels), check=True, stdout=subprocess.DEVNULL
    )
    _in_process(BUNDLED_SAMPLE, 1)  # the JIT compiles (or loads its cache) outside the timings
    print(f"load average at the start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")

    if not args.memory_only:
        throughput(real, synthetic, args.source, args.repeat, kernels)
    print(f"\nload average before memory: {os.getloadavg()[0]:.1f}\n")
    print("| kernels | peak RSS, busy day (MB) | RSS at the end of the quiet day (MB) |")
    print("|---|---:|---:|")
    for name, env in (("JIT", _env(None)), ("AOT", _env(kernels))):
        (day_peak, _), (_, quiet_rss) = _memory([busy, quiet], env)
        print(f"| {name} | {day_peak} | {quiet_rss} |")


if __name__ == "__main__":
    main()
