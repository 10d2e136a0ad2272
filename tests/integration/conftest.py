"""Whole-system tests: agents, a store, the app and a browser together."""

from tests.support.agent_harness import (  # noqa: F401
    reap_agents,
    recorded_keys_fixture,
    sample_windows,
)
from tests.support.aggregator_harness import pg_schema, store, store_settings  # noqa: F401
from tests.support.web_harness import browser, served  # noqa: F401
