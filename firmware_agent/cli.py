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
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import nacl.signing

from firmware_agent import BUNDLED_SAMPLE, __version__
from firmware_agent.contract.checks import exit_status, print_table
from firmware_agent.contract.command_line import run_command
from firmware_agent.contract.errors import AgentError
from firmware_agent.contract.messages import public_key_text, verify_key_from_text
from firmware_agent.contract.resolve import show
from firmware_agent.contract.signing import KEY_FILE, create_signing_key, load_signing_key
from firmware_agent.settings import DEFAULT_CONFIG, SETTINGS, load_config
from firmware_agent.stages.config import hop_channels

if TYPE_CHECKING:
    from firmware_agent.service.broker_session import BrokerSession
    from firmware_agent.stages.capture import CaptureReader

# A command imports the stages, the service and the tools it runs when it runs (PLC0415 is off
# for this file): their modules compile numba kernels on import, which 'config show', 'keygen',
# 'enrol' and --help need not wait for (tests/agent/test_settings.py).

log = logging.getLogger("footfall.agent")


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
    from firmware_agent.tools.capture_stats import inspect_capture

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
    from firmware_agent.stages.batch import FrameBatch
    from firmware_agent.stages.capture import CaptureReader
    from firmware_agent.stages.pipeline import Pipeline

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
            released = config.privacy.release(window)
            print(json.dumps(released), flush=True)
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


