"""``footfall-aggregator demo`` as the tests run it: started, read up to its login, stopped.

One five-week demo with Mosquitto (:func:`mosquitto_demo`) serves the whole session: the README's
command as written (tests/integration/test_demo.py) and the dashboard read in Chromium
(tests/integration/test_demo_dashboard.py) ask the same demo, which is stopped with Ctrl-C
(SIGINT) at the end and must then exit 0 and take its broker with it. Before, each module started
its own: 52 s of wall time each at load 8 (issue 19's speed work).
"""

from __future__ import annotations

import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.ports import free_port

START_S = 180  # the demo prints its login within this (about 45 s on 2 busy cores)
STOP_S = 30  # and stops within this once signalled


def lines_until_login(demo: subprocess.Popen[str]) -> str:
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


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass(frozen=True)
class Demo:
    """A demo that printed its login: its process, dashboard port and what it printed."""

    process: subprocess.Popen[str]
    port: int
    printed: str

    def found(self, pattern: str) -> str:
        match = re.search(pattern, self.printed)
        assert match, self.printed
        return match.group(1)

    @property
    def broker_port(self) -> int:
        return int(self.found(r", MQTT [0-9.]+, on 127\.0\.0\.1:(\d+)\n"))

    @property
    def url(self) -> str:
        return self.found(r"open (http://\S+)")

    @property
    def password(self) -> str:
        return self.found(r"password: (\S+)")


def start_demo(prefix: list[str], broker: str, *more: str) -> Demo:
    """``footfall-aggregator demo --broker BROKER MORE...`` (after the command ``prefix``),
    once it has printed its login; stopped (killed) if it never does."""
    port = free_port()
    cli = Path(sys.executable).with_name("footfall-aggregator")
    process = subprocess.Popen(
        [*prefix, str(cli), "demo", "--port", str(port), "--broker", broker, *more],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        return Demo(process, port, lines_until_login(process))
    except BaseException:
        process.kill()
        process.wait()
        raise


def stop_demo(demo: Demo, signum: signal.Signals) -> int:
    """Signal the demo; its exit status (it must have stopped within STOP_S)."""
    demo.process.send_signal(signum)
    try:
        return demo.process.wait(STOP_S)
    finally:
        if demo.process.poll() is None:
            demo.process.kill()
            demo.process.wait()
        if demo.process.stdout is not None:
            demo.process.stdout.close()


@pytest.fixture(scope="session")
def mosquitto_demo() -> Iterator[Demo]:
    """The session's five-week demo with Mosquitto; Ctrl-C (SIGINT) at the end stops it, with
    status 0 and its broker gone (a failure there fails the run, at the last test's teardown)."""
    if not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()):
        pytest.skip("the demo with Mosquitto needs mosquitto (apt-get install mosquitto)")
    demo = start_demo([], "mosquitto")
    broker_port = demo.broker_port
    yield demo
    assert stop_demo(demo, signal.SIGINT) == 0
    assert not listening(broker_port), "the demo's broker outlived it"
