"""The README's main command: ``footfall-aggregator demo`` runs broker, aggregator and an agent
replaying the bundled capture, and the printed login opens a dashboard with its counts.

Three times: with Mosquitto (MQTT 5), stopped by Ctrl-C (SIGINT); with the embedded amqtt broker
forced (``--broker embedded``, MQTT 3.1.1), stopped by SIGTERM; and with ``--broker auto`` where
Mosquitto is hidden (a mount namespace puts /dev/null over its binaries: what a machine without
it gets), which must fall back to the embedded broker and say so. Each time every window of the
capture reaches the dashboard's API, the demo exits 0 and its broker is gone; each run is
bounded in time. A broker it does not know (``FOOTFALL_DEMO_BROKER``) is refused, naming the
flag and the variable.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.support.netns import require
from tests.support.ports import free_port

START_S = 180  # the demo prints its login within this (about 45 s on 2 busy cores)


@pytest.fixture(scope="module")
def replayed_windows() -> tuple[int, str]:
    """The windows the bundled capture makes (``footfall-agent replay``, no broker), and the
    day of the first."""
    agent = Path(sys.executable).with_name("footfall-agent")
    done = subprocess.run(
        [str(agent), "replay"], check=True, capture_output=True, text=True, timeout=120
    )
    lines = done.stdout.splitlines()
    return len(lines), json.loads(lines[0])["window_start"][:10]


def _lines_until_login(demo: subprocess.Popen[str]) -> str:
    """What the demo printed up to its 'Ctrl-C stops it.' line; fails after START_S."""
    lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()

    def read() -> None:
        assert demo.stdout is not None
        for line in demo.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    text, deadline = "", time.monotonic() + START_S
    while not text.endswith("Ctrl-C stops it.\n"):
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"no login within {START_S} s:\n{text}") from None
        if line is None:
            raise AssertionError(f"the demo exited with {demo.wait()}:\n{text}")
        text += line
    return text


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _hiding_mosquitto(broker: str) -> list[str]:
    """For ``auto``: a command prefix that runs the demo in a mount namespace of its own where
    every Mosquitto binary is /dev/null (not executable), as on a machine without it. The
    prefix execs (no fork), so the demo keeps the process id signals are sent to."""
    if broker != "auto":
        return []
    unshare = shutil.which("unshare")
    binaries = {
        str(Path(found).resolve())
        for found in (shutil.which("mosquitto"), shutil.which("mosquitto", path="/usr/sbin:/sbin"))
        if found
    }
    require(
        unshare is not None and os.geteuid() == 0,
        "hiding Mosquitto needs root and unshare (util-linux) for a mount namespace",
    )
    assert unshare is not None
    mounts = "".join(f"mount --bind /dev/null {path} && " for path in sorted(binaries))
    return [unshare, "--mount", "--propagation", "private", "sh", "-c", mounts + 'exec "$@"', "sh"]


@pytest.mark.slow  # a five-week demo each
@pytest.mark.parametrize(
    ("broker", "stop", "printed"),
    [
        (
            "mosquitto",
            signal.SIGINT,
            "broker: Mosquitto (",
        ),
        ("embedded", signal.SIGTERM, "broker: amqtt "),
        pytest.param(
            "auto",
            signal.SIGTERM,
            "Mosquitto is not installed: the demo uses its embedded broker\nbroker: amqtt ",
            marks=pytest.mark.root,  # Mosquitto hidden in a mount namespace
        ),
    ],
    ids=["mosquitto", "embedded", "auto-without-mosquitto"],
)
def test_the_demo_prints_a_login_that_shows_the_replayed_counts(
    broker: str, stop: signal.Signals, printed: str, replayed_windows: tuple[int, str]
) -> None:
    if broker == "mosquitto" and not (
        shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()
    ):
        pytest.skip("the demo with Mosquitto needs mosquitto (apt-get install mosquitto)")
    port = free_port()
    cli = Path(sys.executable).with_name("footfall-aggregator")
    demo = subprocess.Popen(
        [*_hiding_mosquitto(broker), str(cli), "demo", "--port", str(port), "--broker", broker],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        text = _lines_until_login(demo)
        assert text.startswith(printed), text
        protocol = "MQTT 5" if broker == "mosquitto" else "MQTT 3.1.1"
        listens = re.search(rf", {protocol}, on 127\.0\.0\.1:(\d+)\n", text)
        url = re.search(r"open (http://\S+)", text)
        password = re.search(r"password: (\S+)", text)
        assert listens and url and password, text
        windows, day = replayed_windows
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as browser:
            csrf = browser.get("/login").cookies["footfall_csrf"]
            signed = browser.post(
                "/login", data={"name": "demo", "password": password.group(1), "csrf": csrf}
            )
            assert signed.status_code == 303
            data = browser.get(f"/api/v1/sites/demo-shop/dashboard?day={day}").json()
            devices = browser.get(
                f"/api/v1/sites/demo-shop/counts?resolution=hour&from={day}&to={day}"
            ).json()["rows"]
            # Every window the agent made came through the broker and was stored once (the
            # bundled capture lies within one day), as counts v2 (people).
            assert sum(row["windows"] for row in devices) == windows > 0
            assert [(a["agent"], a["counts_v"]) for a in data["agents"]] == [("entrance", 2)]
            assert sum(row["windows"] for row in data["rows"]) == windows
            # The two shops' five weeks of people (v2), all stored; the link opens the latest day.
            shop = browser.get(url.group(1))
            assert shop.status_code == 200 and "Visitors" in shop.text
            for site in ("high-street", "station"):
                (agent,) = browser.get(f"/api/v1/sites/{site}/agents?since_hours=1000").json()
                assert agent["counts_v"] == 2 and agent["windows"] > 9000
    finally:
        demo.send_signal(stop)
        status = demo.wait(30)
        if demo.stdout is not None:
            demo.stdout.close()
    assert status == 0
    assert not _listening(int(listens.group(1))), "the demo's broker outlived it"


def test_the_demo_refuses_a_broker_it_does_not_know() -> None:
    cli = Path(sys.executable).with_name("footfall-aggregator")
    done = subprocess.run(
        [str(cli), "demo", "--port", str(free_port())],
        check=False,
        env={"FOOTFALL_DEMO_BROKER": "nats", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert (
        "(--broker or FOOTFALL_DEMO_BROKER) must be one of auto, mosquitto, embedded, got "
        "'nats'" in done.stderr
    )


def test_the_demo_says_at_once_that_its_port_is_taken() -> None:
    cli = Path(sys.executable).with_name("footfall-aggregator")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        done = subprocess.run([str(cli), "demo", "--port", str(port)], check=False,
                              capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 1 and time.monotonic() - started < 10
    assert f"port {port} is taken" in done.stderr
    assert f"choose another with --port, e.g. footfall-aggregator demo --port {port + 1}" in (
        done.stderr
    )
