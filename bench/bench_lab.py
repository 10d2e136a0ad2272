"""Every lab day through the agent, scored out of sample: the one command for issue 15.

    .venv/bin/python bench/bench_lab.py [LAB_DIR] [--days N] [--set NAME=VALUE] [--doc]

Replays each day of ``../shared/data/lab`` through the agent's pipeline (cached per day under
``bench/out/lab/``: a second run after a change outside the agent takes seconds), calibrates
each fold on the other folds, and prints pooled and per-day scores, the error by truth level,
empty windows, the missing windows (outages) and the cost (replay seconds, frames per second).
A progress line per day goes to stderr. ``--doc`` writes the lab-days section of
docs/ACCURACY.md instead (tests/support/lab_days.py says how everything is scored).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from firmware_agent.tools.evaluate import Truth
from tests.support.lab_days import (
    CACHE,
    LabDay,
    Scored,
    lab_config,
    lab_days,
    replay_day,
    report,
    scored,
    threshold_report,
    visit_thresholds,
)
from tests.support.lab_doc import print_report, write_section

DEFAULT = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "lab"


def _setting(text: str) -> tuple[str, int]:
    name, _, value = text.partition("=")
    return name.removeprefix("estimate."), int(value)


def add_settings_option(parser: argparse.ArgumentParser, example: str) -> None:
    """``--set NAME=VALUE`` (repeatable): an estimate setting to replay with, as
    ``(name, value)`` pairs in ``args.set``."""
    parser.add_argument(
        "--set",
        type=_setting,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help=f"an estimate setting, e.g. {example}",
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lab", nargs="?", type=Path, default=DEFAULT)
    parser.add_argument("--days", type=int, help="only the first N days (a quick look)")
    add_settings_option(parser, "static_min_s=0")
    parser.add_argument("--no-cache", action="store_true", help="replay every day again")
    parser.add_argument("--doc", action="store_true", help="write docs/ACCURACY.md's section")
    args = parser.parse_args()  # fmt: skip
    config = lab_config(**dict(args.set))
    truth = Truth.read(args.lab / "truth.csv")
    days = lab_days(args.lab)[: args.days]
    began = time.perf_counter()
    out = []
    replay_s = 0.0
    replayed = 0  # probe requests in the days replayed (not cached)
    for i, day in enumerate(days, 1):
        windows = replay_day(day, config, None if args.no_cache else CACHE)
        replay_s += windows.seconds
        replayed += int(windows.probes.sum()) if windows.seconds else 0
        out.append(scored(windows, truth))
        how = f"replayed in {windows.seconds:.1f} s" if windows.seconds else "cached"
        print(f"[{i}/{len(days)}] {day.date}: {how}, {time.perf_counter() - began:.1f} s",
              file=sys.stderr, flush=True)  # fmt: skip
    rep = report(out)
    rate = f", {replayed / replay_s:,.0f} probe requests/s" if replay_s else ""
    cost = f"cost: replay {replay_s:.1f} s for the days not cached{rate}"
    cache = None if args.no_cache else CACHE

    def at(day: LabDay, dbm: int) -> Scored:
        return scored(
            replay_day(day, lab_config(**dict(args.set), rssi_threshold_dbm=dbm), cache), truth
        )

    try:
        visits = visit_thresholds(days, out, at)
    except LookupError as exc:
        if args.doc:
            raise
        print(f"{exc}; the learnt threshold only", file=sys.stderr)
        print_report((rep,))
        print(f"\n{cost}")
        return 0
    site = threshold_report(days, out, at, visits, from_visit=False)
    visit = threshold_report(days, out, at, visits, from_visit=True)
    if args.doc:
        write_section((rep, site, visit), args.lab)
        print("wrote docs/ACCURACY.md (lab days)", file=sys.stderr)
        return 0
    print_report((rep, site, visit))
    total = time.perf_counter() - began
    print(f"\n{cost}; total {total:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
