"""The one place the agent's stages meet: capture -> parse -> anonymize -> count + estimate.

Stages do not import each other's internals; this module hands arrays from one to the
next and owns the epoch key's life:

* the counter and the estimator get the same device rows and close the same windows; each
  window's counts are joined with its estimate (and the site's calibration, if any);

* the raw frame buffer is zeroed as soon as it is parsed (it holds addresses and SSIDs);
* the address array is zeroed by the anonymize stage as soon as it is hashed;
* in strict privacy mode, device ids are truncated (and fingerprints dropped) before the
  counter sees them, the estimate stage is left out, and the key lives one window; the
  windows count truncated ids (the privacy stage corrects them for collisions on release);
* when the watermark reaches an epoch boundary, the windows before it are closed (every
  open visit ends), the key, the device table and the estimator's chains are overwritten,
  and a new key starts.

Windows close on the frames' own clock. A live source also gives the wall clock
(:meth:`Pipeline.tick`): a quiet room still closes its windows on time, with zeros.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np

from firmware_agent.anonymize import DeviceBatch, EpochKey, anonymize
from firmware_agent.capture import FrameBatch, read_ahead
from firmware_agent.count import NS, WindowCounter, WindowCounts
from firmware_agent.estimate import Estimator, WindowEstimate
from firmware_agent.parse import KIND_PROBE, ProbeBatch, parse_batch
from firmware_agent.privacy import truncate_ids
from firmware_agent.settings import AgentConfig

__all__ = ["Pipeline", "PipelineStats", "parse_frames"]

log = logging.getLogger("footfall.agent")


@dataclass(slots=True)
class PipelineStats:
    frames: int = 0
    probe_rows: int = 0
    probe_requests: int = 0  # rows counted as devices' probe requests
    malformed: int = 0  # rows too damaged to count
    windows: int = 0
    epochs: int = 0
    epochs_skipped: int = 0


@dataclass(slots=True)
class Pipeline:
    """Frame batches in, closed windows out, one epoch key at a time.

    With ``estimate`` False the estimate stage is left out (windows carry no people
    estimate): the benchmarks measure what it costs.
    """

    config: AgentConfig
    stats: PipelineStats = field(default_factory=PipelineStats)
    estimate: bool = True
    _counter: WindowCounter = field(init=False)
    _estimator: Estimator | None = field(init=False, default=None)
    _key: EpochKey | None = field(init=False, default=None)
    _boundary: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self._counter = WindowCounter(self.config.count)
        if self.estimate and not self.config.privacy.strict:
            self._estimator = Estimator(self.config.estimate, zone=self.config.epoch.zone)

    @property
    def threshold_note(self) -> str | None:
        """The estimate's signal threshold and why (None without the estimate stage)."""
        return self._estimator.threshold_note if self._estimator else None

    @property
    def epoch_label(self) -> str | None:
        """Public random label of the current epoch (not derived from the key)."""
        return None if self._key is None else self._key.label

    def run(
        self, batches: Iterable[FrameBatch], *, clock: Callable[[], int] | None = None
    ) -> Iterator[WindowCounts]:
        """Every window of a stream of batches, the last ones closed at its end.

        Parsing runs a batch ahead in a second thread (:func:`read_ahead`), so that on two
        cores reading and parsing overlap anonymizing and counting. With a ``clock`` (a live
        source: ``time.time_ns``), :meth:`tick` follows every batch; a live source yields
        empty batches when the air is quiet, so that windows still close on time.
        """
        for probes in read_ahead(map(parse_frames, batches)):
            yield from self.count(probes)
            if clock is not None:
                yield from self.tick(clock())
        yield from self.finish()

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
        quiet room publishes zeros from the start. Replays never call this.
        """
        watermark = now_ns - self.config.count.lateness_s * NS
        if self._key is None:
            self._key = EpochKey()
            self._boundary = self.config.epoch.next_boundary(watermark)
            self.stats.epochs += 1
            w = self.config.count.window_s * NS
            self._counter.new_epoch(watermark // w * w)
            if self._estimator:
                self._estimator.new_epoch(watermark // w * w)
            return
        if watermark >= self._boundary:
            yield from self._rotate(watermark)
        oldest = self._counter.oldest_open_ns
        if oldest is not None and oldest + self.config.count.window_s * NS <= watermark:
            windows = list(self._counter.close_until(watermark, end_visits=False))
            estimates = self._estimator.close_until(watermark) if self._estimator else None
            yield from self._counted(self._joined(windows, estimates))

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
            windows = list(self._counter.close_until(until, end_visits=True))
            estimates = self._estimator.close_until(until) if self._estimator else None
            yield from self._counted(self._joined(windows, estimates))
        if self._key is not None:
            self._key.wipe()
            self._key = None
        self._counter.table.wipe()
        if self._estimator:
            self._estimator.wipe()

    def _count(self, probes: ProbeBatch) -> Iterator[WindowCounts]:
        lateness = self.config.count.lateness_s * NS
        start = 0
        while start < len(probes):
            if self._key is None:
                self._key = EpochKey()
                self._boundary = self.config.epoch.next_boundary(int(probes.ts_ns[start]))
                self.stats.epochs += 1
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
        assert self._key is not None
        windows = list(self._counter.close_until(self._boundary, end_visits=True))
        estimates = self._estimator.close_until(self._boundary) if self._estimator else None
        yield from self._counted(self._joined(windows, estimates))
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
        self._counter.new_epoch(start)
        if self._estimator:
            self._estimator.new_epoch(start)
        self._boundary = following

    def _add(self, batch: DeviceBatch) -> list[WindowCounts]:
        """Count and estimate one batch; the windows it closed, joined with their estimates."""
        bits = self.config.privacy.id_bits
        if bits is not None:
            truncate_ids(batch, bits)
        windows = list(self._counter.add(batch))
        estimates = self._estimator.add(batch) if self._estimator else None
        return self._joined(windows, estimates)

    def _joined(
        self, windows: list[WindowCounts], estimates: list[WindowEstimate] | None
    ) -> list[WindowCounts]:
        if estimates is None:
            return windows
        calibration = self.config.calibration
        joined = []
        for window, estimate in zip(windows, estimates, strict=True):
            assert window.window_start == estimate.window_start, "counter and estimator differ"
            joined.append(
                replace(
                    window,
                    people_est=estimate.people_est,
                    static_excluded=estimate.static_excluded,
                    people=calibration.people(estimate.people_est) if calibration else None,
                )
            )
        return joined

    def _counted(self, windows: Iterable[WindowCounts]) -> Iterator[WindowCounts]:
        for window in windows:
            self.stats.windows += 1
            yield window


def parse_frames(batch: FrameBatch) -> ProbeBatch:
    """Parse a batch, then zero its frame buffer: it holds addresses and SSIDs.

    A transient batch lies in the reader's buffer, which the next read overwrites and
    closing the reader zeroes.
    """
    probes = parse_batch(batch)
    if not batch.transient:
        batch.data.fill(0)
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
