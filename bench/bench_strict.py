"""Strict mode's collision rate per window, and its accuracy against standard, on the lab days.

Replays lab days (``../shared/data/lab/*.pcap.gz``, or the files given) in ``strict`` and in
``standard`` (UTC midnight epochs, 5-minute windows) and prints, per day (Markdown):

* windows; windows with a crowd of two devices or more; of those, how many reach the
  collision floor (:data:`~firmware_agent.stages.privacy.COLLISION_FLOOR`) and so publish device
  counts, how many publish a device count below the floor (0 is the promise), and the lowest
  and median share of devices sharing their id at the width the window is counted at
  (measured from its own counts, :func:`~firmware_agent.stages.privacy.shared_share`);
* the widths used;
* strict ``devices`` (collision-corrected) against standard's, MAPE over the windows where
  standard counts 5 devices or more, and the mean signed error.

Usage: ``nice .venv/bin/python bench/bench_strict.py [FILE ...] [--days 12]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from firmware_agent.service.config import AgentConfig  # noqa: E402
from firmware_agent.settings import load_config  # noqa: E402
from firmware_agent.stages.batch import WindowCounts  # noqa: E402
from firmware_agent.stages.capture import CaptureReader  # noqa: E402
from firmware_agent.stages.pipeline import Pipeline  # noqa: E402
from firmware_agent.stages.privacy import COLLISION_FLOOR, linear_count, shared_share  # noqa: E402

SHARED = Path(os.environ.get("FOOTFALL_SHARED", REPO.parent / "shared"))


def windows(config: AgentConfig, path: Path) -> list[WindowCounts]:
    with CaptureReader(path) as reader:
        return list(Pipeline(config).run(reader))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="*", type=Path)
    parser.add_argument("--days", type=int, default=12, help="lab days when no file is given")
    args = parser.parse_args()
    files = args.files or sorted((SHARED / "data" / "lab").glob("*.pcap.gz"))[: args.days]
    env = {"FOOTFALL_EPOCH_TIMEZONE": "UTC"}
    strict = load_config(None, environ=env | {"FOOTFALL_PRIVACY_MODE": "strict"})
    standard = load_config(None, environ=env)
    print(
        "| day | windows | crowd >= 2 | reach the floor | published below it | lowest share | "
        "median share | widths | devices MAPE | bias |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    for path in files:
        ours, theirs = windows(strict, path), windows(standard, path)
        shares, widths = [], set()
        crowds = below = 0
        for w in ours:
            bits = w.id_bits or strict.privacy.id_bits or 0
            crowd = linear_count(w.devices, 1 << bits)
            crowds += crowd >= 2
            share = shared_share(bits, crowd)
            below += share < COLLISION_FLOOR and strict.privacy.release(w)["devices"] not in (
                0,
                None,
            )
            if crowd >= 2 and share >= COLLISION_FLOOR:
                shares.append(share)
                widths.add(bits)
        # Strict skips the windows of a silence longer than its one-window epoch: pair by start.
        by_start = {w.window_start: w for w in theirs}
        pairs = [
            (b.devices, strict.privacy.correct(a).devices)
            for a in ours
            if (b := by_start[a.window_start]).devices >= 5
        ]
        mape = statistics.mean(abs(s - t) / t for t, s in pairs) if pairs else float("nan")
        bias = statistics.mean(s - t for t, s in pairs) if pairs else float("nan")
        low = f"{min(shares):.0%}" if shares else "-"
        mid = f"{statistics.median(shares):.0%}" if shares else "-"
        print(
            f"| {path.name[16:26]} | {len(ours)} | {crowds} | {len(shares)} | {below} | {low} | "
            f"{mid} | {','.join(map(str, sorted(widths)))} | {mape:.1%} | {bias:+.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
