"""The installer's path (``hardware/``): the script, the units, the broker's ACL, the config.

``install.sh`` runs twice into a throwaway root (``--root``, without the virtual environment,
which needs PyPI): the second run changes nothing. The units it installs pass
``systemd-analyze verify`` in that root. The shipped Mosquitto config and ACL run in a real
Mosquitto: each agent account writes its own topics and Home Assistant discovery config only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from aggregator.config import load_config as load_aggregator_config
from aggregator.mqtt import PACKET_OVERHEAD
from firmware_agent.contract.errors import BrokerError
from firmware_agent.contract.messages import AgentId, SiteId
from firmware_agent.service.broker_session import BrokerSession
from firmware_agent.service.homeassistant import discovery_message
from firmware_agent.service.publish import BrokerSettings
from firmware_agent.settings import load_config
from tests.support.mqtt_broker import HOST, TestCertificates, shipped_broker, wait_for
from tests.support.netns import require
from tests.support.shared import REPO

HARDWARE = REPO / "hardware"
SCHEMAS = REPO / "firmware_agent" / "contract" / "schemas"
INSTALL = HARDWARE / "install.sh"
SCRIPTS = ("footfall-monitor", "footfall-doctor")


def tool(name: str) -> str:
    path = shutil.which(name)
    require(path is not None, f"{name} is not installed (.ci/run installs it)")
    assert path is not None
    return path


def test_scripts_are_shellcheck_clean() -> None:
    result = subprocess.run(
        [tool("shellcheck"), str(INSTALL), *(str(HARDWARE / s) for s in SCRIPTS)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout


def snapshot(root: Path) -> dict[str, tuple[str, int, int, bytes]]:
    """Every path under root: its mode, owner, group and (for files) content."""
    tree = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        content = path.read_bytes() if path.is_file() and not path.is_symlink() else b""
        tree[str(path.relative_to(root))] = (oct(st.st_mode), st.st_uid, st.st_gid, content)
    return tree


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    require(os.geteuid() == 0, "install.sh needs root (it sets owners)")
    tool("systemd-sysusers")
    root = tmp_path_factory.mktemp("root")
    first = subprocess.run(
        [
            "bash",
            str(INSTALL),
            "--root",
            str(root),
            "--no-venv",
            "--radio",
            "wlx00c0ca",
            "--channel",
            "11",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert first.returncode == 0, first.stderr
    assert "made the user footfall" in first.stdout
    yield root


@pytest.mark.root  # installed: install.sh sets owners
def test_install_twice_changes_nothing(installed: Path) -> None:
    before = snapshot(installed)
    again = subprocess.run(
        ["bash", str(INSTALL), "--root", str(installed), "--no-venv", "--radio", "wlx00c0ca"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "nothing to change" in again.stdout, again.stdout
    assert snapshot(installed) == before


@pytest.mark.root  # installed: install.sh sets owners
def test_install_lays_out_config_state_and_units_with_their_owners(installed: Path) -> None:
    def owner(path: str) -> tuple[str, str, str]:
        st = (installed / path.lstrip("/")).stat()
        users = {int(line.split(":")[2]): line.split(":")[0]
                 for line in (installed / "etc/passwd").read_text().splitlines()}  # fmt: skip
        groups = {int(line.split(":")[2]): line.split(":")[0]
                  for line in (installed / "etc/group").read_text().splitlines()}  # fmt: skip
        name = {0: "root"}
        return (
            oct(st.st_mode & 0o777),
            name.get(st.st_uid) or users[st.st_uid],
            (name.get(st.st_gid) or groups[st.st_gid]),
        )

    assert owner("/etc/footfall") == ("0o750", "root", "footfall")
    assert owner("/etc/footfall/agent.toml") == ("0o640", "root", "footfall")
    assert owner("/var/lib/footfall") == ("0o700", "footfall", "footfall")
    assert owner("/var/cache/footfall") == ("0o700", "footfall", "footfall")
    assert owner("/opt/footfall/libexec/footfall-monitor") == ("0o755", "root", "root")
    defaults = (installed / "etc/default/footfall-monitor").read_text()
    assert "FOOTFALL_RADIO=wlx00c0ca" in defaults and "FOOTFALL_CHANNEL=11" in defaults
    nm = (installed / "etc/NetworkManager/conf.d/90-footfall.conf").read_text()
    assert "unmanaged-devices=interface-name:wlx00c0ca;interface-name:mon0" in nm


@pytest.mark.root  # installed: install.sh sets owners
def test_installed_units_pass_systemd_analyze_verify(installed: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(installed, root, symlinks=True)
    # systemd's own units, and a stand-in for the agent the venv would hold
    shutil.copytree("/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    agent = root / "opt/footfall/bin/footfall-agent"
    agent.parent.mkdir(parents=True)
    agent.write_text("#!/bin/sh\n")
    agent.chmod(0o755)
    result = subprocess.run(
        [tool("systemd-analyze"), "verify", f"--root={root}",
         "footfall-monitor.service", "footfall-agent.service"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_agent_unit_is_hardened_with_only_the_capabilities_it_needs() -> None:
    unit = (HARDWARE / "systemd/footfall-agent.service").read_text()
    settings = dict(
        line.split("=", 1) for line in unit.splitlines() if "=" in line and line[0] != "#"
    )
    assert settings["User"] == settings["Group"] == "footfall"
    assert settings["AmbientCapabilities"] == "CAP_NET_RAW CAP_NET_ADMIN"
    assert settings["CapabilityBoundingSet"] == "CAP_NET_RAW CAP_NET_ADMIN"
    assert settings["ProtectSystem"] == "strict" and settings["NoNewPrivileges"] == "yes"
    assert settings["StateDirectory"] == settings["ConfigurationDirectory"] == "footfall"
    assert settings["Restart"] == "on-failure"
    assert settings["MemoryDenyWriteExecute"] == "no"  # numba's JIT (see the unit's comment)
    assert settings["LimitCORE"] == settings["MemorySwapMax"] == "0"  # the key stays in memory
    assert "NUMBA_CACHE_DIR=/var/cache/footfall/numba" in unit
    assert settings["CacheDirectory"] == "footfall"


def test_shipped_agent_config_loads_and_reads_the_monitor_interface(tmp_path: Path) -> None:
    config = load_config(HARDWARE / "agent.toml", environ={})
    assert config.source.path == "iface:mon0" and config.metrics.port == 9750
    assert config.live.link_type is None and not config.homeassistant.discovery


@pytest.fixture(scope="module")
def footfall_broker(
    mosquitto_bin: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[int, TestCertificates]]:
    """Mosquitto with hardware/mosquitto's config and ACL (paths and port made local)."""
    with shipped_broker(mosquitto_bin, tmp_path_factory.mktemp("mosquitto")) as broker:
        for user in ("shop1/door", "shop1/till", "aggregator", "homeassistant"):
            broker.add_account(user, f"pw-{user}")
        broker.reload()
        yield broker.port, broker.certs


