"""The installer's day, end to end, as ``hardware/README.md`` writes it (issue 21).

The README's blocks marked ``sh test:<name>`` are run as written, with this machine's names put
in (:data:`Day.substitutions`: each one must still be found in its block, so a procedure that
drifts from this test fails it):

* the **Pi** is a network namespace of its own: its radio is one end of a veth pair (the other
  end, outside, is the air: ``tcpreplay`` sends the bundled capture into it, looping, all day),
  and it reaches the broker over a second veth pair, as a Pi reaches it over the shop's network;
* the **broker** is Mosquitto with ``hardware/mosquitto``'s own config and ACL, TLS on the
  uplink's address (``tests/mqtt_broker.shipped_broker``);
* the **aggregator** is ``footfall-aggregator serve`` (ingest in the same process, receipts
  on), on SQLite, configured through ``FOOTFALL_AGG_*`` as its admin's file would;
* ``install.sh --root`` installs the agent into a directory, and the agent runs from there. Its
  Python environment is made beforehand (``python -m venv`` with this checkout's packages on
  its path, as an image builder's cache would), so ``install.sh`` finds the same version
  installed and does not reach PyPI. What ``install.sh`` does last on a Pi, and not into a
  ``--root``, is done there too: its kernels made ready, by its fallback (one ``footfall-agent
  replay`` fills numba's cache, the checkout's), so that the agent never compiles while the
  day runs (on a cold cache a stop waited for a compilation past its 30 s, and ``doctor``'s
  ``numba cache`` was red).
* what stands in for the hardware is said once, in :meth:`Day.agent_env`: the config and state
  directories under the root, the radio read as radiotap (a veth is Ethernet to the kernel),
  short broker timers. ``footfall-doctor`` (systemd-run as the service's user) is run as
  ``footfall-agent doctor`` as root; ``systemctl start footfall-agent`` as the agent in the
  background.

The day, in order: the admin's broker account and receipt key; the installer's ``install.sh``;
the agent runs before the admin has made the site (doctor: only ``stored`` red; the aggregator's
``agents check``: ``site``); the admin makes the site and the installer's account; still not
enrolled (``stored`` red; ``enrolment`` in ``agents check``); the installer enrols on the web
page in chromium; doctor before the start (only ``stored`` red), the start, doctor again: every
check ok once a window is stored (``clock`` excepted where this machine's clock is not
synchronised: it is the machine's truth, and the check says so with its fix). Then the README's
failure table: a wrong broker password, the ACL refusing, the radio not in monitor mode, each
turning exactly its own line red.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest
from playwright.sync_api import Browser, Page

from aggregator.agent_check import check_agent
from aggregator.config import StoreSettings
from aggregator.store import Store
from firmware_agent.cli import BUNDLED_SAMPLE
from firmware_agent.tools.doctor import clock_state
from tests.support.mqtt_broker import ShippedBroker, shipped_broker, wait_for
from tests.support.netns import NEEDED, as_ethernet, require
from tests.support.ports import free_port
from tests.support.shared import REPO

T = TypeVar("T")
GUIDE = REPO / "hardware" / "README.md"
BLOCK = re.compile(r"^```sh test:([a-z-]+)\n(.*?)^```", re.MULTILINE | re.DOTALL)
PASSWORD = "installer-secret-1"
AGENT_PASSWORD = "door-secret-1"
CLOCK_SYNCED = clock_state()[0] != 5  # TIME_ERROR: this machine's clock is not synchronised


def guide_blocks() -> dict[str, str]:
    return {name: body for name, body in BLOCK.findall(GUIDE.read_text())}


def table(out: str) -> dict[str, tuple[str, str]]:
    """check -> (status, the rest with its fix), from doctor's or agents check's table."""
    lines = out.splitlines()
    width = lines[0].index("result") - 8
    found: dict[str, tuple[str, str]] = {}
    last = ""
    for line in lines[1:-1]:
        if line.startswith(" "):
            found[last] = (found[last][0], found[last][1] + "\n" + line.strip())
        else:
            last = line[:width].strip()
            found[last] = (line[width + 2 : width + 6].strip(), line[width + 6 :].strip())
    return found


def failed(out: str) -> set[str]:
    """The checks that failed, but the clock where this machine's is not synchronised (then it
    must fail, saying so)."""
    rows = table(out)
    if not CLOCK_SYNCED and "clock" in rows:
        assert rows["clock"][0] == "FAIL" and "timedatectl set-ntp true" in rows["clock"][1]
    return {c for c, (status, _) in rows.items() if status == "FAIL" and (c, CLOCK_SYNCED) != (
        "clock", False)}  # fmt: skip


@dataclass
class Day:
    """The machine's side of the day: the Pi, the broker, the aggregator, the root."""

    tmp: Path
    namespace: str
    air: str  # outside the Pi: frames are sent in here
    host_ip: str  # the broker's address on the Pi's uplink
    pi_ip: str  # the Pi's: its metrics endpoint listens there
    broker: ShippedBroker
    aggregator_env: dict[str, str]
    url: str
    root: Path
    site: str
    metrics_port: int = field(default_factory=free_port)
    agent_run: subprocess.Popen[bytes] | None = None
    receipt_key: str = ""
    substitutions: list[tuple[str, str]] = field(default_factory=list)

    @property
    def agent(self) -> str:
        return str(self.root / "opt/footfall/bin/footfall-agent")

    @property
    def config(self) -> Path:
        return self.root / "etc/footfall/agent.toml"

    def agent_env(self, **more: str) -> dict[str, str]:
        """The stand-ins for the hardware and the unit (see the module docstring)."""
        return (
            os.environ
            | {
                "FOOTFALL_AGENT_CONFIG_DIR": str(self.root / "etc/footfall"),
                "FOOTFALL_AGENT_STATE_DIR": str(self.root / "var/lib/footfall"),
                "FOOTFALL_SOURCE_PATH": "iface:footfall0",
                "FOOTFALL_SOURCE_LINK_TYPE": "radiotap",
                "FOOTFALL_METRICS_HOST": self.pi_ip,
                "FOOTFALL_METRICS_PORT": str(self.metrics_port),
                "FOOTFALL_BROKER_STOP_GRACE_S": "1",
                "FOOTFALL_BROKER_RECEIPT_TIMEOUT_S": "2",
                "FOOTFALL_BROKER_BACKOFF_MAX_S": "1",
            }
            | more
        )

    def run_block(self, name: str, *, on_pi: bool, stdin: str = "", strict: bool = True) -> str:
        """A README block with this machine's names put in, run by bash; its output (with
        ``strict``, every command must succeed; otherwise each runs whatever the last did)."""
        text = guide_blocks()[name]
        for old, new in self.substitutions:
            if old in text:
                text = text.replace(old, new)
        assert "sudo" not in text and "my-shop" not in text, f"block {name} not adapted:\n{text}"
        command = ["bash", *(["-euo", "pipefail"] if strict else []), "-c", text]
        if on_pi:
            command = ["ip", "netns", "exec", self.namespace, *command]
        env = self.agent_env() if on_pi else self.aggregator_env
        result = subprocess.run(command, input=stdin, capture_output=True, text=True, env=env,
                                check=False, timeout=60)  # fmt: skip
        assert result.returncode == 0 or not strict, f"block {name}:\n{text}\n{result.stdout}" + (
            result.stderr
        )
        return result.stdout + result.stderr

    def doctor(self, *more: str, **env: str) -> tuple[int, str]:
        result = subprocess.run(
            ["ip", "netns", "exec", self.namespace, self.agent, "doctor", "--config",
             str(self.config), "--sample-s", "0.5", *more],
            capture_output=True, text=True, env=self.agent_env(**env), check=False, timeout=60,
        )  # fmt: skip
        return result.returncode, result.stdout + result.stderr

    def stored(self) -> bool:
        """Whether the store holds a window of the agent (read here: quicker than a command)."""
        with Store.open(StoreSettings(self.aggregator_env["FOOTFALL_AGG_STORE_DSN"])) as store:
            return any(f.check == "stored" and f.status == "ok"
                       for f in check_agent(store, self.site, "door"))  # fmt: skip

    def agents_check(self) -> tuple[int, str]:
        result = subprocess.run(
            [str(Path(sys.executable).parent / "footfall-aggregator"), "agents", "check",
             self.site, "door"],
            capture_output=True, text=True, env=self.aggregator_env, check=False, timeout=60,
        )  # fmt: skip
        return result.returncode, result.stdout + result.stderr

    def start_agent(self) -> None:
        """``systemctl start footfall-agent``."""
        with (self.tmp / "agent.log").open("ab") as log:
            self.agent_run = subprocess.Popen(
                ["ip", "netns", "exec", self.namespace, self.agent, "run", "--config",
                 str(self.config)],
                stdout=log, stderr=log, env=self.agent_env(),
            )  # fmt: skip

    def counted(self) -> bool:
        """Whether the running agent has counted frames (its metrics endpoint says)."""
        url = f"http://{self.pi_ip}:{self.metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                text = response.read().decode()
        except OSError:
            return False
        return re.search(r"^footfall_probe_requests_total [1-9]", text, re.MULTILINE) is not None

    def stop_agent(self) -> None:
        """``systemctl stop footfall-agent``: the open window is published, then it ends."""
        assert self.agent_run is not None
        self.agent_run.send_signal(signal.SIGTERM)
        self.agent_run.wait(30)
        self.agent_run = None

    def agent_log(self) -> str:
        return (self.tmp / "agent.log").read_text()


