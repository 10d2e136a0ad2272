"""The hostile-message suite (issue 16): 62 kinds of message, each refused with its own reason,
while a valid window from another agent sent after each is stored within a second.

One Mosquitto, one store and one ingest process (``footfall-aggregator ingest``, the real
command) serve the whole module, once on SQLite and once on PostgreSQL (a schema of its own).
Each kind comes from an agent of its own (``kNN``, with its broker account), so the
``refusals`` table tells its reason apart from every other kind's: each test reads the rows
its message added. Among the kinds are the two stalls of issue 16 (a window dated 9999-12-31
in a UTC site or 0001-01-01 in New York: the roll-up's ``OverflowError`` killed the store
thread; a replayed signature with ``\\n`` after it: the 89-character value failed
PostgreSQL's insert, and SQLite stored it), a window the database itself refuses (seq 666:
quarantined, the rest of its batch stored), made-up agents (counted as one row of their
site, not a row each), and a 100 MB message, which the broker drops for ingest because
ingest announced its MQTT 5 Maximum Packet Size (its peak memory is read). A window refused
for its content after its signature verified is quarantined with its text and settled (its
agent's receipt covers it); a bad signature or a schema refusal settles nothing. The module
ends with SIGTERM: ingest exits 0 within its grace period.
"""

from __future__ import annotations

import base64
import itertools
import json
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from aggregator.config import StoreSettings
from aggregator.store import Store
from aggregator.verify import Accepted, Verifier
from firmware_agent.contract.messages import (
    AgentId,
    SiteId,
    canonical_json,
    status_payload,
    utc_text,
)
from tests.aggregator.test_ingest import AgentAccount, _config_file, _spawn
from tests.support.agent_fleet import WINDOW, meta_of
from tests.support.aggregator_harness import (
    Agent,
    drop_schema,
    pg_dsn,
    refuse_seq_666,
    stored_seqs,
)
from tests.support.mqtt_broker import HOST, Mosquitto, TestCertificates, wait_for

NOW = int(time.time())
DAY = NOW - NOW % 86400 - 86400  # yesterday, 00:00 UTC
OLD = DAY - 100 * 86400  # past store.retention_days (90)
SITE, YORK = "hx", "hy"
GOOD = Agent(SITE, "good")
NOISY = Agent(SITE, "noisy")  # its meta says it adds noise (standard mode)
GOOD_SEQ = itertools.count(1)
MB_100 = 100 << 20
B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

Payload = dict[str, Any]


def window(who: Agent, seq: int = 1, slot: int = 0, **fields: Any) -> Payload:
    """A valid counts payload of ``who`` (its ``slot``-th 5-minute window of yesterday),
    fields replaced by ``fields``."""
    counts = WINDOW | {"window_start": utc_text(DAY + 300 * slot)}
    header = {"kind": "counts", "v": 1, "site": who.site, "agent": who.agent, "seq": seq}
    return header | {"epoch": "9f3c1a7e52b04d68"} | counts | fields


def signed(agent: Agent, payload: Payload, *, key_of: Agent | None = None) -> bytes:
    """The envelope of ``payload`` signed by ``agent`` (or ``key_of``), checked by nobody."""
    key = (key_of or agent).key
    sig = base64.b64encode(key.sign(canonical_json(payload)).signature).decode()
    return canonical_json({"alg": "ed25519", "payload": payload, "sig": sig})


def edited(body: bytes, edit: Callable[[dict[str, Any]], None]) -> bytes:
    envelope = json.loads(body)
    edit(envelope)
    return json.dumps(envelope).encode()


@dataclass
class Kind:
    """One hostile kind: its messages (after ``prior`` ones, stored first) and what it adds
    to the refusals table."""

    name: str
    agent: Agent
    reason: str | None  # None: the broker drops it (never reaches ingest)
    messages: Callable[[Agent], list[bytes]]
    topic_kind: str = "counts"
    prior: Callable[[Agent], list[bytes]] = field(default=lambda _a: [])
    enrolled: bool = True
    revoked: bool = False
    counted_as: tuple[str, str] | None = None  # (site, agent) of the refusals row

    @property
    def row(self) -> tuple[str, str, str]:
        site, agent = self.counted_as or (self.agent.site, self.agent.agent)
        return (self.reason or "", site, agent)


