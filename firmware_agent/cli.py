"""``footfall-agent``: the agent's command line.

Errors end as one line on stderr (``footfall-agent: error: ...``) and exit status 1 (2 for
usage errors); no traceback. Logs go unbuffered to stderr through the ``footfall.agent``
logger and never carry an address, device id, key or SSID.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO

from firmware_agent import __version__
from firmware_agent.capture import CaptureReader, FrameBatch
from firmware_agent.capture_stats import inspect_capture
from firmware_agent.errors import AgentError
from firmware_agent.pipeline import Pipeline
from firmware_agent.settings import load_config

log = logging.getLogger("footfall.agent")

BUNDLED_SAMPLE = Path(__file__).with_name("data") / "sample.pcap"


class Progress:
    """A progress bar on a terminal, a line every ``every_s`` seconds otherwise."""

    def __init__(self, label: str, total_bytes: int | None, stream: TextIO = sys.stderr) -> None:
        self.label = label
        self.total = total_bytes
        self.stream = stream
        self.tty = stream.isatty()
        self.every_s = 0.2 if self.tty else 10.0
        self.started = self.last = time.monotonic()
        self.shown = False

    def update(self, done_bytes: int, frames: int, windows: int, *, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.last < self.every_s:
            return
        if final and not self.shown and now - self.started < self.every_s:
            return
        self.last = now
        self.shown = True
        rate = frames / max(now - self.started, 1e-9)
        facts = f"{frames:,} frames, {windows:,} windows, {rate:,.0f} frames/s"
        if self.total:
            share = min(done_bytes / self.total, 1.0)
            bar = "#" * int(share * 30)
            text = f"{self.label} [{bar:<30}] {share:4.0%} {facts}"
        else:
            text = f"{self.label} {facts}"
        if self.tty:
            self.stream.write("\r" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def _source_size(source: str) -> int | None:
    if source == "-":
        return None
    try:
        return os.path.getsize(source)
    except OSError:
        return None


def cmd_inspect(args: argparse.Namespace) -> int:
    status = 0
    for source in args.files:
        progress = Progress(f"inspect {source}", _source_size(source))

        def show(reader: CaptureReader, progress: Progress = progress) -> None:
            progress.update(reader.bytes_read, reader.records_read, 0)

        facts = inspect_capture(source, show)
        print(json.dumps(facts), flush=True)
        if facts["read_error"]:
            status = 1
    return status


def cmd_replay(args: argparse.Namespace) -> int:
    overrides: dict[str, object] = {}
    if args.window_s is not None:
        overrides["count.window_s"] = args.window_s
    config = load_config(args.config, overrides=overrides)
    source = str(args.file) if args.file is not None else str(BUNDLED_SAMPLE)
    pipeline = Pipeline(config)
    progress = Progress(f"replay {source}", _source_size(source))
    with CaptureReader(source if source != "-" else sys.stdin.buffer, in_place=True) as reader:

        def batches() -> Iterator[FrameBatch]:
            for batch in reader:
                yield batch
                progress.update(reader.bytes_read, reader.records_read, pipeline.stats.windows)

        for window in pipeline.run(batches()):
            print(json.dumps(window.as_dict()), flush=True)
        progress.update(reader.bytes_read, reader.records_read, pipeline.stats.windows, final=True)
    log.info(
        "replayed %s: %d frames, %d probe rows, %d windows, %d epochs",
        source,
        pipeline.stats.frames,
        pipeline.stats.probe_rows,
        pipeline.stats.windows,
        pipeline.stats.epochs,
    )
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    width = max(len(name) for name, _, _ in config.show())
    for name, value, source in config.show():
        print(f"{name:<{width}}  {value:<12}  ({source})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="footfall-agent",
        description="Privacy-first WiFi footfall agent: probe requests in, counts out.",
    )
    parser.add_argument("--version", action="version", version=f"footfall-agent {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "inspect",
        help="print tshark-style facts about captures (one JSON object each)",
        description="Print, per capture, one JSON object of facts computed by the agent's "
        "own parser: frames, probe requests, malformed probes, distinct transmitters "
        "(from keyed hashes; no address is printed), SSID kinds, signal range, times.",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="pcap or pcapng (.gz too)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "replay",
        help="replay a capture and print one JSON line per closed window",
        description="Replay a capture through parse, anonymize and count; print one JSON "
        "line per closed window. Without FILE, replays the capture bundled with footfall. "
        "'-' reads a pcap stream on standard input (tcpdump -U -w - | ...).",
    )
    p.add_argument("file", nargs="?", metavar="FILE", help="pcap or pcapng (.gz too), or -")
    p.add_argument("--window-s", type=int, help="window length in seconds (count.window_s)")
    p.add_argument("--config", type=Path, help="agent TOML config file")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("config", help="configuration")
    config_sub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = config_sub.add_parser("show", help="print the effective settings, secrets masked")
    show.add_argument("--config", type=Path, help="agent TOML config file")
    show.set_defaults(func=cmd_config_show)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("footfall-agent: %(levelname)s: %(message)s"))
    log.handlers = [handler]
    log.setLevel(logging.INFO if args.verbose else logging.WARNING)
    try:
        status: int = args.func(args)
    except AgentError as exc:
        print(f"footfall-agent: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 1
    except KeyboardInterrupt:
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
