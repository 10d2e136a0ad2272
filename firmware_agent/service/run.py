"""``footfall-agent run``: the long-running agent, source -> pipeline -> spool -> publisher.

* **Source** (``source.path``): a capture file replayed at its own pace, at a multiple of it,
  or as fast as possible (``source.speed``), ``-``, a pcap stream on standard input, or
  ``iface:<name>``, a monitor-mode interface (:mod:`firmware_agent.stages.live`), whose windows also
  close on the wall clock when the air is quiet.
* **For installers** (optional): Prometheus metrics on ``metrics.port`` and a Home Assistant
  discovery config (:mod:`firmware_agent.service.metrics`,
  :mod:`firmware_agent.service.homeassistant`).
* Each closed window is signed and appended to the spool (which allocates its sequence
  number durably), then the publisher thread sends it (:mod:`firmware_agent.service.publish`). The
  windows one batch of frames closed are appended in one transaction (one fsync), so a
  backfill is not held to the disk's fsync rate; none is sent before its commit.
* A window at or before the newest one already spooled is skipped: an agent publishes a
  window once, even when a restart replays the same capture from its beginning.
* **End of a capture file**: every open window is closed and spooled, and the agent waits until
  the spool is empty (however long the broker takes), goes offline and exits.
* **SIGTERM or SIGINT**: the source stops, the open window is closed and spooled, the
  publisher keeps sending for up to ``broker.stop_grace_s`` and the status goes ``offline``;
  anything unsent stays in the spool for the next start. A second signal exits at once.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING

import nacl.signing

from firmware_agent import __version__
from firmware_agent.contract.errors import ConfigError
from firmware_agent.contract.messages import counts_payload, meta_payload, seal
from firmware_agent.contract.signing import load_signing_key
from firmware_agent.service.config import AgentConfig
from firmware_agent.service.homeassistant import announce_in_background
from firmware_agent.service.metrics import MetricsServer, SpoolWatch, agent_metrics
from firmware_agent.service.publish import Publisher
from firmware_agent.service.spool import SPOOL_FILE, Spool
from firmware_agent.stages.batch import NS, FrameBatch, WindowCounts
from firmware_agent.stages.capture import CaptureReader
from firmware_agent.stages.config import AUTO
from firmware_agent.stages.live import IFACE_PREFIX, LiveCapture
from firmware_agent.stages.people import PeopleSettings
from firmware_agent.stages.pipeline import Pipeline
from firmware_agent.stages.privacy import epoch_label

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = ["agent_meta", "run_agent"]

log = logging.getLogger("footfall.agent")

_PACED_BATCH_FRAMES = 256  # small batches, so that paced windows close close to their time


class _StoppableInput(io.RawIOBase):
    """A pipe that reads as ended once ``stop`` is set, instead of blocking until data comes."""

    def __init__(self, fd: int, stop: threading.Event) -> None:
        super().__init__()
        self._fd = fd
        self._stop = stop

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        while not self._stop.is_set():
            ready, _, _ = select.select([self._fd], [], [], 0.2)
            if ready:
                return os.readv(self._fd, [buffer])
        return 0


def _paced(
    batches: Iterable[FrameBatch], speed: float | None, stop: threading.Event
) -> Iterator[FrameBatch]:
    """Hand each batch over once its last frame is due at ``speed`` times the capture's pace
    (None: at once); end early when ``stop`` is set."""
    origin: tuple[int, float] | None = None
    for batch in batches:
        if stop.is_set():
            return
        if speed is not None and len(batch):
            if origin is None:
                origin = (int(batch.ts_ns[0]), time.monotonic())
            due = origin[1] + (int(batch.ts_ns.max()) - origin[0]) / NS / speed
            if stop.wait(max(0.0, due - time.monotonic())):
                return
        yield batch


def agent_meta(config: AgentConfig) -> dict[str, object]:
    """The meta payload: how this agent counts and what it does for privacy."""
    count = config.count
    people = PeopleSettings.from_config(count, config.estimate, config.epoch)
    threshold = config.estimate.rssi_threshold_dbm
    return meta_payload(
        config.identity.site,
        config.identity.agent,
        agent_version=__version__,
        window_s=count.window_s,
        epoch_length="midnight" if config.epoch.length_s is None else config.epoch.length_s,
        epoch_timezone=str(config.values["epoch.timezone"]),
        thresholds={
            "rssi_threshold_dbm": "auto" if threshold == AUTO else threshold,
            "min_dwell_s": people.min_dwell_s,
            "visit_gap_s": people.visit_gap_s,
            "lateness_s": count.lateness_s,
            "presence_hold_s": people.hold_s,
        },
        privacy=config.privacy.meta(),
    )


def _counts_message(
    config: AgentConfig, key: nacl.signing.SigningKey, label: str, window: WindowCounts, seq: int
) -> bytes:
    identity = config.identity
    return seal(
        counts_payload(
            identity.site,
            identity.agent,
            seq,
            label,
            config.privacy.release(window),
        ),
        key,
    )


@contextmanager
def _signals(stop: threading.Event) -> Iterator[None]:
    """SIGTERM and SIGINT set ``stop`` (and nothing else: a handler that took a lock the main
    thread holds would hang); a second one exits at once."""

    def handler(_signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _open_source(config: AgentConfig, stop: threading.Event) -> CaptureReader | LiveCapture:
    source = config.source
    if not source.path:
        raise ConfigError(
            "source.path is empty: set it (or --source) to a capture file, '-' for a pcap "
            "stream on standard input, or iface:<name> for a monitor-mode interface"
        )
    if source.path.startswith(IFACE_PREFIX):
        return LiveCapture(source.path.removeprefix(IFACE_PREFIX), config.live, stop=stop)
    if source.path == "-":
        stream = io.BufferedReader(_StoppableInput(sys.stdin.fileno(), stop))
        return CaptureReader(stream, in_place=True)
    if source.speed is None:
        return CaptureReader(source.path, in_place=True)
    return CaptureReader(source.path, in_place=True, batch_frames=_PACED_BATCH_FRAMES)


def run_agent(config: AgentConfig) -> int:
    """Run until the source ends and the spool is sent, or until a signal (module docstring)."""
    identity = config.identity
    key = load_signing_key(identity.config_dir)
    spool_path = identity.state_dir / SPOOL_FILE
    stop = threading.Event()
    with (
        Spool(spool_path, config.spool) as spool,
        _open_source(config, stop) as reader,
        _signals(stop),
    ):
        pipeline = Pipeline(config)
        publisher = Publisher(
            config.broker, identity.site, identity.agent, key, spool_path, config.spool,
            agent_meta(config), lambda: pipeline.stats.evictions,
        )  # fmt: skip
        publisher.start()
        log.info("running site=%s agent=%s source=%s", identity.site, identity.agent, reader.name)
        watch = metrics = None
        if config.metrics.port:
            watch = SpoolWatch(spool_path)
            kernel = reader.kernel_stats if isinstance(reader, LiveCapture) else None
            metrics = MetricsServer(
                config.metrics, agent_metrics(pipeline.stats, watch, publisher.connected, kernel)
            )
        if config.homeassistant.discovery:
            announce_in_background(
                config.broker, config.homeassistant, identity.site, identity.agent, stop
            )
        try:
            spooled = _spool_windows(config, key, reader, pipeline, spool, publisher, stop)
        except BaseException:
            publisher.stop(0)
            publisher.join(5)
            raise
        finally:
            if metrics is not None and watch is not None:
                metrics.close()
                watch.close()
        _finish(publisher, stop, config.broker.stop_grace_s)
    log.info(
        "stopped site=%s agent=%s: %d frames, %d windows spooled",
        identity.site,
        identity.agent,
        pipeline.stats.frames,
        spooled,
    )
    return 0


def _spool_windows(
    config: AgentConfig,
    key: nacl.signing.SigningKey,
    reader: CaptureReader | LiveCapture,
    pipeline: Pipeline,
    spool: Spool,
    publisher: Publisher,
    stop: threading.Event,
) -> int:
    """Every window of the source into the spool (but those spooled before); how many."""
    newest = spool.state().newest_window
    spooled = skipped = 0
    live = isinstance(reader, LiveCapture)
    speed = None if live or config.source.path == "-" else config.source.speed
    clock = time.time_ns if live else None
    for group in pipeline.run_grouped(_paced(reader, speed, stop), clock=clock):
        ready = [(w, start) for w, start in group if newest is None or w.window_start > newest]
        skipped += len(group) - len(ready)
        if not ready:
            continue
        spool.append_many(
            [
                (
                    w.window_start,
                    functools.partial(
                        _counts_message, config, key, epoch_label(key.verify_key.encode(), start), w
                    ),
                )
                for w, start in ready
            ]
        )
        spooled += len(ready)
        publisher.notify()
        if publisher.error is not None:
            raise publisher.error
    if skipped:
        log.info("skipped %d windows already spooled before this start", skipped)
    return spooled


def _finish(publisher: Publisher, stop: threading.Event, grace_s: int) -> None:
    """The source has ended: let the publisher send everything, or, once a signal came, what
    it can within ``grace_s``."""
    publisher.stop(None)
    graced = False
    while True:
        if stop.is_set() and not graced:
            log.info("stopping: sending spooled windows for up to %d s", grace_s)
            publisher.stop(grace_s)
            graced = True
        if publisher.join(0.2):
            break
    if publisher.error is not None:
        raise publisher.error
