"""The aggregator's layer: a store on SQLite and PostgreSQL, the app served, a browser."""

from tests.support.aggregator_harness import pg_schema, store, store_settings  # noqa: F401
from tests.support.web_harness import browser, served  # noqa: F401
