"""Publishing against a real Mosquitto: every window arrives signed, once and in order; the
status and meta messages are retained; stops are clean; the broker's refusals are sentences;
with the aggregator's receipt key, a window stays spooled until a signed receipt covers it."""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import nacl.signing
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from firmware_agent.cli import BUNDLED_SAMPLE
from firmware_agent.contract.broker import Backoff
from firmware_agent.contract.errors import BrokerError, ConfigError
from firmware_agent.contract.fields import EVICTIONS
from firmware_agent.contract.messages import (
    AgentId,
    SiteId,
    Topic,
    counts_payload,
    public_key_text,
    receipt_payload,
    seal,
)
from firmware_agent.contract.signing import load_signing_key
from firmware_agent.service.publish import BrokerSettings, Connection, Publisher
from firmware_agent.service.run import agent_meta
from firmware_agent.service.spool import Spool, SpoolSettings
from firmware_agent.settings import load_config
from firmware_agent.stages.capture import CaptureReader
from firmware_agent.stages.pipeline import Pipeline
from firmware_agent.tools.audit import Audit
from firmware_agent.tools.synthetic import SyntheticSpec, write_synthetic_capture
from tests.support.agent_fleet import START, meta_of, window
from tests.support.agent_harness import counts_of, prepare_agent, unique_id
from tests.support.mqtt_broker import (
    HOST,
    READER,
    Mosquitto,
    Subscriber,
    TestCertificates,
    wait_for,
)
from tests.support.ports import free_port

StartBroker = Callable[[Mapping[tuple[str, str], str]], Mosquitto]


def _check_run(sub: Subscriber, files: Any, expected: list[dict[str, Any]]) -> None:
    """Every window once, in sequence order, signed; status ends offline (stopped)."""
    wait_for(
        lambda: any(e.payload["cause"] == "stopped" for e in sub.envelopes("/status")),
        10,
        "the offline status",
    )
    windows = sub.windows()
    assert counts_of(windows) == expected
    seqs = [w["seq"] for w in windows]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    for kind in ("/counts", "/status", "/meta"):
        for envelope in sub.envelopes(kind):
            envelope.verify(files.verify_key)
            assert (envelope.payload["site"], envelope.payload["agent"]) == (
                files.site,
                files.agent,
            )
    states = [e.payload["state"] for e in sub.envelopes("/status")]
    assert states[0] == "online" and states[-1] == "offline"


