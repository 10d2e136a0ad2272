"""Many simulated agents publishing signed counts to a real Mosquitto, cheaply.

Running hundreds of real agents (each a process with numba) is out of reach of a test; what the
aggregator sees of an agent is its broker account and its signed messages, so a
:class:`Fleet` opens one MQTT 3.1.1 connection per agent (user name ``<site>/<agent>``, as the
broker's ACL wants) from a single thread and publishes pre-sealed envelopes at QoS 1, with an
in-flight window per connection, like the agent's publisher. After a lost connection it
connects again and sends what was not acknowledged (as the agent's spool does), so a broker
restart loses nothing on the agents' side. Packets are the aggregator's own codec's
(:mod:`aggregator.mqtt_codec`, MQTT 3.1.1), written straight to sockets so that the fleet
costs the machine little next to the aggregator it loads.

:func:`fleet_messages` makes the envelopes: the same canonical JSON and Ed25519 signature as
:func:`firmware_agent.contract.messages.seal`, without its per-message schema validation (the schema
is checked once on a sample), so a hundred thousand of them take seconds.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nacl.signing

from aggregator.mqtt_codec import (
    connect_packet,
    decode_connack,
    decode_puback,
    next_packet,
    publish_packet,
)
from firmware_agent.contract.fields import STANDARD_PUBLISHES
from firmware_agent.contract.messages import (
    AgentId,
    SiteId,
    canonical_json,
    counts_payload,
    meta_payload,
    public_key_text,
    seal,
    utc_text,
)
from tests.support.mqtt_broker import HOST, READER, Mosquitto, TestCertificates

WINDOW = {
    "window_s": 300,
    "probe_requests": 96,
    "malformed": 0,
    "late_frames": 0,
    "devices": 11,
    "devices_randomised": 3,
    "visitors": 8,
    "passersby": 3,
    "visits_ended": 18,
    "dwell_minutes": {"lt5": 5, "5-15": 5, "15-30": 1, "30-60": 1, "ge60": 6},
    "devices_epoch": 289,
}
START = 1_709_625_600  # 2024-03-05T08:00:00Z


@dataclass
class SimAgent:
    site: str
    agent: str
    key: nacl.signing.SigningKey
    password: str
    messages: list[bytes] = field(default_factory=list)

    @property
    def topic(self) -> str:
        return f"footfall/v1/{self.site}/{self.agent}/counts"

    @property
    def public_key(self) -> str:
        return public_key_text(self.key)


def fast_seal(payload: dict[str, object], key: nacl.signing.SigningKey) -> bytes:
    """:func:`seal` without the schema validation (the caller validated one sample)."""
    signature = key.sign(canonical_json(payload)).signature
    envelope = {"alg": "ed25519", "payload": payload, "sig": base64.b64encode(signature).decode()}
    return canonical_json(envelope)


def window(i: int, agent_index: int = 0) -> dict[str, object]:
    """The i-th 5-minute window of an agent, counts varying a little."""
    return WINDOW | {
        "window_start": utc_text(START + 300 * i),
        "probe_requests": 50 + (i * 7 + agent_index) % 90,
        "devices_epoch": 100 + i,
    }


def make_agents(n: int, site: str = "s1", prefix: str = "a", seed: str = "") -> list[SimAgent]:
    """``n`` agents of a site; with a ``seed``, their keys are derived from it (so another
    process can make the same agents), else random."""

    def key(name: str) -> nacl.signing.SigningKey:
        if not seed:
            return nacl.signing.SigningKey.generate()
        return nacl.signing.SigningKey(hashlib.sha256(f"{seed}/{site}/{name}".encode()).digest())

    return [SimAgent(site, f"{prefix}{i}", key(f"{prefix}{i}"), f"pw-{i}") for i in range(n)]


def fleet_messages(agents: Sequence[SimAgent], windows: int, *, first_seq: int = 1) -> int:
    """Give each agent ``windows`` sealed counts messages (seq first_seq...); the total."""
    sample = agents[0]
    check = counts_payload(
        SiteId(sample.site), AgentId(sample.agent), 1, "0" * 16, window(0), version=1
    )
    assert fast_seal(check, sample.key) == seal(check, sample.key)  # same bytes as the agent's
    for a, agent in enumerate(agents):
        site, name = SiteId(agent.site), AgentId(agent.agent)
        agent.messages = [
            fast_seal(
                counts_payload(
                    site, name, first_seq + i, "9f3c1a7e52b04d68", window(i, a), version=1
                ),
                agent.key,
            )
            for i in range(windows)
        ]
    return sum(len(agent.messages) for agent in agents)


def fleet_broker(
    binary: str, root: Path, certs: TestCertificates, agents: Sequence[SimAgent]
) -> Mosquitto:
    """A Mosquitto (tests/support/mqtt_broker.py) with an account per simulated agent, hashed in one
    ``mosquitto_passwd -U`` (one call per account takes seconds for a thousand)."""
    broker = Mosquitto(binary, root, certs, {})
    accounts = [READER] + [(f"{a.site}/{a.agent}", a.password) for a in agents]
    passwords = root / "passwords"
    passwords.write_text("".join(f"{user}:{password}\n" for user, password in accounts))
    subprocess.run(["mosquitto_passwd", "-U", str(passwords)], check=True, capture_output=True)
    return broker


class _Connection:
    def __init__(
        self, agent: SimAgent, ports: Sequence[int], inflight: int, reconnect_s: float
    ) -> None:
        self.agent = agent
        self.reconnect_s = reconnect_s
        self.ports = ports
        self.port = ports[0]
        self.window = inflight
        self.topic = agent.topic.encode()
        self.sock: socket.socket | None = None
        self.next = 0  # next message index never sent
        self.resend: list[int] = []  # indices to send again after a reconnection
        self.inflight: dict[int, int] = {}  # packet id -> message index
        self.acked = 0
        self.pid = 0
        self.out = bytearray()
        self.inp = bytearray()
        self.retry_at = 0.0

    @property
    def done(self) -> bool:
        return self.acked == len(self.agent.messages)

    def open(self) -> bool:
        """Connect and wait for CONNACK; False if the broker is not there (try later)."""
        sock: socket.socket | None = None
        try:
            sock = socket.create_connection((HOST, self.port), timeout=2)
            sock.sendall(  # MQTT 3.1.1, clean session, no keep-alive
                connect_packet(
                    f"fleet-{self.agent.site}-{self.agent.agent}",
                    f"{self.agent.site}/{self.agent.agent}",
                    self.agent.password,
                    keepalive_s=0,
                    session_expiry_s=0,
                    receive_maximum=0,
                    v5=False,
                    clean_start=True,
                )
            )
            ack = bytearray()
            while (packet := next_packet(ack)) is None:
                chunk = sock.recv(4096)
                if not chunk:
                    raise OSError("closed")
                ack += chunk
        except OSError:
            if sock is not None:
                sock.close()
            self.lost()
            return False
        header, start, end = packet
        if header != 0x20 or decode_connack(ack[start:end])[1] != 0:
            sock.close()
            raise AssertionError(f"broker refused {self.agent.agent}: CONNACK {ack.hex()}")
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.resend = sorted(self.resend + list(self.inflight.values()))
        self.inflight.clear()
        self.out.clear()
        self.inp.clear()
        return True

    def lost(self) -> None:
        """The connection is gone: try again later, at the next broker address listed."""
        if self.sock is not None:
            self.sock.close()
        self.sock = None
        self.retry_at = time.monotonic() + self.reconnect_s
        self.port = self.ports[(self.ports.index(self.port) + 1) % len(self.ports)]

    def fill(self, budget: int) -> int:
        """Queue up to ``budget`` PUBLISH packets within the in-flight window; how many."""
        n = 0
        while n < budget and len(self.inflight) < self.window:
            if self.resend:
                index, dup = self.resend.pop(0), True
            elif self.next < len(self.agent.messages):
                index, dup = self.next, False
                self.next += 1
            else:
                break
            self.pid = self.pid % 65535 + 1
            self.inflight[self.pid] = index
            message = self.agent.messages[index]
            self.out += publish_packet(self.topic, message, False, qos=1, mid=self.pid, dup=dup)
            n += 1
        return n

    def read(self) -> None:
        assert self.sock is not None
        data = self.sock.recv(65536)
        if not data:
            raise OSError("closed by the broker")
        self.inp += data
        at = 0
        while (packet := next_packet(self.inp, at)) is not None:
            header, start, at = packet
            if header != 0x40:
                raise AssertionError(f"unexpected packet {header:#x} for {self.agent.agent}")
            if self.inflight.pop(decode_puback(self.inp[start:at]), None) is not None:
                self.acked += 1
        del self.inp[:at]


class Fleet:
    """Simulated agents publishing (see the module docstring), in a thread of their own.

    ``rate`` caps the messages per second over the fleet (None: as fast as the broker
    acknowledges); ``inflight`` is each connection's window of unacknowledged messages;
    ``reconnect_s`` the wait before connecting again (the agent's first backoff is 0.25 to
    0.5 s). ``port`` may be a list (the nodes of a cluster): every agent connects to the first,
    and after a lost connection to the next."""

    def __init__(
        self,
        port: int | Sequence[int],
        agents: Sequence[SimAgent],
        *,
        rate: float | None = None,
        inflight: int = 32,
        reconnect_s: float = 0.5,
    ) -> None:
        ports = [port] if isinstance(port, int) else list(port)
        self.connections = [_Connection(agent, ports, inflight, reconnect_s) for agent in agents]
        self.rate = rate
        self.total = sum(len(a.messages) for a in agents)
        self.sent = 0
        self.error: BaseException | None = None
        self.started = 0.0
        self.finished = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fleet", daemon=True)

    @property
    def acked(self) -> int:
        return sum(c.acked for c in self.connections)

    def start(self) -> Fleet:
        self._thread.start()
        return self

    def join(self, timeout: float) -> None:
        """Wait until every message is acknowledged by the broker."""
        self._thread.join(timeout)
        if self.error is not None:
            raise AssertionError(f"fleet failed: {self.error}") from self.error
        if self._thread.is_alive():
            raise AssertionError(
                f"fleet: {self.acked} of {self.total} messages acknowledged after {timeout} s"
            )

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        try:
            self.started = time.monotonic()
            self._loop(selector)
            self.finished = time.monotonic()
        except BaseException as exc:
            self.error = exc
        finally:
            for c in self.connections:
                if c.sock is not None:
                    c.sock.close()
            selector.close()

    def _loop(self, selector: selectors.BaseSelector) -> None:
        registered: dict[socket.socket, _Connection] = {}

        def drop(c: _Connection) -> None:
            if c.sock is not None:
                selector.unregister(c.sock)
                registered.pop(c.sock, None)
            c.lost()

        while not self._stop.is_set():
            now = time.monotonic()
            if all(c.done for c in self.connections):
                return
            allowed = (
                self.total
                if self.rate is None
                else int(self.rate * (now - self.started)) + 1 - self.sent
            )
            for c in self.connections:
                if c.sock is None and now >= c.retry_at and c.open():
                    assert c.sock is not None
                    registered[c.sock] = c
                    selector.register(c.sock, selectors.EVENT_READ)
                if c.sock is not None and allowed > 0:
                    n = c.fill(min(allowed, 8))
                    allowed -= n
                    self.sent += n
                if c.sock is not None and c.out:
                    try:
                        sent = c.sock.send(c.out)
                        del c.out[:sent]
                    except BlockingIOError:
                        pass
                    except OSError:
                        drop(c)
            for key, _ in selector.select(0.005):
                c = registered[key.fileobj]  # type: ignore[index]
                try:
                    c.read()
                except OSError:
                    drop(c)


def main(argv: Sequence[str] | None = None) -> int:
    """A fleet in a process of its own (for the benchmark): seal, print 'ready', wait for a
    line on stdin, publish everything, print one JSON line of times (time.monotonic())."""
    parser = argparse.ArgumentParser(prog="python -m tests.support.agent_fleet")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--agents", type=int, required=True)
    parser.add_argument("--windows", type=int, required=True)
    parser.add_argument("--seed", required=True)
    parser.add_argument("--site", default="s1")
    parser.add_argument("--first-seq", type=int, default=1)
    parser.add_argument("--rate", type=float, default=None)
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args(argv)
    agents = make_agents(args.agents, args.site, seed=args.seed)
    total = fleet_messages(agents, args.windows, first_seq=args.first_seq)
    print("ready", total, flush=True)
    sys.stdin.readline()
    fleet = Fleet(args.port, agents, rate=args.rate).start()
    fleet.join(args.timeout)
    print(json.dumps({"messages": total, "started": fleet.started, "finished": fleet.finished}))
    return 0


if __name__ == "__main__":
    sys.exit(main())


def meta_of(site: str, agent: str, **privacy: object) -> dict[str, object]:
    """A meta payload (v2) as an agent in standard mode sends it, ``privacy`` fields
    replaced."""
    return meta_payload(
        SiteId(site),
        AgentId(agent),
        agent_version="0.1.0",
        window_s=300,
        epoch_length="midnight",
        epoch_timezone="Europe/Paris",
        thresholds={
            "rssi_threshold_dbm": -75,
            "min_dwell_s": 120,
            "visit_gap_s": 600,
            "lateness_s": 10,
            "presence_hold_s": 120,
        },
        privacy={
            "mode": "standard",
            "device_hash": "siphash-2-4",
            "key_bits": 128,
            "key_lifetime_s": 90000,
            "id_bits": None,
            "suppress_below": 5,
            "dp_epsilon": None,
            "dp_epsilon_day": None,
            "published": dict.fromkeys(STANDARD_PUBLISHES, True),
        }
        | privacy,
    )
