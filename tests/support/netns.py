"""A veth pair with one end in a network namespace of its own: a radio without a radio.

``tcpreplay`` (or anything else) sends a capture's frames, byte for byte, into the end inside
the namespace; the agent reads the other end, in the root namespace, with the link type
overridden to radiotap (a veth is an Ethernet device, but it carries whatever bytes it is
given). The agent's end has IPv6 off and no address, so the kernel never sends anything of its
own on it; nothing leaves the pair.

The fixture needs root (``ip netns``, ``AF_PACKET``) and ``ip`` and ``tcpreplay``: without them
it skips, saying why, except under ``CI`` (set by ``.ci/run``), where it fails.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

NEEDED = ("ip", "tcpreplay")
LINKTYPE_ETHERNET = 1


def require(condition: bool, reason: str) -> None:
    """Skip with ``reason`` unless ``condition``; under CI, fail instead."""
    if condition:
        return
    if os.environ.get("CI"):
        pytest.fail(reason + " (CI is set: the namespace tests must run)")
    pytest.skip(reason)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass(frozen=True)
class Veth:
    namespace: str
    inject: str  # inside the namespace
    agent: str  # in the root namespace: what the agent reads

    def replay(
        self, capture: Path, work: Path, *, pps: int | None = None, limit: int | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Send the frames of a pcap into the pair, at ``pps`` frames per second
        (``--topspeed`` without it); with ``limit``, that many frames, looping the capture."""
        frames = as_ethernet(capture, work / f"{capture.stem}.eth.pcap")
        rate = [f"--pps={pps}"] if pps else ["--topspeed"]
        count = [f"--limit={limit}", "--loop=0"] if limit else []
        return subprocess.run(
            ["ip", "netns", "exec", self.namespace, "tcpreplay", "-q", "--preload-pcap",
             *rate, *count, "-i", self.inject, str(frames)],
            check=True, capture_output=True, text=True,
        )  # fmt: skip


def as_ethernet(capture: Path, out: Path) -> Path:
    """A copy of a pcap whose header says Ethernet: tcpreplay refuses to send radiotap (127)
    frames, but sends Ethernet ones as the bytes they are, which is all a veth needs."""
    if out.exists():
        return out
    data = bytearray(capture.read_bytes())
    order = "<" if data[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    if data[:4] not in (
        b"\xd4\xc3\xb2\xa1",
        b"\x4d\x3c\xb2\xa1",
        b"\xa1\xb2\xc3\xd4",
        b"\xa1\xb2\x3c\x4d",
    ):
        raise ValueError(f"{capture}: not a pcap file (pcapng is not rewritten here)")
    data[20:24] = struct.pack(order + "I", LINKTYPE_ETHERNET)
    out.write_bytes(bytes(data))
    return out


@contextmanager
def veth_pair() -> Iterator[Veth]:
    """A fresh veth pair and namespace with unique names, removed whatever happens (root)."""
    suffix = uuid.uuid4().hex[:8]
    pair = Veth(f"footfall-{suffix}", f"ffi{suffix}", f"ffa{suffix}")
    _ip("netns", "add", pair.namespace)
    try:
        _ip("link", "add", pair.agent, "type", "veth", "peer", "name", pair.inject,
            "netns", pair.namespace)  # fmt: skip
        Path(f"/proc/sys/net/ipv6/conf/{pair.agent}/disable_ipv6").write_text("1\n")
        _ip("link", "set", pair.agent, "mtu", "9000", "up")
        _ip("-n", pair.namespace, "link", "set", pair.inject, "mtu", "9000", "up")
        yield pair
    finally:
        subprocess.run(["ip", "link", "del", pair.agent], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", pair.namespace], capture_output=True, check=False)


@pytest.fixture
def veth() -> Iterator[Veth]:
    """A veth pair for one test; skips (or fails under CI) without root, ip or tcpreplay."""
    require(os.geteuid() == 0, "the namespace tests need root (ip netns, AF_PACKET sockets)")
    missing = [tool for tool in NEEDED if shutil.which(tool) is None]
    require(not missing, f"the namespace tests need {', '.join(missing)}: apt-get install "
            "iproute2 tcpreplay (.ci/run does it)")  # fmt: skip
    with veth_pair() as pair:
        yield pair
