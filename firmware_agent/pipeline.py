"""The one place the agent's stages meet: capture -> parse -> anonymize -> count.

Stages do not import each other's internals; this module hands arrays from one to the
next and owns the epoch key's life:

* the raw frame buffer is zeroed as soon as it is parsed (it holds addresses and SSIDs);
* the address array is zeroed by the anonymize stage as soon as it is hashed;
* when the watermark reaches an epoch boundary, the windows before it are closed (every
  open visit ends), the key and the device table are overwritten, and a new key starts.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np

from firmware_agent.anonymize import EpochKey, anonymize
from firmware_agent.capture import FrameBatch, read_ahead
from firmware_agent.count import NS, WindowCounter, WindowCounts
from firmware_agent.parse import ProbeBatch, parse_batch
from firmware_agent.settings import AgentConfig

__all__ = ["Pipeline", "PipelineStats", "parse_frames"]

log = logging.getLogger("footfall.agent")


@dataclass(slots=True)
class PipelineStats:
    frames: int = 0
    probe_rows: int = 0
    windows: int = 0
    epochs: int = 0
    epochs_skipped: int = 0


@dataclass(slots=True)
class Pipeline:
    """Frame batches in, closed windows out, one epoch key at a time."""

    config: AgentConfig
    stats: PipelineStats = field(default_factory=PipelineStats)
    _counter: WindowCounter = field(init=False)
    _key: EpochKey | None = field(init=False, default=None)
    _boundary: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self._counter = WindowCounter(self.config.count)

    @property
    def epoch_label(self) -> str | None:
        """Public random label of the current epoch (not derived from the key)."""
        return None if self._key is None else self._key.label

    def run(self, batches: Iterable[FrameBatch]) -> Iterator[WindowCounts]:
        """Every window of a stream of batches, the last ones closed at its end.

        Parsing runs a batch ahead in a second thread (:func:`read_ahead`), so that on two
        cores reading and parsing overlap anonymizing and counting.
        """
        for probes in read_ahead(map(parse_frames, batches)):
            yield from self.count(probes)
        yield from self.finish()

    def feed(self, batch: FrameBatch) -> Iterator[WindowCounts]:
        """Parse, anonymize and count one batch; yield the windows it closed."""
        yield from self.count(parse_frames(batch))

    def count(self, probes: ProbeBatch) -> Iterator[WindowCounts]:
        """Anonymize and count one parsed batch; yield the windows it closed."""
        self.stats.frames += probes.frames
        self.stats.probe_rows += len(probes)
        yield from self._count(probes)

    def finish(self) -> Iterator[WindowCounts]:
        """End of input: close every open window and forget the key."""
        yield from self._counted(self._counter.close_all())
        if self._key is not None:
            self._key.wipe()
            self._key = None
        self._counter.table.wipe()

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
                yield from self._counted(self._counter.add(anonymize(part, self._key)))
                return
            newest = np.maximum.accumulate(ts)
            previous = self._counter.watermark_ns
            if previous is not None:
                np.maximum(newest, previous + lateness, out=newest)
            cut = start + int(np.argmax(newest - lateness >= self._boundary))
            part = _rows(probes, start, cut)
            yield from self._counted(self._counter.add(anonymize(part, self._key)))
            yield from self._rotate(int(newest[cut - start]) - lateness)
            start = cut

    def _rotate(self, watermark: int) -> Iterator[WindowCounts]:
        assert self._key is not None
        yield from self._counted(self._counter.close_until(self._boundary, end_visits=True))
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
        self._boundary = following

    def _counted(self, windows: Iterator[WindowCounts]) -> Iterator[WindowCounts]:
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
