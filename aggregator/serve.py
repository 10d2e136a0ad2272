"""``footfall-aggregator serve``: the API and dashboard (uvicorn), and by default ingest in
the same process (``serve.ingest = "on"``: one process for a single-site install). For scale,
``serve.ingest = "off"`` and ``footfall-aggregator ingest`` processes apart, all on one
PostgreSQL.
"""

from __future__ import annotations

import logging
import threading
import time

import uvicorn

from aggregator.app import create_app
from aggregator.config import AggregatorConfig
from aggregator.store import Store

__all__ = ["serve"]

log = logging.getLogger("footfall.aggregator")


def serve(
    config: AggregatorConfig,
    store: Store,
    *,
    ready: threading.Event | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Serve until SIGINT or SIGTERM (uvicorn's handlers, in the main thread) or ``stop`` is
    set, then stop ingest after its batch (:meth:`Ingest.finish`: at most ``STOP_GRACE_S``).
    ``ready`` is set once the server listens and ingest (if on) has subscribed. If ingest fails
    for good (:class:`IngestFatalError`), the server stops too and the error is raised: the
    process exits non-zero for its supervisor."""
    settings = config.serve
    app = create_app(
        store, session_s=3600 * settings.session_hours, secure_cookies=settings.secure_cookies
    )
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_level="warning",
            proxy_headers=bool(settings.trusted_proxies),  # none believed by default
            forwarded_allow_ips=settings.trusted_proxies,
            server_header=False,
        )
    )
    ingest_thread = None
    if settings.ingest:
        from aggregator.ingest import Ingest  # noqa: PLC0415 (only with ingest in process)

        ingest = Ingest(config, store)

        def ingest_ended() -> None:
            server.should_exit = True

        ingest_thread = ingest.start(on_end=ingest_ended)
        log.info("ingest in this process: broker %s", config.broker.address)
    log.info("serving the API and dashboard on http://%s:%d/", settings.host, settings.port)

    def announce() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if ingest_thread is not None:
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
        if ingest_thread is not None:
            ingest.finish(ingest_thread)
