"""The whole path, capture to windows: deterministic, batch-size independent, epoch-aware."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from firmware_agent.cli import BUNDLED_SAMPLE
from firmware_agent.settings import load_config
from firmware_agent.stages.batch import NS, WindowCounts
from firmware_agent.stages.capture import CaptureReader
from firmware_agent.stages.pipeline import Pipeline
from firmware_agent.tools.synthetic import SyntheticSpec, write_synthetic_capture
from tests.support.agent_harness import UTC

UTC_MIDNIGHT = {"FOOTFALL_EPOCH_TIMEZONE": "UTC"}


def replay(
    path: Path, environ: dict[str, str] | None = None, **reader: Any
) -> tuple[list[WindowCounts], Pipeline]:
    pipeline = Pipeline(load_config(None, environ=environ or UTC_MIDNIGHT))
    with CaptureReader(path, **reader) as frames:
        windows = list(pipeline.run(frames))
    return windows, pipeline


def test_replay_is_deterministic_and_independent_of_batching() -> None:
    first, _ = replay(BUNDLED_SAMPLE)
    again, _ = replay(BUNDLED_SAMPLE)
    tiny, _ = replay(BUNDLED_SAMPLE, batch_frames=7, chunk_bytes=4096)
    in_place, _ = replay(BUNDLED_SAMPLE, chunk_bytes=4096, in_place=True)
    assert first == again == tiny == in_place
    assert len(first) > 20


def test_windows_account_for_every_probe_and_device(tmp_path: Path) -> None:
    capture = tmp_path / "s.pcap"
    truth = write_synthetic_capture(capture, SyntheticSpec(frames=5000, devices=80, seed=11))
    windows, pipeline = replay(capture)
    assert sum(w.probe_requests for w in windows) == truth.frames == pipeline.stats.frames
    assert windows[-1].devices_epoch == truth.addresses
    assert all(w.malformed == 0 and w.visitors + w.passersby == w.devices for w in windows)
    starts = [w.window_start for w in windows]
    assert starts == list(range(starts[0], starts[0] + 300 * len(starts), 300))
    assert sum(w.visits_ended for w in windows) == sum(
        sum(w.dwell_minutes.values()) for w in windows
    )


def test_epoch_rotation_wipes_devices_and_ends_visits() -> None:
    hourly = UTC_MIDNIGHT | {"FOOTFALL_EPOCH_LENGTH": "3600"}
    windows, pipeline = replay(BUNDLED_SAMPLE, hourly)
    daily, _ = replay(BUNDLED_SAMPLE)
    assert pipeline.stats.epochs >= 3
    by_start = {w.window_start: w for w in windows}
    for w in windows:
        if w.window_start % 3600 == 0 and w.window_start - 300 in by_start:
            # a new epoch: devices so far restart from this window's own devices
            assert w.devices_epoch == w.devices
            previous = by_start[w.window_start - 300]
            assert previous.devices_epoch >= previous.devices
    # Per-window device counts do not depend on the epoch length: each window lies in one epoch.
    assert [w.devices for w in windows] == [w.devices for w in daily]
    assert sum(w.visits_ended for w in windows) >= sum(w.visits_ended for w in daily)


def test_a_day_without_frames_is_skipped_not_filled(tmp_path: Path) -> None:
    a, b = tmp_path / "a.pcap", tmp_path / "b.pcap"
    write_synthetic_capture(a, SyntheticSpec(frames=500, devices=10, seed=1, duration_s=1800))
    later = SyntheticSpec(
        frames=500,
        devices=10,
        seed=2,
        duration_s=1800,
        start_ns=SyntheticSpec().start_ns + 3 * 86400 * NS,
    )
    write_synthetic_capture(b, later)
    pipeline = Pipeline(load_config(None, environ=UTC_MIDNIGHT))
    windows = []
    for path in (a, b):
        with CaptureReader(path) as frames:
            for batch in frames:
                windows += pipeline.feed(batch)
    windows += pipeline.finish()
    assert pipeline.stats.epochs_skipped == 1
    assert len(windows) < 3 * 288


def _agent(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "firmware_agent.cli", *args],
        input=stdin,
        capture_output=True,
        check=False,
    )


def test_replay_from_stdin_equals_replay_of_the_file() -> None:
    from_file = _agent("replay", str(BUNDLED_SAMPLE))
    from_pipe = _agent("replay", "-", stdin=BUNDLED_SAMPLE.read_bytes())
    assert from_file.returncode == from_pipe.returncode == 0
    assert from_file.stdout == from_pipe.stdout
    assert from_file.stdout.count(b"\n") > 20


def test_replay_under_python_o_prints_the_same_windows(
    sample_windows: list[dict[str, Any]],
) -> None:
    """``python -O`` drops asserts: the pipeline's invariants (windows of the counter, estimator
    and people stage lining up; an epoch key under every window) are explicit checks instead,
    and a replay runs through them to the same windows."""
    optimised = subprocess.run(
        [sys.executable, "-O", "-m", "firmware_agent.cli", "replay", str(BUNDLED_SAMPLE)],
        capture_output=True, text=True, check=False, env=os.environ | UTC,
    )  # fmt: skip
    assert optimised.returncode == 0, optimised.stderr
    assert [json.loads(line) for line in optimised.stdout.splitlines()] == sample_windows


def test_replay_of_a_non_capture_is_one_line_naming_the_file(tmp_path: Path) -> None:
    page = tmp_path / "page.pcap"
    page.write_text("<!DOCTYPE html><html><body>not a capture</body></html>")
    result = _agent("replay", str(page))
    assert result.returncode == 1
    err = result.stderr.decode()
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"footfall-agent: error: {page}: not a pcap or pcapng capture")


def test_inspect_reports_a_bad_file_and_exits_1(tmp_path: Path) -> None:
    empty = tmp_path / "empty.pcap"
    empty.write_bytes(b"")
    result = _agent("inspect", str(BUNDLED_SAMPLE), str(empty))
    assert result.returncode == 1
    lines = result.stdout.decode().splitlines()
    assert len(lines) == 2
    assert '"read_error": false' in lines[0] and '"read_error": true' in lines[1]


def test_config_show_lists_every_setting_with_its_source(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text("[count]\nwindow_s = 600\n")
    result = _agent("config", "show", "--config", str(path))
    out = result.stdout.decode()
    assert result.returncode == 0
    assert "count.window_s" in out and f"({path})" in out and "(default)" in out


@pytest.mark.parametrize("window_s", ["60", "900"])
def test_replay_window_flag_sets_the_window_length(window_s: str) -> None:
    result = _agent("replay", str(BUNDLED_SAMPLE), "--window-s", window_s)
    assert result.returncode == 0
    assert f'"window_s": {window_s}'.encode() in result.stdout


def test_more_addresses_than_the_ceiling_run_to_the_end_and_report_evictions(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    capture = tmp_path / "busy.pcap"
    spec = SyntheticSpec(frames=24_000, devices=8000, randomised_share=1.0, seed=18)
    truth = write_synthetic_capture(capture, spec)
    assert truth.addresses > 8000
    free, _ = replay(capture)
    capped, pipeline = replay(capture, UTC_MIDNIGHT | {"FOOTFALL_COUNT_MAX_DEVICES": "2048"})
    assert pipeline.stats.devices_evicted > truth.addresses - 2048
    assert pipeline._counter.table.capacity == 4096  # never grown: the ceiling is 2,048 rows
    said = [r.message for r in caplog.records if "device table at its ceiling" in r.message]
    assert said == [
        "device table at its ceiling (count.max_devices = 2048): the longest silent rows are "
        "evicted from now on in this epoch (footfall_devices_evicted_total)"
    ]
    assert sum(w.probe_requests for w in capped) == truth.frames
    published = [(w.window_start, w.devices, w.visitors, w.visits_ended) for w in capped]
    assert published == [(w.window_start, w.devices, w.visitors, w.visits_ended) for w in free]
    # The estimator keeps the addresses of about twenty minutes: under the same ceiling it
    # evicted none, and its figures are the ones without it.
    assert pipeline.stats.estimate_evicted == 0
    assert [(w.people_est, w.figures) for w in capped] == [(w.people_est, w.figures) for w in free]
