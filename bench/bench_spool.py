"""Benchmark of a backfill through the spool: windows signed and appended, as the agent does.

The windows are the bundled sample's, replayed through the agent's pipeline with its people
stage, then repeated with advancing starts up to ``--windows`` (100,000 by default: a year of
5-minute windows is 105,120). Each is signed (Ed25519) and stored with synchronous = FULL:

* ``grouped``: :meth:`~firmware_agent.spool.Spool.append_many`, the windows a batch of
  frames closed in one transaction (``--group``, 256: the counter's output buffer), one
  fsync per group: what ``footfall-agent run`` does now;
* ``one by one`` (baseline, same run): :meth:`~firmware_agent.spool.Spool.append`, one
  transaction and fsync per window, as the agent did before; timed on the first
  ``--baseline`` windows (it runs a few hundred a second) and extrapolated.

Goal (issue 18): 100,000 windows in under 30 s.

Usage: ``python bench/bench_spool.py [--windows 100000] [--group 256] [--baseline 2000]``
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import tempfile
import time
from pathlib import Path

import nacl.signing

from firmware_agent.capture import CaptureReader
from firmware_agent.count import WindowCounts
from firmware_agent.pipeline import Pipeline
from firmware_agent.privacy import epoch_label
from firmware_agent.service import _counts_message
from firmware_agent.settings import AgentConfig, load_config
from firmware_agent.spool import Spool, SpoolSettings
from firmware_agent.synthetic import SAMPLE_PATH

OUT = Path(__file__).resolve().parent / "out"


def windows(config: AgentConfig, n: int) -> list[WindowCounts]:
    """The sample's windows, repeated with advancing starts, ``n`` of them."""
    with CaptureReader(SAMPLE_PATH) as reader:
        real = list(Pipeline(config).run(reader))
    step = config.count.window_s
    return [
        dataclasses.replace(real[i % len(real)], window_start=real[0].window_start + i * step)
        for i in range(n)
    ]


def timed(
    config: AgentConfig, ws: list[WindowCounts], group: int, directory: Path, name: str
) -> float:
    key = nacl.signing.SigningKey.generate()
    label = epoch_label(key.verify_key.encode(), ws[0].window_start)
    build = [
        (w.window_start, functools.partial(_counts_message, config, key, label, w)) for w in ws
    ]
    settings = SpoolSettings(max_windows=max(len(ws), 1))
    with Spool(directory / name, settings) as spool:
        began = time.perf_counter()
        if group == 1:
            for start, message in build:
                spool.append(start, message)
        else:
            for at in range(0, len(build), group):
                spool.append_many(build[at : at + group])
        elapsed = time.perf_counter() - began
        assert spool.state().pending == len(ws)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=100_000)
    parser.add_argument("--group", type=int, default=256)
    parser.add_argument("--baseline", type=int, default=2000)
    args = parser.parse_args()
    config = load_config(environ={})
    ws = windows(config, args.windows)
    OUT.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=OUT) as tmp:  # on the disk, not a tmpfs
        grouped = timed(config, ws, args.group, Path(tmp), "grouped.sqlite3")
        single = timed(config, ws[: args.baseline], 1, Path(tmp), "single.sqlite3")
    per_single = single / args.baseline
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")
    print("| spool append | windows | seconds | windows/s | 100k windows |")
    print("|---|---:|---:|---:|---:|")
    print(
        f"| grouped ({args.group} a transaction) | {args.windows:,} | {grouped:.1f} "
        f"| {args.windows / grouped:,.0f} | {grouped * 100_000 / args.windows:.1f} s |"
    )
    print(
        f"| one by one (baseline) | {args.baseline:,} | {single:.1f} "
        f"| {1 / per_single:,.0f} | {per_single * 100_000:.0f} s (extrapolated) |"
    )
    print(f"\ngrouped / one by one: {per_single * args.windows / grouped:.0f}x")


if __name__ == "__main__":
    main()
