"""The settings README.md documents: the keys of its TOML examples, by program.

A TOML block under the ``## The aggregator`` heading documents the aggregator's settings; every
other one the agent's (both have a ``[broker]`` table, with different keys).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping

from tests.support.shared import REPO

_BLOCK = re.compile(r"^```toml\n(.*?)^```", re.M | re.S)


def _flatten(table: Mapping[str, object], prefix: str = "") -> set[str]:
    names: set[str] = set()
    for key, value in table.items():
        if isinstance(value, dict):
            names |= _flatten(value, f"{prefix}{key}.")
        else:
            names.add(f"{prefix}{key}")
    return names


def documented(program: str) -> set[str]:
    """Dotted names of the settings README.md's TOML examples show for ``program`` ('agent' or
    'aggregator')."""
    names: set[str] = set()
    for part in re.split(r"^(?=## )", (REPO / "README.md").read_text(), flags=re.M):
        is_aggregator = part.startswith("## The aggregator")
        if is_aggregator == (program == "aggregator"):
            for block in _BLOCK.findall(part):
                names |= _flatten(tomllib.loads(block))
    return names
