"""``footfall-aggregator demo``: the whole system on one machine, for a first look.

It starts a private broker on a free loopback port: Mosquitto if it is installed (its own
config, no persistence; MQTT 5), otherwise amqtt, a broker in Python installed with footfall's
``[demo]`` extra, in a process of its own (MQTT 3.1.1 only, so agent and ingest speak 3.1.1 to
it); ``--broker`` (or ``FOOTFALL_DEMO_BROKER``) chooses. Either takes no password: it listens on
127.0.0.1 only. Then it starts the aggregator (SQLite in a temporary directory; API, dashboard
and ingest in this process), and an agent that replays the capture bundled with footfall at
full speed through the broker, signed, as a real one would, with the aggregator's receipt key
(a window leaves its spool only once stored); it enrols the agent, makes a demo
merchant with a fresh random password, and prints the broker it used, the dashboard's address
and the login. Ctrl-C (or SIGTERM) stops it all.

amqtt keeps a session's queued messages only for a client that gave a user name (with
anonymous access on it keeps none), so the embedded broker is configured to want a user name and
check nothing else, and both clients give one. Its limits, which the demo does not meet (ingest
runs for the whole demo and acknowledges each batch within milliseconds), and which the agent's
receipts would make good anyway: it never sends again a QoS 1 message that is not acknowledged
within 5 s or before its subscriber disconnects, loses one that comes while its subscriber is
disconnecting, and keeps nothing over its own restart (docs/aggregator.md).
"""

from __future__ import annotations

import base64
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
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from datetime import time as dtime
from importlib import metadata, resources
from pathlib import Path
from types import FrameType
from zoneinfo import ZoneInfo

import nacl.signing
import sqlalchemy as sa

from aggregator.accounts import Accounts
from aggregator.config import load_config
from aggregator.errors import AggregatorError
from aggregator.receipts import load_receipt_key
from aggregator.serve import serve
from aggregator.store import Store, agents, site_days, windows
from firmware_agent.contract.messages import (
    AgentId,
    SiteId,
    Topic,
    canonical_json,
    public_key_text,
    utc_text,
)
from firmware_agent.service.publish import BrokerSettings, Connection
from firmware_agent.tools.shop_traffic import ShopProfile, shop_windows

__all__ = [
    "BROKERS",
    "DEMO_DAYS",
    "DEMO_SITES",
    "Broker",
    "amqtt_command",
    "embedded_broker",
    "fill_traffic",
    "run_demo",
]

SITE, AGENT, MERCHANT = "demo-shop", "entrance", "demo"
# The two shops whose five weeks of people (counts v2) the demo fills: id -> (name, agent,
# traffic). The second is smaller, and its sensor was down one Wednesday afternoon (a gap).
DEMO_SITES: dict[str, tuple[str, str, ShopProfile]] = {
    "high-street": ("High Street", "door", ShopProfile(peak_arrivals_per_hour=42, seed=11)),
    "station": ("Station kiosk", "door", ShopProfile(peak_arrivals_per_hour=25, seed=12)),
}
DEMO_DAYS = 35
_INFLIGHT = 512
_SETTLE_S = 180  # longest wait for ingest to store the shops' windows
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


def _agent_config(workdir: Path, broker: Broker, receipt_key: str) -> Path:
    """The agent's config: with the aggregator's receipt key, so a window leaves its spool only
    once stored, whatever the broker (amqtt too) forgets."""
    path = workdir / "agent.toml"
    path.write_text(
        f'[agent]\nsite = "{SITE}"\nid = "{AGENT}"\nconfig_dir = "{workdir}/agent"\n'
        f'state_dir = "{workdir}/agent"\n'
        f'[broker]\nhost = "127.0.0.1"\nport = {broker.port}\nusername = "{SITE}/{AGENT}"\n'
        f'protocol = "{broker.protocol}"\nreceipt_key = "{receipt_key}"\nreceipt_timeout_s = 5\n'
    )
    return path


def _replay(agent_cli: str, agent_toml: Path) -> None:
    """The agent replays the bundled capture at full speed through the broker, signed."""
    print("replaying the bundled capture through the broker ...", flush=True)
    sample = resources.files("firmware_agent") / "data/sample.pcap"
    command = [agent_cli, "run", "--config", str(agent_toml), "--speed", "fast"]
    try:
        subprocess.run(
            [*command, "--source", str(sample)],
            check=True,
            env=os.environ | {"FOOTFALL_LOG": "warning"},
            stderr=subprocess.DEVNULL,
            timeout=_REPLAY_S,
        )
    except subprocess.SubprocessError as exc:
        raise AggregatorError(f"the agent's replay failed: {exc}") from exc


