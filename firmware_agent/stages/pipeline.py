"""The one place the agent's stages meet: capture -> parse -> anonymize -> count + estimate
-> people.

Stages do not import each other's internals; this module hands arrays from one to the
next and owns the epoch key's life:

* the counter and the estimator get the same device rows and close the same windows; the
  people stage gets the rows with the chain the estimator put each in, and closes the same
  windows too; each window's counts are joined with its estimate and its people figures
  (occupancy through the site's calibration, if any);

* the raw frame buffer is zeroed as soon as it is parsed (it holds addresses and SSIDs);
* the address array is zeroed by the anonymize stage as soon as it is hashed;
* in strict privacy mode, device ids are truncated (and fingerprints dropped) before the
  counter sees them, the estimate and people stages are left out, and the key lives one
  window; the
  windows count truncated ids (the privacy stage corrects them for collisions on release);
* when the watermark reaches an epoch boundary, the windows before it are closed (every
  open visit ends), the key, the device table, the estimator's chains and the people
  stage's visits are overwritten, and a new key starts.

Windows close on the frames' own clock. A live source also gives the wall clock
(:meth:`Pipeline.tick`): a quiet room still closes its windows on time.

**No data.** A window in which nothing at all was heard says ``no_data`` (a gap: radio down,
capture stalled) only where the sensor *normally hears something*: the median frames of the
epoch's windows with frames so far is at least :data:`NORMAL_FRAMES`. Elsewhere a silent
window is a quiet one: its figures are published (zero people), not a gap. The rule is causal
(only windows already closed), and the 101 lab days are scored by this very flag
(tests/support/lab_days.py): at a median of 10 frames a window, a silent one is an outage
(P < 5e-5 for a Poisson count). It is per window whatever ``window_s`` is, since
it is a window's count that falls to zero by chance. Until the epoch has a window with frames
(its first windows, after midnight) the previous epoch's windows decide, so a radio that died
before midnight stays a gap after it and a quiet site's night stays zeros; before any frame at
all since the agent started, a silent window is no data (nothing says the radio works).

Measured on the shared captures (687 windows, 38 of them silent): the lab's empty Sunday
2024-03-31 (a median of 9 frames) has 3 silent windows, now zeros, not gaps; a 30-minute hole
cut into the bundled capture is six windows of no data (tests/agent/test_people.py). Still no data,
as the lab days' rule calls them too: the 16 silent windows of two one-phone captures (after
windows of 68 and 57 frames, 80 minutes of nothing: nothing tells a capture filtered to one
phone from a dead radio) and 3 evening windows of 2024-04-04 (the busy morning holds the
epoch's median at about 250; the evening hears 0-9 frames a window).
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from firmware_agent.stages.anonymize import EpochKey, anonymize
from firmware_agent.stages.batch import (
    KIND_PROBE,
    NS,
    DeviceBatch,
    FrameBatch,
    ProbeBatch,
    WindowCounts,
    WindowPeople,
)
from firmware_agent.stages.capture import read_ahead
from firmware_agent.stages.config import Calibration, CountSettings, EpochClock, EstimateSettings
from firmware_agent.stages.count import WindowCounter
from firmware_agent.stages.estimate import Estimator, WindowEstimate
from firmware_agent.stages.parse import parse_batch
from firmware_agent.stages.people import PeopleCounter, PeopleSettings, calibrated
from firmware_agent.stages.privacy import PrivacyPolicy, truncate_ids

__all__ = ["NORMAL_FRAMES", "Pipeline", "PipelineConfig", "PipelineStats", "parse_frames"]

log = logging.getLogger("footfall.agent")

NORMAL_FRAMES = 10
"""A silent window is no data when the median window with frames so far holds at least this
many frames (see the module docstring)."""


class PipelineConfig(Protocol):
    """The settings the pipeline reads: the agent's whole configuration
    (:class:`~firmware_agent.service.config.AgentConfig`) is one, and the stages need not
    import the service that holds it."""

    @property
    def count(self) -> CountSettings: ...
    @property
    def epoch(self) -> EpochClock: ...
    @property
    def estimate(self) -> EstimateSettings: ...
    @property
    def calibration(self) -> Calibration | None: ...
    @property
    def privacy(self) -> PrivacyPolicy: ...


@dataclass(slots=True)
class PipelineStats:
    frames: int = 0
    probe_rows: int = 0
    probe_requests: int = 0  # rows counted as devices' probe requests
    malformed: int = 0  # rows too damaged to count
    windows: int = 0
    epochs: int = 0
    epochs_skipped: int = 0
    devices_evicted: int = 0  # device table rows evicted at count.max_devices, every epoch
    estimate_evicted: int = 0  # addresses, chains, fingerprints the estimator evicted, ditto
    evictions: tuple[int, int] = (0, 0)  # eviction rounds of the two (status v2), ditto


@dataclass(slots=True)
class Pipeline:
    """Frame batches in, closed windows out, one epoch key at a time.

    With ``estimate`` False the estimate and people stages are left out (windows carry no
    people figures): the benchmarks measure what they cost.
    """

    config: PipelineConfig
    stats: PipelineStats = field(default_factory=PipelineStats)
    estimate: bool = True
    _counter: WindowCounter = field(init=False)
    _estimator: Estimator | None = field(init=False, default=None)
    _people: PeopleCounter | None = field(init=False, default=None)
    _key: EpochKey | None = field(init=False, default=None)
    _boundary: int = field(init=False, default=0)
    _epoch_start: int = field(init=False, default=0)
    _bits: int | None = field(init=False, default=None)  # strict: this window's id width
    _heard: list[int] = field(init=False, default_factory=list)  # frames per heard window
    _heard_before: list[int] = field(init=False, default_factory=list)  # the last epoch's

    def __post_init__(self) -> None:
        self._counter = WindowCounter(self.config.count)
        self._bits = self.config.privacy.id_bits
        if self.estimate and not self.config.privacy.strict:
            self._estimator = Estimator(
                self.config.estimate,
                zone=self.config.epoch.zone,
                suppress_below=self.config.privacy.suppress_below,
            )
            self._people = PeopleCounter(
                PeopleSettings.from_config(
                    self.config.count, self.config.estimate, self.config.epoch
                )
            )

    @property
    def threshold_note(self) -> str | None:
        """The estimate's signal threshold and why (None without the estimate stage)."""
        return self._estimator.threshold_note if self._estimator else None

    @property
    def epoch_start(self) -> int | None:
        """Start (Unix seconds) of the first window counted under the current key: with the
        agent's public key, all its public label is made of (:func:`privacy.epoch_label`)."""
        return None if self._key is None else self._epoch_start // NS

    def run(
        self, batches: Iterable[FrameBatch], *, clock: Callable[[], int] | None = None
    ) -> Iterator[WindowCounts]:
        """Every window of a stream of batches, the last ones closed at its end.

        Parsing runs a batch ahead in a second thread (:func:`read_ahead`), so that on two
        cores reading and parsing overlap anonymizing and counting. With a ``clock`` (a live
        source: ``time.time_ns``), :meth:`tick` follows every batch; a live source yields
        empty batches when the air is quiet, so that windows still close on time.
        """
        for group in self.run_grouped(batches, clock=clock):
            yield from (window for window, _ in group)

    def run_grouped(
        self, batches: Iterable[FrameBatch], *, clock: Callable[[], int] | None = None
    ) -> Iterator[list[tuple[WindowCounts, int]]]:
        """:meth:`run`, a list per batch of the windows it closed (never empty), each with
        its epoch's start (:attr:`epoch_start`, as it was when the window closed): what the
        agent spools in one transaction."""

        def labelled(windows: Iterable[WindowCounts]) -> list[tuple[WindowCounts, int]]:
            out = []
            for window in windows:
                start = self.epoch_start
                if start is None:
                    raise RuntimeError(
                        f"window {window.window_start} closed without an epoch key (a bug: a "
                        "window exists only under a key)"
                    )
                out.append((window, start))
            return out

        for probes in read_ahead(map(parse_frames, batches)):
            group = labelled(self.count(probes))
            if clock is not None:
                group += labelled(self.tick(clock()))
            if group:
                yield group
        last = labelled(self.finish())
        if last:
            yield last

    def feed(self, batch: FrameBatch) -> Iterator[WindowCounts]:
        """Parse, anonymize and count one batch; yield the windows it closed."""
        yield from self.count(parse_frames(batch))

    def count(self, probes: ProbeBatch) -> Iterator[WindowCounts]:
        """Anonymize and count one parsed batch; yield the windows it closed."""
        self.stats.frames += probes.frames
        self.stats.probe_rows += len(probes)
        usable = int(np.count_nonzero(probes.kind == KIND_PROBE))
        self.stats.probe_requests += usable
        self.stats.malformed += len(probes) - usable
        yield from self._count(probes)

    def tick(self, now_ns: int) -> Iterator[WindowCounts]:
        """The wall clock says ``now_ns``: close the windows a frame stamped now would close.

        A window closes once ``now_ns`` minus ``count.lateness_s`` reaches its end (and an
        epoch ends the same way), exactly as the frames' watermark closes it; a frame that
        comes later still with an older timestamp counts as late in the oldest open window.
        Before any frame, the first tick starts the epoch and opens the current window, so a
        quiet room publishes its windows (as no data while nothing has been heard) from the
        start.
        Replays never call this.
        """
        watermark = now_ns - self.config.count.lateness_s * NS
        if self._key is None:
            self._key = EpochKey()
            self._boundary = self.config.epoch.next_boundary(watermark)
            self.stats.epochs += 1
            w = self.config.count.window_s * NS
            self._new_epoch(watermark // w * w)
            return
        if watermark >= self._boundary:
            yield from self._rotate(watermark)
        oldest = self._counter.oldest_open_ns
        if oldest is not None and oldest + self.config.count.window_s * NS <= watermark:
            yield from self._counted(self._close_until(watermark, end_visits=False))

    def finish(self) -> Iterator[WindowCounts]:
        """End of input: close every open window and forget the key.

        That is up to the newest frame's window, and at least the oldest open window: after a
        tick closed the window of the newest frame, later frames may have counted late in the
        next one, or no frame came at all since the tick opened it.
        """
        oldest = self._counter.oldest_open_ns
        if oldest is not None:
            w = self.config.count.window_s * NS
            until = oldest + w
            if self._counter.watermark_ns is not None:
                newest = self._counter.watermark_ns + self.config.count.lateness_s * NS
                until = max(until, newest // w * w + w)
            yield from self._counted(self._close_until(until, end_visits=True))
        if self._key is not None:
            self._key.wipe()
            self._key = None
        self._counter.table.wipe()
        if self._estimator:
            self._estimator.wipe()
        if self._people:
            self._people.wipe()

    def _count(self, probes: ProbeBatch) -> Iterator[WindowCounts]:
        lateness = self.config.count.lateness_s * NS
        start = 0
        while start < len(probes):
            if self._key is None:
                self._key = EpochKey()
                self._boundary = self.config.epoch.next_boundary(int(probes.ts_ns[start]))
                self.stats.epochs += 1
                w = self.config.count.window_s * NS
                self._epoch_start = int(probes.ts_ns[start]) // w * w
            ts = probes.ts_ns[start:]
            if int(ts.max()) - lateness < self._boundary:  # the common case: no boundary
                part = _rows(probes, start, len(probes))
                yield from self._counted(self._add(anonymize(part, self._key)))
                return
            newest = np.maximum.accumulate(ts)
            previous = self._counter.watermark_ns
            if previous is not None:
                np.maximum(newest, previous + lateness, out=newest)
            cut = start + int(np.argmax(newest - lateness >= self._boundary))
            part = _rows(probes, start, cut)
            yield from self._counted(self._add(anonymize(part, self._key)))
            yield from self._rotate(int(newest[cut - start]) - lateness)
            start = cut

    def _rotate(self, watermark: int) -> Iterator[WindowCounts]:
        yield from self._counted(self._close_until(self._boundary, end_visits=True))
        ended = self._key is not None
        if self._key is not None:  # there is one: the epoch being ended counted under it
            self._key.wipe()
        self._key = EpochKey()
        self.stats.epochs += 1
        start = self._boundary
        following = self.config.epoch.next_boundary(start)
        if watermark >= following:
            w = self.config.count.window_s * NS
            start = watermark // w * w
            following = self.config.epoch.next_boundary(start)
            self.stats.epochs_skipped += 1
            log.info("no frames for a whole epoch: windows resume at %d", start // NS)
        self._new_epoch(start, follows=ended and start == self._boundary)
        self._boundary = following

    def _new_epoch(self, start: int, *, follows: bool = False) -> None:
        self._epoch_start = start
        self._heard_before = self._heard or self._heard_before
        self._heard = []
        self._counter.new_epoch(start)
        if self._estimator:
            self._estimator.new_epoch(start)
        if self._people:
            self._people.new_epoch(start, follows=follows)

    def _close_until(self, until: int, *, end_visits: bool) -> list[WindowCounts]:
        windows = list(self._counter.close_until(until, end_visits=end_visits))
        if self._estimator is None or self._people is None:
            return self._strict(windows)
        estimates = self._estimator.close_until(until)
        figures = self._people.close_until(until, end_visits=end_visits)
        return self._joined(windows, estimates, figures)

    def _add(self, batch: DeviceBatch) -> list[WindowCounts]:
        """Count and estimate one batch; the windows it closed, joined with their estimates."""
        if self._bits is not None:
            truncate_ids(batch, self._bits)
        windows = list(self._counter.add(batch))
        self.stats.devices_evicted = self._counter.evicted_total
        self.stats.evictions = (self._counter.evictions, self.stats.evictions[1])
        if self._estimator is None or self._people is None:
            return self._strict(windows)
        estimates = self._estimator.add(batch)
        self.stats.estimate_evicted = self._estimator.evicted_total
        self.stats.evictions = (self._counter.evictions, self._estimator.evictions)
        figures = self._people.add(
            batch.kind,
            batch.ts_ns,
            self._estimator.row_chains,
            batch.rssi,
            self._estimator.row_thresholds,
            self._estimator.row_fresh,
        )
        return self._joined(windows, estimates, figures)

    def _joined(
        self,
        windows: list[WindowCounts],
        estimates: list[WindowEstimate],
        figures: list[WindowPeople],
    ) -> list[WindowCounts]:
        calibration = self.config.calibration
        joined = []
        for window, estimate, people in zip(windows, estimates, figures, strict=True):
            if not window.window_start == estimate.window_start == people.window_start:
                raise RuntimeError(
                    f"the counter, estimator and people stage closed different windows "
                    f"({window.window_start}, {estimate.window_start}, {people.window_start}): "
                    "a bug, their windows must line up"
                )
            joined.append(
                replace(
                    window,
                    people_est=estimate.people_est,
                    static_excluded=estimate.static_excluded,
                    figures=calibrated(people, calibration) if calibration else people,
                    calibrated=calibration is not None,
                )
            )
        return joined

    def _strict(self, windows: list[WindowCounts]) -> list[WindowCounts]:
        """Strict (no estimator): each window counted at the width its own crowd allows (the
        table still holds it), and the next window's width from it. Not under noise: a width
        that follows the crowd follows one device too (an unbounded sensitivity)."""
        policy = self.config.privacy
        if self._bits is None or policy.dp_epsilon is not None:
            return windows
        out = []
        for window in windows:
            ids, randomised = self._counter.closed_rows(window.window_start)
            out.append(policy.anonymise(window, ids, randomised, self._bits))
            self._bits = policy.next_bits(len(ids), self._bits)
        return out

    def _counted(self, windows: Iterable[WindowCounts]) -> Iterator[WindowCounts]:
        """Count the windows; a silent one is no data where the sensor normally hears."""
        for window in windows:
            self.stats.windows += 1
            hears = self._normally_hears()
            if window.frames:
                self._heard.append(window.frames)
            yield replace(window, no_data=hears and not window.frames, silence_is_gap=hears)

    def _normally_hears(self) -> bool:
        """Whether the epoch's windows with frames so far (or, before it has any, the last
        epoch's) have a median of :data:`NORMAL_FRAMES` or more; True if none ever had."""
        heard = self._heard or self._heard_before
        return not heard or statistics.median(heard) >= NORMAL_FRAMES


def parse_frames(batch: FrameBatch) -> ProbeBatch:
    """Parse a batch, then zero its frames: they hold addresses and SSIDs.

    A transient batch lies in the reader's buffer, its frames one after the other (with the
    record headers between them): that stretch is zeroed, the rest of the buffer is the
    reader's (it zeroes what it moves or no longer needs).
    """
    probes = parse_batch(batch)
    if not batch.transient:
        batch.data.fill(0)
    elif len(batch):
        batch.data[int(batch.offsets[0]) : int(batch.offsets[-1] + batch.lengths[-1])] = 0
    return probes


def _rows(probes: ProbeBatch, start: int, stop: int) -> ProbeBatch:
    """Rows start..stop of a probe batch, as views (zeroing them zeroes the batch)."""
    if start == 0 and stop == len(probes):
        return probes
    return replace(
        probes,
        kind=probes.kind[start:stop],
        ts_ns=probes.ts_ns[start:stop],
        mac=probes.mac[start:stop],
        seq=probes.seq[start:stop],
        rssi=probes.rssi[start:stop],
        freq_mhz=probes.freq_mhz[start:stop],
        ssid=probes.ssid[start:stop],
        fp=probes.fp[start:stop],
    )