def account(port: int, certs: TestCertificates, user: str) -> BrokerSettings:
    return BrokerSettings(host=HOST, port=port, username=user, password=f"pw-{user}",
                          tls_ca=str(certs.ca), connect_timeout_s=5)  # fmt: skip


def test_broker_acl_lets_each_agent_write_only_its_own_topics(
    footfall_broker: tuple[int, TestCertificates],
) -> None:
    port, certs = footfall_broker
    door = account(port, certs, "shop1/door")
    with BrokerSession(door, "footfall-shop1-door-test") as session:
        session.publish("footfall/v1/shop1/door/counts", b"{}", retain=False)
        for other in (
            "footfall/v1/shop1/till/counts",
            "footfall/v1/shop2/door/counts",
            "homeassistant/device/footfall-shop1/till/config",
            "footfall/v1/x",
        ):
            with pytest.raises(BrokerError, match="not authorised"):
                session.publish(other, b"{}", retain=False)
        with pytest.raises(BrokerError, match="not authorised"):  # receipts: the aggregator's
            session.publish("footfall/v1/shop1/door/receipt", b"{}", retain=True)
    for reader in ("aggregator", "homeassistant"):
        with (
            BrokerSession(account(port, certs, reader), f"{reader}-test") as session,
            pytest.raises(BrokerError, match="not authorised"),
        ):
            session.publish(f"footfall/v1/{reader}/x/counts", b"{}", retain=False)


def test_broker_acl_lets_the_aggregator_write_receipts_that_only_their_agent_reads(
    footfall_broker: tuple[int, TestCertificates],
) -> None:
    port, certs = footfall_broker
    with BrokerSession(account(port, certs, "aggregator"), "aggregator-receipts") as session:
        for agent in ("door", "till"):
            session.publish(f"footfall/v1/shop1/{agent}/receipt", agent.encode(), retain=True)
    door = retained(account(port, certs, "shop1/door"), "footfall/v1/+/+/receipt")
    assert door == {"footfall/v1/shop1/door/receipt": b"door"}
    home = account(port, certs, "homeassistant")
    assert retained(home, "footfall/v1/shop1/door/receipt", wait_s=1) == {}


def test_home_assistant_discovery_is_accepted_for_the_agents_own_config_and_reads_its_counts(
    footfall_broker: tuple[int, TestCertificates],
) -> None:
    port, certs = footfall_broker
    topic, body = discovery_message("homeassistant", SiteId("shop1"), AgentId("door"))
    assert topic == "homeassistant/device/footfall-shop1/door/config"
    with BrokerSession(account(port, certs, "shop1/door"), "footfall-shop1-door-ha") as session:
        session.publish(topic, body, retain=True)
    config = json.loads(body)
    assert config["state_topic"] == "footfall/v1/shop1/door/counts"
    counts_fields = json.loads((SCHEMAS / "counts.v2.json").read_text())["properties"]
    for component in config["components"].values():
        field = component["value_template"].split("payload.")[1].split()[0]
        assert field in counts_fields and component["platform"] == "sensor"
        assert component["unit_of_measurement"] in ("people", "devices")
    assert retained(account(port, certs, "homeassistant"), "homeassistant/#") == {topic: body}