def _sig_edit(edit: Callable[[str], str]) -> Callable[[Agent], list[bytes]]:
    def make(a: Agent) -> list[bytes]:
        return [edited(signed(a, window(a)), lambda e: e.update(sig=edit(e["sig"])))]

    return make


def _payload(**fields: Any) -> Callable[[Agent], list[bytes]]:
    return lambda a: [signed(a, window(a, **fields))]


def _deep(_a: Agent) -> list[bytes]:
    return [b'{"alg":"ed25519","payload":' + b"[" * 3000 + b"]" * 3000 + b"}"]


def _other_bits(sig: str) -> str:
    """The same 64 bytes: the last character before "==" carries 4 bits base64 drops."""
    return sig[:85] + B64[B64.index(sig[85]) | 1] + "=="


def _kinds() -> list[Kind]:
    out: list[Kind] = []

    def kind(
        name: str, reason: str | None, messages: Callable[[Agent], list[bytes]], **kw: Any
    ) -> None:
        agent = Agent(kw.pop("site", SITE), kw.pop("agent_id", f"k{len(out) + 1:02d}"))
        out.append(Kind(name, agent, reason, messages, **kw))

    stored_first = {"prior": lambda a: [signed(a, window(a))]}
    # The bytes themselves.
    kind("not UTF-8", "not_utf8", lambda a: [b'{"alg":"ed\xff\xfe25519"}'])
    kind("not JSON", "not_json", lambda a: [b"counts!"])
    kind("empty", "not_json", lambda a: [b""])
    kind(
        "NaN for a count",
        "not_json",
        lambda a: [signed(a, window(a)).replace(b'"devices":11', b'"devices":NaN')],
    )
    kind("JSON nested 3,000 deep", "too_deep", _deep)
    kind(
        "66,000 bytes: over ingest.max_message_bytes",
        "too_large",
        lambda a: [b"{" + b" " * 66_000 + b"}"],
    )
    # The envelope.
    kind("a JSON array", "schema", lambda a: [b"[]"])
    kind("a JSON string", "schema", lambda a: [b'"counts"'])
    kind("no signature", "schema", lambda a: [edited(signed(a, window(a)), lambda e: e.pop("sig"))])
    kind(
        "a field beside the envelope's",
        "schema",
        lambda a: [edited(signed(a, window(a)), lambda e: e.update(note="x"))],
    )
    kind(
        "alg none",
        "schema",
        lambda a: [edited(signed(a, window(a)), lambda e: e.update(alg="none"))],
    )
    kind(
        "replayed with a newline after the signature (stall 2)",
        "schema",
        _sig_edit(lambda s: s + "\n"),
        **stored_first,
    )
    kind("signature of 85 characters", "schema", _sig_edit(lambda s: s[1:]))
    kind("signature with a character outside base64", "schema", _sig_edit(lambda s: "!" + s[1:]))
    kind("signature spelled with other trailing bits", "sig_encoding", _sig_edit(_other_bits))
    # The payload's schema.
    kind("a mac field", "schema", _payload(mac="aa:bb:cc:dd:ee:ff"))
    kind(
        "no devices",
        "schema",
        lambda a: [signed(a, {k: v for k, v in window(a).items() if k != "devices"})],
    )
    kind("an unknown kind", "schema", _payload(kind="counts2"))
    kind("an unknown version", "schema", _payload(v=3))
    kind("11.0 for 11", "schema", _payload(devices=11.0))
    kind("true for a count", "schema", _payload(malformed=True))
    kind("a negative count", "schema", _payload(late_frames=-1))
    kind("a count above 2^53 - 1", "schema", _payload(probe_requests=2**53))
    kind("a count as a string", "schema", _payload(probe_requests="96"))
    kind("a site with a newline", "schema", lambda a: [signed(a, window(a, site=a.site + "\n"))])
    kind(
        "a window start with a newline",
        "schema",
        lambda a: [signed(a, window(a, window_start=utc_text(DAY) + "\n"))],
    )
    kind("30 February", "schema", _payload(window_start="2024-02-30T10:00:00Z"))
    kind(
        "a window start with an offset",
        "schema",
        _payload(window_start="2024-03-05T10:00:00+01:00"),
    )
    kind("an epoch in capitals", "schema", _payload(epoch="9F3C1A7E52B04D68"))
    kind("seq 0", "schema", lambda a: [signed(a, window(a, seq=0))])
    kind(
        "a dwell band missing",
        "schema",
        _payload(dwell_minutes={"lt5": 5, "5-15": 5, "15-30": 1, "30-60": 1}),
    )
    kind("an escaped NUL", "schema", _payload(epoch="9f3c1a7e52b04d6\u0000"))
    # The topic and the agent.
    kind(
        "the payload names another agent",
        "topic_mismatch",
        lambda a: [signed(a, window(a, agent="good"))],
    )
    kind(
        "counts on the status topic",
        "topic_mismatch",
        lambda a: [signed(a, window(a))],
        topic_kind="status",
    )
    kind(
        "a topic in capitals",
        "bad_topic",
        lambda a: [signed(a, window(a))],
        site="HX",
        agent_id="K35",
        enrolled=False,
        counted_as=("", ""),
    )
    kind(
        "an agent that is not enrolled",
        "unknown_agent",
        lambda a: [signed(a, window(a))],
        enrolled=False,
        counted_as=(SITE, ""),
    )
    kind(
        "another made-up agent",
        "unknown_agent",
        lambda a: [signed(a, window(a))],
        enrolled=False,
        counted_as=(SITE, ""),
    )
    kind("a revoked agent", "revoked_agent", lambda a: [signed(a, window(a))], revoked=True)
    # The signature.
    kind(
        "a count changed after signing",
        "bad_signature",
        lambda a: [signed(a, window(a)).replace(b'"probe_requests":96', b'"probe_requests":97')],
    )
    kind(
        "signed by another agent's key",
        "bad_signature",
        lambda a: [signed(a, window(a), key_of=GOOD)],
    )
    kind("a signature of zeros", "bad_signature", _sig_edit(lambda s: "A" * 86 + "=="))
    kind(  # refused for its content only once it verified: forged, it settles nothing
        "counts that do not add up, signed by another agent's key",
        "bad_signature",
        lambda a: [signed(a, window(a, visits_ended=17), key_of=GOOD)],
    )
    kind("a status with a forged field", "bad_signature", _forged_status, topic_kind="status")
    kind("a meta with an extra field", "schema", _meta_with_extra, topic_kind="meta")
    # The window: its length, its place, its counts.
    kind("window_s 61", "window_length", _payload(window_s=61))
    kind("window_s 3599", "window_length", _payload(window_s=3599))
    kind(
        "a window start off the grid",
        "window_unaligned",
        _payload(window_start=utc_text(DAY + 120)),
    )
    kind(
        "9999-12-31 in a UTC site (stall 1)",
        "window_range",
        _payload(window_start="9999-12-31T00:00:00Z"),
    )
    kind(
        "0001-01-01 in a New York site (stall 1)",
        "window_range",
        lambda a: [signed(a, window(a, window_start="0001-01-01T00:00:00Z"))],
        site=YORK,
    )
    kind("two days ahead", "window_range", _payload(window_start=utc_text(DAY + 3 * 86400)))
    kind("1970-01-01", "window_range", _payload(window_start="1970-01-01T00:00:00Z"))
    kind("visitors above devices", "inconsistent", _payload(visitors=20, passersby=None))
    kind("visitors + passersby not devices", "inconsistent", _payload(passersby=2))
    kind("dwell bands not visits_ended", "inconsistent", _payload(visits_ended=17))
    kind(
        "more randomised devices than devices",
        "inconsistent",
        _payload(devices_randomised=12, visitors=None),
    )
    kind("more devices than in the epoch", "inconsistent", _payload(devices_epoch=10))
    # What the store decides.
    kind(
        "a replay of a stored window", "duplicate", lambda a: [signed(a, window(a))], **stored_first
    )
    kind(
        "other counts under a stored seq",
        "seq_conflict",
        lambda a: [signed(a, window(a, probe_requests=95))],
        **stored_first,
    )
    kind(
        "another seq for a stored window",
        "duplicate_window",
        lambda a: [signed(a, window(a, seq=2))],
        **stored_first,
    )
    kind("a replay of a window retention deleted", "expired", _payload(window_start=utc_text(OLD)))
    kind(
        "a window the database refuses (seq 666)",
        "store_failed",
        lambda a: [signed(a, window(a, seq=666))],
    )
    kind("100 MB", None, lambda a: [])  # published by mosquitto_pub, from a file
    return out


