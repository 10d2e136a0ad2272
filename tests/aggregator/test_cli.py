"""``footfall-aggregator``: settings, registry commands, one-line errors, documented commands,
and an aggregator that never loads the agent's hot path."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path

import nacl.signing
import pytest

from aggregator.cli import build_parser, main
from aggregator.config import SETTINGS, load_config
from aggregator.errors import ConfigError
from aggregator.store import Store
from aggregator.verify import Accepted, Verifier
from firmware_agent.contract.messages import AgentId, SiteId, public_key_text, seal, status_payload
from tests.support.aggregator_harness import Agent
from tests.support.readme_settings import documented
from tests.support.shared import REPO

NOW = 1_709_640_000  # 2024-03-05 12:00 UTC


@pytest.fixture
def dsn(tmp_path: Path) -> list[str]:
    return ["--set", f"store.dsn=sqlite:///{tmp_path / 'agg.sqlite3'}"]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_sites_and_agents_are_enrolled_listed_and_revoked(
    capsys: pytest.CaptureFixture[str], dsn: list[str]
) -> None:
    key = public_key_text(nacl.signing.SigningKey.generate())
    assert run(capsys, "sites", "add", "shop-12", "--timezone", "Europe/Paris", *dsn)[0] == 0
    assert run(capsys, "agents", "add", "shop-12", "entrance", key, *dsn)[0] == 0
    other = public_key_text(nacl.signing.SigningKey.generate())
    # The form 'footfall-agent enroll' prints works too.
    status, out, _ = run(
        capsys, "enrol", "--site", "shop-12", "--agent", "till", "--public-key", other, *dsn
    )
    assert (status, out) == (0, "agent shop-12/till enrolled\n")
    status, out, _ = run(capsys, "sites", "list", *dsn)
    assert out.splitlines()[1].split() == ["shop-12", "shop-12", "Europe/Paris", "2"]
    assert run(capsys, "agents", "revoke", "shop-12", "till", *dsn)[0] == 0
    status, out, _ = run(capsys, "agents", "list", "--json", *dsn)
    listed = {row["agent"]: row for row in map(json.loads, out.splitlines())}
    assert listed["entrance"]["revoked_at"] is None and listed["till"]["revoked_at"] is not None
    assert listed["entrance"]["public_key"] == key
    status, out, _ = run(capsys, "agents", "list", *dsn)
    assert "revoked" in out and "MISSING" in out
    assert run(capsys, "agents", "gaps", "shop-12", "entrance", *dsn) == (0, "", "")
    assert run(capsys, "refusals", *dsn) == (0, "", "")
    assert run(capsys, "quarantine", *dsn) == (0, "", "")
    status, out, _ = run(capsys, "prune", *dsn)
    assert out == "deleted 0 windows older than 90 days\n"


def test_errors_are_one_line_naming_what_is_wrong(
    capsys: pytest.CaptureFixture[str], dsn: list[str]
) -> None:
    key = public_key_text(nacl.signing.SigningKey.generate())
    assert run(capsys, "sites", "add", "shop-1", "--timezone", "UTC", *dsn)[0] == 0
    status, out, err = run(capsys, "agents", "add", "nowhere", "a1", key, *dsn)
    assert status == 1 and out == ""
    assert err == (
        "footfall-aggregator: error: site nowhere does not exist: add it first "
        "(footfall-aggregator sites add nowhere --timezone ZONE)\n"
    )
    status, _, err = run(capsys, "sites", "list", "--set", "store.retention_days=-1", *dsn)
    assert status == 1
    assert "store.retention_days must be between 0 (keep all) and 100000, got -1" in err
    assert len(err.splitlines()) == 1


def test_a_failed_enrol_leaves_no_store_behind(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, dsn: list[str]
) -> None:
    key = public_key_text(nacl.signing.SigningKey.generate())
    enrol = ["--site", "shop-1", "--agent", "door", "--public-key", key, *dsn]
    for spelling in ("enrol", "enroll"):
        status, out, err = run(capsys, spelling, *enrol)
        assert (status, out) == (1, "")
        assert f"no database at {tmp_path / 'agg.sqlite3'}: 'footfall-aggregator sites add'" in err
    assert list(tmp_path.iterdir()) == []
    assert run(capsys, "sites", "add", "shop-1", "--timezone", "UTC", *dsn)[0] == 0
    assert run(capsys, "enroll", *enrol) == (0, "agent shop-1/door enrolled\n", "")


def test_the_admins_commands_do_nothing_when_they_fail(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    dsn: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bad site or account makes no database; an installer granted a site that does not
    exist is not added (else the fixed command says 'already exists')."""

    def users_add(*sites: str, password: str = "installer-pw-1") -> tuple[int, str, str]:
        monkeypatch.setattr("sys.stdin", io.StringIO(password + "\n"))
        granted = [arg for site in sites for arg in ("--site", site)]
        return run(capsys, "users", "add", "ines", "--role", "installer", *granted,
                   "--password-stdin", *dsn)  # fmt: skip

    status, _, err = run(capsys, "sites", "add", "My Shop", "--timezone", "UTC", *dsn)
    assert status == 1 and "site id must match" in err
    status, _, err = run(capsys, "sites", "add", "my-shop", "--timezone", "Mars/Olympus", *dsn)
    assert status == 1 and "time zone must be an IANA name" in err
    status, _, err = users_add(password="short")
    assert status == 1 and "password must be at least 10 characters" in err
    assert list(tmp_path.iterdir()) == []
    assert run(capsys, "sites", "add", "my-shop", "--timezone", "UTC", *dsn)[0] == 0
    status, _, err = users_add("my-shop", "my-shopp")
    assert status == 1 and err == (
        "footfall-aggregator: error: site my-shopp does not exist: add it first "
        "(footfall-aggregator sites add my-shopp --timezone ZONE); no user was added\n"
    )
    assert run(capsys, "users", "list", *dsn)[1] == ""
    assert users_add("my-shop", "my-shop") == (0, "user ines added (installer)\n", "")
    assert run(capsys, "users", "list", *dsn)[1].splitlines()[1].split() == [
        "ines", "installer", "enabled", "my-shop",
    ]  # fmt: skip