@pytest.mark.parametrize(("protocol", "tls"), [("5", False), ("3.1.1", True)])
def test_run_publishes_every_window_once_in_order_signed(
    protocol: str,
    tls: bool,
    start_broker: StartBroker,
    test_certificates: TestCertificates,
    sample_windows: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    site, agent = unique_id("s"), "a1"
    broker = start_broker({(site, agent): f"pw-{agent}"})
    settings: dict[str, object] = {"broker.protocol": protocol}
    if tls:
        settings |= {
            "broker.port": broker.tls_port,
            "broker.tls_ca": str(test_certificates.ca),
            "broker.tls_cert": str(test_certificates.client_cert),
            "broker.tls_key": str(test_certificates.client_key),
        }
    files = prepare_agent(tmp_path, broker, site, agent, settings)
    sub = Subscriber(broker)
    try:
        run = files.start("--source", str(BUNDLED_SAMPLE))
        assert run.wait(60) == 0, files.log_text()
        _check_run(sub, files, sample_windows)
    finally:
        sub.close()
    log = files.log_text()
    assert f"published counts site={site} agent={agent} window=" in log
    assert "Traceback" not in log

    late = Subscriber(broker, f"footfall/v1/{site}/{agent}/#")  # retained messages only
    try:
        wait_for(lambda: len(late.snapshot()) == 2, 5, "retained status and meta")
        retained = {topic.rsplit("/", 1)[1]: body for topic, body, was in late.snapshot() if was}
        meta = late.envelopes("/meta")[0].verify(files.verify_key)
        assert (meta["window_s"], meta["epoch_timezone"], meta["privacy"]["key_bits"]) == (
            300,
            "UTC",
            128,
        )
        assert late.envelopes("/status")[0].payload["state"] == "offline"
        assert set(retained) == {"status", "meta"}
    finally:
        late.close()


def test_sigterm_publishes_the_open_window_and_goes_offline(
    start_broker: StartBroker, sample_windows: list[dict[str, Any]], tmp_path: Path
) -> None:
    """A pcap stream on stdin that stays open: the last window closes only at SIGTERM."""
    site, agent = unique_id("s"), "a1"
    broker = start_broker({(site, agent): f"pw-{agent}"})
    files = prepare_agent(tmp_path, broker, site, agent)
    sub = Subscriber(broker)
    try:
        run = files.start("--source", "-", stdin=subprocess.PIPE)
        assert run.stdin is not None
        feeder = threading.Thread(target=run.stdin.write, args=(BUNDLED_SAMPLE.read_bytes(),))
        feeder.start()
        wait_for(lambda: len(sub.windows()) == len(sample_windows) - 1, 30, "all but one window")
        feeder.join()
        run.send_signal(signal.SIGTERM)
        assert run.wait(20) == 0, files.log_text()
        run.stdin.close()
        _check_run(sub, files, sample_windows)
    finally:
        sub.close()
    assert "stopping: sending spooled windows" in files.log_text()


def test_spool_cap_drops_the_oldest_and_status_reports_it(
    start_broker: StartBroker, sample_windows: list[dict[str, Any]], tmp_path: Path
) -> None:
    """No broker while the capture is replayed: 10 windows kept, the rest dropped and reported;
    the next start sends the 10 and publishes nothing twice."""
    site, agent = unique_id("s"), "a1"
    broker = start_broker({(site, agent): f"pw-{agent}"})
    settings = {"spool.max_windows": 10, "broker.port": free_port(), "broker.stop_grace_s": 1}
    files = prepare_agent(tmp_path, broker, site, agent, settings)
    run = files.start("--source", str(BUNDLED_SAMPLE))
    wait_for(lambda: "in all" in files.log_text(), 30, "the spool to drop windows")
    wait_for(lambda: "refused the connection" in files.log_text(), 10, "a connection attempt")
    run.send_signal(signal.SIGTERM)
    assert run.wait(20) == 0, files.log_text()
    dropped = len(sample_windows) - 10
    assert f"{dropped} dropped in all" in files.log_text()
    assert "stopping with 10 windows unsent" in files.log_text()

    sub = Subscriber(broker)
    try:
        again = files.start("--source", str(BUNDLED_SAMPLE), "--set", f"broker.port={broker.port}")
        assert again.wait(60) == 0, files.log_text()
        _check_run(sub, files, sample_windows[-10:])
        online = sub.envelopes("/status")[0].payload
        assert (online["spool_dropped"], online["spool_pending"]) == (dropped, 10)
    finally:
        sub.close()
    assert f"skipped {len(sample_windows)} windows already spooled" in files.log_text()


def test_status_v2_publishes_the_eviction_rounds_and_the_audit_passes_it(
    start_broker: StartBroker, tmp_path: Path
) -> None:
    """A capture with 11,892 addresses in half an hour against count.max_devices = 1024: the
    agent runs to the end, its status (v2) says both tables evicted, the rounds only grow, the
    last status (offline) has the same rounds as an in-process replay, and a privacy audit of
    everything it published passes."""
    capture = tmp_path / "busy.pcap"
    spec = SyntheticSpec(frames=24_000, devices=8000, randomised_share=1.0, seed=18,
                         duration_s=1800)  # fmt: skip
    write_synthetic_capture(capture, spec)
    environ = {"FOOTFALL_EPOCH_TIMEZONE": "UTC", "FOOTFALL_COUNT_MAX_DEVICES": "1024"}
    pipeline = Pipeline(load_config(None, environ=environ))
    with CaptureReader(capture, in_place=True) as frames:
        expected = len(list(pipeline.run(frames)))
    rounds = pipeline.stats.evictions
    assert min(rounds) > 0
    site = unique_id("s")
    broker = start_broker({(site, "a1"): "pw-a1"})
    files = prepare_agent(tmp_path, broker, site, "a1", {"count.max_devices": 1024})
    sub = Subscriber(broker)
    try:
        run = files.start("--source", str(capture))
        assert run.wait(60) == 0, files.log_text()
        wait_for(
            lambda: any(e.payload["cause"] == "stopped" for e in sub.envelopes("/status")),
            10,
            "the offline status",
        )
        assert len(sub.windows()) == expected
        statuses = [e.payload for e in sub.envelopes("/status")]
        said = [tuple(p[name] for name in EVICTIONS) for p in statuses]
        assert {p["v"] for p in statuses} == {2}
        assert said == sorted(said) and said[-1] == rounds
        audit = Audit({f"{site}/a1": files.verify_key})
        for topic, body, _ in sub.snapshot():
            audit.add(topic, body)
        assert audit.verdict(), audit.report()
    finally:
        sub.close()


def _settings(broker: Mosquitto, **changes: Any) -> BrokerSettings:
    fields: dict[str, Any] = {
        "host": HOST,
        "port": broker.port,
        "username": "s1/a1",
        "password": "pw-a1",
        "connect_timeout_s": 5,
    }
    return BrokerSettings(**(fields | changes))


def _open(settings: BrokerSettings) -> None:
    topic = Topic(SiteId("s1"), AgentId("a1"), "status")
    connection = Connection(settings, settings.ssl_context(), "footfall-s1-a1", (topic, b"x"))
    try:
        connection.open()
    finally:
        connection.close()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_bad_password_is_a_sentence(start_broker: StartBroker, protocol: str) -> None:
    broker = start_broker({("s1", "a1"): "pw-a1"})
    with pytest.raises(BrokerError, match=r"refused the connection: not authorised \(check broker"):
        _open(_settings(broker, password="wrong", protocol=protocol))


def test_nothing_listening_is_a_sentence() -> None:
    settings = BrokerSettings(host=HOST, port=free_port())
    with pytest.raises(BrokerError, match=r"refused the connection \(nothing listens there\)"):
        _open(settings)


def test_tls_against_the_wrong_ca_names_the_file(
    start_broker: StartBroker, test_certificates: TestCertificates
) -> None:
    broker = start_broker({("s1", "a1"): "pw-a1"})
    certs = test_certificates
    settings = _settings(
        broker,
        port=broker.tls_port,
        tls_ca=str(certs.other_ca),
        tls_cert=str(certs.client_cert),
        tls_key=str(certs.client_key),
    )
    with pytest.raises(
        BrokerError, match=rf"does not verify against broker.tls_ca {certs.other_ca}"
    ):
        _open(settings)


def test_tls_without_the_client_certificate_says_so(
    start_broker: StartBroker, test_certificates: TestCertificates
) -> None:
    broker = start_broker({("s1", "a1"): "pw-a1"})
    settings = _settings(broker, port=broker.tls_port, tls_ca=str(test_certificates.ca))
    with pytest.raises(BrokerError, match=r"it may want a client certificate: broker.tls_cert"):
        _open(settings)


def test_tls_files_that_cannot_be_used_are_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.pem"
    with pytest.raises(ConfigError, match=rf"broker.tls_ca {missing}: cannot read"):
        BrokerSettings(tls_ca=str(missing)).ssl_context()
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=rf"broker.tls_ca {garbage}: not a PEM CA certificate"):
        BrokerSettings(tls_ca=str(garbage)).ssl_context()


