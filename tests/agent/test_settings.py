"""Settings: defaults, file, environment and flags in that order; bad input named precisely."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from firmware_agent.contract.errors import ConfigError
from firmware_agent.settings import SETTINGS, load_config
from firmware_agent.stages.batch import NS
from firmware_agent.stages.config import EpochClock
from tests.support.readme_settings import documented
from tests.support.shared import REPO


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_precedence_is_default_file_environment_flag(tmp_path: Path) -> None:
    path = _write(tmp_path, "[count]\nwindow_s = 600\nmin_dwell_s = 30\n")
    config = load_config(
        path,
        environ={"FOOTFALL_COUNT_WINDOW_S": "900", "FOOTFALL_COUNT_VISIT_GAP_S": "700"},
        overrides={"count.window_s": 1200},
    )
    assert config.count.window_s == 1200
    assert config.sources["count.window_s"] == "command line"
    assert (config.count.min_dwell_s, config.sources["count.min_dwell_s"]) == (30, str(path))
    assert config.count.visit_gap_s == 700
    assert config.sources["count.visit_gap_s"] == "FOOTFALL_COUNT_VISIT_GAP_S"
    assert config.sources["count.lateness_s"] == "default"


def test_unknown_key_is_an_error_with_a_suggestion(tmp_path: Path) -> None:
    path = _write(tmp_path, "[count]\nwindow_sec = 300\n")
    with pytest.raises(
        ConfigError, match=r"unknown setting 'count.window_sec'; did you mean 'count.window_s'"
    ):
        load_config(path, environ={})


def test_wrong_type_names_setting_value_and_source(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError,
        match=r"count.window_s must be an integer, got 'five' \(from FOOTFALL_COUNT_WINDOW_S\)",
    ):
        load_config(None, environ={"FOOTFALL_COUNT_WINDOW_S": "five"})


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "[count\n")
    with pytest.raises(ConfigError, match=r"agent\.toml: not valid TOML"):
        load_config(path, environ={})


@pytest.mark.parametrize(
    ("length", "message"),
    [
        ("5", "epoch.length must be 'midnight' or seconds, at least 60"),
        ("172800", "'standard' keeps a key and device ids for at most 24 hours"),
        ("450", "multiple of count.window_s"),
    ],
)
def test_bad_epoch_length_is_refused(length: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, environ={"FOOTFALL_EPOCH_LENGTH": length})


def test_bad_timezone_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"epoch\.timezone must be an IANA zone"):
        load_config(None, environ={"FOOTFALL_EPOCH_TIMEZONE": "Mars/Olympus"})


def test_midnight_boundary_follows_the_zone_across_daylight_saving() -> None:
    clock = EpochClock(None, ZoneInfo("Europe/Paris"), 300)
    before_dst = int(datetime(2024, 3, 30, 12, tzinfo=UTC).timestamp()) * NS
    boundary = clock.next_boundary(before_dst)
    assert datetime.fromtimestamp(boundary / NS, ZoneInfo("Europe/Paris")).isoformat() == (
        "2024-03-31T00:00:00+01:00"
    )
    after = clock.next_boundary(boundary)
    assert (after - boundary) // NS == 23 * 3600  # the night the clocks go forward


def test_midnight_off_the_hour_rounds_up_to_a_window_boundary() -> None:
    clock = EpochClock(None, ZoneInfo("Asia/Kolkata"), 3600)  # UTC+05:30
    t = int(datetime(2024, 5, 1, 12, tzinfo=UTC).timestamp()) * NS
    boundary = clock.next_boundary(t)
    assert boundary % (3600 * NS) == 0
    local = datetime.fromtimestamp(boundary / NS, ZoneInfo("Asia/Kolkata"))
    assert (local.hour, local.minute) == (0, 30)


def test_fixed_epochs_are_aligned_multiples() -> None:
    clock = EpochClock(600, None, 300)
    assert clock.next_boundary(1_700_000_123 * NS) == 1_700_000_400 * NS


def test_every_setting_has_help_and_an_environment_name() -> None:
    for setting in SETTINGS:
        assert setting.help.endswith(".")
        assert setting.env.startswith("FOOTFALL_")


def test_every_mistake_in_a_file_is_reported_at_once_with_line_table_and_key(
    tmp_path: Path,
) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(
        '[count]\nwindow_s = 7\nmin_dwell_s = "x"\n\n[agent]\nsite = "Bad Site"\n'
        '[epoch]\ntimezone = "Mars/Olympus"\n[sorce]\npath = "x"\n'
    )
    with pytest.raises(ConfigError) as raised:
        load_config(path, environ={"FOOTFALL_BROKER_PORT": "70000"})
    lines = str(raised.value).splitlines()
    assert lines[0] == f"6 problems in {path}:"
    assert sorted(lines[1:]) == sorted([
        "  - count.min_dwell_s must be an integer, got 'x' "
        f"(from {path} line 3, [count] min_dwell_s)",
        f"  - {path} line 10, [sorce] path: unknown setting 'sorce.path'; "
        "did you mean 'source.path'?",
        "  - window_s must be a divisor of 3600 between 60 and 3600, got 7 "
        f"({path} line 2, [count] window_s)",
        "  - epoch.timezone must be an IANA zone such as 'Europe/Paris', got 'Mars/Olympus' "
        f"({path} line 8, [epoch] timezone)",
        f"  - agent.site must match [a-z0-9][a-z0-9_-]{{0,62}}, got 'Bad Site' ({path} line 6, "
        "[agent] site)",
        "  - broker.port must be between 1 and 65535, got 70000 (FOOTFALL_BROKER_PORT)",
    ])  # fmt: skip


def test_every_setting_is_in_the_readme_and_every_readme_key_is_a_setting() -> None:
    names = {s.name for s in SETTINGS}
    assert sorted(names - documented("agent")) == []
    assert sorted(documented("agent") - names) == []


def test_switches_take_on_off_or_toml_booleans_and_name_the_line_otherwise(
    tmp_path: Path,
) -> None:
    assert load_config(_write(tmp_path, "[source]\nhop = true\n"), environ={}).live.hop
    on = load_config(None, environ={"FOOTFALL_HOMEASSISTANT_DISCOVERY": " On "})
    assert on.homeassistant.discovery
    path = _write(tmp_path, '[privacy]\nmode = "Strict"\n[source]\nhop = "yes"\n')
    with pytest.raises(ConfigError) as raised:
        load_config(path, environ={})
    assert str(raised.value) == (  # one problem: "Strict" is a choice, any case
        f"source.hop must be 'on' or 'off', got 'yes' (from {path} line 4, [source] hop)"
    )


def test_config_show_loads_no_numba() -> None:
    """The stages that compile kernels are imported by the commands that run them only."""
    code = (
        "import contextlib, io, sys\n"
        "from firmware_agent import cli\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    status = cli.main(['config', 'show', '--help-text'])\n"
        "print(status, len(out.getvalue().splitlines()))\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'numba', 'llvmlite', 'scapy'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.splitlines() == [f"0 {2 * len(SETTINGS)}", "[]"]
