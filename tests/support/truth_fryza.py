"""Ground truth of the lab-room captures (``fryza_*``) in footfall's truth format.

The dataset's ``*_ver-99.csv`` files have one row per frame (``;``-separated), with the frame's
local time (``datetime``, Brno: CET in winter, CEST in summer, no offset written) and
``occupancy``, the people in the room in that minute. The pcap's timestamps are UTC; the CSV's
times are the same instants in local time (checked in tests/agent/test_evaluate.py, to the
microsecond, on both sides of the 2024-03-31 change to summer time).

This writes one row per minute, from the first frame's minute to the last one's, with the
offset of that minute (``2023-02-08T11:01:00+01:00``); a minute without frames keeps the
previous minute's value. Several CSV files make one truth file in time order.

``python -m tests.support.truth_fryza CSV... > truth.csv``
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO
from zoneinfo import ZoneInfo

LAB_ZONE = ZoneInfo("Europe/Prague")


def minutes(path: Path) -> dict[int, float]:
    """Unix minute start -> occupancy, for every minute a frame of the CSV falls in."""
    out: dict[int, float] = {}
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh, delimiter=";"):
            local = datetime.fromisoformat(row["datetime"]).replace(tzinfo=LAB_ZONE)
            minute = int(local.timestamp()) // 60 * 60
            out.setdefault(minute, float(row["occupancy"]))
    return out


def truth_rows(paths: Iterable[Path]) -> list[tuple[str, float]]:
    """(timestamp with offset, people) per minute over every file's span, in time order."""
    rows: list[tuple[int, float]] = []
    for path in paths:
        seen = minutes(path)
        value = seen[min(seen)]
        for minute in range(min(seen), max(seen) + 60, 60):
            value = seen.get(minute, value)
            rows.append((minute, value))
    rows.sort()
    return [
        (datetime.fromtimestamp(m, UTC).astimezone(LAB_ZONE).isoformat(), people)
        for m, people in rows
    ]


def write_truth(paths: Iterable[Path], out: Path) -> None:
    with out.open("w", newline="") as fh:
        _write(paths, fh)


def _write(paths: Iterable[Path], fh: TextIO) -> None:
    writer = csv.writer(fh, lineterminator="\n")
    writer.writerow(["timestamp", "people"])
    for stamp, people in truth_rows(paths):
        writer.writerow([stamp, f"{people:g}"])


def main(argv: Sequence[str] | None = None) -> int:
    paths = [Path(p) for p in (sys.argv[1:] if argv is None else argv)]
    if not paths:
        print("usage: python -m tests.support.truth_fryza CSV... > truth.csv", file=sys.stderr)
        return 2
    _write(paths, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
