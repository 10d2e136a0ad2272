"""A 3-node NATS cluster on loopback for the JetStream tests and bench: three ``nats-server``
processes, each with JetStream (its own store directory), a cluster route to the other two and
the MQTT listener the agents publish to. One account holds the aggregator's user (JetStream,
every subject) and one user per agent, ``<site>/<agent>``, MQTT only, that may publish only
under its own topic (hardware/nats/footfall-accounts.conf, the same permissions).

Ports come from :class:`Ports` (:class:`tests.support.ports.PortAllocator`), which never hands
a port out twice, so two nodes (or a node and a test broker) never get the same one even though
a killed node's ports are free again for a moment.
"""

from __future__ import annotations

import os
import signal
import subprocess
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.support.agent_fleet import SimAgent
from tests.support.mqtt_broker import HOST, wait_for
from tests.support.ports import PortAllocator as Ports

NATS_SERVER = "/usr/sbin/nats-server"
AGGREGATOR = ("aggregator", "aggregator-pw")


def nats_server() -> str | None:
    """The nats-server binary, or None."""
    for candidate in (NATS_SERVER, *(f"{d}/nats-server" for d in os.get_exec_path())):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


@dataclass
class Node:
    name: str
    client: int
    route: int
    mqtt: int
    monitor: int
    config: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def accounts_block(agents: Sequence[SimAgent]) -> str:
    """The FOOTFALL account: the aggregator, and each agent allowed only its own topic."""
    users = [f"      {{user: {_quoted(AGGREGATOR[0])}, password: {_quoted(AGGREGATOR[1])}}}"]
    for a in agents:
        own = _quoted(f"footfall.v1.{a.site}.{a.agent}.>")
        users.append(
            f"      {{user: {_quoted(f'{a.site}/{a.agent}')}, password: {_quoted(a.password)}, "
            f"allowed_connection_types: [MQTT], permissions: {{publish: [{own}], "
            f'subscribe: [{own}, "$MQTT.sub.>"]}}}}'
        )
    return (
        "accounts {\n  FOOTFALL {\n    jetstream: enabled\n    users: [\n"
        + ",\n".join(users)
        + "\n    ]\n  }\n}\n"
    )


class NatsCluster:
    """Three nodes (see the module docstring); ``start``, ``kill``/``restart`` a node,
    ``stop`` them all."""

    def __init__(self, root: Path, agents: Sequence[SimAgent], ports: Ports, size: int = 3):
        binary = nats_server()
        assert binary is not None, "nats-server is not installed (.ci/run installs it)"
        self.binary = binary
        root.mkdir(parents=True, exist_ok=True)
        self.nodes = [
            Node(
                f"n{i + 1}",
                ports.take(),
                ports.take(),
                ports.take(),
                ports.take(),
                root / f"n{i + 1}.conf",
                root / f"n{i + 1}.log",
            )
            for i in range(size)
        ]
        accounts = accounts_block(agents)
        for node in self.nodes:
            routes = ", ".join(
                f"nats-route://{HOST}:{o.route}" for o in self.nodes if o is not node
            )
            node.config.write_text(
                f"server_name: {node.name}\nlisten: {HOST}:{node.client}\n"
                f"http: {HOST}:{node.monitor}\n"
                f"jetstream {{ store_dir: {_quoted(str(root / node.name))}, "
                "max_memory_store: 64MB, max_file_store: 2GB }\n"
                f"cluster {{ name: footfall, listen: {HOST}:{node.route}, routes: [{routes}] }}\n"
                f'mqtt {{ listen: {HOST}:{node.mqtt}, ack_wait: "10s", stream_replicas: 3 }}\n'
                + accounts
            )

    @property
    def servers(self) -> str:
        """broker.servers for the aggregator."""
        return ",".join(f"nats://{HOST}:{n.client}" for n in self.nodes)

    @property
    def mqtt_ports(self) -> list[int]:
        return [n.mqtt for n in self.nodes]

    @property
    def port(self) -> int:
        """The MQTT listener agents try first (the first node's)."""
        return self.nodes[0].mqtt

    @property
    def hosts(self) -> str:
        """The other nodes' MQTT listeners, as an agent's broker.hosts."""
        return ",".join(f"{HOST}:{n.mqtt}" for n in self.nodes[1:])

    def ingest_settings(self) -> str:
        """The [broker] lines of an ingest process's config: JetStream, streams on 3 nodes, a
        message a dead process took goes to another after 3 s."""
        return (
            f'kind = "jetstream"\nservers = "{self.servers}"\nusername = "{AGGREGATOR[0]}"\n'
            f'password = "{AGGREGATOR[1]}"\nstream_replicas = 3\nack_wait_s = 3\n'
            "keepalive_s = 5\nbackoff_max_s = 1\nconnect_timeout_s = 3\n"
        )

    def start(self, timeout: float = 30) -> None:
        for node in self.nodes:
            self._spawn(node)
        for node in self.nodes:
            self._wait_up(node, timeout)

    def _spawn(self, node: Node) -> None:
        with node.log.open("ab") as log:
            node.proc = subprocess.Popen([self.binary, "-c", str(node.config)], stderr=log)

    def _wait_up(self, node: Node, timeout: float, page: str = "healthz") -> None:
        """Wait until the node's monitoring ``page`` answers 200: /healthz once its JetStream
        is current, /varz once it runs."""

        def up() -> bool:
            assert node.proc is not None
            if node.proc.poll() is not None:
                raise AssertionError(f"{node.name} exited: {node.log.read_text()[-2000:]}")
            try:
                url = f"http://{HOST}:{node.monitor}/{page}"
                with urllib.request.urlopen(url, timeout=1) as answer:
                    return bool(answer.status == 200)
            except OSError:
                return False

        wait_for(up, timeout, f"nats-server {node.name}: /{page} answering 200")

    def kill(self, node: Node | None = None) -> None:
        """kill -9 of ``node``, or of every node running (the whole cluster)."""
        for each in [node] if node is not None else self.nodes:
            if each.running:
                assert each.proc is not None
                each.proc.send_signal(signal.SIGKILL)
                each.proc.wait(10)

    def restart(self, node: Node, timeout: float = 30) -> None:
        """Start a killed node again; it catches up with the others after this returns."""
        self._spawn(node)
        self._wait_up(node, timeout, "varz")

    def stop(self) -> None:
        self.kill()

    def logs(self) -> str:
        return "\n".join(f"--- {n.name}\n{n.log.read_text()[-3000:]}" for n in self.nodes)
