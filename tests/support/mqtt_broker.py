"""A real Mosquitto for the tests and the publish benchmark, and a TCP link that can be cut.

:class:`Mosquitto` runs ``mosquitto -c CONF`` from a directory of its own (config, password
file written with ``mosquitto_passwd -b``, ACL, persistence, log) on free loopback ports:

* ``port``: plain MQTT, password required;
* ``tls_port``: TLS with certificates from :class:`TestCertificates` (made with ``openssl``),
  a client certificate and a password required.

It can be stopped (SIGTERM), killed (SIGKILL), made to save its persistence (SIGUSR1) and
started again on the same ports (from :mod:`tests.support.ports`, which never hands a port out
twice). The ACL gives each agent account (user name ``<site>/<agent>``) write access to its own
topics only (``pattern write footfall/v1/%u/#``) and read access to its receipt, and the
``reader`` account read access to all and write access to the receipts (it is what ingest logs
in as).

:class:`Link` stands between a client and the broker (or a database): :meth:`Link.cut`
silences every open connection (bytes are swallowed, nothing is closed, so only keep-alive
can tell) and closes the listening port; :meth:`Link.refuse` closes every connection too (a
server that stopped); :meth:`Link.restore` drops the silenced connections and listens again.

:class:`Subscriber` reads everything under ``footfall/`` with the reader account.

The fixtures: ``mosquitto_bin`` (session; skips when Mosquitto is absent, fails under
``FOOTFALL_REQUIRE_BROKER=1``), ``test_certificates`` (session) and ``start_broker`` (a factory
whose brokers are killed at the end of the test).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import selectors
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from firmware_agent.contract.messages import Envelope
from tests.support.ports import free_port, free_ports

HOST = "127.0.0.1"
READER = ("reader", "reader-secret")


def find_mosquitto() -> str | None:
    """The broker binary: on PATH, or in /usr/sbin or /usr/local/sbin (often not on PATH)."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for directory in ("/usr/sbin", "/usr/local/sbin"):
        path = Path(directory) / "mosquitto"
        if os.access(path, os.X_OK):
            return str(path)
    return None


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` every 10 ms; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.2):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class TestCertificates:
    """A CA, a server certificate for 127.0.0.1/localhost, a client certificate, and an
    unrelated CA (to prove verification fails against it)."""

    __test__ = False  # not a test class, whatever its name

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path

    @classmethod
    def make(cls, directory: Path, addresses: Sequence[str] = ()) -> TestCertificates:
        """``addresses``: more IP addresses the server certificate is for."""
        directory.mkdir(parents=True, exist_ok=True)

        def openssl(*args: str) -> None:
            subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

        key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        for ca in ("ca", "other_ca"):
            openssl("req", "-x509", *key, "-keyout", f"{ca}.key", "-out", f"{ca}.crt",
                    "-days", "2", "-subj", f"/CN=footfall test {ca}")  # fmt: skip
        names = ",".join(f"IP:{a}" for a in ("127.0.0.1", *addresses))
        (directory / "server.ext").write_text(f"subjectAltName={names},DNS:localhost\n")
        for name, ext in (("server", ["-extfile", "server.ext"]), ("client", [])):
            openssl("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                    "-subj", f"/CN=footfall test {name}")  # fmt: skip
            openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                    "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", *ext)  # fmt: skip
        return cls(
            ca=directory / "ca.crt",
            server_cert=directory / "server.crt",
            server_key=directory / "server.key",
            client_cert=directory / "client.crt",
            client_key=directory / "client.key",
            other_ca=directory / "other_ca.crt",
        )


class Mosquitto:
    """One Mosquitto process and its files (see the module docstring)."""

    def __init__(
        self,
        binary: str,
        root: Path,
        certs: TestCertificates,
        agents: Mapping[tuple[str, str], str],
    ) -> None:
        """``agents`` maps (site, agent) to the password of the account ``<site>/<agent>``."""
        self.binary = binary
        self.root = root
        self.port, self.tls_port = free_ports(2)
        self.process: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)
        passwords = root / "passwords"
        passwords.touch()
        # Agents' user names are '<site>/<agent>': one pattern gives each its own topics.
        acl = [
            "pattern write footfall/v1/%u/#",
            "pattern read footfall/v1/%u/receipt",
            "pattern write homeassistant/device/footfall-%u/config",  # as hardware/mosquitto's
            f"user {READER[0]}",
            "topic read #",
            "topic write footfall/v1/+/+/receipt",
            "",
        ]
        accounts = {READER[0]: READER[1]}
        for (site, agent), password in agents.items():
            accounts[f"{site}/{agent}"] = password
        for name, password in accounts.items():
            subprocess.run(
                ["mosquitto_passwd", "-b", str(passwords), name, password],
                check=True,
                capture_output=True,
            )
        (root / "acl").write_text("\n".join(acl))
        (root / "mosquitto.conf").write_text(
            "\n".join(
                [
                    f"user {pwd.getpwuid(os.geteuid()).pw_name}",
                    "per_listener_settings false",
                    "allow_anonymous false",
                    f"password_file {passwords}",
                    f"acl_file {root / 'acl'}",
                    "persistence true",
                    f"persistence_location {root}/",
                    f"log_dest file {root / 'mosquitto.log'}",
                    "log_type all",
                    "max_queued_messages 100000",
                    f"listener {self.port} {HOST}",
                    f"listener {self.tls_port} {HOST}",
                    f"cafile {certs.ca}",
                    f"certfile {certs.server_cert}",
                    f"keyfile {certs.server_key}",
                    "require_certificate true",
                    "",
                ]
            )
        )

    @property
    def log(self) -> str:
        path = self.root / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        self.process = subprocess.Popen(
            [self.binary, "-c", str(self.root / "mosquitto.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        process = self.process

        def up() -> bool:
            if process.poll() is not None:
                err = process.stderr.read().decode() if process.stderr else ""
                raise AssertionError(f"mosquitto exited: {err}\n{self.log}")
            return _listening(self.port) and _listening(self.tls_port)

        wait_for(up, 10, f"mosquitto on ports {self.port} and {self.tls_port}")

    def _signal(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)
            self.process.wait(10)
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()

    def stop(self) -> None:
        """A clean stop (SIGTERM): the broker saves its persistence and closes connections."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: nothing is saved, connections drop at once."""
        self._signal(signal.SIGKILL)

    def save(self) -> None:
        """Make the running broker write its persistence file now (SIGUSR1)."""
        assert self.process is not None
        db = self.root / "mosquitto.db"
        before = db.stat().st_mtime_ns if db.exists() else None
        self.process.send_signal(signal.SIGUSR1)
        wait_for(
            lambda: db.exists() and db.stat().st_mtime_ns != before, 5, "mosquitto.db to be saved"
        )


class Link:
    """A TCP relay to ``(host, port)`` on a port of its own, which can be cut and restored."""

    def __init__(self, host: str, port: int, bind: str = HOST) -> None:
        """A relay to ``host:port`` listening on ``bind`` (an address of this machine)."""
        self.target = (host, port)
        self.bind = bind
        self.port = free_port()
        self._selector = selectors.DefaultSelector()
        self._peers: dict[socket.socket, socket.socket] = {}
        self._silenced = False
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._running = True
        self._listen()
        self._thread = threading.Thread(target=self._pump, name="link", daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.bind, self.port))
        listener.listen()
        listener.setblocking(False)
        self._listener = listener
        self._selector.register(listener, selectors.EVENT_READ)

    def cut(self) -> None:
        """Silence every open connection and refuse new ones."""
        with self._lock:
            self._silenced = True
            if self._listener is not None:
                self._selector.unregister(self._listener)
                self._listener.close()
                self._listener = None

    def refuse(self) -> None:
        """Close every open connection and refuse new ones: the server stopped."""
        self.cut()
        with self._lock:
            for sock in list(self._peers):
                self._drop(sock)

    def restore(self) -> None:
        """Drop the silenced connections and accept new ones again."""
        with self._lock:
            for sock in list(self._peers):
                self._drop(sock)
            self._silenced = False
            self._listen()

    def close(self) -> None:
        self.cut()
        self._running = False
        self._thread.join(5)
        with self._lock:
            for sock in list(self._peers):
                self._drop(sock)

    def _drop(self, sock: socket.socket) -> None:
        peer = self._peers.pop(sock, None)
        for s in (sock, peer):
            if s is not None:
                self._peers.pop(s, None)
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(s)
                s.close()

    def _pump(self) -> None:
        while self._running:
            for key, _ in self._selector.select(0.05):
                with self._lock:
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if sock is self._listener:
                        client, _ = sock.accept()
                        try:
                            upstream = socket.create_connection(self.target, timeout=2)
                        except OSError:
                            client.close()
                            continue
                        for s in (client, upstream):
                            s.setblocking(False)
                            self._selector.register(s, selectors.EVENT_READ)
                        self._peers[client], self._peers[upstream] = upstream, client
                    elif sock in self._peers:
                        try:
                            data = sock.recv(65536)
                        except OSError:
                            data = b""
                        if not data:
                            self._drop(sock)
                        elif not self._silenced:
                            try:
                                self._peers[sock].sendall(data)
                            except OSError:
                                self._drop(sock)


@pytest.fixture(scope="session")
def mosquitto_bin() -> str:
    binary = find_mosquitto()
    if binary is None or shutil.which("mosquitto_passwd") is None:
        reason = "Mosquitto is not installed (apt-get install mosquitto; .ci/run does it)"
        if os.environ.get("FOOTFALL_REQUIRE_BROKER") == "1":
            pytest.fail(reason + " and FOOTFALL_REQUIRE_BROKER=1")
        pytest.skip(reason)
    return binary


@pytest.fixture(scope="session")
def test_certificates(tmp_path_factory: pytest.TempPathFactory) -> TestCertificates:
    return TestCertificates.make(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def start_broker(
    mosquitto_bin: str, test_certificates: TestCertificates, tmp_path: Path
) -> Iterator[Callable[[Mapping[tuple[str, str], str]], Mosquitto]]:
    """A factory: ``start_broker({(site, agent): password})`` starts a Mosquitto."""
    brokers: list[Mosquitto] = []

    def start(agents: Mapping[tuple[str, str], str]) -> Mosquitto:
        broker = Mosquitto(
            mosquitto_bin, tmp_path / f"broker{len(brokers)}", test_certificates, agents
        )
        brokers.append(broker)
        broker.start()
        return broker

    yield start
    for broker in brokers:
        broker.kill()


class Subscriber:
    """A reader-account client (or ``account``) on the broker (or a port), recording every
    message it gets, reconnecting by itself. ``persistent`` keeps its session (and what is
    queued for it) across its own disconnections and a broker restart that kept the broker's
    persistence."""

    def __init__(
        self,
        broker: Mosquitto | int,
        topic: str = "footfall/#",
        *,
        persistent: bool = False,
        account: tuple[str, str] = READER,
    ):
        self.topic = topic
        self.messages: list[tuple[str, bytes, bool]] = []  # topic, payload, retained
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        client_id = f"reader-{uuid.uuid4().hex[:12]}"
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=not persistent,
        )
        self.client.username_pw_set(*account)
        self.client.reconnect_delay_set(0.05, 0.5)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(HOST, broker if isinstance(broker, int) else broker.port, keepalive=5)
        self.client.loop_start()
        if not self._subscribed.wait(5):
            raise AssertionError(f"no SUBACK for {topic}")

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if not reason.is_failure:
            client.subscribe(self.topic, qos=1)

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((message.topic, message.payload, bool(message.retain)))

    def snapshot(self) -> list[tuple[str, bytes, bool]]:
        with self._lock:
            return list(self.messages)

    def envelopes(self, kind: str) -> list[Envelope]:
        """Every message of a kind, parsed and validated (not de-duplicated)."""
        return [Envelope.parse(body) for topic, body, _ in self.snapshot() if topic.endswith(kind)]

    def windows(self) -> list[dict[str, Any]]:
        """Counts payloads de-duplicated by (agent, seq), in order of first arrival."""
        seen: set[tuple[str, int]] = set()
        out = []
        for envelope in self.envelopes("/counts"):
            ident = (envelope.payload["agent"], envelope.payload["seq"])
            if ident not in seen:
                seen.add(ident)
                out.append(envelope.payload)
        return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


SHIPPED = Path(__file__).resolve().parents[2] / "hardware" / "mosquitto"


@dataclass(frozen=True)
class ShippedBroker:
    """Mosquitto running hardware/mosquitto's own config and ACL, made local: the files in
    ``root``, the TLS listener on ``host:port``. ``reload`` is ``systemctl reload mosquitto``."""

    root: Path
    host: str
    port: int
    certs: TestCertificates
    process: subprocess.Popen[bytes]

    @property
    def passwords(self) -> Path:
        return self.root / "footfall.passwd"

    @property
    def acl(self) -> Path:
        return self.root / "footfall.acl"

    def add_account(self, user: str, password: str) -> None:
        subprocess.run(["mosquitto_passwd", "-b", str(self.passwords), user, password],
                       check=True, capture_output=True)  # fmt: skip

    def reload(self) -> None:
        """Read the passwords and the ACL again (SIGHUP)."""
        self.process.send_signal(signal.SIGHUP)
        time.sleep(0.3)


@contextlib.contextmanager
def shipped_broker(
    mosquitto_bin: str, root: Path, host: str = HOST, certs: TestCertificates | None = None
) -> Iterator[ShippedBroker]:
    """Mosquitto with hardware/mosquitto's footfall.conf and footfall.acl (paths, address and
    port made local), no account yet; stopped after."""
    root.mkdir(parents=True, exist_ok=True)
    certs = certs or TestCertificates.make(root / "certs", (host,))
    (root / "footfall.passwd").touch()
    shutil.copy(SHIPPED / "footfall.acl", root / "footfall.acl")
    port = free_port()
    conf = (SHIPPED / "footfall.conf").read_text()
    for shipped, local in [
        ("/etc/mosquitto/footfall.passwd", str(root / "footfall.passwd")),
        ("/etc/mosquitto/footfall.acl", str(root / "footfall.acl")),
        ("/etc/mosquitto/certs/footfall.crt", str(certs.server_cert)),
        ("/etc/mosquitto/certs/footfall.key", str(certs.server_key)),
        ("listener 8883", f"listener {port} {host}"),
        ("/var/lib/mosquitto/", f"{root}/"),
    ]:
        assert shipped in conf
        conf = conf.replace(shipped, local)
    conf = f"user {pwd.getpwuid(os.geteuid()).pw_name}\nlog_dest file {root / 'log'}\n" + conf
    (root / "mosquitto.conf").write_text(conf)
    process = subprocess.Popen([mosquitto_bin, "-c", str(root / "mosquitto.conf")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip

    def up() -> bool:
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            return False

    try:
        wait_for(up, 10, "the footfall broker")
        yield ShippedBroker(root, host, port, certs, process)
    finally:
        process.kill()
        process.wait()
        if process.stderr:
            process.stderr.close()
