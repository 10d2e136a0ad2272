"""Benchmark of the agent's core: capture file -> parse -> hash -> count.

Prints one table. Every speed is set against a baseline measured in the same run:

* ``e2e``: the whole in-process path (read, parse, anonymize, count; the pipeline the
  agent runs), frames and probe requests per second, best of ``--repeat`` runs with a
  warm numba cache;
* ``parse``: the numba parse stage alone on batches already in memory;
* ``scapy``: scapy's full dissection (``RadioTap(frame)`` / ``Dot11(frame)`` plus reading
  the transmitter, sequence number and elements) of the same frames, timed on the first
  ``--scapy-frames`` of them (it runs ~10^4 frames/s; a million would take minutes);
* ratios: numba parse / scapy and e2e / scapy, per frame.

Then the peak RSS of ``footfall-agent replay`` of the million-frame capture (a child
process, so the measurement holds only the agent) and the wall time of a warm-cache
``footfall-agent replay`` of the bundled sample (median of 5).

Usage: ``python bench/bench_core.py [--frames 1000000] [--shared ../shared/data/pcaps]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from scapy.layers.dot11 import Dot11, RadioTap
from scapy_dissect import dissect

from firmware_agent import BUNDLED_SAMPLE
from firmware_agent.settings import load_config
from firmware_agent.stages.batch import KIND_PROBE, LINKTYPE_RADIOTAP, FrameBatch
from firmware_agent.stages.capture import CaptureReader
from firmware_agent.stages.parse import parse_batch
from firmware_agent.stages.pipeline import Pipeline
from firmware_agent.tools.synthetic import SyntheticSpec, write_synthetic_capture

OUT = Path(__file__).resolve().parent / "out"
AGENT = [sys.executable, "-m", "firmware_agent.cli"]


def _best(run: Callable[[], None], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def _replay(path: Path) -> None:
    pipeline = Pipeline(load_config(environ={}))
    with CaptureReader(path, in_place=True) as reader:
        for _window in pipeline.run(reader):
            pass


def _batches(path: Path) -> list[FrameBatch]:
    with CaptureReader(path) as reader:
        return list(reader)


def _scapy_rate(batches: list[FrameBatch], limit: int) -> float:
    frames = []
    for batch in batches:
        for off, length, lt in zip(batch.offsets, batch.lengths, batch.link_types, strict=True):
            frames.append((bytes(batch.data[off : off + length]), int(lt)))
            if len(frames) == limit:
                break
        if len(frames) == limit:
            break
    start = time.perf_counter()
    for frame, lt in frames:
        dissect(RadioTap(frame) if lt == LINKTYPE_RADIOTAP else Dot11(frame))
    return len(frames) / (time.perf_counter() - start)


def bench_capture(path: Path, repeat: int, scapy_frames: int) -> dict[str, float | str]:
    batches = _batches(path)
    frames = sum(len(b) for b in batches)
    probes = sum(int((parse_batch(b).kind & KIND_PROBE != 0).sum()) for b in batches)
    _replay(path)  # warm the numba cache
    parse_s = _best(lambda: [parse_batch(b) for b in batches], repeat)
    e2e_s = _best(lambda: _replay(path), repeat)
    scapy = _scapy_rate(batches, scapy_frames)
    return {
        "capture": path.name,
        "frames": frames,
        "probes": probes,
        "e2e_frames_s": frames / e2e_s,
        "e2e_probes_s": probes / e2e_s,
        "parse_frames_s": frames / parse_s,
        "scapy_frames_s": scapy,
        "parse_vs_scapy": frames / parse_s / scapy,
        "e2e_vs_scapy": frames / e2e_s / scapy,
    }


# A child's ru_maxrss counts the image it was forked from (the benchmark, holding a million
# frames) until it execs, so a small intermediate process spawns the agent and reports it.
_MEASURE = (
    "import os, subprocess, sys\n"
    "child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
    "_pid, status, usage = os.wait4(child.pid, 0)\n"
    "print(usage.ru_maxrss, os.waitstatus_to_exitcode(status))\n"
)


def peak_rss_mb(path: Path) -> float:
    """Peak resident memory of ``footfall-agent replay`` of one capture."""
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, *AGENT, "replay", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    if out[1] != "0":
        raise SystemExit(f"replay of {path} failed with status {out[1]}")
    return int(out[0]) / 1024


def warm_start_s() -> float:
    times = []
    for _ in range(5):
        start = time.perf_counter()
        subprocess.run(
            [*AGENT, "replay", str(BUNDLED_SAMPLE)], check=True, stdout=subprocess.DEVNULL
        )
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1_000_000)
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--scapy-frames", type=int, default=20_000)
    parser.add_argument(
        "--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/pcaps"
    )
    args = parser.parse_args()

    OUT.mkdir(exist_ok=True)
    synthetic = OUT / f"synthetic_{args.frames}_{args.devices}.pcap"
    if not synthetic.exists():
        print(f"writing {synthetic.name} ...", file=sys.stderr)
        write_synthetic_capture(
            synthetic,
            SyntheticSpec(frames=args.frames, devices=args.devices, randomised_share=0.5, seed=7),
        )
    captures = [synthetic]
    if args.shared.is_dir():
        pcaps = [p for p in args.shared.iterdir() if p.suffix in {".pcap", ".cap", ".pcapng"}]
        biggest = max(pcaps, key=lambda p: p.stat().st_size)
        most_probes = args.shared / "fryza_p1_sc6-61_2023-02-21_anonymized.pcap"
        captures += [biggest] + ([most_probes] if most_probes.exists() else [])
    else:
        print(f"{args.shared} absent: benchmarking the synthetic capture only", file=sys.stderr)

    print(f"cores: {os.cpu_count()}, python {sys.version.split()[0]}, best of {args.repeat}\n")
    columns = [  # (key, heading, width, format)
        ("capture", "capture", 44, "<"),
        ("frames", "frames", 9, ">,"),
        ("probes", "probes", 9, ">,"),
        ("e2e_frames_s", "e2e fr/s", 11, ">,.0f"),
        ("e2e_probes_s", "e2e pr/s", 11, ">,.0f"),
        ("parse_frames_s", "parse fr/s", 11, ">,.0f"),
        ("scapy_frames_s", "scapy fr/s", 10, ">,.0f"),
        ("parse_vs_scapy", "parse/scapy", 11, ">,.0f"),
        ("e2e_vs_scapy", "e2e/scapy", 9, ">,.0f"),
    ]
    header = " ".join(f"{title:{fmt[0]}{width}}" for _, title, width, fmt in columns)
    print(header)
    print("-" * len(header))
    for path in captures:
        row = bench_capture(path, args.repeat, args.scapy_frames)
        row["capture"] = str(row["capture"])[:44]
        print(" ".join(f"{row[key]:{fmt[0]}{width}{fmt[1:]}}" for key, _, width, fmt in columns))
    print()
    print(f"peak RSS, footfall-agent replay {synthetic.name}: {peak_rss_mb(synthetic):.0f} MB")
    wall = warm_start_s()
    print(f"warm-cache footfall-agent replay of the bundled sample: {wall:.2f} s (median of 5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
