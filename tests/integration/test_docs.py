"""The README shows every ``footfall-agent`` command (a command nobody can find is not there);
both programs and everything shipped spell enrolling one way."""

from __future__ import annotations

import argparse
import re

from aggregator import cli as aggregator_cli
from firmware_agent import cli as agent_cli
from tests.support.shared import REPO

# The other spelling: the alias itself, or a line that says it is one.
_ENROLL = re.compile(r"\benroll(s|ment)?\b", re.IGNORECASE)
_ALIAS = ("aliases=", "'enroll' too", "the other spelling", "is the same command")


def test_every_agent_command_is_in_the_readme() -> None:
    readme = (REPO / "README.md").read_text()
    for name in _commands(agent_cli.build_parser()):
        assert f"footfall-agent {name}" in readme, f"README.md does not show {name!r}"


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (commands,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(commands.choices)


def test_both_programs_spell_it_enrol_and_take_enroll_as_the_same_command() -> None:
    """Issue 19: ``enrol`` everywhere (the project's British spelling: enrolment, enrolled),
    ``enroll`` accepted as an alias by both programs and named only as that."""
    for program in (agent_cli, aggregator_cli):
        commands = _commands(program.build_parser())
        assert commands["enroll"] is commands["enrol"], program.__name__
    shipped = [REPO / "README.md", *(REPO / "docs").rglob("*.md"), *(REPO / "hardware").rglob("*")]
    shipped += [*(REPO / "firmware_agent").rglob("*.py"), *(REPO / "aggregator").rglob("*.py")]
    shipped += [*(REPO / "aggregator" / "web").rglob("*.html")]
    stray = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in shipped
        if path.is_file() and path.suffix not in {".pcap", ".png", ".jpg"}
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if _ENROLL.search(line) and not any(alias in line for alias in _ALIAS)
    ]
    assert not stray, "spell it 'enrol' ('enroll' only as the alias):\n" + "\n".join(stray)