def check_rows(out: str) -> dict[str, str]:
    return {
        line[:10].strip(): line[10:].strip() for line in out.splitlines()[1:-1] if line[0] != " "
    }


def test_agents_check_names_the_first_missing_step_and_its_fix(
    capsys: pytest.CaptureFixture[str], dsn: list[str]
) -> None:
    key = public_key_text(nacl.signing.SigningKey.generate())
    assert run(capsys, "sites", "add", "shop-1", "--timezone", "UTC", *dsn)[0] == 0
    status, out, _ = run(capsys, "agents", "check", "shop-2", "door", *dsn)
    rows = check_rows(out)
    assert status == 1 and rows["site"] == "FAIL  site shop-2 does not exist"
    assert "fix: an admin: footfall-aggregator sites add shop-2 --timezone ZONE\n" in out
    assert {rows[c][:4] for c in ("enrolment", "refusals", "stored", "status")} == {"skip"}
    status, out, _ = run(capsys, "agents", "check", "shop-1", "door", *dsn)
    rows = check_rows(out)
    assert status == 1 and rows["site"].startswith("ok")
    assert rows["enrolment"] == "FAIL  agent shop-1/door is not enrolled"
    with Store.open(load_config(None, overrides=dict([dsn[1].split("=", 1)])).store) as store:
        store.store_batch([], {("unknown_agent", "shop-1", ""): 3}, 1)  # as ingest counts them
    rows = check_rows(run(capsys, "agents", "check", "shop-1", "door", *dsn)[1])
    assert rows["enrolment"] == (
        "FAIL  agent shop-1/door is not enrolled (3 messages of this site's agents not enrolled "
        "were refused)"
    )
    assert "or an installer enrols it on the web page /sites/shop-1" in out
    assert rows["stored"] == "FAIL  no window of shop-1/door is stored"
    assert run(capsys, "enrol", "--site", "shop-1", "--agent", "door", "--public-key", key, *dsn)
    status, out, _ = run(capsys, "agents", "check", "shop-1", "door", *dsn)
    rows = check_rows(out)
    assert rows["enrolment"].startswith("ok    enrolled at") and key[:12] in rows["enrolment"]
    assert (status, rows["stored"][:4]) == (1, "FAIL")
    assert run(capsys, "agents", "revoke", "shop-1", "door", *dsn)[0] == 0
    assert (
        "FAIL  agent shop-1/door was revoked at"
        in run(capsys, "agents", "check", "shop-1", "door", *dsn)[1]
    )


