"""``footfall-agent doctor``: is this access point ready to count? One table, a fix per failure.

Each check returns a :class:`Finding`: ``ok``, ``FAIL`` (with the command or setting that fixes
it) or ``skip`` (does not apply here, or cannot be checked because another check failed). The
exit status is 0 when nothing failed. The checks, in the order an installer fixes things:

* **interface** (live sources): exists, is up, is in monitor mode (or ``source.link_type`` says
  what its frames carry);
* **capabilities**: ``CAP_NET_RAW`` to capture, ``CAP_NET_ADMIN`` too when hopping channels;
* **frames**: probe requests actually arrive within a few seconds, and the kernel drops none;
* **clock**: the kernel says the clock is synchronised (windows are stamped with it);
* **identity**: site, agent id and time zone set in the file, not left to defaults (the host
  name, the system's zone): a warning, since the agent runs with them, but they bite later;
* **signing key**: present, private (0600), readable as a key; its public key for enrolment;
* **broker**: reachable, TLS verified, credentials accepted (a session of its own, no will);
* **acl**: the broker takes a publish on the agent's own topic (its signed meta message, as the
  agent sends at start) and refuses one outside it (``footfall/v1/<site>/<agent>~/meta``, which
  no agent owns): MQTT 5 says so in the acknowledgement, MQTT 3.1.1 cannot;
* **stored**: the aggregator stores this agent's windows: its retained receipt
  (``aggregator/receipts.py``) is there and verifies with ``broker.receipt_key``. The agent
  cannot see why there is none; ``footfall-aggregator agents check SITE AGENT`` on the
  aggregator can (site missing, key not enrolled, messages refused);
* **spool**: the state directory is writable, the spool opens, some free space is left;
* **numba cache**: the compiled kernels load from the cache (a cold cache costs a long start).

Nothing here prints an address, a device id or an SSID: frames are only counted.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import nacl.signing

from firmware_agent import BUNDLED_SAMPLE, kernels
from firmware_agent.contract.checks import FAIL, OK, SKIP, WARN, Finding
from firmware_agent.contract.errors import AgentError, BrokerError, MessageError
from firmware_agent.contract.messages import (
    TOPIC_ROOT,
    Envelope,
    Topic,
    public_key_text,
    seal,
    settled_ranges,
)
from firmware_agent.contract.signing import KEY_FILE, load_signing_key
from firmware_agent.service.broker_session import BrokerSession
from firmware_agent.service.config import AgentConfig
from firmware_agent.service.spool import SPOOL_FILE, Spool
from firmware_agent.stages import anonymize, capture, count, estimate, live, parse
from firmware_agent.stages.capture import CaptureReader
from firmware_agent.stages.live import IFACE_PREFIX, LiveCapture, interface_facts
from firmware_agent.stages.pipeline import Pipeline

__all__ = ["run_checks"]

_CAP_NET_ADMIN, _CAP_NET_RAW = 12, 13
_MIN_FREE_BYTES = 50 << 20
_TIME_ERROR = 5  # adjtimex(2): the clock is not synchronised
_RECEIPT_WAIT_S = 2.0  # a retained receipt arrives right after the subscription


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
                       "and the account (broker.username, broker.password): footfall-agent enrol "
                       "prints what to set up")  # fmt: skip
    tls = "TLS" if broker.tls_ca else "no TLS"
    user = f"as {broker.username!r}" if broker.username else "anonymously"
    return Finding("broker", OK, f"{broker.address} ({tls}) accepted {site}/{agent} {user}")


def _config_flag(config: AgentConfig) -> str:
    """`` --config FILE`` for a fix's command, when the settings came from a file."""
    return f" --config {config.file}" if config.file is not None else ""


def _file(config: AgentConfig) -> str:
    return str(config.file) if config.file is not None else "/etc/footfall/agent.toml"


def check_identity(config: AgentConfig) -> Finding:
    """Site, agent id and time zone: set on purpose, not the defaults (a warning)."""
    sources = config.sources
    site, agent = config.identity.site, config.identity.agent
    zone = str(config.values["epoch.timezone"])
    unset = []
    if sources["agent.site"] == "default":
        unset.append(f"agent.site is the default {site.value!r}")
    if sources["agent.id"] == "default":
        unset.append(f"agent.id is this host's name {agent.value!r}")
    if not zone:
        unset.append(f"epoch.timezone is empty: midnight follows this system's zone ({_zone()})")
    if unset:
        return Finding("identity", WARN, "; ".join(unset), f"set them in {_file(config)}: "
                       "agent.site (the site the aggregator's admin made), agent.id, "
                       "epoch.timezone (the shop's IANA zone, e.g. Europe/Paris)")  # fmt: skip
    return Finding("identity", OK, f"site {site}, agent {agent}, time zone {zone}")


def _zone() -> str:
    try:
        return os.readlink("/etc/localtime").split("zoneinfo/", 1)[-1]
    except OSError:
        return time.strftime("%Z")