def together(*calls: Callable[[], T]) -> list[T]:
    """The calls' results, the calls made at the same time (each runs a process)."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return [future.result() for future in [pool.submit(call) for call in calls]]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def day(mosquitto_bin: str, tmp_path: Path) -> Iterator[Day]:
    require(os.geteuid() == 0, "the installer's day needs root (ip netns, install.sh)")
    missing = [t for t in (*NEEDED, "systemd-sysusers") if shutil.which(t) is None]
    require(not missing, f"the installer's day needs {', '.join(missing)}")
    suffix = uuid.uuid4().hex[:8]
    namespace, air, uplink = f"footfall-pi-{suffix}", f"ffair{suffix}", f"ffupl{suffix}"
    net = int(suffix[:2], 16)
    host_ip, pi_ip = f"10.231.{net}.1", f"10.231.{net}.2"
    _ip("netns", "add", namespace)
    servers: list[subprocess.Popen[bytes]] = []
    sender_stop = threading.Event()
    try:
        _ip("link", "add", air, "type", "veth", "peer", "name", "wlan1", "netns", namespace)
        Path(f"/proc/sys/net/ipv6/conf/{air}/disable_ipv6").write_text("1\n")
        _ip("link", "set", air, "mtu", "9000", "up")
        _ip("-n", namespace, "link", "set", "wlan1", "mtu", "9000", "up")
        _ip("link", "add", uplink, "type", "veth", "peer", "name", "eth0", "netns", namespace)
        _ip("addr", "add", f"{host_ip}/30", "dev", uplink)
        _ip("link", "set", uplink, "up")
        _ip("-n", namespace, "addr", "add", f"{pi_ip}/30", "dev", "eth0")
        _ip("-n", namespace, "link", "set", "eth0", "up")
        _ip("-n", namespace, "link", "set", "lo", "up")
        with shipped_broker(mosquitto_bin, tmp_path / "broker", host_ip) as broker:
            broker.add_account("aggregator", "aggregator-secret")
            broker.reload()
            port = free_port()
            aggregator_env = os.environ | {
                "FOOTFALL_AGG_STORE_DSN": f"sqlite:///{tmp_path / 'aggregator.sqlite3'}",
                "FOOTFALL_AGG_INGEST_RECEIPT_KEY_FILE": str(tmp_path / "receipt.key"),
                "FOOTFALL_AGG_INGEST_RECEIPT_INTERVAL_MS": "0",
                "FOOTFALL_AGG_BROKER_HOST": host_ip,
                "FOOTFALL_AGG_BROKER_PORT": str(broker.port),
                "FOOTFALL_AGG_BROKER_TLS_CA": str(broker.certs.ca),
                "FOOTFALL_AGG_BROKER_PASSWORD": "aggregator-secret",
                "FOOTFALL_AGG_BROKER_BACKOFF_MAX_S": "1",
                "FOOTFALL_AGG_SERVE_PORT": str(port),
                "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            }
            with (tmp_path / "aggregator.log").open("wb") as log:
                servers.append(subprocess.Popen(
                    [str(Path(sys.executable).parent / "footfall-aggregator"), "-v", "serve"],
                    env=aggregator_env, stdout=log, stderr=log,
                ))  # fmt: skip
            day = Day(tmp_path, namespace, air, host_ip, pi_ip, broker, aggregator_env,
                      f"http://127.0.0.1:{port}", tmp_path / "pi", f"shop-{suffix}")  # fmt: skip
            frames = as_ethernet(BUNDLED_SAMPLE, tmp_path / "sample.eth.pcap")
            sender = threading.Thread(target=_air, args=(air, frames, sender_stop), daemon=True)
            sender.start()
            yield day
            if day.agent_run is not None:
                day.agent_run.kill()
                day.agent_run.wait()
    finally:
        sender_stop.set()
        for server in servers:
            server.send_signal(signal.SIGTERM)
            server.wait(20)
        subprocess.run(["ip", "link", "del", air], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", uplink], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True, check=False)


def _air(air: str, frames: Path, stop: threading.Event) -> None:
    """Phones probing all day: the capture's frames, 500 a second, until the day ends."""
    while not stop.is_set():
        subprocess.run(["tcpreplay", "-q", "--pps=500", "--limit=1000", "-i", air, str(frames)],
                       capture_output=True, check=False)  # fmt: skip