def retained(settings: BrokerSettings, topic_filter: str, wait_s: float = 0) -> dict[str, bytes]:
    """The retained messages a subscriber with these settings gets under a filter (within
    ``wait_s``, or the first within 5 s)."""
    got: dict[str, bytes] = {}
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.username_pw_set(settings.username, settings.password)
    context = settings.ssl_context()
    assert context is not None
    client.tls_set_context(context)
    client.on_connect = lambda c, *_: c.subscribe(topic_filter, qos=1)
    client.on_message = lambda _c, _u, m: got.__setitem__(m.topic, m.payload)
    client.connect(HOST, settings.port)
    client.loop_start()
    try:
        if wait_s:
            time.sleep(wait_s)
        else:
            wait_for(lambda: bool(got), 5, f"a retained message under {topic_filter}")
    finally:
        client.disconnect()
        client.loop_stop()
    return got


def test_the_shipped_broker_refuses_a_message_larger_than_ingest_takes(
    footfall_broker: tuple[int, TestCertificates],
) -> None:
    port, certs = footfall_broker
    door = account(port, certs, "shop1/door")
    topic = "footfall/v1/shop1/door/meta"
    with BrokerSession(door, "footfall-shop1-door-big") as session:
        session.publish(topic, b"{}", retain=True)
    with (
        BrokerSession(door, "footfall-shop1-door-big") as session,
        pytest.raises(BrokerError),
    ):
        session.publish(topic, b"{" + b" " * 70_000 + b"}", retain=True)
    assert retained(account(port, certs, "aggregator"), topic) == {topic: b"{}"}


def test_the_shipped_broker_takes_no_packet_larger_than_ingest_announces() -> None:
    conf = (HARDWARE / "mosquitto/footfall.conf").read_text().splitlines()
    (limit,) = [int(line.split()[1]) for line in conf if line.startswith("max_packet_size ")]
    ingest = load_aggregator_config(environ={}).ingest
    assert limit == ingest.max_message_bytes + PACKET_OVERHEAD == 66_560


def _absent_ingest(port: int, certs: TestCertificates) -> mqtt.Client:
    """The aggregator's persistent session (clean session off) on the counts, not connected."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id="ingest-away",
        protocol=mqtt.MQTTv311,
        clean_session=False,
    )
    settings = account(port, certs, "aggregator")
    client.username_pw_set(settings.username, settings.password)
    context = settings.ssl_context()
    assert context is not None
    client.tls_set_context(context)
    return client


def test_the_shipped_broker_keeps_what_it_queued_through_a_kill_9(
    mosquitto_bin: str, tmp_path: Path
) -> None:
    """Finding 3's broker half: with Mosquitto's default (a save every 30 minutes) a broker
    killed while ingest was away lost every window queued for it. The shipped config saves
    after every 100 changes: of 300 windows queued, at most the last 100 are lost (agents with
    receipts send those again; tests/integration/test_delivery.py)."""
    sent, received = 300, []
    with shipped_broker(mosquitto_bin, tmp_path / "broker") as broker:
        for user in ("shop1/door", "aggregator"):
            broker.add_account(user, f"pw-{user}")
        broker.reload()
        ingest = _absent_ingest(broker.port, broker.certs)
        subscribed: list[int] = []
        ingest.on_subscribe = lambda *_: subscribed.append(1)
        ingest.connect(HOST, broker.port)
        ingest.loop_start()
        wait_for(ingest.is_connected, 5, "the aggregator's session")
        ingest.subscribe("footfall/v1/+/+/counts", qos=1)
        wait_for(lambda: bool(subscribed), 5, "the subscription")
        ingest.disconnect()
        ingest.loop_stop()
        door = account(broker.port, broker.certs, "shop1/door")
        with BrokerSession(door, "footfall-shop1-door") as session:
            for seq in range(sent):
                session.publish("footfall/v1/shop1/door/counts", b"%d" % seq, retain=False)
        broker.process.kill()
        broker.process.wait()
        again = subprocess.Popen(
            [mosquitto_bin, "-c", str(broker.root / "mosquitto.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            back = _absent_ingest(broker.port, broker.certs)
            back.on_message = lambda _c, _u, m: received.append(int(m.payload))
            wait_for(lambda: _connects(back, broker.port), 10, "the restarted broker")
            back.loop_start()
            wait_for(lambda: len(received) >= sent - 100, 10, "the saved queue")
            time.sleep(0.5)  # and whatever else it kept
            back.disconnect()
            back.loop_stop()
        finally:
            again.kill()
            again.wait()
    assert received == list(range(len(received)))  # in order, from the first
    assert sent - 100 <= len(received) <= sent


def _connects(client: mqtt.Client, port: int) -> bool:
    try:
        client.connect(HOST, port)
    except OSError:
        return False
    return True