def check_acl(config: AgentConfig) -> Finding:
    """The broker takes the agent's own meta message and refuses one on a topic no agent owns."""
    from firmware_agent.service.run import agent_meta  # noqa: PLC0415 (the publisher's stack)

    site, agent = config.identity.site, config.identity.agent
    own = Topic(site, agent, "meta")
    outside = f"{TOPIC_ROOT}/{site}/{agent}~/meta"  # no agent's: '~' is in no id
    fix = (f"the broker's ACL (hardware/mosquitto/footfall.acl, in /etc/mosquitto/) and the "
           f"account's name: broker.username must be '{site}/{agent}'")  # fmt: skip
    try:
        key = load_signing_key(config.identity.config_dir)
    except AgentError:
        return Finding("acl", SKIP, "needs the signing key (its meta message is signed)")
    with BrokerSession(config.broker, f"footfall-{site}-{agent}-doctor") as session:
        try:
            session.publish(str(own), seal(agent_meta(config), key), retain=True)
        except BrokerError as exc:
            return Finding("acl", FAIL, str(exc), fix)
        if config.broker.protocol != "5":
            return Finding("acl", OK, f"{own} accepted; MQTT 3.1.1 does not say whether "
                           f"{outside} is refused (broker.protocol = '5' does)")  # fmt: skip
        try:
            session.publish(outside, b"", retain=False)
        except BrokerError:
            return Finding("acl", OK, f"{own} accepted, {outside} refused")
    return Finding("acl", FAIL, f"{outside} accepted: this account may write other agents' "
                   "topics", fix)  # fmt: skip


def check_stored(config: AgentConfig) -> Finding:
    """The aggregator's retained receipt for this agent: there, and signed with its key."""
    site, agent = config.identity.site, config.identity.agent
    topic = Topic(site, agent, "receipt")
    key = config.broker.receipt_verify_key  # checked where the settings were loaded
    if key is None:
        return Finding(
            "stored",
            FAIL,
            "broker.receipt_key is empty: nothing tells this agent what the aggregator stores",
            "on the aggregator, footfall-aggregator receipt-key prints it: set "
            f"broker.receipt_key in {_file(config)}",
        )
    with BrokerSession(config.broker, f"footfall-{site}-{agent}-doctor") as session:
        body = next((b for _, b in session.listen(str(topic), _RECEIPT_WAIT_S) if b), None)
    why = (f"on the aggregator, footfall-aggregator agents check {site} {agent} says why (site "
           "missing, key not enrolled, messages refused); if the agent has not run yet: "
           "systemctl start footfall-agent, and run doctor again once a window is over "
           f"(count.window_s = {config.count.window_s} s)")  # fmt: skip
    if body is None:
        return Finding("stored", FAIL, f"no receipt on {topic}: the aggregator has stored no "
                       "window of this agent", why)  # fmt: skip
    return _receipt_finding(body, topic, key)


def _receipt_finding(body: bytes, topic: Topic, key: nacl.signing.VerifyKey) -> Finding:
    try:
        envelope = Envelope.parse(body)
        if envelope.topic != topic:
            raise MessageError(f"it names {envelope.topic}")
        payload = envelope.verify(key)
        settled_ranges(payload)
    except MessageError as exc:
        return Finding("stored", FAIL, f"the receipt on {topic} is not one: {exc}",
                       "broker.receipt_key must be what footfall-aggregator receipt-key "
                       "prints")  # fmt: skip
    return Finding("stored", OK, f"the aggregator holds windows {payload['first_seq']} to "
                   f"{payload['through_seq']} (last {payload['last_seq']}, "
                   f"{len(payload['gaps'])} gaps), receipt of {payload['at']}")  # fmt: skip


def check_signing_key(config: AgentConfig) -> Finding:
    config_dir = config.identity.config_dir
    try:
        key = load_signing_key(config_dir)
    except AgentError as exc:
        return Finding("signing key", FAIL, str(exc), f"footfall-agent keygen{_config_flag(config)}"
                       f", then enrol it (footfall-agent enrol{_config_flag(config)})")  # fmt: skip
    public = public_key_text(key)
    return Finding("signing key", OK, f"{config_dir / KEY_FILE} (0600), public key "
                   f"{public[:12]}...; footfall-agent enrol prints the rest")  # fmt: skip


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
    with CaptureReader(BUNDLED_SAMPLE, in_place=True) as reader:
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
    """Every check, in the order an installer fixes things."""
    identity = check_identity(config)
    interface = check_interface(config)
    capabilities = check_capabilities(config)
    if capabilities.status != OK and interface.status == OK:
        frames = Finding("frames", SKIP, "needs CAP_NET_RAW")
    else:
        frames = check_frames(config, sample_s, interface)
    clock = check_clock()
    key = check_signing_key(config)
    broker = check_broker(config)
    if broker.status != OK:
        acl = Finding("acl", SKIP, "needs a broker login")
        stored = Finding("stored", SKIP, "needs a broker login")
    else:
        acl = check_acl(config)
        stored = check_stored(config)
    steps: list[Callable[[], Finding]] = [
        lambda: check_spool(config),
        lambda: check_numba_cache(config),
    ]
    found = [identity, interface, capabilities, frames, clock, key, broker, acl, stored]
    return found + [step() for step in steps]
