"""Channel hopping: ``iw`` moves a monitor interface over a list of channels, in its own thread.

A phone sends its probe requests on every channel in turn, so one fixed channel already sees
most of them; hopping (``source.hop = "on"``) trades a share of each phone's frames for
coverage of access points' channels. Each channel is set once, in order, before the thread
starts, so a missing ``iw`` or a channel the radio refuses (a regulatory domain without
channel 13, a 2.4 GHz-only adapter asked for 36) is a clear error at start, naming the
channel and the interface. A failure later (the adapter unplugged) is kept in
:attr:`ChannelHopper.error` for the capture loop to raise.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading

from firmware_agent.contract.errors import ChannelHopError

__all__ = ["ChannelHopper"]

log = logging.getLogger("footfall.agent")

_IW_TIMEOUT_S = 5.0


class ChannelHopper:
    """Hops ``iface`` over ``channels``, ``dwell_ms`` on each (start, stop, error)."""

    def __init__(self, iface: str, channels: tuple[int, ...], dwell_ms: int) -> None:
        if not channels:
            raise ChannelHopError(f"channel hopping on {iface}: no channels to hop over")
        self.iface = iface
        self.channels = channels
        self.dwell_s = dwell_ms / 1000
        self.error: ChannelHopError | None = None
        self.hops = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        iw = shutil.which("iw")
        if iw is None:
            raise ChannelHopError(
                f"channel hopping on {iface} needs iw, which is not installed: "
                "'apt-get install iw', or set source.hop = 'off'"
            )
        self._iw = iw

    def set_channel(self, channel: int) -> None:
        """Tune the interface to ``channel`` now; ChannelHopError naming it if refused."""
        command = [self._iw, "dev", self.iface, "set", "channel", str(channel)]
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=_IW_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise ChannelHopError(
                f"iw did not set channel {channel} on {self.iface} within {_IW_TIMEOUT_S:g} s"
            ) from exc
        if done.returncode != 0:
            why = (done.stderr or done.stdout).strip().splitlines()
            raise ChannelHopError(
                f"iw refused channel {channel} on {self.iface}: "
                f"{why[-1] if why else f'exit status {done.returncode}'} (check "
                "source.hop_channels against 'iw list' and the regulatory domain, 'iw reg get')"
            )

    def start(self) -> None:
        """Check every channel once, then hop in a daemon thread."""
        for channel in self.channels:
            self.set_channel(channel)
        log.info(
            "hopping %s over channels %s, %d ms each",
            self.iface,
            ",".join(map(str, self.channels)),
            round(self.dwell_s * 1000),
        )
        self._thread = threading.Thread(target=self._run, name="footfall-hop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            for channel in self.channels:
                if self._stop.wait(self.dwell_s):
                    return
                try:
                    self.set_channel(channel)
                except ChannelHopError as exc:
                    self.error = exc
                    log.error("%s", exc)
                    return
                self.hops += 1

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
