"""``footfall-agent survey``: the installer's site survey, before the agent counts.

For a few minutes it listens on the live interface (hopping over ``--channels`` when given)
and shows, per channel, the probe requests heard a second and a histogram of their signal in
10 dB bands, refreshed every couple of seconds with the time left. Moving the antenna between
runs, the installer keeps the place and channel where the shop is heard strongest.

Only frames are counted: each batch is parsed for its signal and frequency, and its
transmitter addresses are zeroed at once (:func:`survey`), as the anonymize stage would;
nothing per device is kept, shown or written.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import TextIO

import numpy as np

from firmware_agent.contract.errors import ConfigError
from firmware_agent.service.config import AgentConfig
from firmware_agent.stages.batch import KIND_PROBE, RSSI_MISSING, FrameBatch
from firmware_agent.stages.live import IFACE_PREFIX, LiveCapture
from firmware_agent.stages.parse import parse_batch

__all__ = ["BANDS", "Survey", "channel_of", "run_survey"]

# Signal bands (dBm, lower bound; the last takes everything weaker).
BANDS = (-50, -60, -70, -80, -90)
_BAND_NAMES = (">=-50", "-60", "-70", "-80", "-90", "<-90")


def channel_of(freq_mhz: int) -> str:
    """The 802.11 channel of a frequency ('?' where the radio header gave none)."""
    if freq_mhz == 2484:
        return "14"
    if 2412 <= freq_mhz <= 2472:
        return str((freq_mhz - 2407) // 5)
    if 5000 < freq_mhz < 5900:
        return str((freq_mhz - 5000) // 5)
    return "?"


@dataclass
class Survey:
    """Probe requests per channel and signal band; frames only, no device."""

    probes: Counter[str] = field(default_factory=Counter)
    bands: dict[str, list[int]] = field(default_factory=dict)
    no_signal: Counter[str] = field(default_factory=Counter)

    def add(self, batch: FrameBatch) -> None:
        probes = parse_batch(batch)
        probes.mac.fill(0)  # the addresses go at once: nothing here is per device
        keep = probes.kind == KIND_PROBE
        for freq in np.unique(probes.freq_mhz[keep]):
            channel = channel_of(int(freq))
            rssi = probes.rssi[keep & (probes.freq_mhz == freq)]
            heard = rssi[rssi != RSSI_MISSING]
            self.probes[channel] += len(rssi)
            self.no_signal[channel] += len(rssi) - len(heard)
            counts = self.bands.setdefault(channel, [0] * len(_BAND_NAMES))
            index = np.searchsorted(-np.array(BANDS), -heard, side="left")
            for band, n in zip(*np.unique(index, return_counts=True), strict=True):
                counts[int(band)] += int(n)

    def table(self, elapsed_s: float) -> str:
        """Per channel: probe requests a second and the share in each signal band."""
        head = f"{'channel':<8}{'probes/s':>9}  " + " ".join(f"{b:>6}" for b in _BAND_NAMES)
        lines = [head + "  (share of probe requests by signal, dBm)"]
        for channel in sorted(self.probes, key=lambda c: (c == "?", int(c) if c != "?" else 0)):
            counts = self.bands.get(channel, [0] * len(_BAND_NAMES))
            heard = max(sum(counts), 1)
            shares = " ".join(f"{n / heard:>6.0%}" for n in counts)
            rate = self.probes[channel] / max(elapsed_s, 1e-9)
            lines.append(f"{channel:<8}{rate:>9.1f}  {shares}")
        if not self.probes:
            lines.append("(no probe request heard yet)")
        return "\n".join(lines)


def run_survey(
    config: AgentConfig,
    seconds: float,
    channels: tuple[int, ...] | None = None,
    out: TextIO | None = None,
    every_s: float = 2.0,
) -> Survey:
    """Listen for ``seconds`` on the configured live interface, showing the table as it
    fills (every ``every_s`` on a terminal, at the end otherwise) and what time is left."""
    out = out or sys.stdout
    path = config.source.path
    if not path.startswith(IFACE_PREFIX):
        raise ConfigError(
            f"survey listens on a live interface: source.path must be iface:<name>, got {path!r}"
        )
    settings = config.live
    if channels:
        settings = replace(settings, hop=True, hop_channels=channels)
    survey = Survey()
    started = time.monotonic()
    with LiveCapture(path.removeprefix(IFACE_PREFIX), settings, idle_s=0.2) as source:
        timer = threading.Timer(seconds, source.stop)
        timer.start()
        try:
            _fill(survey, source, started, seconds, out, every_s)
        finally:
            timer.cancel()
    elapsed = time.monotonic() - started
    out.write(f"\nsurvey of {elapsed:.0f} s on {path}:\n{survey.table(elapsed)}\n")
    out.flush()
    return survey


def _fill(
    survey: Survey,
    batches: Iterable[FrameBatch],
    started: float,
    seconds: float,
    out: TextIO,
    every_s: float,
) -> None:
    tty = out.isatty()
    shown = started
    for batch in batches:
        survey.add(batch)
        now = time.monotonic()
        if now - shown >= every_s:
            shown = now
            left = max(seconds - (now - started), 0)
            progress = f"{now - started:.0f} s of {seconds:.0f} s, {left:.0f} s left"
            if tty:
                out.write("\x1b[H\x1b[J" + survey.table(now - started) + "\n" + progress + "\n")
            else:
                out.write(progress + "\n")
            out.flush()
