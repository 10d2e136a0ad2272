"""``footfall-aggregator demo``: the whole system on one machine, for a first look.

It starts a private Mosquitto on a free port (its own config, no persistence, loopback only),
the aggregator (SQLite in a temporary directory; API, dashboard and ingest in this process),
and an agent that replays the capture bundled with footfall at full speed through the broker,
signed, as a real one would; it enrols the agent, makes a demo merchant with a fresh random
password, and prints the dashboard's address and the login. Ctrl-C stops it all.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import sqlalchemy as sa

from aggregator.accounts import Accounts
from aggregator.config import load_config
from aggregator.errors import AggregatorError
from aggregator.serve import serve
from aggregator.store import Store, site_days

__all__ = ["run_demo"]

SITE, AGENT, MERCHANT = "demo-shop", "entrance", "demo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _mosquitto() -> str:
    found = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/sbin")
    if found is None:
        raise AggregatorError(
            "the demo needs Mosquitto (apt-get install mosquitto): the aggregator's ingest "
            "speaks MQTT 5, which the embedded amqtt broker does not"
        )
    return found


@contextlib.contextmanager
def _broker(workdir: Path) -> Iterator[int]:
    port = _free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    process = subprocess.Popen(
        [_mosquitto(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if time.monotonic() > deadline or process.poll() is not None:
                raise AggregatorError(f"mosquitto did not start on port {port}")
            time.sleep(0.1)
        yield port
    finally:
        process.terminate()
        process.wait(10)


def _agent_config(workdir: Path, broker_port: int) -> Path:
    path = workdir / "agent.toml"
    path.write_text(
        f'[agent]\nsite = "{SITE}"\nid = "{AGENT}"\nconfig_dir = "{workdir}/agent"\n'
        f'state_dir = "{workdir}/agent"\n'
        f'[broker]\nhost = "127.0.0.1"\nport = {broker_port}\nusername = ""\n'
    )
    return path


def run_demo(port: int, timezone: str) -> int:
    """Run the demo until Ctrl-C (see the module docstring)."""
    bin_dir = Path(sys.executable).parent
    agent_cli = str(bin_dir / "footfall-agent")
    with tempfile.TemporaryDirectory(prefix="footfall-demo-") as tmp:
        workdir = Path(tmp)
        with _broker(workdir) as broker_port:
            config = load_config(
                overrides={
                    "store.data_dir": str(workdir),
                    "broker.host": "127.0.0.1",
                    "broker.port": broker_port,
                    "broker.username": "",
                    "ingest.share_group": "",
                    "ingest.client_id": "footfall-demo",
                    "serve.port": port,
                }
            )
            agent_toml = _agent_config(workdir, broker_port)
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
                ready = threading.Event()
                server = threading.Thread(
                    target=serve, args=(config, store), kwargs={"ready": ready}, daemon=True
                )
                server.start()
                if not ready.wait(30):
                    raise AggregatorError("the aggregator did not start within 30 s")
                print("replaying the bundled capture through the broker ...", flush=True)
                subprocess.run(
                    [
                        agent_cli,
                        "run",
                        "--config",
                        str(agent_toml),
                        "--speed",
                        "fast",
                        "--source",
                        str(resources.files("firmware_agent") / "data/sample.pcap"),
                    ],
                    check=True,
                    env=os.environ | {"FOOTFALL_LOG": "warning"},
                    stderr=subprocess.DEVNULL,
                )
                time.sleep(1)  # the last batch's commit
                with store.begin(read_only=True) as conn:
                    day = conn.execute(sa.select(sa.func.max(site_days.c.local_day))).scalar()
                url = f"http://127.0.0.1:{port}/sites/{SITE}" + (f"?date={day}" if day else "")
                print(f"\nfootfall demo: open {url}")
                print(f"  user: {MERCHANT}\n  password: {password}")
                print("Ctrl-C stops it.", flush=True)
                with contextlib.suppress(KeyboardInterrupt):
                    server.join()
    return 0
