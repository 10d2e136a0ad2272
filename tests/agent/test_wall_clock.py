"""Live windows close on the wall clock too (``Pipeline.tick``), and exactly as frames would.

A tick at time t closes what a frame stamped t closes: every window ending at or before
t - lateness. So ticking at the frames' own times changes nothing, a quiet room still gets its
windows on time (no data until a frame says the radio works), and a frame that comes after its
window was closed by the clock is counted late, as a replay counts a frame older than the
watermark.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest

from firmware_agent.cli import BUNDLED_SAMPLE
from firmware_agent.settings import load_config
from firmware_agent.stages.batch import NS, FrameBatch, WindowCounts
from firmware_agent.stages.capture import CaptureReader
from firmware_agent.stages.pipeline import Pipeline
from firmware_agent.tools.synthetic import SyntheticSpec, write_synthetic_capture

UTC = {"FOOTFALL_EPOCH_TIMEZONE": "UTC"}
W = 300 * NS
LATENESS = 10 * NS
T0 = 1_709_625_600 * NS  # a window boundary


def pipeline(**environ: str) -> Pipeline:
    return Pipeline(load_config(None, environ=UTC | environ))


def batches(path: Path, batch_frames: int = 100) -> Iterator[FrameBatch]:
    with CaptureReader(path, batch_frames=batch_frames) as reader:
        yield from reader


def test_a_quiet_room_gets_zero_windows_on_time() -> None:
    p = pipeline()
    assert list(p.tick(T0 + 42 * NS)) == []  # starts the epoch, opens the current window
    assert list(p.tick(T0 + W + LATENESS - 1)) == []  # not yet: lateness allowance
    (first,) = p.tick(T0 + W + LATENESS)
    later = list(p.tick(T0 + 3 * W + LATENESS))
    assert [w.window_start for w in (first, *later)] == [(T0 + k * W) // NS for k in range(3)]
    for w in (first, *later):
        assert (w.probe_requests, w.devices, w.visitors, w.devices_epoch) == (0, 0, 0, 0)
        assert w.no_data  # nothing heard since the agent started: nothing says the radio works
    assert p.stats.windows == 3


def test_ticking_at_the_frames_own_times_closes_the_same_windows(tmp_path: Path) -> None:
    capture = tmp_path / "s.pcap"
    write_synthetic_capture(capture, SyntheticSpec(frames=4000, devices=60, seed=5))
    replayed = list(pipeline().run(batches(capture)))
    ticked = pipeline()
    windows: list[WindowCounts] = []
    for batch in batches(capture):
        windows += ticked.feed(batch)
        windows += ticked.tick(int(batch.ts_ns.max()))
    windows += ticked.finish()
    assert windows == replayed
    assert len(replayed) > 40


def test_the_clock_closes_windows_in_a_quiet_gap_as_the_next_frame_would() -> None:
    """Ticks between batches, at the time the next frame comes (the wall clock never runs
    ahead of frames already stamped), close the replay's windows; devices_epoch included."""
    replayed = list(pipeline().run(batches(BUNDLED_SAMPLE)))
    stamped = [
        (batch, int(batch.ts_ns.min()), int(batch.ts_ns.max()))
        for batch in batches_copied(BUNDLED_SAMPLE, 1)
    ]
    ticked = pipeline()
    windows: list[WindowCounts] = []
    closed_by_ticks = 0
    for (batch, _, newest), (_, next_first, _) in pairwise(stamped):
        windows += ticked.feed(batch)
        by_tick = list(ticked.tick(max(newest, next_first)))
        closed_by_ticks += len(by_tick)
        windows += by_tick
    windows += ticked.feed(stamped[-1][0])
    windows += ticked.finish()
    assert windows == replayed
    assert closed_by_ticks > 20


def batches_copied(path: Path, batch_frames: int) -> list[FrameBatch]:
    with CaptureReader(path, batch_frames=batch_frames) as reader:
        return list(reader)


def test_a_frame_older_than_a_window_the_clock_closed_counts_as_late() -> None:
    with CaptureReader(BUNDLED_SAMPLE, batch_frames=20) as reader:
        batch = next(iter(reader))
        first = int(batch.ts_ns[0])
        late = replace(batch, ts_ns=np.full(len(batch), first, np.int64), data=batch.data.copy())
    p = pipeline()
    assert list(p.feed(batch)) == []
    (closed,) = p.tick(first // W * W + W + LATENESS)
    assert list(p.feed(late)) == []
    (window,) = p.finish()
    assert closed.probe_requests == len(batch) and closed.late_frames == 0
    assert window.window_start == closed.window_start + W // NS
    assert window.late_frames == window.probe_requests == len(batch)


@pytest.mark.parametrize(("frames", "gap"), [(20, True), (3, False)])
def test_the_clock_ends_an_epoch_when_no_frame_does(frames: int, gap: bool) -> None:
    """The silent windows, in the epoch and after it, are no data where the sensor heard 20
    frames in its one window with frames (it normally hears), zeros where it heard 3."""
    p = pipeline(FOOTFALL_EPOCH_LENGTH="3600")
    with CaptureReader(BUNDLED_SAMPLE, batch_frames=frames) as reader:
        batch = next(iter(reader))
        batch = replace(batch, data=batch.data.copy())
    start = int(batch.ts_ns.min())
    list(p.feed(batch))
    began = p.epoch_start
    boundary = (start // (3600 * NS) + 1) * 3600 * NS
    windows = list(p.tick(boundary + LATENESS))
    assert windows[-1].window_start == (boundary - W) // NS
    assert windows[-1].devices_epoch > 0 and p.epoch_start == boundary // NS != began
    assert p.stats.epochs == 2
    (fresh,) = p.tick(boundary + W + LATENESS)
    assert fresh.window_start == boundary // NS and fresh.devices_epoch == 0
    silent = [w for w in [*windows, fresh] if w.probe_requests == 0]
    assert len(silent) >= 2 and {w.no_data for w in silent} == {gap}


def test_run_with_a_clock_ticks_after_every_batch_including_empty_ones() -> None:
    empty = FrameBatch(
        np.zeros(0, np.uint8),
        np.zeros(0, np.int64),
        np.zeros(0, np.int32),
        np.zeros(0, np.int64),
        np.zeros(0, np.uint16),
    )
    times = iter([T0 + LATENESS, T0 + W + LATENESS, T0 + 2 * W + LATENESS])
    windows = list(pipeline().run([empty, empty, empty], clock=lambda: next(times)))
    # the last window, opened by the last tick, is closed at the end of the input
    assert [w.window_start for w in windows] == [(T0 + k * W) // NS for k in range(3)]
