"""The Prometheus endpoint: text exposition (by prometheus_client), served on a local port,
spool-derived counters."""

from __future__ import annotations

import threading
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics
from prometheus_client.parser import text_string_to_metric_families

from firmware_agent.contract.errors import ConfigError
from firmware_agent.service.metrics import (
    Metric,
    MetricsServer,
    MetricsSettings,
    SpoolWatch,
    agent_metrics,
    registry,
)
from firmware_agent.service.spool import Spool
from firmware_agent.stages.live import KernelStats
from firmware_agent.stages.pipeline import PipelineStats
from tests.support.mqtt_broker import wait_for


def exposition(metrics: list[Metric]) -> str:
    return generate_latest(registry(metrics)).decode()


def test_exposition_is_prometheus_text_and_leaves_unknown_values_out() -> None:
    """The names and types on the wire are the ones the hand-written exposition had (a counter
    named ``..._total`` keeps its name; no ``_created`` series)."""
    text = exposition([
        Metric("footfall_frames_total", "counter", "Frames read.", lambda: 12),
        Metric("footfall_last_publish_timestamp_seconds", "gauge", "When.", lambda: None),
        Metric("footfall_ratio", "gauge", "A share.", lambda: 0.25),
    ])  # fmt: skip
    assert text == (
        "# HELP footfall_frames_total Frames read.\n"
        "# TYPE footfall_frames_total counter\n"
        "footfall_frames_total 12.0\n"
        "# HELP footfall_ratio A share.\n"
        "# TYPE footfall_ratio gauge\n"
        "footfall_ratio 0.25\n"
    )


def test_server_answers_in_text_or_openmetrics_and_refuses_a_taken_port() -> None:
    stats = PipelineStats(frames=7, probe_requests=5, malformed=1)
    metrics = [Metric("footfall_frames_total", "counter", "Frames.", lambda: stats.frames)]
    server = MetricsServer(MetricsSettings(port=0, host="127.0.0.1"), metrics)
    try:
        url = f"http://127.0.0.1:{server.port}/metrics"
        with urllib.request.urlopen(url, timeout=2) as response:
            assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
            assert b"\nfootfall_frames_total 7.0\n" in response.read()
        stats.frames = 9
        wanted = "application/openmetrics-text; version=1.0.0"
        request = urllib.request.Request(url, headers={"Accept": wanted})
        with urllib.request.urlopen(request, timeout=2) as response:
            assert response.headers["Content-Type"].startswith(wanted)
            (family,) = openmetrics(response.read().decode())
        assert (family.name, family.type) == ("footfall_frames", "counter")
        assert [(s.name, s.value) for s in family.samples] == [("footfall_frames_total", 9)]
        taken = rf"metrics.port: cannot listen on 127.0.0.1:{server.port}"
        with pytest.raises(ConfigError, match=taken):
            MetricsServer(MetricsSettings(port=server.port), metrics)
    finally:
        server.close()


def test_spool_watch_counts_acknowledged_windows_and_when(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    with Spool(path) as spool:
        spool.append(0, lambda seq: b"old")  # waiting from before the start
        watch = SpoolWatch(path, interval_s=0.02)
        try:
            wait_for(lambda: watch.state is not None, 5, "the first look at the spool")
            assert (watch.published, watch.last_publish_s) == (0, None)
            seqs = [spool.append(300 * i, lambda seq: b"w") for i in range(1, 4)]
            before = time.time()
            spool.ack([seqs[0], seqs[1]])
            wait_for(lambda: watch.published == 2, 5, "two acknowledged windows")
            assert watch.last_publish_s is not None and watch.last_publish_s >= before
            assert watch.state is not None and watch.state.pending == 2
        finally:
            watch.close()


def test_spool_watch_counts_from_an_empty_spool_not_from_the_first_sequence_number(
    tmp_path: Path,
) -> None:
    """A new spool numbers its first message with the Unix time (sequence numbers are never
    reused across spools): the count of published windows starts at 0 all the same."""
    path = tmp_path / "spool.sqlite3"
    watch = SpoolWatch(path, interval_s=0.02)
    try:
        wait_for(lambda: watch.state is not None, 5, "the first look at the spool")
        with Spool(path) as spool:
            spool.ack([spool.append(300, lambda seq: b"w")])
        wait_for(lambda: watch.published != 0, 5, "an acknowledged window")
        time.sleep(0.1)
        assert watch.published == 1
    finally:
        watch.close()


def test_agent_metrics_include_the_kernels_counters_for_a_live_source(tmp_path: Path) -> None:
    watch = SpoolWatch(tmp_path / "spool.sqlite3", interval_s=0.02)
    try:
        wait_for(lambda: watch.state is not None, 5, "the first look at the spool")
        stats = PipelineStats(frames=10, probe_requests=8, malformed=2, windows=1)
        connected = threading.Event()
        live = agent_metrics(stats, watch, connected, lambda: KernelStats(10, 3, 1))
        text = exposition(live)
        samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
        assert samples == {
            "footfall_frames_total": 10, "footfall_probe_requests_total": 8,
            "footfall_malformed_total": 2, "footfall_windows_closed_total": 1,
            "footfall_windows_published_total": 0, "footfall_spool_depth": 0,
            "footfall_spool_dropped_total": 0, "footfall_devices_evicted_total": 0,
            "footfall_estimate_evicted_total": 0,
            "footfall_broker_connected": 0, "footfall_kernel_packets_total": 10,
            "footfall_kernel_drops_total": 3,
        }  # fmt: skip
        assert "footfall_last_publish_timestamp_seconds" not in text  # nothing published yet
        assert "kernel" not in exposition(agent_metrics(stats, watch, connected, None))
    finally:
        watch.close()
