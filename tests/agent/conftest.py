"""The agent's layer: agents run as subprocesses, epoch keys recorded as they are drawn."""

from tests.support.agent_harness import (  # noqa: F401
    reap_agents,
    recorded_keys_fixture,
    sample_windows,
)
