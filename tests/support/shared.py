"""Where the real captures live (``../shared``, beside a developer's checkout, not shipped).

Tests that read it skip with the reason when it is absent; ``FOOTFALL_REQUIRE_SHARED=1`` (set by
``.ci/run``) turns that skip into a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("FOOTFALL_SHARED", REPO.parent / "shared"))
REQUIRE_SHARED = os.environ.get("FOOTFALL_REQUIRE_SHARED") == "1"


def shared_path(*parts: str) -> Path:
    """A path inside ../shared; skip (or fail under FOOTFALL_REQUIRE_SHARED=1) if absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        reason = (
            f"{path} is absent: ../shared (real captures and the tshark oracle) sits beside "
            "a developer's checkout but is not shipped; set FOOTFALL_SHARED to point at it"
        )
        if REQUIRE_SHARED:
            pytest.fail(reason + " (FOOTFALL_REQUIRE_SHARED=1 makes this a failure)")
        pytest.skip(reason)
    return path


def shared_capture_names() -> list[str]:
    """Names of the shared captures, for parametrisation (empty when ../shared is absent)."""
    pcaps = SHARED / "data" / "pcaps"
    if not pcaps.is_dir():
        return ["<no shared captures>"]
    return sorted(p.name for p in pcaps.iterdir() if not p.name.endswith(".csv"))
