"""The tests' port allocator never hands a port out twice: not within a process, not to two
processes at once, not a port in use, not one from the kernel's ephemeral range."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ports
from tests.support.ports import HOST, PortAllocator, free_port, free_ports
from tests.support.shared import REPO

# A narrow range of our own, so that two allocators must meet; away from the shared one
# (20000 up) so that parallel test runs on the machine do not take its ports.
LOW, HIGH = 15_000, 15_120


def test_a_port_freed_again_is_not_handed_out_again() -> None:
    """The bug of issue 19: a port is free again once its socket closes, and bind(0) gave it
    to the next caller. Here a port given and then bound and released is never given again."""
    first = free_port()
    with socket.socket() as sock:
        sock.bind((HOST, first))
    later = free_ports(200)
    assert first not in later
    assert len(set(later)) == 200


def test_ports_lie_below_the_kernels_ephemeral_range() -> None:
    start = ports._ephemeral_start()
    assert all(ports.LOWEST <= port < start for port in free_ports(20))


def test_a_port_something_listens_on_is_skipped(tmp_path: Path) -> None:
    allocator = PortAllocator(LOW, HIGH, locks=tmp_path)
    with socket.socket() as busy:
        busy.bind((HOST, LOW))
        busy.listen()
        given = allocator.take_many(HIGH - LOW - 1)
        assert LOW not in given
        with pytest.raises(RuntimeError, match="no free loopback port left"):
            allocator.take()


TAKER = """
import sys
from pathlib import Path
from tests.support.ports import PortAllocator
allocator = PortAllocator({low}, {high}, locks=Path({locks!r}))
print(" ".join(map(str, allocator.take_many({n}))), flush=True)
sys.stdin.read()  # hold the ports until the test has both lists
"""


def test_two_processes_at_once_never_get_the_same_port(tmp_path: Path) -> None:
    """Two allocators in two live processes share a range exactly as large as both ask for:
    whatever their start, each skips the other's (locked) ports and together they cover it."""
    half = (HIGH - LOW) // 2
    code = TAKER.format(low=LOW, high=HIGH, locks=str(tmp_path), n=half)
    command = [sys.executable, "-c", code]
    pipe = subprocess.PIPE
    takers = [
        subprocess.Popen(command, cwd=REPO, text=True, stdin=pipe, stdout=pipe) for _ in range(2)
    ]
    try:
        lists = [set(map(int, t.stdout.readline().split())) for t in takers if t.stdout]
    finally:
        for taker in takers:
            taker.communicate("", timeout=10)
    assert [len(given) for given in lists] == [half, half]
    assert not lists[0] & lists[1]
    assert lists[0] | lists[1] == set(range(LOW, HIGH))
