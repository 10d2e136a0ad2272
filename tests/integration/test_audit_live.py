"""``footfall-agent audit`` on a real run: an agent publishing the bundled sample, and its Home
Assistant discovery config, to a Mosquitto of the test's own, heard by the audit on the broker
(listening on '#'), and (standard mode) captured on the wire by tcpdump and audited again from
the capture, with the same verdict and count. About 22 s each
(the audit listens for 20 s), so here rather than in the agent's fast layer
(tests/agent/test_audit.py holds the audit's rules)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from firmware_agent.cli import BUNDLED_SAMPLE
from firmware_agent.contract.messages import public_key_text
from tests.support.agent_harness import prepare_agent, unique_id
from tests.support.mqtt_broker import HOST, READER, Mosquitto, Subscriber

StartBroker = Callable[[Mapping[tuple[str, str], str]], Mosquitto]
AUDIT = [sys.executable, "-m", "firmware_agent.cli", "audit"]
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("mode", ["standard", "strict"])
def test_a_real_run_passes_on_the_broker_and_in_its_capture(
    mode: str, start_broker: StartBroker, tmp_path: Path
) -> None:
    site, agent = unique_id("s"), "a1"
    broker = start_broker({(site, agent): f"pw-{agent}"})
    settings = {"privacy.mode": mode, "homeassistant.discovery": True}
    files = prepare_agent(tmp_path, broker, site, agent, settings)
    discovery = Subscriber(broker, "homeassistant/#")
    key = f"{site}/{agent}={public_key_text(files.verify_key)}"
    pcap = tmp_path / "agent.pcap"
    tcpdump = _tcpdump(pcap, broker.port) if mode == "standard" else None
    listen = [*AUDIT, "--broker", f"{HOST}:{broker.port}", "--key", key, "--seconds", "20"]
    listen += ["--set", f"broker.username={READER[0]}", "--set", f"broker.password={READER[1]}"]
    audit = subprocess.Popen(listen, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert audit.stderr is not None
        assert "listening on #" in audit.stderr.readline()  # subscribed: nothing will be missed
        assert files.start("--source", str(BUNDLED_SAMPLE)).wait(60) == 0, files.log_text()
        out, err = audit.communicate(timeout=60)
        configs = [t for t, _, _ in discovery.snapshot()]
    finally:
        discovery.close()
        audit.kill()
        if tcpdump is not None:
            tcpdump.send_signal(signal.SIGINT)
            tcpdump.communicate(timeout=10)
    assert audit.returncode == 0, out + err
    assert "verdict: PASS" in out and f"{site}/{agent}" in out
    assert configs == [f"homeassistant/device/footfall-{site}/{agent}/config"]  # heard, passed
    counts = int(out.split(f"{site}/{agent}")[1].split()[3])
    assert counts > 20, out  # the bundled sample's windows were all heard
    if tcpdump is None:
        return
    offline = subprocess.run(
        [*AUDIT, "--pcap", str(pcap), "--key", key], capture_output=True, text=True, check=False
    )
    assert offline.returncode == 0, offline.stdout + offline.stderr
    assert "verdict: PASS" in offline.stdout
    assert int(offline.stdout.split(f"{site}/{agent}")[1].split()[3]) == counts


def _tcpdump(path: Path, port: int) -> subprocess.Popen[bytes]:
    binary = shutil.which("tcpdump")
    if binary is None:
        pytest.fail("tcpdump is not installed (apt-get install tcpdump; .ci/run does it)")
    process = subprocess.Popen(
        [binary, "-i", "lo", "-U", "-w", str(path), "tcp", "port", str(port)],
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    process.stderr.readline()  # "listening on lo ...": capturing from here on
    return process