def test_agents_list_and_check_show_a_status_v2_eviction_rounds(
    capsys: pytest.CaptureFixture[str], dsn: list[str]
) -> None:
    """An agent whose status (v2) says its tables evicted: ``agents list`` shows the rounds
    (``count/estimate``; ``-`` before any status v2), ``--json`` has them, and ``agents
    check`` warns with the fix."""
    agent = Agent("shop-1", "door")
    assert run(capsys, "sites", "add", "shop-1", "--timezone", "UTC", *dsn)[0] == 0
    assert run(capsys, "agents", "add", "shop-1", "door", agent.public_key, *dsn)[0] == 0
    listed = run(capsys, "agents", "list", *dsn)[1].splitlines()
    assert listed[0].split()[-2:] == ["EVICTIONS", "SENDS"] and listed[1].split()[-2] == "-"
    status = status_payload(
        SiteId("shop-1"), AgentId("door"), cause="connected", at=NOW, spool_pending=0,
        spool_dropped=0, last_seq=0, evictions=(3, 8),
    )  # fmt: skip
    with Store.open(load_config(None, overrides=dict([dsn[1].split("=", 1)])).store) as store:
        topic = "footfall/v1/shop-1/door/status"
        accepted = Verifier(65536).check(topic, seal(status, agent.key), store.registry(), NOW)
        assert isinstance(accepted, Accepted), accepted
        store.store_batch([accepted], now=NOW)
    assert run(capsys, "agents", "list", *dsn)[1].splitlines()[1].split()[-2] == "3/8"
    (row,) = map(json.loads, run(capsys, "agents", "list", "--json", *dsn)[1].splitlines())
    assert (row["count_evictions"], row["estimate_evictions"]) == (3, 8)
    out = run(capsys, "agents", "check", "shop-1", "door", *dsn)[1]
    assert check_rows(out)["status"].endswith(
        "its tables were at their ceiling (eviction rounds since it started: 3 device table, "
        "8 estimator)"
    )
    assert "raise count.max_devices or estimate.max_fingerprints" in out


