"""``footfall-agent doctor``: is this access point ready to count? One table, a fix per failure.

Each check returns a :class:`Finding`: ``ok``, ``FAIL`` (with the command or setting that fixes
it) or ``skip`` (does not apply here, or cannot be checked because another check failed). The
exit status is 0 when nothing failed. The checks, in the order an installer fixes things:

* **interface** (live sources): exists, is up, is in monitor mode (or ``source.link_type`` says
  what its frames carry);
* **capabilities**: ``CAP_NET_RAW`` to capture, ``CAP_NET_ADMIN`` too when hopping channels;
* **frames**: probe requests actually arrive within a few seconds, and the kernel drops none;
* **clock**: the kernel says the clock is synchronised (windows are stamped with it);
* **broker**: reachable, TLS verified, credentials accepted (a session of its own, no will);
* **signing key**: present, private (0600), readable as a key; its public key for enrolment;
* **spool**: the state directory is writable, the spool opens, some free space is left;
* **numba cache**: the compiled kernels load from the cache (a cold cache costs a long start).

Nothing here prints an address, a device id or an SSID: frames are only counted.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

from firmware_agent import anonymize, capture, count, estimate, kernels, live, parse
from firmware_agent.broker_session import BrokerSession
from firmware_agent.capture import CaptureReader
from firmware_agent.errors import AgentError
from firmware_agent.live import IFACE_PREFIX, LiveCapture, interface_facts
from firmware_agent.messages import public_key_text
from firmware_agent.pipeline import Pipeline
from firmware_agent.settings import AgentConfig
from firmware_agent.signing import KEY_FILE, load_signing_key
from firmware_agent.spool import SPOOL_FILE, Spool

__all__ = ["Finding", "print_table", "run_checks"]

OK, FAIL, SKIP = "ok", "FAIL", "skip"
_CAP_NET_ADMIN, _CAP_NET_RAW = 12, 13
_MIN_FREE_BYTES = 50 << 20
_TIME_ERROR = 5  # adjtimex(2): the clock is not synchronised
_SAMPLE = Path(__file__).with_name("data") / "sample.pcap"


@dataclass(frozen=True, slots=True)
class Finding:
    check: str
    status: str  # OK, FAIL or SKIP
    detail: str
    fix: str = ""


def _capabilities() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def check_interface(config: AgentConfig) -> Finding:
    path = config.source.path
    if not path.startswith(IFACE_PREFIX):
        return Finding("interface", SKIP, f"source.path is {path!r}, not a live interface")
    iface = path.removeprefix(IFACE_PREFIX)
    try:
        hatype, link_type, up = interface_facts(iface)
    except AgentError as exc:
        return Finding("interface", FAIL, str(exc), "create it: systemctl start footfall-monitor "
                       "(hardware/footfall-monitor.service)")  # fmt: skip
    if not up:
        return Finding("interface", FAIL, f"{iface} is down", f"ip link set {iface} up")
    if link_type:
        return Finding("interface", OK, f"{iface}: monitor mode, up (hardware type {hatype})")
    if config.live.link_type is not None:
        return Finding("interface", OK, f"{iface}: up, link type {config.live.link_type} "
                       "from source.link_type")  # fmt: skip
    return Finding(
        "interface",
        FAIL,
        f"{iface} is not in monitor mode (hardware type {hatype})",
        f"iw dev {iface} set type monitor (or make one: iw phy <phy> interface add mon0 type "
        "monitor)",
    )


def check_capabilities(config: AgentConfig) -> Finding:
    caps = _capabilities()
    needed = {"CAP_NET_RAW": _CAP_NET_RAW}
    if config.live.hop:
        needed["CAP_NET_ADMIN"] = _CAP_NET_ADMIN
    missing = [name for name, bit in needed.items() if not caps >> bit & 1]
    if missing:
        return Finding(
            "capabilities",
            FAIL,
            f"missing {', '.join(missing)}",
            "run as root, or as the service: AmbientCapabilities=CAP_NET_RAW CAP_NET_ADMIN "
            "(hardware/footfall-agent.service)",
        )
    return Finding("capabilities", OK, ", ".join(needed))


def check_frames(config: AgentConfig, sample_s: float, interface: Finding) -> Finding:
    if interface.status != OK:
        return Finding("frames", SKIP, "needs a working live interface")
    iface = config.source.path.removeprefix(IFACE_PREFIX)
    frames = 0
    try:  # without hopping: a running agent may be hopping this interface already
        with LiveCapture(iface, replace(config.live, hop=False), idle_s=0.1) as source:
            timer = threading.Timer(sample_s, source.stop)
            timer.start()
            for batch in source:
                frames += len(batch)
            timer.cancel()
            stats = source.kernel_stats()
    except AgentError as exc:
        return Finding("frames", FAIL, str(exc), "see the interface and capabilities checks")
    rate = frames / sample_s
    detail = f"{frames} probe requests in {sample_s:g} s ({rate:.1f}/s), {stats.drops} dropped"
    if frames == 0:
        return Finding(
            "frames",
            FAIL,
            detail,
            f"is the adapter's antenna on, the channel busy (iw dev {iface} info), and "
            "NetworkManager leaving the interface alone (nmcli device status)?",
        )
    if stats.drops:
        return Finding("frames", FAIL, detail, "the agent falls behind: a faster board, or "
                       "source.ring_mb larger")  # fmt: skip
    return Finding("frames", OK, detail)


def clock_state() -> tuple[int, int]:
    """(adjtimex state, max error in microseconds) of the system clock."""
    libc = ctypes.CDLL(None, use_errno=True)
    timex = ctypes.create_string_buffer(512)  # struct timex, modes = 0: read only
    state = int(libc.adjtimex(timex))
    return state, struct.unpack_from("Iqqq", timex)[3]


def check_clock() -> Finding:
    state, maxerror_us = clock_state()
    if state < 0:
        return Finding("clock", SKIP, f"adjtimex failed: {os.strerror(ctypes.get_errno())}")
    if state == _TIME_ERROR:
        return Finding(
            "clock",
            FAIL,
            "not synchronised (windows and epochs follow this clock)",
            "timedatectl set-ntp true (systemd-timesyncd), or install chrony",
        )
    return Finding("clock", OK, f"synchronised, max error {maxerror_us / 1000:.0f} ms")


def check_broker(config: AgentConfig) -> Finding:
    broker = config.broker
    site, agent = config.identity.site, config.identity.agent
    try:
        with BrokerSession(broker, f"footfall-{site}-{agent}-doctor"):
            pass
    except AgentError as exc:
        return Finding("broker", FAIL, str(exc), "check broker.host, broker.port, broker.tls_ca "
                       "and the account: footfall-agent enroll prints what to set up")  # fmt: skip
    tls = "TLS" if broker.tls_ca else "no TLS"
    user = f"as {broker.username!r}" if broker.username else "anonymously"
    return Finding("broker", OK, f"{broker.address} ({tls}) accepted {site}/{agent} {user}")


def check_signing_key(config: AgentConfig) -> Finding:
    config_dir = config.identity.config_dir
    try:
        key = load_signing_key(config_dir)
    except AgentError as exc:
        return Finding("signing key", FAIL, str(exc), "footfall-agent keygen, then enrol the key "
                       "(footfall-agent enroll)")  # fmt: skip
    public = public_key_text(key)
    return Finding("signing key", OK, f"{config_dir / KEY_FILE} (0600), public key "
                   f"{public[:12]}...; footfall-agent enroll prints the rest")  # fmt: skip


def check_spool(config: AgentConfig) -> Finding:
    state_dir = config.identity.state_dir
    fix = f"mkdir -p {state_dir} and make it the agent user's (the unit's StateDirectory does it)"
    if not os.access(state_dir, os.W_OK):
        return Finding("spool", FAIL, f"{state_dir} is missing or not writable", fix)
    try:
        with Spool(state_dir / SPOOL_FILE, config.spool) as spool:
            pending = spool.state().pending
    except AgentError as exc:
        return Finding("spool", FAIL, str(exc), fix)
    free = shutil.disk_usage(state_dir).free
    detail = f"{state_dir / SPOOL_FILE}: {pending} windows waiting, {free / 1e9:.1f} GB free"
    if free < _MIN_FREE_BYTES:
        return Finding("spool", FAIL, detail, "free some space on the state directory's disk")
    return Finding("spool", OK, detail)


def _kernels() -> Iterator[Any]:
    """numba's dispatchers (the JIT's kernels)."""
    from numba.core.registry import CPUDispatcher  # noqa: PLC0415 (not under the AOT build)

    for module in (capture, parse, anonymize, count, estimate, live):
        for value in vars(module).values():
            if isinstance(value, CPUDispatcher):
                yield value


def _replay_sample(config: AgentConfig) -> float:
    started = time.monotonic()
    with CaptureReader(_SAMPLE, in_place=True) as reader:
        for _ in Pipeline(config).run(reader):
            pass
    return time.monotonic() - started


def check_numba_cache(config: AgentConfig) -> Finding:
    """Run the bundled sample through the pipeline: every kernel loads (or compiles)."""
    if kernels.AOT is not None:
        took = _replay_sample(config)
        return Finding("numba cache", OK, f"not needed: kernels compiled ahead of time "
                       f"({kernels.AOT.__file__}), sample replayed in {took:.1f} s")  # fmt: skip
    dispatchers = list(_kernels())
    compiled_before = sum(sum(k.stats.cache_misses.values()) for k in dispatchers)
    took = _replay_sample(config)
    misses = sum(sum(k.stats.cache_misses.values()) for k in dispatchers) - compiled_before
    where = os.environ.get("NUMBA_CACHE_DIR") or "__pycache__ beside the agent's modules"
    if misses:
        return Finding(
            "numba cache",
            FAIL,
            f"cold: {misses} kernels compiled in {took:.0f} s (now cached in {where})",
            "run doctor again as the agent's user (the unit sets NUMBA_CACHE_DIR to a "
            "directory it can write), or start the agent once",
        )
    return Finding("numba cache", OK, f"warm: {len(dispatchers)} kernels loaded in {took:.1f} s "
                   f"from {where}")  # fmt: skip


def run_checks(config: AgentConfig, sample_s: float = 5.0) -> list[Finding]:
    interface = check_interface(config)
    capabilities = check_capabilities(config)
    if capabilities.status != OK and interface.status == OK:
        frames = Finding("frames", SKIP, "needs CAP_NET_RAW")
    else:
        frames = check_frames(config, sample_s, interface)
    steps: list[Callable[[], Finding]] = [
        check_clock,
        lambda: check_broker(config),
        lambda: check_signing_key(config),
        lambda: check_spool(config),
        lambda: check_numba_cache(config),
    ]
    return [interface, capabilities, frames, *(step() for step in steps)]


def print_table(findings: list[Finding], out: TextIO | None = None) -> None:
    out = out or sys.stdout
    width = max(len(f.check) for f in findings)
    out.write(f"{'check':<{width}}  {'':<4}  result\n")
    for f in findings:
        out.write(f"{f.check:<{width}}  {f.status:<4}  {f.detail}\n")
        if f.fix:
            out.write(f"{'':<{width}}        fix: {f.fix}\n")
    failed = sum(f.status == FAIL for f in findings)
    out.write(f"{failed} of {len(findings)} checks failed\n" if failed else "all checks passed\n")
    out.flush()
