"""What the estimate stage costs: the agent's core with and without it, in the same run.

Replays a capture in process through the pipeline (read, parse, anonymize, count) with the
estimate stage (link random addresses, signal threshold, dwell, static devices) and without it,
best of ``--repeat`` each with a warm numba cache, and prints frames per second and the ratio.
The issue's budget: the estimator keeps the core within 2x of its speed without it.

Usage: ``python bench/bench_estimate.py [CAPTURE] [--repeat 3]`` (default: the million-frame
synthetic capture of bench_core.py, written if absent).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from firmware_agent.settings import load_config
from firmware_agent.stages.capture import CaptureReader
from firmware_agent.stages.pipeline import Pipeline
from firmware_agent.tools.synthetic import SyntheticSpec, write_synthetic_capture

OUT = Path(__file__).resolve().parent / "out"
DEFAULT = OUT / "synthetic_1000000_2000.pcap"


def replay_s(path: Path, *, estimate: bool) -> tuple[float, int]:
    """Seconds for one replay, and the frames it read."""
    pipeline = Pipeline(load_config(None, environ={}), estimate=estimate)
    start = time.perf_counter()
    with CaptureReader(path, in_place=True) as reader:
        for _window in pipeline.run(reader):
            pass
    return time.perf_counter() - start, pipeline.stats.frames


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("capture", nargs="?", type=Path, default=DEFAULT)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if args.capture == DEFAULT and not DEFAULT.exists():
        OUT.mkdir(exist_ok=True)
        print(f"writing {DEFAULT.name} ...", file=sys.stderr)
        write_synthetic_capture(
            DEFAULT, SyntheticSpec(frames=1_000_000, devices=2000, randomised_share=0.5, seed=7)
        )
    replay_s(args.capture, estimate=True)  # warm the numba cache and the page cache
    best: dict[bool, float] = {}
    frames = 0
    for _ in range(args.repeat):  # interleaved, so that both see the same machine
        for estimate in (False, True):
            seconds, frames = replay_s(args.capture, estimate=estimate)
            best[estimate] = min(best.get(estimate, seconds), seconds)
    print(f"cores: {os.cpu_count()}, python {sys.version.split()[0]}, best of {args.repeat}")
    print(f"capture: {args.capture.name}, {frames:,} frames\n")
    print(f"{'pipeline':<28} {'seconds':>8} {'frames/s':>12}")
    for estimate, label in ((False, "core (count only)"), (True, "core + estimate")):
        print(f"{label:<28} {best[estimate]:>8.2f} {frames / best[estimate]:>12,.0f}")
    ratio = best[True] / best[False]
    print(f"\nwith the estimate stage the core takes {ratio:.2f}x as long (budget: 2x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
