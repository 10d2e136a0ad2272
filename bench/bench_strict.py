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
  standard counts 5 devices or more, and the mean signed error;

then the days pooled, and how many of those busy windows strict publishes a device count in,
with the MAPE there.

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
    pooled = [0, 0, 0, 0]  # windows, crowd >= 2, reach the floor, published below it
    all_pairs: list[tuple[int, int, bool]] = []
    for path in files:
        ours, theirs = windows(strict, path), windows(standard, path)
        shares, widths = [], set()
        crowds = below = 0
        published = {}
        for w in ours:
            bits = w.id_bits or strict.privacy.id_bits or 0
            crowd = linear_count(w.devices, 1 << bits)
            crowds += crowd >= 2
            share = shared_share(bits, crowd)
            published[w.window_start] = strict.privacy.release(w)["devices"] is not None
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
            (b.devices, strict.privacy.correct(a).devices, published[a.window_start])
            for a in ours
            if (b := by_start[a.window_start]).devices >= 5
        ]
        for i, n in enumerate((len(ours), crowds, len(shares), below)):
            pooled[i] += n
        all_pairs += pairs
        low = f"{min(shares):.0%}" if shares else "-"
        mid = f"{statistics.median(shares):.0%}" if shares else "-"
        print(
            f"| {path.name[16:26]} | {len(ours)} | {crowds} | {len(shares)} | {below} | {low} | "
            f"{mid} | {','.join(map(str, sorted(widths)))} | {_mape(pairs)} | {_bias(pairs)} |",
            flush=True,
        )
    shown = [p for p in all_pairs if p[2]]
    print(
        f"| {len(files)} days | {pooled[0]} | {pooled[1]} | {pooled[2]} | {pooled[3]} | | | | "
        f"{_mape(all_pairs)} | {_bias(all_pairs)} |"
    )
    print(
        f"\nWindows where standard counts 5 devices or more: {len(all_pairs)}; strict publishes a "
        f"device count in {len(shown)} of them ({len(shown) / max(len(all_pairs), 1):.0%}), "
        f"MAPE there {_mape(shown)}, bias {_bias(shown)}."
    )


def _mape(pairs: list[tuple[int, int, bool]]) -> str:
    return f"{statistics.mean(abs(s - t) / t for t, s, _ in pairs):.1%}" if pairs else "-"


def _bias(pairs: list[tuple[int, int, bool]]) -> str:
    return f"{statistics.mean(s - t for t, s, _ in pairs):+.1f}" if pairs else "-"


if __name__ == "__main__":
    main()
