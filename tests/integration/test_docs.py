"""The README shows every ``footfall-agent`` command (a command nobody can find is not there)."""

from __future__ import annotations

import argparse

from firmware_agent.cli import build_parser
from tests.support.shared import REPO


def test_every_agent_command_is_in_the_readme() -> None:
    readme = (REPO / "README.md").read_text()
    (commands,) = (
        action
        for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    for name in commands.choices:
        assert f"footfall-agent {name}" in readme, f"README.md does not show {name!r}"
