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
from importlib import metadata, resources
from pathlib import Path
from types import FrameType

import sqlalchemy as sa

from aggregator.accounts import Accounts
from aggregator.config import load_config
from aggregator.errors import AggregatorError
from aggregator.receipts import load_receipt_key
from aggregator.serve import serve
from aggregator.store import Store, site_days
from firmware_agent.messages import public_key_text

__all__ = ["BROKERS", "Broker", "amqtt_command", "embedded_broker", "run_demo"]

SITE, AGENT, MERCHANT = "demo-shop", "entrance", "demo"
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
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
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


def run_demo(port: int, timezone: str, broker_choice: str = "auto") -> int:
    """Run the demo until Ctrl-C or SIGTERM (see the module docstring)."""
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
                    _replay(agent_cli, agent_toml)
                    time.sleep(1)  # the last batch's commit
                    with store.begin(read_only=True) as conn:
                        day = conn.execute(sa.select(sa.func.max(site_days.c.local_day))).scalar()
                    url = f"http://127.0.0.1:{port}/sites/{SITE}" + (f"?date={day}" if day else "")
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
