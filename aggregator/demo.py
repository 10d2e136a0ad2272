"""``footfall-aggregator demo``: the whole system on one machine, for a first look.

It starts a private broker on a free loopback port: Mosquitto if it is installed (its own
config, no persistence; MQTT 5), otherwise amqtt, a broker in Python installed with footfall's
``[demo]`` extra, in a process of its own (MQTT 3.1.1 only, so agent and ingest speak 3.1.1 to
it); ``--broker`` (or ``FOOTFALL_DEMO_BROKER``) chooses. Either takes no password: it listens on
127.0.0.1 only. Then it starts the aggregator (SQLite in a temporary directory; API, dashboard
and ingest in this process) and three agents, ``footfall-agent run`` processes publishing
through the broker, signed, as real ones would, with the aggregator's receipt key (a window
leaves an agent's spool only once stored): one replays the capture bundled with footfall at
full speed; each of the two shops' counts the probe requests of ``--days`` days of its
customers' and passers-by's phones (addresses that rotate; next door, a printer and a TV),
which :mod:`firmware_agent.tools.shop_traffic` generates with their ground truth and pipes
into it as one pcap stream. The demo enrols the agents, waits until every window is stored,
says for each shop the visitors its agent counted against the truth, makes a demo merchant
with a fresh random password, and prints the broker it used, the dashboard's address and the
login. Ctrl-C (or SIGTERM) stops it all.

The shops' agents publish hourly windows (``count.window_s = 3600``): at 5 minutes a small
shop's arrivals, visits and occupancy are mostly from 1 to 4, which the agent suppresses
(``privacy.suppress_below``, 5), so the page would show lower bounds. Their signal threshold
is the site's (-76 dBm, what ``footfall-agent calibrate --site-threshold`` picks from an
empty hour there), as an installer's calibration visit would set it.

amqtt keeps a session's queued messages only for a client that gave a user name (with
anonymous access on it keeps none), so the embedded broker is configured to want a user name and
check nothing else, and both clients give one. Its limits, which the demo does not meet (ingest
runs for the whole demo and acknowledges each batch within milliseconds), and which the agent's
receipts would make good anyway: it never sends again a QoS 1 message that is not acknowledged
within 5 s or before its subscriber disconnects, loses one that comes while its subscriber is
disconnecting, and keeps nothing over its own restart (docs/aggregator.md).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from datetime import time as dtime
from importlib import metadata, resources
from pathlib import Path
from types import FrameType
from zoneinfo import ZoneInfo

import sqlalchemy as sa

from aggregator.accounts import Accounts
from aggregator.config import load_config
from aggregator.errors import AggregatorError
from aggregator.receipts import load_receipt_key
from aggregator.serve import serve
from aggregator.store import Store, agents, site_days, windows
from firmware_agent.contract.messages import public_key_text
from firmware_agent.tools.shop_traffic import ShopProfile

__all__ = [
    "BROKERS",
    "DEMO_DAYS",
    "DEMO_SITES",
    "SHOP_SETTINGS",
    "Broker",
    "Shop",
    "amqtt_command",
    "embedded_broker",
    "finish_shops",
    "run_demo",
    "start_shops",
]

SITE, AGENT, MERCHANT = "demo-shop", "entrance", "demo"
# The two shops whose five weeks of people (counts v2) the demo fills: id -> (name, agent,
# traffic). The second is smaller, and its sensor was down one Wednesday afternoon (a gap).
DEMO_SITES: dict[str, tuple[str, str, ShopProfile]] = {
    "high-street": ("High Street", "door", ShopProfile(peak_arrivals_per_hour=42, seed=11)),
    "station": ("Station kiosk", "door", ShopProfile(peak_arrivals_per_hour=25, seed=12)),
}
DEMO_DAYS = 35
# The shops' agents' settings (see the module docstring), besides their time zone.
SHOP_SETTINGS = "[count]\nwindow_s = 3600\n[estimate]\nrssi_threshold_dbm = -76\n"
_SETTLE_S = 300  # longest wait for the shops' agents to count and ingest to store their windows
_QUIET = os.environ | {"FOOTFALL_LOG": "warning"}
BROKERS = ("auto", "mosquitto", "embedded")
_START_S = 30  # longest wait for a broker to listen (amqtt imports for ~1 s on a busy machine)
_REPLAY_S = 600  # longest the agent may take to replay the bundled capture


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True, slots=True)
class Broker:
    """A broker the demo started: what to call it, where it listens, which MQTT it speaks."""

    name: str
    port: int
    protocol: str  # "5" or "3.1.1"


def _mosquitto() -> str | None:
    return shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/sbin")


@contextlib.contextmanager
def _process(command: list[str], name: str, port: int) -> Iterator[None]:
    """``command`` running until the block ends, once something listens on ``port``; stopped
    with SIGTERM (neither broker keeps anything), killed if it has not within 10 s."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + _START_S
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if process.poll() is not None:
                raise AggregatorError(f"{name} exited with status {process.returncode}")
            if time.monotonic() > deadline:
                raise AggregatorError(f"{name} did not listen on port {port} within {_START_S} s")
            time.sleep(0.1)
        yield
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def amqtt_command(workdir: Path, port: int) -> list[str]:
    """The command that runs amqtt on ``port`` (config in ``workdir``): it wants a user name
    (so that sessions keep their messages) and checks no password."""
    conf = workdir / "amqtt.yaml"  # JSON is YAML
    conf.write_text(
        json.dumps(
            {
                "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
                "plugins": {
                    "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": False}
                },
            }
        )
    )
    return [sys.executable, "-m", "amqtt.scripts.broker_script", "-c", str(conf)]


