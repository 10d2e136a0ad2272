"""``keygen``, ``config show`` and ``run`` at the command line: the signing key file, the new
settings and their checks, and the errors a person sees before anything connects."""

from __future__ import annotations

from pathlib import Path

import pytest

from firmware_agent import cli
from firmware_agent.contract.errors import ConfigError, SigningKeyError
from firmware_agent.contract.messages import verify_key_from_text
from firmware_agent.contract.signing import KEY_FILE, create_signing_key, load_signing_key
from firmware_agent.settings import SETTINGS, load_config
from tests.support.shared import REPO


def _config(tmp_path: Path, text: str = "") -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(
        f'[agent]\nconfig_dir = "{tmp_path / "etc"}"\nstate_dir = "{tmp_path / "state"}"\n' + text
    )
    return path


def test_keygen_writes_a_private_key_and_prints_its_public_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(_config(tmp_path))
    assert cli.main(["keygen", "--config", config]) == 0
    printed = capsys.readouterr().out.strip()
    path = tmp_path / "etc" / KEY_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    assert verify_key_from_text(printed) == load_signing_key(tmp_path / "etc").verify_key
    assert printed not in path.read_text()  # the file holds the private seed, not this

    assert cli.main(["keygen", "--config", config]) == 1
    assert "already exists; --force replaces it" in capsys.readouterr().err
    assert cli.main(["keygen", "--config", config, "--show"]) == 0
    assert capsys.readouterr().out.strip() == printed
    assert cli.main(["keygen", "--config", config, "--force"]) == 0
    assert capsys.readouterr().out.strip() != printed


def test_the_key_file_is_checked(tmp_path: Path) -> None:
    create_signing_key(tmp_path)
    path = tmp_path / KEY_FILE
    path.chmod(0o640)
    with pytest.raises(SigningKeyError, match=r"may be read by others \(mode 0640\): chmod 600"):
        load_signing_key(tmp_path)
    path.write_text("garbage\n")
    path.chmod(0o600)
    with pytest.raises(SigningKeyError, match="is not a footfall signing key"):
        load_signing_key(tmp_path)
    with pytest.raises(SigningKeyError, match="run 'footfall-agent keygen'"):
        load_signing_key(tmp_path / "nowhere")


def test_config_show_masks_the_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FOOTFALL_BROKER_PASSWORD", "hunter2")
    config = str(_config(tmp_path, '[broker]\nusername = "s1-a1"\n'))
    assert cli.main(["config", "show", "--config", config, "--set", "broker.port=8883"]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out
    assert "broker.password" in out and "********" in out and "FOOTFALL_BROKER_PASSWORD" in out
    assert "8883" in out and "command line" in out


def test_config_show_help_text_explains_every_setting_as_the_shipped_config_says(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    shipped = (REPO / "hardware" / "agent.toml").read_text()
    assert "'footfall-agent config show --help-text' lists every setting with its help" in shipped
    monkeypatch.setenv("FOOTFALL_BROKER_PASSWORD", "hunter2")
    config = str(_config(tmp_path, '[broker]\nusername = "s1/a1"\n'))
    assert cli.main(["config", "show", "--help-text", "--config", config]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "hunter2" not in "\n".join(lines)
    shown = dict(zip(lines[::2], lines[1::2], strict=True))  # a setting, then its help
    assert len(shown) == len(SETTINGS)
    for setting, (line, help_line) in zip(SETTINGS, shown.items(), strict=True):
        assert line.split()[0] == setting.name and help_line == f"    {setting.help}"
    password = next(line for line in shown if line.startswith("broker.password "))
    assert password.split()[1:] == ["'********'", "(FOOTFALL_BROKER_PASSWORD)"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[agent]\nsite = "Shop 1"\n',
            r"agent\.site must match \[a-z0-9\]\[a-z0-9_-\]\{0,62\}, got 'Shop 1'",
        ),
        ('[broker]\nprot = "x"\n', r"unknown setting 'broker\.prot'; did you mean 'broker\.port'"),
        ('[broker]\nprotocol = "4"\n', r"broker\.protocol must be '5' or '3\.1\.1', got '4'"),
        ("[broker]\nport = 0\n", r"broker\.port must be between 1 and 65535, got 0"),
        ('[broker]\ntls_cert = "c.pem"\n', r"broker\.tls_cert and broker\.tls_key go together"),
        ('[broker]\npassword = "x"\n', r"broker\.password is set but broker\.username is empty"),
        ('[source]\nspeed = "slow"\n', r"source\.speed must be 'realtime', 'fast' or a factor"),
        ("[spool]\nmax_windows = 0\n", r"spool\.max_windows must be between 1 and"),
        ('[broker]\nreceipt_key = "abc"\n', r"broker\.receipt_key: public key must be base64"),
        ("[broker]\nresend_per_s = 0\n", r"broker\.resend_per_s must be between 1 and 100000"),
    ],
)
def test_bad_settings_are_refused_with_the_rule(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path, environ={})


def test_source_speed_and_agent_id_defaults() -> None:
    config = load_config(None, environ={"FOOTFALL_SOURCE_SPEED": "60x"})
    assert config.source.speed == 60.0
    assert load_config(None, environ={}).source.speed == 1.0  # realtime
    assert load_config(None, environ={"FOOTFALL_SOURCE_SPEED": "fast"}).source.speed is None
    agent = str(load_config(None, environ={}).identity.agent)
    assert agent and agent == agent.lower()  # the host name, made an id


def test_run_says_what_is_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(_config(tmp_path))
    assert cli.main(["run", "--config", config]) == 1
    assert "signing.key does not exist: run 'footfall-agent keygen'" in capsys.readouterr().err
    assert cli.main(["keygen", "--config", config]) == 0
    assert cli.main(["run", "--config", config]) == 1
    assert "source.path is empty" in capsys.readouterr().err
    assert cli.main(["run", "--config", config, "--source", str(tmp_path / "none.pcap")]) == 1
    assert "none.pcap: cannot open" in capsys.readouterr().err
