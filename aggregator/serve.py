"""``footfall-aggregator serve``: the API and dashboard (uvicorn), and by default ingest in
the same process (``serve.ingest = "on"``: one process for a single-site install). For scale,
``serve.ingest = "off"`` and ``footfall-aggregator ingest`` processes apart, all on one
PostgreSQL.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Generator
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

from aggregator.app import create_app
from aggregator.config import AggregatorConfig
from aggregator.store import Store

__all__ = ["serve"]

if TYPE_CHECKING:
    from aggregator.ingest import Ingest

log = logging.getLogger("footfall.aggregator")
_CALLS_GRACE_S = 10  # how long a stop waits for API and dashboard calls in progress


class _Server(uvicorn.Server):
    """uvicorn's server, whose signal also stops ingest at once, and which lets ingest finish
    (:meth:`Ingest.finish`) before it raises the signal again as uvicorn does once it has
    stopped (which used to end the process before ingest had finished its batch, and ends it
    even if a call is still waiting on the database)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._stop: Callable[[], None] = lambda: None
        self._finish: Callable[[], None] = lambda: None
        self._signalled = False

    def on_signal(self, stop: Callable[[], None], finish: Callable[[], None]) -> None:
        """On a signal, call ``stop`` at once and ``finish`` once the server has stopped."""
        self._stop, self._finish = stop, finish

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._signalled = True
        self._stop()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        with super().capture_signals():
            try:
                yield
            finally:
                if self._signalled:
                    self._finish()


def serve(
    config: AggregatorConfig,
    store: Store,
    *,
    ready: threading.Event | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Serve until SIGINT or SIGTERM (uvicorn's handlers, in the main thread) or ``stop`` is
    set, then stop ingest after its batch (:meth:`Ingest.finish`: at most ``ingest.stop_grace_s``
    after the signal; uvicorn waits at most ``_CALLS_GRACE_S`` for calls in progress).
    ``ready`` is set once the server listens and ingest (if on) has subscribed. If ingest fails
    for good (:class:`IngestFatalError`), the server stops too and the error is raised: the
    process exits non-zero for its supervisor."""
    settings = config.serve
    app = create_app(
        store, session_s=3600 * settings.session_hours, secure_cookies=settings.secure_cookies
    )
    server = _Server(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_level="warning",
            proxy_headers=bool(settings.trusted_proxies),  # none believed by default
            forwarded_allow_ips=settings.trusted_proxies,
            server_header=False,
            timeout_graceful_shutdown=_CALLS_GRACE_S,
        )
    )
    ingest, ingest_thread = None, None
    if settings.ingest:
        from aggregator.ingest import Ingest  # noqa: PLC0415 (only with ingest in process)

        ingest = Ingest(config, store)

        def ingest_ended() -> None:
            server.should_exit = True

        ingest_thread = ingest.start(on_end=ingest_ended)
        server.on_signal(
            ingest.stop, functools.partial(_finish_before_the_signal, ingest, ingest_thread)
        )
        log.info("ingest in this process: broker %s", config.broker.address)
    log.info("serving the API and dashboard on http://%s:%d/", settings.host, settings.port)

    def announce() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if ingest is not None:
            ingest.connected.wait()
        if ready is not None:
            ready.set()

    def watch(stop: threading.Event) -> None:
        stop.wait()
        server.should_exit = True

    threading.Thread(target=announce, name="footfall-ready", daemon=True).start()
    if stop is not None:
        threading.Thread(target=watch, args=(stop,), name="footfall-stop", daemon=True).start()
    try:
        server.run()
    finally:
        if ingest is not None and ingest_thread is not None:
            ingest.finish(ingest_thread)


def _finish_before_the_signal(ingest: Ingest, thread: threading.Thread) -> None:
    """Ingest's end after a signal, which uvicorn then raises again: the process ends with
    it, so a failure can only be logged."""
    try:
        ingest.finish(thread)
    except BaseException as exc:
        log.critical("%s", exc)