@contextlib.contextmanager
def embedded_broker(workdir: Path) -> Iterator[Broker]:
    """amqtt (MQTT 3.1.1) in a process of its own on a free loopback port
    (:func:`amqtt_command`)."""
    port = _free_port()
    name = f"amqtt {metadata.version('amqtt')} (embedded)"
    with _process(amqtt_command(workdir, port), name, port):
        yield Broker(name, port, "3.1.1")


@contextlib.contextmanager
def _mosquitto_broker(workdir: Path, binary: str) -> Iterator[Broker]:
    port = _free_port()
    conf = workdir / "mosquitto.conf"
    # max_queued_messages as the shipped config has it: Mosquitto's default (1,000) drops what
    # ingest has not taken yet, and the shops' five weeks arrive in seconds (2,507 of 19,832
    # windows lost in one run on a loaded machine; the demo's fill has no spool to re-send).
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "max_queued_messages 100000\n"
    )
    name = f"Mosquitto ({binary})"
    with _process([binary, "-c", str(conf)], name, port):
        yield Broker(name, port, "5")


def _broker(workdir: Path, choice: str) -> contextlib.AbstractContextManager[Broker]:
    """The broker ``choice`` names: 'auto' is Mosquitto if installed, else amqtt."""
    if choice not in BROKERS:
        raise AggregatorError(
            f"the demo's broker (--broker or FOOTFALL_DEMO_BROKER) must be one of "
            f"{', '.join(BROKERS)}, got {choice!r}"
        )
    mosquitto = _mosquitto()
    if choice != "embedded" and mosquitto is not None:
        return _mosquitto_broker(workdir, mosquitto)
    if choice == "mosquitto":
        raise AggregatorError(
            "--broker mosquitto: Mosquitto is not installed (apt-get install mosquitto)"
        )
    if importlib.util.find_spec("amqtt") is None:
        raise AggregatorError(
            "the demo needs a broker: install footfall with its demo extra (pip install "
            "'.[demo]', which brings amqtt) or Mosquitto (apt-get install mosquitto)"
        )
    if choice == "auto":
        print("Mosquitto is not installed: the demo uses its embedded broker", flush=True)
    return embedded_broker(workdir)


def _agent_config(
    workdir: Path, site: str, agent: str, broker: Broker, receipt_key: str, more: str = ""
) -> Path:
    """An agent's config (its key and spool in ``workdir/site``): with the aggregator's receipt
    key, so a window leaves its spool only once stored, whatever the broker (amqtt too)
    forgets; ``more`` adds settings."""
    home = workdir / site
    home.mkdir()
    path = home / "agent.toml"
    path.write_text(
        f'[agent]\nsite = "{site}"\nid = "{agent}"\nconfig_dir = "{home}"\n'
        f'state_dir = "{home}"\n'
        f'[broker]\nhost = "127.0.0.1"\nport = {broker.port}\nusername = "{site}/{agent}"\n'
        f'protocol = "{broker.protocol}"\nreceipt_key = "{receipt_key}"\nreceipt_timeout_s = 5\n'
        + more
    )
    return path


