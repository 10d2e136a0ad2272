"""The aggregator's web app: the API (:mod:`aggregator.api`, :mod:`aggregator.admin`) and the
dashboard (:mod:`aggregator.dashboard`) over one store, served by ``footfall-aggregator serve``
(:mod:`aggregator.serve`) and by the tests' harnesses.
"""

from __future__ import annotations

from fastapi import FastAPI

from aggregator import __version__
from aggregator.admin import admin_router
from aggregator.api import Services, api_router
from aggregator.dashboard import install_dashboard
from aggregator.store import Store

__all__ = ["create_app"]


def create_app(
    store: Store, *, session_s: int = 12 * 3600, secure_cookies: str = "auto"
) -> FastAPI:
    """The API and the dashboard over one store."""
    app = FastAPI(
        title="footfall",
        version=__version__,
        description="Foot traffic counts of the sites you may see. Errors: "
        '{"error": {"status", "code", "message", "field"}}.',
        openapi_url="/api/v1/openapi.json",
        docs_url=None,  # api_docs: Swagger UI from this server, under its own CSP
        redoc_url=None,
    )
    app.state.services = Services(store, session_s, secure_cookies)
    app.include_router(api_router)
    app.include_router(admin_router)
    install_dashboard(app)
    return app