def prepare_environment(root: Path) -> None:
    """/opt/footfall as an image builder's cache leaves it: a virtual environment with this
    checkout's packages on its path and its footfall-agent (install.sh then finds the same
    version and installs nothing from PyPI), its kernels ready (install.sh's fallback: one
    replay fills numba's cache)."""
    base = Path(sys.base_prefix) / "bin" / "python3"
    venv = root / "opt/footfall"
    subprocess.run([str(base), "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv)}))
    (site / "footfall-checkout.pth").write_text(
        f"import site; site.addsitedir({sysconfig.get_path('purelib')!r})\n"
    )
    agent = venv / "bin/footfall-agent"
    agent.write_text(
        f"#!{venv}/bin/python3\nimport sys\nfrom firmware_agent.cli import main\nsys.exit(main())\n"
    )
    agent.chmod(0o755)
    subprocess.run([str(agent), "replay"], stdout=subprocess.DEVNULL, check=True, timeout=600)


def pin_radio(day: Day) -> None:
    """What systemd-udevd does at the next boot with install.sh's .link file: the interface
    with that address is named as it says."""
    link = (day.root / "etc/systemd/network/10-footfall-radio.link").read_text()
    address = re.search(r"^MACAddress=(.+)$", link, re.MULTILINE)
    name = re.search(r"^Name=(.+)$", link, re.MULTILINE)
    assert address and name
    listed = subprocess.run(["ip", "-n", day.namespace, "-o", "link"], capture_output=True,
                            text=True, check=True).stdout  # fmt: skip
    radio = next(line.split(": ")[1].split("@")[0] for line in listed.splitlines()
                 if f"link/ether {address[1]}" in line)  # fmt: skip
    _ip("-n", day.namespace, "link", "set", radio, "down")
    _ip("-n", day.namespace, "link", "set", radio, "name", name[1])
    _ip("-n", day.namespace, "link", "set", name[1], "up")


def enrol_on_the_web_page(day: Day, chromium: Browser, public_key: str) -> Page:
    """The installer signs in from the site's page, is sent back to it, enrols the agent
    there and stays."""
    page = chromium.new_page()
    page.goto(f"{day.url}/sites/{day.site}")
    page.fill("input[name=name]", "ines")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{day.url}/sites/{day.site}")
    page.fill("input[name=agent]", "door")
    page.fill("input[name=public_key]", public_key)
    with page.expect_navigation():
        page.click("button:text('Enrol')")
    assert "door" in page.inner_text("table")
    return page


def doctor_with_acl(day: Day, acl: str) -> str:
    """What doctor says on the Pi while the broker's ACL reads ``acl``; the ACL it had is
    put back after."""
    shipped = day.broker.acl.read_text()
    day.broker.acl.write_text(acl)
    day.broker.reload()
    try:
        return day.doctor()[1]
    finally:
        day.broker.acl.write_text(shipped)
        day.broker.reload()


def agent_row(page: Page) -> list[str]:
    """The agent's row of the site page's agents table, as the installer sees it now."""
    page.reload()
    return page.inner_text("#agents tr[data-agent=door]").split("\t")


@pytest.mark.slow
@pytest.mark.root
def test_the_installers_day_as_the_guide_writes_it(day: Day, browser: Browser) -> None:
    aggregator = Path(sys.executable).parent / "footfall-aggregator"
    day.substitutions = [
        ("sudo mosquitto_passwd /etc/mosquitto/footfall.passwd my-shop/door",
         f"mosquitto_passwd -b {day.broker.passwords} {day.site}/door {AGENT_PASSWORD}"),
        ("sudo systemctl reload mosquitto", f"kill -HUP {day.broker.process.pid}"),
        ("footfall-aggregator users add ines --role installer --site my-shop",
         f"{aggregator} users add ines --role installer --site my-shop --password-stdin"),
        ("sudo hardware/install.sh",
         f"bash {REPO}/hardware/install.sh --root {day.root} --no-apt --source {REPO}"),
        ("mqtt.example.net:8883", f"{day.host_ip}:{day.broker.port}"),
        ("--tls-ca system", f"--tls-ca {day.broker.certs.ca}"),
        ("sudo footfall-agent", day.agent),
        ("/etc/footfall/agent.toml", str(day.config)),
        ("sudo footfall-doctor", f"{day.agent} doctor --config {day.config} --sample-s 0.5"),
        ("sudo systemctl start footfall-agent", "true"),  # the test starts it (start_agent)
        ("my-shop", day.site),
    ]  # fmt: skip
    blocks = guide_blocks()
    assert list(blocks) == ["admin-site", "admin-broker", "install", "enrol", "check", "counted"]
    for name, text in blocks.items():  # every substitution still finds its text
        used = [old for old, _ in day.substitutions if old in text]
        assert used or name == "counted", f"block {name} has none of the test's names"

    # 1. The admin: the agent's broker account and the receipt key.
    receipt_key = day.run_block("admin-broker", on_pi=False).strip()
    day.substitutions.insert(0, ("'RECEIPT KEY'", receipt_key))

    # 2. The installer: install.sh into the Pi's root, with what the admin gave.
    day.root.mkdir()
    prepare_environment(day.root)
    installed = day.run_block("install", on_pi=True, stdin=AGENT_PASSWORD + "\n")
    assert f"agent.site = {day.site}, agent.id = door, epoch.timezone = Europe/Paris" in installed
    assert "installed footfall" not in installed  # the prepared environment was the same version
    pin_radio(day)  # the next boot
    again = day.run_block("install", on_pi=True, stdin=AGENT_PASSWORD + "\n")  # run twice,
    assert "nothing to change" in again, again  # the radio already renamed by its .link file

    # 3. The agent runs before the admin has made the site: its windows are refused.
    day.start_agent()
    wait_for(day.counted, 60, "the agent counting probe requests")
    day.stop_agent()
    (status, out), (checked, by_aggregator) = together(day.doctor, day.agents_check)
    assert status == 1 and failed(out) == {"stored"}, out
    assert f"footfall-aggregator agents check {day.site} door" in table(out)["stored"][1]
    status, out = checked, by_aggregator
    assert status == 1 and failed(out) == {"site"}, out
    assert f"sites add {day.site} --timezone ZONE" in table(out)["site"][1]

    # 4. The admin makes the site and the installer's account; the key is still not enrolled.
    day.run_block("admin-site", on_pi=False, stdin=PASSWORD + "\n")
    (_, out), (_, on_the_pi) = together(day.agents_check, day.doctor)
    assert failed(out) == {"enrolment", "stored"}, out
    assert "footfall-agent enrol prints the command" in table(out)["enrolment"][1]
    assert f"enrols it on the web page /sites/{day.site}" in table(out)["enrolment"][1]
    assert failed(on_the_pi) == {"stored"}, on_the_pi
    assert f"agents check {day.site} door" in table(on_the_pi)["stored"][1]

    # 5. Enrolment on the web page, as the installer, with the key 'enrol' printed.
    printed = day.run_block("enrol", on_pi=True)
    public_key = printed.splitlines()[0].removeprefix("public key: ")
    assert f"or on the web page /sites/{day.site}: 'Enrol an agent', id door" in printed
    page = enrol_on_the_web_page(day, browser, public_key)
    assert agent_row(page)[3] == "0"  # its windows: none stored yet

    # 6. Doctor before the start (no window stored yet), the start, doctor once stored.
    out = day.run_block("check", on_pi=True, strict=False)
    assert failed(out) == {"stored"}, out
    assert "no receipt on footfall/v1/" in table(out)["stored"][1]
    day.start_agent()  # the spooled windows are sent again, and stored this time

    wait_for(day.stored, 30, "a stored window")
    out = day.run_block("counted", on_pi=True, strict=CLOCK_SYNCED)
    rows = table(out)
    assert list(rows) == [
        "identity",
        "interface",
        "capabilities",
        "frames",
        "clock",
        "signing key",
        "broker",
        "acl",
        "stored",
        "spool",
        "numba cache",
    ]
    assert failed(out) == set(), out
    assert all(status == "ok" for check, (status, _) in rows.items() if check != "clock"), out
    assert re.match(
        r"the aggregator holds windows \d+ to \d+ \(last \d+, 0 gaps\)", rows["stored"][1]
    )
    status, out = day.agents_check()
    assert failed(out) == set() and table(out)["stored"][0] == "ok", out
    row = agent_row(page)  # and the site's page shows it counted
    assert row[1] == "online" and int(row[3]) >= 1, row
    page.close()
    day.stop_agent()

    # 7. The README's failures, each turning exactly its own line red, with its fix.
    (_, out), (_, radio) = together(
        lambda: day.doctor(FOOTFALL_BROKER_PASSWORD="wrong"),
        lambda: day.doctor(FOOTFALL_SOURCE_LINK_TYPE="auto"),
    )
    assert failed(radio) == {"interface"}, radio
    assert "footfall0 is not in monitor mode" in table(radio)["interface"][1]
    assert "fix: iw dev footfall0 set type monitor" in table(radio)["interface"][1]
    assert failed(out) == {"broker"}, out
    assert "not authorised" in table(out)["broker"][1] or "refused" in table(out)["broker"][1]
    assert "the account (broker.username, broker.password)" in table(out)["broker"][1]
    assert (table(out)["acl"][0], table(out)["stored"][0]) == ("skip", "skip")
    acl = day.broker.acl.read_text()
    out = doctor_with_acl(day, acl.replace("pattern write footfall/v1/%u/meta\n", ""))
    assert failed(out) == {"acl"}, out
    assert "fix: the broker's ACL (hardware/mosquitto/footfall.acl" in table(out)["acl"][1]
    out = doctor_with_acl(day, "pattern write footfall/v1/#\n" + acl)  # one that lets too much
    assert failed(out) == {"acl"}, out
    assert "accepted: this account may write other agents' topics" in table(out)["acl"][1]


def test_the_readme_sends_installers_to_the_guide_this_test_runs() -> None:
    """The README holds no installer's steps of its own that could drift from the guide's
    (which the test above runs): it points at the guide and at this test."""
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"^```sh\n(.*?)^```", readme, re.MULTILINE | re.DOTALL)
    steps = ("install.sh", "footfall-doctor", "mosquitto_passwd", "systemctl")
    assert not [s for block in blocks for s in steps if s in block]
    assert "[hardware/README.md](hardware/README.md), which starts with the installer's day" in (
        readme
    )
    assert "`tests/integration/test_install.py` runs that procedure as written" in readme
