"""``footfall-agent doctor`` and ``enrol``: the installer's checks and enrolment text.

The whole path (aggregator, web enrolment, receipts from a real ingest) is
``tests/integration/test_install.py``; here the aggregator's receipt is published by the test,
signed as
ingest signs it."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import nacl.signing
import pytest

from aggregator.cli import build_parser as aggregator_parser
from firmware_agent import cli
from firmware_agent.cli import BUNDLED_SAMPLE
from firmware_agent.contract.messages import (
    AgentId,
    SiteId,
    Topic,
    public_key_text,
    receipt_payload,
    seal,
)
from firmware_agent.service.broker_session import BrokerSession
from firmware_agent.service.publish import BrokerSettings
from firmware_agent.settings import load_config
from firmware_agent.tools import doctor
from tests.support.agent_harness import prepare_agent, toml_text, unique_id
from tests.support.mqtt_broker import HOST, READER, Mosquitto
from tests.support.netns import Veth
from tests.support.ports import free_port

StartBroker = Callable[[Mapping[tuple[str, str], str]], Mosquitto]
CHECKS = [
    "identity", "interface", "capabilities", "frames", "clock", "signing key", "broker", "acl",
    "stored", "spool", "numba cache",
]  # fmt: skip


def publish_receipt(broker: Mosquitto, site: str, agent: str, key: nacl.signing.SigningKey) -> None:
    """The retained receipt ingest publishes once it has stored seqs 1 to 3, as ingest signs it."""
    reader = BrokerSettings(host=HOST, port=broker.port, username=READER[0], password=READER[1])
    topic = Topic(SiteId(site), AgentId(agent), "receipt")
    body = seal(receipt_payload(topic.site, topic.agent, [(1, 3)], int(time.time())), key)
    with BrokerSession(reader, f"aggregator-{site}") as session:
        session.publish(str(topic), body, retain=True)


def rows(text: str) -> dict[str, str]:
    """check name -> its line, from the table (fix lines joined to their check)."""
    table: dict[str, str] = {}
    last = ""
    for line in text.splitlines()[1:-1]:
        if line.startswith(" "):
            table[last] += "\n" + line.strip()
        else:
            last = line[:12].strip()
            table[last] = line[12:].strip()
    return table


def test_doctor_passes_on_a_ready_access_point(
    veth: Veth,
    start_broker: StartBroker,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(doctor, "clock_state", lambda: (0, 8000))  # this VM's clock is not
    site, agent = unique_id("s"), "a1"
    broker = start_broker({(site, agent): f"pw-{agent}"})
    receipt_key = nacl.signing.SigningKey.generate()
    files = prepare_agent(tmp_path, broker, site, agent, {
        "source.path": f"iface:{veth.agent}", "source.link_type": "radiotap",
        "broker.protocol": "5", "broker.receipt_key": public_key_text(receipt_key),
    })  # fmt: skip
    files.state_dir.mkdir()
    publish_receipt(broker, site, agent, receipt_key)
    sender = threading.Thread(
        target=lambda: (time.sleep(0.3), veth.replay(BUNDLED_SAMPLE, tmp_path, pps=5000))
    )
    sender.start()
    status = cli.main(["doctor", "--config", str(files.config), "--sample-s", "2"])
    sender.join()
    out = capsys.readouterr().out
    assert status == 0, out
    table = rows(out)
    assert list(table) == CHECKS
    assert all(line.startswith("ok") for line in table.values()), out
    assert "dropped" in table["frames"] and " 0 probe requests" not in table["frames"]
    username = load_config(files.config).broker.username
    assert f"accepted {site}/{agent} as {username!r}" in table["broker"]
    assert f"footfall/v1/{site}/{agent}~/meta refused" in table["acl"]
    assert "the aggregator holds windows 1 to 3 (last 3, 0 gaps)" in table["stored"]
    assert out.endswith("all checks passed\n")
    # A receipt signed with another key than broker.receipt_key is not one.
    publish_receipt(broker, site, agent, nacl.signing.SigningKey.generate())
    assert cli.main(["doctor", "--config", str(files.config), "--sample-s", "0.1"]) == 1
    table = rows(capsys.readouterr().out)
    assert (
        table["stored"].startswith("FAIL  the receipt on") and "does not verify" in table["stored"]
    )
    assert (
        "fix: broker.receipt_key must be what footfall-aggregator receipt-key prints"
        in (table["stored"])
    )


def test_doctor_names_every_failure_with_its_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(toml_text({
        "agent.config_dir": str(tmp_path / "etc"), "agent.state_dir": str(tmp_path / "none"),
        "broker.host": HOST, "broker.port": free_port(), "broker.connect_timeout_s": 2,
        "source.path": "iface:ffnone0",
    }))  # fmt: skip
    assert cli.main(["doctor", "--config", str(config), "--sample-s", "0.1"]) == 1
    out = capsys.readouterr().out
    table = rows(out)
    assert table["interface"].startswith("FAIL  interface 'ffnone0' does not exist")
    assert "fix: create it: systemctl start footfall-monitor" in table["interface"]
    assert table["frames"].startswith("skip")
    assert table["broker"].startswith("FAIL") and "refused" in table["broker"]
    assert "fix: check broker.host" in table["broker"]
    assert f"fix: footfall-agent keygen --config {config}, then enrol" in table["signing key"]
    assert table["identity"].startswith("WARN  agent.site is the default 'default'")
    assert "epoch.timezone is empty" in table["identity"]
    assert (table["acl"][:4], table["stored"][:4]) == ("skip", "skip")
    assert table["spool"].startswith("FAIL") and "none is missing or not writable" in out
    assert out.rstrip().endswith("checks failed")


def test_clock_check_reads_the_kernels_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    state, _ = doctor.clock_state()
    assert 0 <= state <= 5
    monkeypatch.setattr(doctor, "clock_state", lambda: (5, 16_000_000))
    finding = doctor.check_clock()
    assert (finding.status, finding.fix) == ("FAIL", doctor.check_clock().fix)
    assert "timedatectl set-ntp true" in finding.fix
    monkeypatch.setattr(doctor, "clock_state", lambda: (0, 12_000))
    assert doctor.check_clock().detail == "synchronised, max error 12 ms"


def test_enroll_prints_the_public_key_and_the_exact_commands(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(toml_text({
        "agent.site": "shop1", "agent.id": "door", "agent.config_dir": str(tmp_path / "etc"),
    }))  # fmt: skip
    assert cli.main(["enrol", "--config", str(config)]) == 1
    assert "signing.key does not exist: run 'footfall-agent keygen'" in capsys.readouterr().err
    assert cli.main(["keygen", "--config", str(config)]) == 0
    public = capsys.readouterr().out.strip()
    assert cli.main(["enroll", "--config", str(config)]) == 0  # the other spelling too
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"public key: {public}"
    command = f"footfall-aggregator enrol --site shop1 --agent door --public-key {public}"
    assert lines[2].strip() == command
    enrol = aggregator_parser().parse_args(command.split()[1:])  # the aggregator takes it as is
    assert (enrol.site, enrol.agent, enrol.public_key) == ("shop1", "door", public)
    assert lines[3].strip() == "or on the web page /sites/shop1: 'Enrol an agent', id door"
    assert "mosquitto_passwd /etc/mosquitto/footfall.passwd shop1/door" in lines[5]
    assert "broker.username = 'shop1/door'" in lines[6]
    assert str(load_config(config).identity.agent) == "door"


def test_survey_shows_probe_rate_and_signal_by_channel_and_nothing_per_device(
    veth: Veth, start_broker: StartBroker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broker = start_broker({})
    files = prepare_agent(tmp_path, broker, "s1", "a1", {
        "source.path": f"iface:{veth.agent}", "source.link_type": "radiotap",
    })  # fmt: skip
    sender = threading.Thread(
        target=lambda: (time.sleep(0.3), veth.replay(BUNDLED_SAMPLE, tmp_path, pps=5000))
    )
    sender.start()
    assert cli.main(["survey", "--config", str(files.config), "--minutes", "0.05"]) == 0
    sender.join()
    out = capsys.readouterr().out
    table = out[out.index("survey of 3 s on") :].splitlines()
    assert table[1].split()[:3] == ["channel", "probes/s", ">=-50"]
    rows = {line.split()[0]: line.split()[1:] for line in table[2:]}
    assert sum(float(r[0]) for r in rows.values()) * 3 == pytest.approx(12000, rel=0.1)
    for shares in rows.values():
        assert sum(int(s.rstrip("%")) for s in shares[1:]) in range(98, 103)
    assert "s of 3 s" in out and "left" in out  # progress while it listens
    assert not re.search(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", out)  # no address, ever
