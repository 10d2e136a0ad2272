"""The README's main command: ``footfall-aggregator demo`` runs broker, aggregator and an agent
replaying the bundled capture, and the printed login opens a dashboard with its counts."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.web_harness import free_port


def test_the_demo_prints_a_login_that_shows_the_replayed_counts() -> None:
    if not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()):
        pytest.skip("the demo needs mosquitto (apt-get install mosquitto)")
    port = free_port()
    cli = Path(sys.executable).with_name("footfall-aggregator")
    demo = subprocess.Popen(
        [str(cli), "demo", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert demo.stdout is not None
        lines = []
        for line in demo.stdout:
            lines.append(line)
            if line.startswith("Ctrl-C"):
                break
        text = "".join(lines)
        url = re.search(r"open (http://\S+)", text)
        password = re.search(r"password: (\S+)", text)
        assert url and password, text
        day = url.group(1).split("date=")[1]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as browser:
            csrf = browser.get("/login").cookies["footfall_csrf"]
            signed = browser.post(
                "/login", data={"name": "demo", "password": password.group(1), "csrf": csrf}
            )
            assert signed.status_code == 303
            data = browser.get(f"/api/v1/sites/demo-shop/dashboard?day={day}").json()
            assert sum(row["windows"] for row in data["today"]) > 0
            assert [a["agent"] for a in data["agents"]] == ["entrance"]
            assert browser.get(url.group(1)).status_code == 200
    finally:
        demo.send_signal(signal.SIGINT)
        status = demo.wait(30)
        if demo.stdout is not None:
            demo.stdout.close()
    assert status == 0