def test_config_show_masks_secrets_and_says_where_each_value_came_from(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "aggregator.toml"
    config.write_text('[broker]\npassword = "hunter2"\n[store]\nretention_days = 30\n')
    monkeypatch.setenv("FOOTFALL_AGG_STORE_DSN", "postgresql://agg:s3cret@db:5432/footfall")
    status, out, _ = run(capsys, "config", "show", "--config", str(config))
    assert status == 0
    assert "hunter2" not in out and "s3cret" not in out
    rows = {line.split()[0]: line for line in out.splitlines()}
    assert "'postgresql://agg:********@db:5432/footfall'" in rows["store.dsn"]
    assert "(FOOTFALL_AGG_STORE_DSN)" in rows["store.dsn"]
    assert rows["store.retention_days"].split()[1:] == ["30", f"({config})"]
    assert "'********'" in rows["broker.password"]


def test_unknown_settings_and_bad_values_are_refused_by_name(tmp_path: Path) -> None:
    config = tmp_path / "aggregator.toml"
    config.write_text("[ingest]\nbatch_maxx = 10\n")
    with pytest.raises(ConfigError, match=r"unknown setting 'ingest\.batch_maxx'; did you mean"):
        load_config(config, environ={})
    with pytest.raises(ConfigError, match=r"ingest\.receive_maximum must be at least twice"):
        load_config(environ={"FOOTFALL_AGG_INGEST_RECEIVE_MAXIMUM": "10"})
    with pytest.raises(ConfigError, match=r"store\.dsn must start with 'sqlite:///' or"):
        load_config(environ={}, overrides={"store.dsn": "mysql://x"})
    with pytest.raises(ConfigError, match=r"broker\.port must be an integer, got 'x'"):
        load_config(environ={}, overrides={"broker.port": "x"})
    default = load_config(environ={}, overrides={"store.data_dir": str(tmp_path)})
    assert default.store.dsn == f"sqlite:///{tmp_path / 'aggregator.sqlite3'}"
    assert default.ingest.client_id.startswith("footfall-aggregator-")
    assert default.ingest.receipt_key_file == str(tmp_path / "receipt.key")
    # A replica's name, not its host's, makes the client id: the same after a move.
    named = load_config(environ={"FOOTFALL_AGG_INGEST_REPLICA": "b"})
    assert named.ingest.client_id == "footfall-aggregator-b"


def test_every_mistake_in_the_file_is_reported_at_once_with_its_line(tmp_path: Path) -> None:
    config = tmp_path / "aggregator.toml"
    config.write_text(
        '[ingest]\nbatch_maxx = 10\n[broker]\nport = "x"\nprotocol = "3.1.1"\n'
        "[store]\nretention_days = -1\n[serve]\nport = 0\nsession_hours = 0\n"
    )
    with pytest.raises(ConfigError) as raised:
        load_config(config, environ={})
    lines = str(raised.value).splitlines()
    assert lines[0] == f"5 problems in {config}:"
    assert lines[1:] == [
        f"  - {config} line 2, [ingest] batch_maxx: unknown setting 'ingest.batch_maxx'; did "
        "you mean 'ingest.batch_max'?",
        f"  - broker.port must be an integer, got 'x' (from {config} line 4, [broker] port)",
        "  - store.retention_days must be between 0 (keep all) and 100000, got -1 "
        f"({config} line 7, [store] retention_days)",
        "  - serve.port must be 1 to 65535, got 0; serve.session_hours must be between 1 and "
        f"2160, got 0 ({config} line 9, [serve] port; {config} line 10, [serve] session_hours)",
        "  - ingest.share_group = 'footfall' needs MQTT 5 (a shared subscription), but "
        "broker.protocol is '3.1.1': set ingest.share_group = '' (one ingest process) or "
        "broker.protocol = '5'",
    ]


def test_every_setting_is_in_the_readme_and_every_readme_key_is_a_setting() -> None:
    names = {s.name for s in SETTINGS}
    assert sorted(names - documented("aggregator")) == []
    assert sorted(documented("aggregator") - names) == []


def test_switches_and_choices_are_read_once_for_both_programs() -> None:
    config = load_config(environ={"FOOTFALL_AGG_SERVE_INGEST": "OFF"})
    assert config.serve.ingest is False
    assert load_config(
        environ={}, overrides={"serve.secure_cookies": " On"}
    ).serve.secure_cookies == ("on")
    with pytest.raises(ConfigError, match=r"serve\.secure_cookies must be 'auto', 'on' or 'off'"):
        load_config(environ={}, overrides={"serve.secure_cookies": "always"})


def _commands(parser: argparse.ArgumentParser, prefix: str = "") -> list[str]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested = _commands(sub, f"{prefix}{name} ")
                found += nested or [f"{prefix}{name}"]
    return found


def test_every_command_is_documented_in_the_readme() -> None:
    readme = (REPO / "README.md").read_text()
    commands = _commands(build_parser())
    assert "agents add" in commands and "ingest" in commands
    missing = [c for c in commands if f"footfall-aggregator {c}" not in readme]
    assert missing == []


def test_importing_the_aggregator_loads_no_numba_scapy_or_numpy() -> None:
    code = (
        "import sys, aggregator.cli, aggregator.ingest, aggregator.store, aggregator.verify, "
        "aggregator.mqtt, aggregator.config, aggregator.rollup\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'numba', 'scapy', 'numpy', "
        "'llvmlite'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
