"""Whole-system tests: agents, a store, the app and a browser together."""

import pytest

from tests.support import kernels_build
from tests.support.agent_harness import (  # noqa: F401
    reap_agents,
    recorded_keys_fixture,
    sample_windows,
)
from tests.support.aggregator_harness import pg_schema, store, store_settings  # noqa: F401
from tests.support.demo import mosquitto_demo  # noqa: F401
from tests.support.web_harness import browser, served  # noqa: F401


def pytest_collection_finish(session: pytest.Session) -> None:
    if not session.config.option.collectonly:  # the AOT build compiles while the first tests run
        kernels_build.start(session.items)


def pytest_sessionfinish(session: pytest.Session) -> None:
    kernels_build.stop()
