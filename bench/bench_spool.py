"""Benchmark of a backfill through the spool: windows signed and appended, as the agent does.

The windows are the bundled sample's, replayed through the agent's pipeline with its people
stage, then repeated with advancing starts. Two costs, measured apart:

* **the spool** (SQLite, synchronous = FULL), on ``--windows`` (100,000: a year of 5-minute
  windows is 105,120) signed messages of the real size: ``grouped``, the windows a batch of
  frames closed in one transaction (``--group``, 256: the counter's output buffer), one fsync
  per group, what ``footfall-agent run`` does now
  (:meth:`~firmware_agent.service.spool.Spool.append_many`);
  ``one by one`` (baseline, same run), one transaction and fsync per window as before, timed
  on ``--sample`` windows and extrapolated;
* **the message**: building a window's counts message (privacy release, JSON Schema
  validation, Ed25519 signature), on ``--sample`` windows and extrapolated.

Goal (issue 18): 100,000 windows in under 30 s.

Usage: ``python bench/bench_spool.py [--windows 100000] [--group 256] [--sample 2000]``
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

from firmware_agent import BUNDLED_SAMPLE
from firmware_agent.service.config import AgentConfig
from firmware_agent.service.run import _counts_message
from firmware_agent.service.spool import Spool, SpoolSettings
from firmware_agent.settings import load_config
from firmware_agent.stages.batch import WindowCounts
from firmware_agent.stages.capture import CaptureReader
from firmware_agent.stages.pipeline import Pipeline
from firmware_agent.stages.privacy import epoch_label

OUT = Path(__file__).resolve().parent / "out"


def windows(config: AgentConfig, n: int) -> list[WindowCounts]:
    """The sample's windows, repeated with advancing starts, ``n`` of them."""
    with CaptureReader(BUNDLED_SAMPLE) as reader:
        real = list(Pipeline(config).run(reader))
    step = config.count.window_s
    return [
        dataclasses.replace(real[i % len(real)], window_start=real[0].window_start + i * step)
        for i in range(n)
    ]


def bodies(config: AgentConfig, ws: list[WindowCounts]) -> tuple[list[bytes], float]:
    """Each window's signed counts message (seq = its index), and the seconds it took."""
    key = nacl.signing.SigningKey.generate()
    label = epoch_label(key.verify_key.encode(), ws[0].window_start)
    began = time.perf_counter()
    out = [_counts_message(config, key, label, w, i + 1) for i, w in enumerate(ws)]
    return out, time.perf_counter() - began


def spooled(starts: list[int], body: list[bytes], group: int, path: Path) -> float:
    """Seconds to append every window, ``group`` a transaction (1: :meth:`Spool.append`)."""
    build = [(start, functools.partial(_body, b)) for start, b in zip(starts, body, strict=True)]
    with Spool(path, SpoolSettings(max_windows=max(len(build), 1))) as spool:
        began = time.perf_counter()
        if group == 1:
            for start, message in build:
                spool.append(start, message)
        else:
            for at in range(0, len(build), group):
                spool.append_many(build[at : at + group])
        elapsed = time.perf_counter() - began
        assert spool.state().pending == len(build)
    return elapsed


def _body(body: bytes, _seq: int) -> bytes:
    return body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=100_000)
    parser.add_argument("--group", type=int, default=256)
    parser.add_argument("--sample", type=int, default=2000)
    args = parser.parse_args()
    config = load_config(environ={})
    ws = windows(config, args.windows)
    sample, built_s = bodies(config, ws[: args.sample])
    body = [sample[i % len(sample)] for i in range(args.windows)]
    starts = [w.window_start for w in ws]
    OUT.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=OUT) as tmp:  # on the disk, not a tmpfs
        grouped = spooled(starts, body, args.group, Path(tmp) / "grouped.sqlite3")
        single = spooled(starts[: args.sample], sample, 1, Path(tmp) / "single.sqlite3")
    per = {"message": built_s / args.sample, "single": single / args.sample}
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")
    print("| step | windows timed | seconds | windows/s | 100k windows |")
    print("|---|---:|---:|---:|---:|")
    print(
        f"| spool, grouped ({args.group} a transaction) | {args.windows:,} | {grouped:.1f} "
        f"| {args.windows / grouped:,.0f} | {grouped * 100_000 / args.windows:.1f} s |"
    )
    print(
        f"| spool, one by one (baseline) | {args.sample:,} | {single:.1f} "
        f"| {1 / per['single']:,.0f} | {per['single'] * 100_000:.0f} s (extrapolated) |"
    )
    print(
        f"| message: release, schema, signature | {args.sample:,} | {built_s:.1f} "
        f"| {1 / per['message']:,.0f} | {per['message'] * 100_000:.0f} s (extrapolated) |"
    )
    total = grouped * 100_000 / args.windows + per["message"] * 100_000
    print(f"\nbackfill of 100k windows, grouped: {total:.0f} s; spool alone "
          f"{per['single'] * args.windows / grouped:.0f}x faster grouped")  # fmt: skip


if __name__ == "__main__":
    main()