def test_publishing_outside_its_own_topics_is_refused_in_words(
    start_broker: StartBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The account of s1/a1 posing as s1/a2: MQTT 5's PUBACK says no, and the agent says why."""
    broker = start_broker({("s1", "a1"): "pw-a1"})
    files = prepare_agent(tmp_path, broker, "s1", "a2")
    key = load_signing_key(files.root / "etc")
    spool_path = tmp_path / "spool.sqlite3"
    with Spool(spool_path) as spool:
        spool.append(0, lambda seq: seal(_counts(seq), key))
    publisher = Publisher(
        _settings(broker, backoff_initial_ms=50, backoff_max_s=1),
        SiteId("s1"),
        AgentId("a2"),
        key,
        spool_path,
        SpoolSettings(),
        _meta(),
    )
    with caplog.at_level(logging.WARNING, logger="footfall.agent"):
        publisher.start()
        wait_for(lambda: "not authorised" in caplog.text, 10, "the refusal")
        publisher.stop(0)
        assert publisher.join(10)
    assert "refused status or meta for site=s1 agent=a2: not authorised" in caplog.text
    with Spool(spool_path) as spool:
        assert spool.state().pending == 1  # refused is not delivered: it stays spooled


def _counts(seq: int) -> dict[str, object]:
    window = {
        "window_start": "2024-03-05T10:55:00Z",
        "window_s": 300,
        **dict.fromkeys(
            ("probe_requests", "malformed", "late_frames", "devices", "devices_randomised"), 0
        ),
        **dict.fromkeys(("visitors", "passersby", "visits_ended", "devices_epoch"), 0),
        "dwell_minutes": dict.fromkeys(("lt5", "5-15", "15-30", "30-60", "ge60"), 0),
    }
    return counts_payload(SiteId("s1"), AgentId("a2"), seq, "0" * 16, window, version=1)


def _meta() -> dict[str, object]:
    environ = {"FOOTFALL_AGENT_SITE": "s1", "FOOTFALL_AGENT_ID": "a2"}
    return agent_meta(load_config(None, environ=environ))


def test_backoff_doubles_with_jitter_up_to_its_cap() -> None:
    backoff = Backoff(0.5, 8)
    delays = [backoff.next() for _ in range(8)]
    for n, delay in enumerate(delays):
        ceiling = min(8, 0.5 * 2**n)
        assert ceiling / 2 <= delay <= ceiling
    backoff.reset()
    assert backoff.next() <= 0.5


def _send_receipt(
    broker: Mosquitto, ids: tuple[SiteId, AgentId], ranges: list[tuple[int, int]], signer: Any
) -> None:
    """A retained receipt, as ingest publishes it (the test ACL lets the reader write it)."""
    body = seal(receipt_payload(*ids, ranges, int(time.time())), signer)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.username_pw_set(*READER)
    client.connect(HOST, broker.port)
    client.loop_start()
    try:
        topic = str(Topic(*ids, "receipt"))
        client.publish(topic, body, qos=1, retain=True).wait_for_publish(5)
    finally:
        client.disconnect()
        client.loop_stop()


def test_with_receipts_a_window_stays_spooled_until_a_signed_receipt_covers_it(
    start_broker: StartBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    site, agent = unique_id("s"), "a1"
    broker = start_broker({(site, agent): "pw"})
    ids = (SiteId(site), AgentId(agent))
    aggregator, forger, key = (nacl.signing.SigningKey.generate() for _ in range(3))
    path = tmp_path / "spool.sqlite3"
    with Spool(path) as spool:
        seqs = [
            spool.append(
                START + 300 * i,
                lambda seq, i=i: seal(
                    counts_payload(*ids, seq, "0" * 16, window(i), version=1), key
                ),
            )
            for i in range(6)
        ]
    settings = BrokerSettings(
        host=HOST, port=broker.port, username=f"{site}/{agent}", password="pw",
        backoff_initial_ms=100, backoff_max_s=1, receipt_key=public_key_text(aggregator),
        receipt_timeout_s=1,
    )  # fmt: skip
    sub = Subscriber(broker, f"footfall/v1/{site}/{agent}/+")
    publisher = Publisher(settings, *ids, key, path, SpoolSettings(), meta_of(site, agent))
    caplog.set_level(logging.INFO, "footfall.agent")
    pending = lambda: Spool(path).state().pending  # noqa: E731
    try:
        publisher.start()
        # Sent, acknowledged by the broker, and still spooled; sent again with no receipt.
        wait_for(lambda: len(sub.snapshot()) >= 12, 10, "every window sent twice")
        assert pending() == 6
        _send_receipt(broker, ids, [(seqs[0], seqs[-1])], forger)
        wait_for(lambda: "ignored a message on" in caplog.text, 5, "the forged receipt ignored")
        assert "does not verify with broker.receipt_key" in caplog.text and pending() == 6
        _send_receipt(broker, ids, [(seqs[0], seqs[2]), (seqs[4], seqs[4])], aggregator)
        wait_for(lambda: pending() == 2, 5, "the covered windows to leave the spool")
        assert [m.seq for m in Spool(path).pending()] == [seqs[3], seqs[5]]
        # The status follows the spool (the aggregator's health sees it fill and empty).
        wait_for(
            lambda: sub.envelopes("/status")[-1].payload["spool_pending"] == 2,
            5,
            "a status saying 2 windows wait",
        )
        _send_receipt(broker, ids, [(seqs[0], seqs[-1])], aggregator)
        publisher.stop(None)  # ends once the spool is empty
        assert publisher.join(10) and publisher.error is None
    finally:
        publisher.stop(0)
        sub.close()
    assert pending() == 0 and publisher.settled == 6
    assert [w["seq"] for w in sub.windows()] == seqs
