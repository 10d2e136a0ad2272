"""The API benchmark's code, at a tiny scale (2 agents x 2 days, SQLite and PostgreSQL), so that
it cannot rot: it builds, times every call of the site page, compares with its baselines and
prints its tables."""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

import pytest

from tests.support.aggregator_harness import pg_dsn
from tests.support.shared import REPO


def _bench() -> Any:
    spec = importlib.util.spec_from_file_location("bench_api", REPO / "bench" / "bench_api.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_api"] = bench
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.postgres
def test_the_api_benchmark_runs_at_a_tiny_scale(capsys: pytest.CaptureFixture[str]) -> None:
    bench = _bench()
    argv = ["--agents", "2", "--days", "2", "--repeat", "2", "--pg", pg_dsn()]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    for kind in ("sqlite", "postgresql"):
        assert f"{kind}: building 2 days of 2 agents" in out
        assert f"{kind}: baselines in process" in out
    for label, _ in bench.calls("bench", bench.date(2026, 1, 1)):
        assert out.count(f"| {label} |") == 4  # per database, as it went and at the end
    assert out.count("| busy times from roll-ups |") == 4


def test_the_api_benchmark_times_two_checkouts_in_turns(capsys: pytest.CaptureFixture[str]) -> None:
    """``--against``: this checkout against itself, each served by a process of its own, while
    a thread holds the write lock now and then (``--writing``)."""
    bench = _bench()
    argv = ["--agents", "1", "--days", "1", "--repeat", "2", "--only", "sqlite"]
    assert bench.main([*argv, "--against", str(REPO), "--writing"]) == 0
    out = capsys.readouterr().out
    assert "before (--against) and after (this checkout) in turns" in out
    for label, _ in bench.calls("bench", bench.date(2026, 1, 1)):
        assert out.count(f"| {label} |") == 2
