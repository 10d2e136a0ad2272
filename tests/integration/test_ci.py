"""CI runs what the README tells people to run: `.ci/run`'s last command is the README's test
command, and that command is scripts/test, which runs scripts/check before the tests."""

from __future__ import annotations

import re

from tests.support.shared import REPO


def _readme_test_command() -> str:
    readme = (REPO / "README.md").read_text()
    block = re.search(r"Run the tests .*?```sh\n(.*?)\n```", readme, re.S)
    assert block, "README.md: no 'Run the tests' paragraph with a sh block"
    return block.group(1).strip()


def test_ci_runs_exactly_the_readmes_test_command() -> None:
    lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    commands = [line for line in lines if line and not line.startswith("#")]
    assert commands[-1] == _readme_test_command() == "scripts/test"


def test_the_full_run_checks_before_it_tests() -> None:
    script = (REPO / "scripts" / "test").read_text()
    assert script.index("\nscripts/check\n") < script.index("-m pytest tests/agent")
    check = (REPO / "scripts" / "check").read_text()
    for tool in ("ruff check", "ruff format --check", "mypy", "lint-imports"):
        assert tool in check, tool