def _keygen(agent_cli: str, agent_toml: Path) -> str:
    """``footfall-agent keygen``: the agent's signing key written, its public key."""
    return subprocess.run(
        [agent_cli, "keygen", "--config", str(agent_toml)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def _replay(agent_cli: str, agent_toml: Path) -> None:
    """The agent replays the bundled capture at full speed through the broker, signed."""
    print("replaying the bundled capture through the broker ...", flush=True)
    sample = resources.files("firmware_agent") / "data/sample.pcap"
    command = [agent_cli, "run", "--config", str(agent_toml), "--speed", "fast"]
    try:
        subprocess.run(
            [*command, "--source", str(sample)],
            check=True,
            env=_QUIET,
            stderr=subprocess.DEVNULL,
            timeout=_REPLAY_S,
        )
    except subprocess.SubprocessError as exc:
        raise AggregatorError(f"the agent's replay failed: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Shop:
    """One of :data:`DEMO_SITES` being counted: its generator piping a pcap stream into its
    agent, and the file the generator writes each hour's truth to."""

    site: str
    name: str
    agent: str
    generator: subprocess.Popen[bytes]
    counting: subprocess.Popen[bytes]
    truth: Path


def start_shops(
    store: Store, workdir: Path, broker: Broker, receipt_key: str, now: int, days: int
) -> list[Shop]:
    """Enrol :data:`DEMO_SITES` and start counting ``days`` local days of their people, up to
    ``now``: for each, :mod:`firmware_agent.tools.shop_traffic` generates the phones' probe
    requests (with the truth) as one pcap stream, piped into ``footfall-agent run --source -``,
    which counts them (:data:`SHOP_SETTINGS`) and publishes each window signed through the
    broker to ingest, as an agent in the shop would; it exits once ingest's receipts say every
    window is stored."""
    agent_cli = str(Path(sys.executable).with_name("footfall-agent"))
    shops = []
    for site_id, (name, agent, shop) in DEMO_SITES.items():
        profile = shop
        store.add_site(site_id, name, profile.timezone, now)
        toml = _agent_config(
            workdir,
            site_id,
            agent,
            broker,
            receipt_key,
            SHOP_SETTINGS + f'[epoch]\ntimezone = "{profile.timezone}"\n',
        )
        store.add_agent(site_id, agent, _keygen(agent_cli, toml), now)
        today = datetime.fromtimestamp(now, ZoneInfo(profile.timezone)).date()
        first = today - timedelta(days=days - 1)
        command = [sys.executable, "-m", "firmware_agent.tools.shop_traffic", "-"]
        command += ["--first", first.isoformat(), "--days", str(days), "--until", str(now)]
        command += ["--timezone", profile.timezone, "--seed", str(profile.seed)]
        command += ["--peak", str(profile.peak_arrivals_per_hour)]
        if site_id == "station":  # its sensor was down one Wednesday afternoon
            wednesday = first + timedelta(days=(2 - first.weekday()) % 7 + 14)
            gap = int(
                datetime.combine(wednesday, dtime(14), ZoneInfo(profile.timezone)).timestamp()
            )
            command += ["--no-data", str(gap), str(gap + 3 * 3600)]
        truth = toml.with_name("truth.jsonl")
        generator = subprocess.Popen(
            [*command, "--truth", str(truth)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        assert generator.stdout is not None
        counting = subprocess.Popen(
            [agent_cli, "run", "--config", str(toml), "--source", "-"],
            stdin=generator.stdout,
            env=_QUIET,
            stderr=subprocess.DEVNULL,
        )
        generator.stdout.close()  # the agent's now: it sees the end when the generator exits
        shops.append(Shop(site_id, name, agent, generator, counting, truth))
    return shops


def finish_shops(store: Store, shops: list[Shop]) -> int:
    """Wait for the shops' generators and agents to finish (every window stored), then say,
    for each, the visitors its agent counted against the generator's truth; the windows
    stored."""
    stored = 0
    deadline = time.monotonic() + _SETTLE_S
    for shop in shops:
        for process, what in ((shop.generator, "generator"), (shop.counting, "agent")):
            try:
                status = process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AggregatorError(
                    f"{shop.name}'s {what} did not finish within {_SETTLE_S} s"
                ) from None
            if status != 0:
                raise AggregatorError(f"{shop.name}'s {what} exited with status {status}")
        truth = sum(json.loads(line)["arrivals"] for line in shop.truth.read_text().splitlines())
        key = sa.select(agents.c.agent_key).where(
            agents.c.site_id == shop.site, agents.c.agent_id == shop.agent
        )
        with store.begin(read_only=True) as conn:
            windows_of = conn.execute(
                sa.select(sa.func.count()).where(windows.c.agent_key == key.scalar_subquery())
            ).scalar_one()
            counted = conn.execute(
                sa.select(sa.func.coalesce(sa.func.sum(site_days.c.arrivals_sum), 0)).where(
                    site_days.c.site_id == shop.site
                )
            ).scalar_one()
        stored += int(windows_of)
        off = f" ({100 * (counted - truth) / truth:+.1f} %)" if truth else ""
        print(
            f"  {shop.name}: {counted} visitors counted by its agent, {truth} in the "
            f"generator's truth{off}",
            flush=True,
        )
    return stored


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the demo as Ctrl-C does: everything cleaned up


def _check_port(port: int) -> None:
    """Say at once when the dashboard's port is taken, rather than after the broker and the
    agent have started and the server has failed to listen."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            raise AggregatorError(
                f"port {port} is taken ({exc.strerror}): another demo or server listens on "
                f"it; choose another with --port, e.g. footfall-aggregator demo --port {port + 1}"
            ) from exc


def run_demo(port: int, timezone: str, broker_choice: str = "auto", days: int = DEMO_DAYS) -> int:
    """Run the demo until Ctrl-C or SIGTERM (see the module docstring), with ``days`` days of
    the two shops' people."""
    if days < 1:
        raise AggregatorError(f"the demo's --days must be at least 1, got {days}")
    _check_port(port)
    bin_dir = Path(sys.executable).parent
    agent_cli = str(bin_dir / "footfall-agent")
    signal.signal(signal.SIGTERM, _interrupt)
    with (
        tempfile.TemporaryDirectory(prefix="footfall-demo-") as tmp,
        contextlib.suppress(KeyboardInterrupt),
    ):
        workdir = Path(tmp)
        with _broker(workdir, broker_choice) as broker:
            print(
                f"broker: {broker.name}, MQTT {broker.protocol}, on 127.0.0.1:{broker.port}",
                flush=True,
            )
            config = load_config(
                overrides={
                    "store.data_dir": str(workdir),
                    "broker.host": "127.0.0.1",
                    "broker.port": broker.port,
                    "broker.username": "footfall-demo",
                    "broker.protocol": broker.protocol,
                    "ingest.share_group": "",
                    "ingest.client_id": "footfall-demo",
                    "serve.port": port,
                }
            )
            receipt_key = public_key_text(load_receipt_key(Path(config.ingest.receipt_key_file)))
            agent_toml = _agent_config(workdir, SITE, AGENT, broker, receipt_key)
            public_key = _keygen(agent_cli, agent_toml)
            password = secrets.token_urlsafe(12)
            with Store.open(config.store) as store:
                now = int(time.time())
                store.add_site(SITE, "Demo shop", timezone, now)
                store.add_agent(SITE, AGENT, public_key, now)
                accounts = Accounts(store)
                accounts.add_user(MERCHANT, "merchant", password, now)
                accounts.grant(MERCHANT, SITE)
                ready, stop = threading.Event(), threading.Event()
                server = threading.Thread(
                    target=serve,
                    args=(config, store),
                    kwargs={"ready": ready, "stop": stop},
                    daemon=True,
                )
                server.start()
                shops: list[Shop] = []
                try:
                    if not ready.wait(30):
                        raise AggregatorError("the aggregator did not start within 30 s")
                    began = time.monotonic()
                    print(
                        f"counting {days} days of two shops' phones through their agents ...",
                        flush=True,
                    )
                    shops = start_shops(store, workdir, broker, receipt_key, now, days)
                    for site_id in DEMO_SITES:
                        accounts.grant(MERCHANT, site_id)
                    _replay(agent_cli, agent_toml)
                    stored = finish_shops(store, shops)
                    print(f"{stored} windows of people in {time.monotonic() - began:.0f} s")
                    shop = next(iter(DEMO_SITES))
                    with store.begin(read_only=True) as conn:
                        day = conn.execute(
                            sa.select(sa.func.max(site_days.c.local_day)).where(
                                site_days.c.site_id == shop
                            )
                        ).scalar()
                    url = f"http://127.0.0.1:{port}/sites/{shop}" + (f"?date={day}" if day else "")
                    print(f"\nfootfall demo: open {url}")
                    print(f"  user: {MERCHANT}\n  password: {password}")
                    print("Ctrl-C stops it.", flush=True)
                    # Not server.join(): in Python 3.11 a join() that Ctrl-C interrupts leaves
                    # the thread marked as stopped, and the broker would stop before ingest.
                    while server.is_alive():
                        stop.wait(0.5)
                finally:  # the agents and the aggregator stop before the broker does
                    for process in (p for shop in shops for p in (shop.generator, shop.counting)):
                        if process.poll() is None:
                            process.kill()
                            process.wait()
                    stop.set()
                    server.join(15)
    return 0
