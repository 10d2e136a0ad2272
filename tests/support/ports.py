"""The one place the tests get loopback ports for the servers they start (brokers, NATS nodes,
relays, the app, the demo, metrics endpoints).

Asking the kernel for a free port (``bind(("127.0.0.1", 0))``, read the number, close) and then
asking again can give the same number twice: the first port is free again the moment its socket
closes, long before the broker meant for it binds it. A clean-clone run of the README's test
command failed on exactly that (issue 19). Three rules here make a double hand-out impossible:

* **Never twice in a process**: every port handed out is remembered until the process ends, so a
  broker that was stopped (its port free for a moment) never has its port given to another.
* **Never twice across processes**: each port is held by an exclusive ``flock`` on a file named
  after it in a directory shared by every test run on the machine, until this process ends (the
  kernel drops the lock when the process dies, however it dies). Two pytest runs side by side
  (CI's, a developer's, ``pytest-xdist`` workers) skip each other's ports.
* **Never a port the kernel hands to clients**: ports come from below the kernel's ephemeral range
  (``net.ipv4.ip_local_port_range``, 32768-60999 by default), from which every outgoing
  connection takes its local port. A port from ``bind(0)`` is in that range, so a client's
  connection could take it between our choosing it and the broker's binding it.

Each candidate is bound once (without ``SO_REUSEADDR``) to prove that nothing else on the machine
listens on it or lingers on it in ``TIME_WAIT``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
import socket
import tempfile
import threading
from pathlib import Path

HOST = "127.0.0.1"
LOWEST = 20_000
LOCKS = Path(tempfile.gettempdir()) / "footfall-test-ports"


def _ephemeral_start() -> int:
    """The first port of the kernel's ephemeral range (where client connections take theirs)."""
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


class PortAllocator:
    """Hands out loopback ports that no other caller, in this process or another, was given."""

    def __init__(self, lowest: int = LOWEST, highest: int | None = None, locks: Path = LOCKS):
        """Ports in ``[lowest, highest)``; ``highest`` is the kernel's first ephemeral port."""
        self.lowest = lowest
        self.highest = _ephemeral_start() if highest is None else highest
        if self.highest - self.lowest < 100:
            raise RuntimeError(
                f"ports {self.lowest}-{self.highest}: too few below the ephemeral range "
                "(net.ipv4.ip_local_port_range); lower its start or the allocator's lowest"
            )
        self.locks = locks
        self._given: set[int] = set()
        self._held: list[int] = []  # open lock files: closing one would free its port
        self._mutex = threading.Lock()
        # A different start per process spreads parallel runs apart; the locks keep them apart.
        self._next = random.Random(os.getpid()).randrange(self.lowest, self.highest)

    def take(self) -> int:
        """A port distinct from every port handed out before."""
        return self.take_many(1)[0]

    def take_many(self, n: int) -> list[int]:
        """``n`` ports, distinct from each other and from every port handed out before."""
        with self._mutex:
            if not self.locks.is_dir():
                self.locks.mkdir(parents=True, exist_ok=True)
                self.locks.chmod(0o1777)  # every user's runs share it
            return [self._take_one() for _ in range(n)]

    def _take_one(self) -> int:
        for _ in range(self.highest - self.lowest):
            port = self._next
            self._next = self._next + 1 if self._next + 1 < self.highest else self.lowest
            if port in self._given or not _bindable(port):
                continue
            fd = os.open(self.locks / str(port), os.O_CREAT | os.O_RDONLY, 0o444)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                os.close(fd)
                if error.errno in (errno.EAGAIN, errno.EACCES):
                    continue  # another live test process holds it
                raise
            self._given.add(port)
            self._held.append(fd)
            return port
        raise RuntimeError(f"no free loopback port left in {self.lowest}-{self.highest}")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


_ALLOCATOR = PortAllocator()


def free_port() -> int:
    """A loopback port no one else in this run (or a parallel one) was or will be given."""
    return _ALLOCATOR.take()


def free_ports(n: int) -> list[int]:
    """``n`` distinct such ports."""
    return _ALLOCATOR.take_many(n)