def _forged_status(a: Agent) -> list[bytes]:
    status = status_payload(
        SiteId(a.site),
        AgentId(a.agent),
        cause="connected",
        at=NOW,
        spool_pending=0,
        spool_dropped=0,
        last_seq=1,
    )
    return [signed(a, status).replace(b'"spool_dropped":0', b'"spool_dropped":9')]


def _meta_with_extra(a: Agent) -> list[bytes]:
    return [signed(a, meta_of(a.site, a.agent) | {"ssid": "MyHomeNetwork"})]


KINDS = _kinds()
# Refusals of a window whose signature verified, for its content: ingest settles them.
CONTENT = {"window_length", "window_unaligned", "window_range", "inconsistent", "expired"}
EXPIRED = next(k for k in KINDS if k.reason == "expired")
BIG = next(k for k in KINDS if k.reason is None)


@dataclass
class Rig:
    broker: Mosquitto
    store: Store
    process: subprocess.Popen[bytes]
    log: Path
    good: AgentAccount


def _peak_rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")))


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def rig(
    request: pytest.FixtureRequest,
    mosquitto_bin: str,
    test_certificates: TestCertificates,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Rig]:
    root = tmp_path_factory.mktemp("hostile")
    accounts = {(k.agent.site, k.agent.agent): "pw" for k in KINDS}
    accounts[(SITE, GOOD.agent)] = accounts[(SITE, NOISY.agent)] = "pw"
    broker = Mosquitto(mosquitto_bin, root / "broker", test_certificates, accounts)
    broker.start()
    if request.param == "sqlite":
        settings = StoreSettings(f"sqlite:///{root / 'aggregator.sqlite3'}")
    else:
        settings = StoreSettings(pg_dsn(), f"ff_test_{uuid.uuid4().hex[:10]}")
    store = Store.open(settings)
    store.add_site(SITE, "", "UTC", NOW)
    store.add_site(YORK, "", "America/New_York", NOW)
    for k in (*KINDS, *(Kind(a.agent, a, None, lambda _a: []) for a in (GOOD, NOISY))):
        if k.enrolled:
            store.add_agent(k.agent.site, k.agent.agent, k.agent.public_key, NOW)
        if k.revoked:
            store.revoke_agent(k.agent.site, k.agent.agent, NOW)
    # A window of the "expired" kind's agent, deleted by retention: its replay is the kind.
    old = Verifier(65536).check(
        EXPIRED.agent.topic, EXPIRED.messages(EXPIRED.agent)[0], store.registry(), OLD + 600
    )
    assert isinstance(old, Accepted), old
    store.store_batch([old], now=NOW)
    assert store.prune(NOW, 90) == 1
    refuse_seq_666(store)
    log = root / "ingest.log"
    process = _spawn(_config_file(root / "aggregator.toml", broker, settings), "hostile", log)
    good = AgentAccount(broker, SITE, GOOD.agent, "pw")
    try:
        wait_for(lambda: "subscribed to" in log.read_text(), 20, "ingest to subscribe")
        yield Rig(broker, store, process, log, good)
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert process.wait(15) == 0, log.read_text()
        assert time.monotonic() - started < 10
    finally:
        good.close()
        if process.poll() is None:
            process.kill()
            process.wait()
        broker.kill()
        store.close()
        if settings.schema:
            drop_schema(settings.dsn, settings.schema)