def _seal(payload: dict[str, object], key: nacl.signing.SigningKey) -> bytes:
    signature = key.sign(canonical_json(payload)).signature
    envelope = {"alg": "ed25519", "payload": payload, "sig": base64.b64encode(signature).decode()}
    return canonical_json(envelope)


def fill_traffic(store: Store, broker: Broker, now: int, days: int = DEMO_DAYS) -> int:
    """Enrol :data:`DEMO_SITES` and publish ``days`` local days of their people, up to
    ``now``, as each site's agent would: counts v2 windows (5 minutes), signed with the agent's
    key, at QoS 1 through the broker to ingest, with the agent's MQTT connection
    (:class:`firmware_agent.service.publish.Connection`). The windows sent."""
    sent = 0
    for site_id, (name, agent, shop) in DEMO_SITES.items():
        profile = shop
        key = nacl.signing.SigningKey.generate()
        store.add_site(site_id, name, profile.timezone, now)
        store.add_agent(site_id, agent, public_key_text(key), now)
        today = datetime.fromtimestamp(now, ZoneInfo(profile.timezone)).date()
        first = today - timedelta(days=days - 1)
        wednesday = first + timedelta(days=(2 - first.weekday()) % 7 + 14)
        if site_id == "station":
            gap = int(
                datetime.combine(wednesday, dtime(14), ZoneInfo(profile.timezone)).timestamp()
            )
            profile = replace(profile, no_data=(gap, gap + 3 * 3600))
        bodies = shop_windows(profile, first, days, 300, until=now)
        topic = Topic.parse(f"footfall/v1/{site_id}/{agent}/counts")
        header = {"kind": "counts", "v": 2, "site": SiteId(site_id).value}
        header |= {"agent": AgentId(agent).value, "epoch": secrets.token_hex(8)}
        connection = Connection(
            BrokerSettings(
                host="127.0.0.1",
                port=broker.port,
                username=f"{site_id}/{agent}",
                protocol=broker.protocol,
                max_inflight=_INFLIGHT,
            ),
            None,
            f"demo-{site_id}-{agent}",
        )
        connection.open()
        try:
            waiting = 0
            for seq, body in enumerate(bodies, 1):
                heard = not body["no_data"]
                payload = (
                    header
                    | body
                    | {
                        "seq": seq,
                        "window_start": utc_text(body["window_start"]),
                        "probe_requests": 40 * (body.get("passersby") or 0) if heard else 0,
                        "malformed": 0,
                        "late_frames": 0,
                        "devices": 2 * (body.get("passersby") or 0) if heard else None,
                        "devices_randomised": body.get("passersby") if heard else None,
                    }
                )
                connection.publish(topic, _seal(payload, key))
                waiting += 1
                while waiting >= _INFLIGHT:
                    waiting -= len(connection.loop(0.05))
            while waiting > 0:
                waiting -= len(connection.loop(0.05))
        finally:
            connection.close()
        sent += len(bodies)
    return sent


def _settle(store: Store, sent: int) -> None:
    """Wait until ingest has stored the ``sent`` windows of the demo's shops, saying every
    10 s how far it got (about 10 s on 2 quiet cores; a busy machine takes longer); after
    :data:`_SETTLE_S`, say how many are stored and go on with those."""
    keys = sa.select(agents.c.agent_key).where(agents.c.site_id.in_(list(DEMO_SITES)))
    began = time.monotonic()
    said = began
    stored = 0
    while time.monotonic() - began < _SETTLE_S:
        with store.begin(read_only=True) as conn:
            stored = (
                conn.execute(
                    sa.select(sa.func.count()).where(windows.c.agent_key.in_(keys))
                ).scalar()
                or 0
            )
        if stored >= sent:
            return
        if time.monotonic() - said >= 10:
            said = time.monotonic()
            print(f"  {stored} of {sent} windows stored ...", flush=True)
        time.sleep(0.2)
    print(f"  only {stored} of {sent} windows stored after {_SETTLE_S} s; the page shows those")


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
            receipt_key = load_receipt_key(Path(config.ingest.receipt_key_file))
            agent_toml = _agent_config(workdir, broker, public_key_text(receipt_key))
            public_key = subprocess.run(
                [agent_cli, "keygen", "--config", str(agent_toml)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
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
                try:
                    if not ready.wait(30):
                        raise AggregatorError("the aggregator did not start within 30 s")
                    began = time.monotonic()
                    print(f"publishing {days} days of two shops' people ...", flush=True)
                    sent = fill_traffic(store, broker, now, days)
                    for site_id in DEMO_SITES:
                        accounts.grant(MERCHANT, site_id)
                    _replay(agent_cli, agent_toml)
                    _settle(store, sent)
                    print(f"{sent} windows of people in {time.monotonic() - began:.0f} s")
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
                finally:  # the aggregator stops before the broker does
                    stop.set()
                    server.join(15)
    return 0
