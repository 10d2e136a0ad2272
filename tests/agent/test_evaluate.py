"""Truth files, scores, calibration and the evaluate / calibrate commands."""

from __future__ import annotations

import csv
import json
import tomllib
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from firmware_agent import cli
from firmware_agent.contract.errors import TruthError
from firmware_agent.settings import load_config
from firmware_agent.stages.config import Calibration
from firmware_agent.tools.evaluate import Truth, fit_calibration, replay, score, write_calibration
from firmware_agent.tools.synthetic import SyntheticSpec, write_synthetic_capture
from tests.support.shared import shared_path
from tests.support.truth_fryza import truth_rows

START = 1_709_625_600  # 2024-03-05T08:00:00Z, the synthetic captures' start


def write_csv(path: Path, rows: list[tuple[str, object]]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["timestamp", "people"])
        writer.writerows(rows)
    return path


def iso(unix_s: int, offset: str = "Z") -> str:
    text = datetime.fromtimestamp(unix_s, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return text + offset


# -- truth files ----------------------------------------------------------------------------


def test_truth_holds_each_row_until_the_next_and_averages_a_window(tmp_path: Path) -> None:
    truth = Truth.read(
        write_csv(
            tmp_path / "t.csv",
            [
                ("2024-03-05T09:00:00+01:00", 10),  # 08:00Z
                ("2024-03-05T08:02:00Z", 4),
                ("2024-03-05T08:04:00Z", 0),
            ],
        )
    )
    assert truth.window(START, 300) == pytest.approx((120 * 10 + 120 * 4 + 60 * 0) / 300)
    assert truth.window(START - 300, 300) is None  # before the truth
    assert truth.window(START + 120, 300) == pytest.approx((120 * 4 + 60 * 0) / 180)
    assert truth.window(START + 180, 300) is None  # covered for 2 of 5 minutes


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("time,count\n", "the first line must be the header 'timestamp,people'"),
        ("timestamp,people\n2024-03-05T08:00:00,3\n", "has no UTC offset"),
        ("timestamp,people\n2024-03-05T08:00:00Z,many\n", "an ISO 8601 time and a number"),
        ("timestamp,people\n2024-03-05T08:00:00Z,-1\n", "people must be 0 or more"),
        (
            "timestamp,people\n2024-03-05T08:01:00Z,1\n2024-03-05T08:00:00Z,1\n",
            "goes back in time",
        ),
        ("timestamp,people\n", "no rows after the header"),
    ],
)
def test_a_bad_truth_file_is_refused_with_its_line(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "t.csv"
    path.write_text(content)
    with pytest.raises(TruthError, match=message):
        Truth.read(path)


# -- scores and calibration -----------------------------------------------------------------


def test_scores_are_the_usual_ones() -> None:
    s = score([12, 8, 2, 0], [10, 10, 1, 0])
    assert s.mae == pytest.approx((2 + 2 + 1 + 0) / 4)
    assert s.mape == pytest.approx(20.0)  # only the windows with 3 people or more
    assert s.rmse == pytest.approx(np.sqrt((4 + 4 + 1) / 4))
    assert s.r == pytest.approx(np.corrcoef([12, 8, 2, 0], [10, 10, 1, 0])[0, 1])
    assert s.windows == 4
    quiet = score([1, 0], [0, 0])
    assert quiet.mape is None and quiet.r is None
    assert set(quiet.as_dict()) == {"mae", "mape", "rmse", "r", "windows"}


def test_calibration_recovers_a_line_and_reports_its_error() -> None:
    x = [0, 4, 8, 12, 16, 20]
    fitted = fit_calibration(x, [0.5 * v + 1 for v in x])
    assert fitted.factor == pytest.approx(0.5) and fitted.offset == pytest.approx(1.0)
    assert fitted.windows == 6 and fitted.mae == pytest.approx(0.0)
    with pytest.raises(TruthError, match="people_est is the same in every window"):
        fit_calibration([3, 3, 3], [1, 2, 3])
    with pytest.raises(TruthError, match="falls as people rise"):
        fit_calibration([1, 2, 3], [3, 2, 1])


def test_writing_the_calibration_keeps_the_rest_of_the_file(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        "# the shop on the corner\n"
        "[count]\nwindow_s = 300  # five minutes\n\n"
        "[estimate]\nrssi_threshold_dbm = -70\ncalibration_factor = 2.0\n\n"
        "[epoch]\ntimezone = 'Europe/Prague'\n"
    )
    config.chmod(0o640)
    changes = write_calibration(config, Calibration(0.71234, -0.25, 1.234, 96))
    text = config.read_text()
    assert text.startswith("# the shop on the corner\n[count]\nwindow_s = 300  # five minutes\n")
    assert "rssi_threshold_dbm = -70\ncalibration_factor = 0.7123\n" in text
    assert text.endswith("[epoch]\ntimezone = 'Europe/Prague'\n")
    assert changes[0] == "estimate.calibration_factor: 2.0 -> 0.7123"
    assert "estimate.calibration_windows: (unset) -> 96" in changes
    assert config.stat().st_mode & 0o777 == 0o640
    loaded = load_config(config, environ={})
    assert loaded.calibration == Calibration(0.7123, -0.25, 1.234, 96)
    assert loaded.estimate.rssi_threshold_dbm == -70
    assert write_calibration(config, Calibration(0.7123, -0.25, 1.234, 96)) == []
    fresh = tmp_path / "new.toml"
    write_calibration(fresh, Calibration(1.5, 0.0, 0.5, 10))
    assert tomllib.loads(fresh.read_text())["estimate"]["calibration_factor"] == 1.5


# -- the commands ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def captures(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Two synthetic captures of the same site on two days, and a truth file for both that
    follows the agent's own estimate (people = 2 x people_est + 1)."""
    tmp = tmp_path_factory.mktemp("evaluate")
    config = load_config(None, environ={})
    rows: list[tuple[str, object]] = []
    paths = []
    for day, seed in ((0, 3), (1, 4)):
        path = tmp / f"day{day}.pcap"
        spec = SyntheticSpec(frames=4000, devices=90, seed=seed, duration_s=3600,
                             start_ns=(START + day * 86400) * 10**9)  # fmt: skip
        write_synthetic_capture(path, spec)
        paths.append(path)
        for w in replay(path, config).windows:
            rows.append((iso(w.window_start, "+00:00"), 2 * (w.people_est or 0) + 1))
    return paths[0], paths[1], write_csv(tmp / "truth.csv", rows)


def test_evaluate_prints_windows_and_scores_and_json(
    captures: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    day0, day1, truth = captures
    assert cli.main(["evaluate", str(day0), "--truth", str(truth)]) == 0
    out = capsys.readouterr().out
    assert "window_start" in out and "estimate: people_est (no calibration)" in out
    assert "summary: MAE" in out and "signal threshold" in out
    args = ["evaluate", str(day1), "--truth", str(truth), "--calibrate-on", str(day0), "--json"]
    assert cli.main(args) == 0
    scores = json.loads(capsys.readouterr().out)
    assert set(scores) == {"mae", "mape", "rmse", "r", "windows"}
    assert scores["mae"] < 0.5 and scores["r"] > 0.99  # the truth is a line of people_est


def test_evaluate_refuses_to_calibrate_on_the_evaluated_capture(
    captures: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    day0, _, truth = captures
    args = ["evaluate", str(day0), "--truth", str(truth), "--calibrate-on", str(day0)]
    assert cli.main(args) == 1
    assert "is both evaluated and calibrated on" in capsys.readouterr().err


def test_calibrate_writes_the_config_that_evaluate_then_uses(
    captures: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    day0, day1, truth = captures
    config = tmp_path / "agent.toml"
    config.write_text("[count]\nwindow_s = 300\n")
    assert cli.main(["calibrate", str(day0), "--truth", str(truth), "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "people = 2.0000 x people_est +1.0000" in out
    assert f"wrote {config}:" in out and "estimate.calibration_factor: (unset) -> 2.0" in out
    calibration = load_config(config, environ={}).calibration
    assert calibration is not None and calibration.factor == pytest.approx(2.0)
    assert cli.main(["evaluate", str(day1), "--truth", str(truth), "--config", str(config)]) == 0
    assert "from the config" in capsys.readouterr().out
    assert cli.main(["replay", str(day1), "--config", str(config)]) == 0
    windows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    plain_config = tmp_path / "plain.toml"
    plain_config.write_text("[count]\nwindow_s = 300\n")
    assert cli.main(["replay", str(day1), "--config", str(plain_config)]) == 0
    plain = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert all(w["calibrated"] for w in windows) and not any(w["calibrated"] for w in plain)
    peaks = [
        (w["occupancy_peak"], p["occupancy_peak"])
        for w, p in zip(windows, plain, strict=True)
        if None not in (w["occupancy_peak"], p["occupancy_peak"])
    ]
    assert peaks and all(c == 2 * raw + 1 for c, raw in peaks)  # occupancy is calibrated


def test_evaluate_without_covered_windows_says_so(
    captures: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    truth = write_csv(tmp_path / "t.csv", [("2001-01-01T00:00:00Z", 3)])
    assert cli.main(["evaluate", str(captures[0]), "--truth", str(truth)]) == 1
    assert "covers no window of the evaluated captures" in capsys.readouterr().err


# -- the lab dataset's converter ------------------------------------------------------------


def test_lab_truth_converter_writes_local_offsets_across_summer_time(tmp_path: Path) -> None:
    lab = tmp_path / "lab_ver-99.csv"
    lab.write_text(
        "datetime;src;occupancy\n"
        "2024-03-31 01:58:10.5;x;0.0\n"
        "2024-03-31 03:00:05.0;x;2.0\n"  # 02:00 CET became 03:00 CEST: one minute later
    )
    assert truth_rows([lab]) == [
        ("2024-03-31T01:58:00+01:00", 0.0),
        ("2024-03-31T01:59:00+01:00", 0.0),
        ("2024-03-31T03:00:00+02:00", 2.0),
    ]


@pytest.mark.shared
def test_lab_csv_times_are_the_pcaps_utc_times_in_local_time() -> None:
    """The converter's premise, to the microsecond, on both sides of the change of time."""
    from firmware_agent.stages.capture import CaptureReader  # noqa: PLC0415
    from tests.support.truth_fryza import LAB_ZONE  # noqa: PLC0415

    for day in ("2023-02-08", "2024-03-31", "2024-04-04"):
        pcaps = shared_path("data", "pcaps")
        with CaptureReader(pcaps / f"fryza_p1_sc6-61_{day}_anonymized.pcap") as reader:
            ts = np.concatenate([b.ts_ns for b in reader])
        with (pcaps / f"fryza_p1_sc6-61_{day}_ver-99.csv").open() as fh:
            rows = list(csv.DictReader(fh, delimiter=";"))
        for row in rows[:: max(1, len(rows) // 200)]:
            local = datetime.fromisoformat(row["datetime"]).replace(tzinfo=LAB_ZONE)
            assert abs(local.timestamp() - ts[int(row["idx"])] / 1e9) < 1e-5