def _stored_within_a_second(rig: Rig) -> float:
    """Send the good agent's next window; how long until it is stored (at most 1 s)."""
    seq = next(GOOD_SEQ)
    rig.good.publish("counts", signed(GOOD, window(GOOD, seq=seq, slot=seq)))
    sent = time.monotonic()
    wait_for(lambda: seq in stored_seqs(rig.store, SITE, GOOD.agent), 1.0, f"good window {seq}")
    return time.monotonic() - sent


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_a_hostile_message_is_refused_with_its_reason_and_stops_no_one(
    rig: Rig, kind: Kind, tmp_path: Path
) -> None:
    a = kind.agent
    account = AgentAccount(rig.broker, a.site, a.agent, "pw")
    try:
        for body in kind.prior(a):
            account.publish("counts", body)
            wait_for(lambda: stored_seqs(rig.store, a.site, a.agent) != [], 5, "the prior window")
        before = rig.store.refusal_counts()
        peak = _peak_rss_kib(rig.process.pid)
        messages = kind.messages(a)
        for body in messages:
            account.publish(kind.topic_kind, body)
        if kind is BIG:
            big = tmp_path / "big"
            big.write_bytes(b"{" + b" " * (MB_100 - 2) + b"}")
            subprocess.run(
                [
                    "mosquitto_pub",
                    "-h",
                    HOST,
                    "-p",
                    str(rig.broker.port),
                    "-q",
                    "1",
                    "-u",
                    f"{a.site}/{a.agent}",
                    "-P",
                    "pw",
                    "-t",
                    f"footfall/v1/{a.site}/{a.agent}/counts",
                    "-f",
                    str(big),
                ],
                check=True,
                timeout=60,
            )
        latency = _stored_within_a_second(rig)
    finally:
        account.close()
    after = rig.store.refusal_counts()
    added = {row: n - before.get(row, 0) for row, n in after.items() if n != before.get(row, 0)}
    assert latency < 1.0
    if kind.reason is None:  # the broker never sent it to ingest (Maximum Packet Size)
        assert added == {}
        assert _peak_rss_kib(rig.process.pid) - peak < 32 << 10  # KiB: far below 100 MB
    else:
        assert added == {kind.row: len(messages)}
    stored = stored_seqs(rig.store, a.site, a.agent)
    assert stored == ([1] if kind.prior(a) else [])
    if kind.reason == "store_failed":
        (row,) = [q for q in rig.store.quarantined() if q["agent_id"] == a.agent]
        assert row["reason"] == "store_failed" and "no_666" in row["error"]
        assert json.loads(row["message"])["payload"]["seq"] == 666
    entry = rig.store.registry().get(a.site, a.agent)
    if entry is None:
        return
    # Refused for its content after its signature verified: quarantined with its text and
    # settled (its receipt covers it). Anything else (a bad signature, a schema) settles
    # nothing: only what the store settled (seq 1 stored first, the expired kind's deleted
    # one, a store's skip).
    settled = rig.store.settled([entry.key]).get(entry.key, ("", "", []))[2]
    expected = [(1, 1)] if kind.prior(a) or kind.reason in CONTENT else []
    if kind.reason == "duplicate_window":  # the store's skip of its seq 2 settles it too
        expected = [(1, 2)]
    assert settled == expected, kind.reason
    if kind.reason in CONTENT:
        (row,) = [q for q in rig.store.quarantined() if q["agent_id"] == a.agent]
        assert row["reason"] == kind.reason and json.loads(row["message"])["payload"]["seq"] == 1


