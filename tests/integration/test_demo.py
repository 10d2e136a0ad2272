"""The README's main command: ``footfall-aggregator demo`` runs broker, aggregator, an agent
replaying the bundled capture and the two shops' agents counting their generated phones, and the
printed login opens a dashboard with their counts; each shop's agent counts its visitors within
10 % of the generator's truth.

Three times: with Mosquitto (MQTT 5), stopped by Ctrl-C (SIGINT); with the embedded amqtt broker
forced (``--broker embedded``, MQTT 3.1.1), stopped by SIGTERM; and with ``--broker auto`` where
Mosquitto is hidden (a mount namespace puts /dev/null over its binaries: what a machine without
it gets), which must fall back to the embedded broker and say so (with ``--days 2``: the same
broker and data path as ``embedded``, which carries the five weeks). Each time every window of
the capture reaches the dashboard's API, the demo exits 0 and its broker is gone; each run is
bounded in time. The Mosquitto run is the session's demo (tests/support/demo.py), which
test_demo_dashboard.py reads in Chromium too; it is stopped at the session's end. A broker it
does not know (``FOOTFALL_DEMO_BROKER``) is refused, naming the flag and the variable, and so
is ``--days 0``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support.demo import Demo, listening, start_demo, stop_demo
from tests.support.netns import require
from tests.support.ports import free_port

SHORT_DAYS = 2  # of the shops' history, in the 'auto' run (see the test)


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
    broker: str,
    stop: signal.Signals,
    printed: str,
    replayed_windows: tuple[int, str],
    request: pytest.FixtureRequest,
) -> None:
    if broker == "mosquitto":  # the session's demo, stopped by SIGINT at its end (mosquitto_demo)
        _shows_the_replayed_counts(request.getfixturevalue("mosquitto_demo"), broker, printed,
                                   replayed_windows)  # fmt: skip
        return
    # 'auto' differs from 'embedded' only in choosing the broker (the same amqtt, the same data
    # path after the "broker:" line), so two days of the shops' history show it as well as five
    # weeks do, the 'embedded' run carrying the five weeks through amqtt.
    days = ["--days", str(SHORT_DAYS)] if broker == "auto" else []
    demo = start_demo(_hiding_mosquitto(broker), broker, *days)
    try:
        _shows_the_replayed_counts(demo, broker, printed, replayed_windows)
    finally:
        status = stop_demo(demo, stop)
    assert status == 0
    assert not listening(demo.broker_port), "the demo's broker outlived it"


def _shows_the_replayed_counts(
    demo: Demo, broker: str, printed: str, replayed_windows: tuple[int, str]
) -> None:
    text = demo.printed
    assert text.startswith(printed), text
    protocol = "MQTT 5" if broker == "mosquitto" else "MQTT 3.1.1"
    assert re.search(rf", {protocol}, on 127\.0\.0\.1:(\d+)\n", text), text
    short = f"counting {SHORT_DAYS} days of two shops' phones" in text
    stored = int(demo.found(r"\n(\d+) windows of people in "))
    # Each shop's agent counted the generated phones within 10 % of the visitors the
    # generator's truth holds (five weeks: thousands of visitors each).
    said = re.findall(
        r"  (.+): (\d+) visitors counted by its agent, (\d+) in the generator's truth", text
    )
    assert [name for name, _, _ in said] == ["High Street", "Station kiosk"], text
    for _, counted, truth in said:
        assert short or (abs(int(counted) - int(truth)) <= 0.1 * int(truth) and int(truth) > 2000)
    windows, day = replayed_windows
    with httpx.Client(base_url=f"http://127.0.0.1:{demo.port}") as browser:
        csrf = browser.get("/login").cookies["footfall_csrf"]
        signed = browser.post(
            "/login", data={"name": "demo", "password": demo.password, "csrf": csrf}
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
        # The two shops' five weeks of hourly windows of people (v2), every one their agents
        # made stored (what the demo says); the link opens the latest day.
        shop = browser.get(demo.url)
        assert shop.status_code == 200 and "Visitors" in shop.text
        shops = []
        for site in ("high-street", "station"):
            (agent,) = browser.get(f"/api/v1/sites/{site}/agents?since_hours=1000").json()
            assert agent["counts_v"] == 2 and agent["missing"] == 0
            assert short or agent["windows"] > 34 * 24
            shops.append(agent["windows"])
        assert sum(shops) == stored > 0, (shops, stored)


def test_the_demo_refuses_a_broker_it_does_not_know_and_less_than_a_day() -> None:
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
    days = subprocess.run(
        [str(cli), "demo", "--port", str(free_port()), "--days", "0"],
        check=False, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert days.returncode == 1
    assert "the demo's --days must be at least 1, got 0" in days.stderr


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