def _setting(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(
            f"expected NAME=VALUE such as broker.port=8883, got {text!r}"
        )
    return name.strip(), value


def cmd_run(args: argparse.Namespace) -> int:
    from firmware_agent.service.run import run_agent

    overrides: dict[str, object] = dict(args.set or [])
    if args.source is not None:
        overrides["source.path"] = args.source
    if args.speed is not None:
        overrides["source.speed"] = args.speed
    config = load_config(args.config, overrides=overrides)
    log.setLevel(min(log.level, logging.INFO))  # a service says what it does
    return run_agent(config)


def cmd_keygen(args: argparse.Namespace) -> int:
    config_dir = load_config(args.config, overrides=dict(args.set or [])).identity.config_dir
    if args.show:
        key = load_signing_key(config_dir)
    else:
        key = create_signing_key(config_dir, replace=args.force)
        print(f"wrote {config_dir / KEY_FILE} (mode 0600); enrol this public key:", file=sys.stderr)
    print(public_key_text(key))
    return 0


def cmd_enrol(args: argparse.Namespace) -> int:
    config = load_config(args.config, overrides=dict(args.set or []))
    identity = config.identity
    public = public_key_text(load_signing_key(identity.config_dir))
    account = f"{identity.site}/{identity.agent}"
    print(f"public key: {public}")
    print("enrol it on the aggregator (an installer's or admin's account):")
    print(
        f"  footfall-aggregator enrol --site {identity.site} --agent {identity.agent} "
        f"--public-key {public}"
    )
    print(f"  or on the web page /sites/{identity.site}: 'Enrol an agent', id {identity.agent}")
    print(f"broker account (hardware/mosquitto): user name {account!r}, made with")
    print(f"  mosquitto_passwd /etc/mosquitto/footfall.passwd {account}")
    if config.broker.username != account:
        print(f"and set broker.username = {account!r} and broker.password in the agent's config")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from firmware_agent.tools.doctor import run_checks

    config = load_config(args.config, overrides=dict(args.set or []))
    findings = run_checks(config, sample_s=args.sample_s)
    print_table(findings)
    return exit_status(findings)


def cmd_survey(args: argparse.Namespace) -> int:
    from firmware_agent.tools.survey import run_survey

    config = load_config(args.config, overrides=dict(args.set or []))
    channels = None
    if args.channels:
        channels = hop_channels(args.channels)
    run_survey(config, args.minutes * 60, channels)
    return 0


def cmd_build_kernels(args: argparse.Namespace) -> int:
    from firmware_agent import kernels

    started = time.monotonic()
    print(f"compiling the kernels ahead of time into {kernels.kernels_dir()} ...", file=sys.stderr)
    path, built = kernels.build()
    took = time.monotonic() - started
    print(f"built {path} in {took:.0f} s" if built else f"up to date: {path}")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    config = load_config(args.config, overrides=dict(args.set or []))
    print(show(SETTINGS, config.values, config.sources, help_text=args.help_text))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from firmware_agent.tools.evaluate import cmd_evaluate as evaluate

    return evaluate(args)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from firmware_agent.tools.evaluate import cmd_calibrate as calibrate

    return calibrate(args)


def cmd_privacy_report(args: argparse.Namespace) -> int:
    from firmware_agent.stages.capture import CaptureReader
    from firmware_agent.stages.pipeline import Pipeline
    from firmware_agent.tools.privacy_report import privacy_report

    config = load_config(args.config, overrides=dict(args.set or []))
    measured = None
    if args.capture is not None:
        with CaptureReader(args.capture) as reader:
            measured = (args.capture.name, list(Pipeline(config).run(reader)))
    print(privacy_report(config, measured))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from firmware_agent.service.broker_session import BrokerSession
    from firmware_agent.tools.audit import audit_all
    from firmware_agent.tools.mqtt_capture import publishes

    keys = dict(args.key or [])
    problems: list[str] = []
    if args.pcap is not None:
        messages: Iterable[tuple[str, bytes]] = publishes(args.pcap, problems)
        source = str(args.pcap)
    else:
        overrides: dict[str, object] = dict(args.set or [])
        if args.broker:
            host, _, port = (
                args.broker.rpartition(":") if ":" in args.broker else (args.broker, "", "")
            )
            overrides["broker.host"] = host
            if port:
                overrides["broker.port"] = port
        broker = load_config(args.config, overrides=overrides).broker
        source = f"broker {broker.address}, {args.topic}, {args.seconds:g} s"
        session = BrokerSession(broker, f"footfall-audit-{os.getpid()}")
        messages = _listening(session, args.topic, args.seconds)
    audit = audit_all(messages, keys)
    if args.json:
        print(json.dumps(audit.as_json() | {"source": source, "unreadable": problems}))
    else:
        print(f"footfall audit of {source}")
        for problem in problems:
            print(f"note: {problem}")
        print(audit.report())
    return 0 if audit.verdict() else 1


def _listening(session: BrokerSession, topic: str, seconds: float) -> Iterator[tuple[str, bytes]]:
    def ready() -> None:
        print(f"listening on {topic} for {seconds:g} s", file=sys.stderr, flush=True)

    with session:
        yield from session.listen(topic, seconds, ready)


def _agent_key(text: str) -> tuple[str, nacl.signing.VerifyKey]:
    name, sep, key = text.partition("=")
    if not sep or name.count("/") != 1:
        raise argparse.ArgumentTypeError(f"expected SITE/AGENT=PUBLIC_KEY, got {text!r}")
    try:
        return name, verify_key_from_text(key)
    except AgentError as exc:
        raise argparse.ArgumentTypeError(f"{name}: {exc}") from exc


_TRUTH_HELP = "ground truth: CSV 'timestamp,people', ISO 8601 times with a UTC offset"
_LOCAL_BIT_HELP = (
    "treat every address as random (a dataset whose anonymiser replaced addresses with random "
    "bytes, so the locally administered bit means nothing)"
)


def _evaluate_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``evaluate`` and ``calibrate`` subcommands."""
    set_help = "override one setting (repeatable), e.g. estimate.rssi_threshold_dbm=-70"
    p = sub.add_parser(
        "evaluate",
        help="score the agent's people estimates against ground truth",
        description="Replay captures through the agent and print, per window, the truth "
        "(mean people over the window), the estimate and the raw counts, then the scores: "
        "mean absolute error, MAPE over windows with 3 or more people, RMSE, Pearson's r. "
        "The estimate is people_est, or people through the config's calibration, or through "
        "a calibration fitted on the --calibrate-on captures only.",
    )
    p.add_argument("captures", nargs="+", metavar="CAPTURE", help="pcap or pcapng (.gz too)")
    p.add_argument("--truth", required=True, type=Path, help=_TRUTH_HELP)
    p.add_argument(
        "--calibrate-on",
        nargs="+",
        metavar="CAPTURE",
        help="fit the calibration on these captures only (never the evaluated ones)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object of the scores")
    p.add_argument("--ignore-local-bit", action="store_true", help=_LOCAL_BIT_HELP)
    p.add_argument("--config", type=Path, help="agent TOML config file")
    p.add_argument("--set", type=_setting, action="append", metavar="NAME=VALUE", help=set_help)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "calibrate",
        help="fit the site's calibration on captures with truth; write it to the config",
        description="Replay captures through the agent, fit people = factor x people_est + "
        "offset on the windows the truth covers, and write factor, offset, the fit's error "
        "and its windows into the [estimate] table of the config file (other lines are kept; "
        "what changed is printed). The config's estimate settings are the ones calibrated.",
    )
    p.add_argument("captures", nargs="+", metavar="CAPTURE", help="pcap or pcapng (.gz too)")
    p.add_argument("--truth", required=True, type=Path, help=_TRUTH_HELP)
    p.add_argument(
        "--config", type=Path, help=f"agent TOML config file to update (default {DEFAULT_CONFIG})"
    )
    p.add_argument("--dry-run", action="store_true", help="print the fit, write nothing")
    p.add_argument(
        "--site-threshold",
        action="store_true",
        help="also set estimate.rssi_threshold_dbm: the weakest signal threshold (-90 to -50 "
        "dBm) at which half of the windows the truth says are empty read no device (the "
        "visit's empty hour; see README, Calibrating a site in one visit)",
    )
    p.add_argument("--ignore-local-bit", action="store_true", help=_LOCAL_BIT_HELP)
    p.add_argument("--set", type=_setting, action="append", metavar="NAME=VALUE", help=set_help)
    p.set_defaults(func=cmd_calibrate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="footfall-agent",
        description="Privacy-first WiFi footfall agent: probe requests in, counts out.",
    )
    parser.add_argument("--version", action="version", version=f"footfall-agent {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    set_help = "override one setting (repeatable), e.g. broker.port=8883"

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
        description="Replay a capture through parse, anonymize, count and the privacy stage; "
        "print one JSON line per closed window, as the agent would publish it. Without FILE, "
        "replays the capture bundled with footfall. "
        "'-' reads a pcap stream on standard input (tcpdump -U -w - | ...).",
    )
    p.add_argument("file", nargs="?", metavar="FILE", help="pcap or pcapng (.gz too), or -")
    p.add_argument("--window-s", type=int, help="window length in seconds (count.window_s)")
    p.add_argument("--config", type=Path, help="agent TOML config file")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser(
        "run",
        help="run the agent: count a source and publish its windows to the broker",
        description="Run the agent as a service: read the source (source.path: a capture "
        "file, or '-' for a pcap stream on standard input), count, sign each window and "
        "spool it, publish it to the MQTT broker. A capture file ends the run once every "
        "window is acknowledged; SIGTERM stops it cleanly (the open window is published, the "
        "status goes offline).",
    )
    p.add_argument("--config", type=Path, help="agent TOML config file")
    p.add_argument("--source", help="capture file or '-' (source.path)")
    p.add_argument("--speed", help="realtime, fast or a factor such as 60 (source.speed)")
    p.add_argument("--set", type=_setting, action="append", metavar="NAME=VALUE", help=set_help)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "keygen",
        help="make the agent's signing key and print its public key",
        description="Write a new Ed25519 signing key to <agent.config_dir>/signing.key (mode "
        "0600) and print its public key, which the aggregator enrols. The signing key is not "
        "the hashing key (that one never leaves memory).",
    )
    p.add_argument("--config", type=Path, help="agent TOML config file")
    p.add_argument("--force", action="store_true", help="replace an existing key")
    p.add_argument("--show", action="store_true", help="print the existing key's public key")
    p.add_argument("--set", type=_setting, action="append", metavar="NAME=VALUE", help=set_help)
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser(
        "enrol",
        aliases=["enroll"],
        help="print the public key and the commands that enrol this agent ('enroll' too)",
        description="Print this agent's public signing key, the aggregator command (or web "
        "page) that enrols it, and the broker account it needs (user name '<site>/<agent>').",
    )
    p.add_argument("--config", type=Path, help="agent TOML config file")
    p.add_argument("--set", type=_setting, action="append", metavar="NAME=VALUE", help=set_help)
    p.set_defaults(func=cmd_enrol)

    p = sub.add_parser(
        "doctor",
        help="check that this access point is ready to count (exit status 1 if not)",
        description="One table of checks, with a fix for each failing one: site, id and time "
        "zone set (a warning if not), interface in monitor mode, capabilities, probe requests "
        "arriving, clock synchronised, signing key, broker reachable with these credentials, "
        "its ACL (own topic accepted, another refused), the aggregator storing this agent's "
        "windows (its signed receipt), spool, numba cache. Exit status 1 if a check failed.",
    )
    p.add_argument("--config", type=Path, help="agent TOML config file")
    p.add_argument(
        "--sample-s", type=float, default=5.0, help="seconds to listen for frames (default 5)"
    )
    p.add_argument("--set", type=_setting, action="append", metavar="NAME=VALUE", help=set_help)
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser(
        "survey",
        help="site survey: probe requests a second and their signal, by channel, live",
        description="Listen on the live interface (source.path) for a few minutes and show, "
        "per channel, the probe requests a second and the share in each 10 dB signal band, "
        "refreshed as it goes with the time left: where to put the antenna and which channel "
        "to listen on. Frames are counted; nothing per device is kept or shown.",
    )
    p.add_argument("--config", type=Path, help="agent TOML config file")
    p.add_argument(
        "--minutes", type=float, default=3.0, help="how long to listen (default 3 minutes)"
    )
    p.add_argument("--channels", help="hop over these channels, e.g. 1,6,11 (needs iw)")
    p.add_argument("--set", type=_setting, action="append", metavar="NAME=VALUE", help=set_help)
    p.set_defaults(func=cmd_survey)

    _evaluate_commands(sub)

    p = sub.add_parser(
        "privacy-report",
        help="explain the effective privacy settings in plain language",
        description="What the agent hears, what it keeps in memory and for how long, what "
        "it writes to disk, what leaves the device, and the rule each mode answers, from the "
        "settings in force.",
    )
    p.add_argument("--config", type=Path, help="agent TOML config file")
    p.add_argument("--set", type=_setting, action="append", metavar="NAME=VALUE", help=set_help)
    p.add_argument(
        "--capture",
        type=Path,
        metavar="FILE",
        help="also replay FILE and state what strict mode achieved there: the share of "
        "devices sharing their id per window",
    )
    p.set_defaults(func=cmd_privacy_report)

    p = sub.add_parser(
        "audit",
        help="check what agents publish for identifiers and privacy (exit status 1: FAIL)",
        description="Listen to the agents' topics on a broker (or read a capture of their "
        "MQTT traffic) and check every message: contract, signature, anything identifier-"
        "like, and consistency with the privacy mode each agent declares. Prints a report "
        "with a PASS/FAIL verdict; exit status 0 on PASS, 1 on FAIL.",
    )
    p.add_argument("--broker", metavar="HOST[:PORT]", help="broker to listen to (broker.host)")
    p.add_argument("--pcap", type=Path, metavar="FILE", help="capture of agents' MQTT traffic")
    p.add_argument(
        "--topic",
        default="#",
        help="topic filter (default '#': everything, so that an agent publishing off its "
        "topics is caught; Home Assistant's discovery configs are recognised)",
    )
    p.add_argument("--seconds", type=float, default=60.0, help="how long to listen (default 60)")
    p.add_argument(
        "--key",
        type=_agent_key,
        action="append",
        metavar="SITE/AGENT=PUBLIC_KEY",
        help="an agent's public key, to check its signatures (repeatable)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object instead of the report")
    p.add_argument("--config", type=Path, help="agent TOML config file (broker settings)")
    p.add_argument("--set", type=_setting, action="append", metavar="NAME=VALUE", help=set_help)
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser(
        "build-kernels",
        help="compile the kernels ahead of time (then numba is not loaded at run time)",
        description="Compile the agent's numba kernels with numba.pycc into one extension "
        "module in FOOTFALL_KERNELS_DIR (default: lib/footfall-kernels in this Python "
        "environment). The agent uses it when it matches its sources and saves the memory of "
        "numba's compiler; otherwise it compiles them just in time. Does nothing if the build "
        "is up to date.",
    )
    p.set_defaults(func=cmd_build_kernels)

    p = sub.add_parser("config", help="configuration")
    config_sub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = config_sub.add_parser("show", help="print the effective settings, secrets masked")
    show.add_argument("--config", type=Path, help="agent TOML config file")
    show.add_argument("--help-text", action="store_true", help="each setting's help under it")
    show.add_argument("--set", type=_setting, action="append", metavar="NAME=VALUE", help=set_help)
    show.set_defaults(func=cmd_config_show)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("footfall-agent", log, AgentError, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