def test_the_suite_has_at_least_50_kinds_and_the_two_stalls() -> None:
    assert len(KINDS) >= 50
    names = " ".join(k.name for k in KINDS)
    assert "(stall 1)" in names and "(stall 2)" in names
    assert len({k.agent.agent for k in KINDS}) == len(KINDS)


def test_an_agent_that_adds_noise_is_held_to_the_schema_only(rig: Rig) -> None:
    """Standard mode with differential privacy noises each count on its own: its sums need
    not add up. Its meta says so; counts in the same batch as that meta are held to it, and
    so are later ones (the store reloads the registry)."""
    meta = signed(NOISY, meta_of(SITE, NOISY.agent, dp_epsilon=0.5, dp_epsilon_day=144.0))
    account = AgentAccount(rig.broker, SITE, NOISY.agent, "pw")
    try:
        account.publish("meta", meta, retain=True)
        account.publish("counts", signed(NOISY, window(NOISY, visitors=10, devices=12)))
        wait_for(lambda: stored_seqs(rig.store, SITE, NOISY.agent) == [1], 2, "window 1")
        account.publish(
            "counts", signed(NOISY, window(NOISY, seq=2, slot=1, devices_randomised=13))
        )
        wait_for(lambda: stored_seqs(rig.store, SITE, NOISY.agent) == [1, 2], 2, "window 2")
    finally:
        account.close()
    assert not [row for row in rig.store.refusal_counts() if row[2] == NOISY.agent]
