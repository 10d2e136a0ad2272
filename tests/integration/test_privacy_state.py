"""After a run, nothing the agent wrote holds a key, an address or a device id.

``footfall-agent run`` (:func:`firmware_agent.service.run.run_agent`, in this process, so that
every epoch key it draws can be recorded) replays a capture as fast as it can to a real
Mosquitto, in both privacy modes: the bundled capture, and every shared capture; and once,
on the bundled capture, the command line's ``run`` in a process of its own. Then every
byte under the agent's directories (its config, signing key, and state directory with the
spool, whose sent rows are deleted but may linger in free pages) is searched for:

* every address in the capture (all address fields of all frames, read independently), in
  every encoding of the leak detector of ``tests/agent/test_privacy.py``, and every SSID;
* every epoch key, as raw bytes, hex or base64;
* every device id the agent could have computed: SipHash-2-4 (libsodium's) of every address
  under every key, as 8 raw bytes either way round, 16 hex digits (either order, either case),
  base64 or decimal, at any offset.
"""

from __future__ import annotations

import base64
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import nacl.encoding
import nacl.hash
import numpy as np
import pytest

from firmware_agent.cli import BUNDLED_SAMPLE
from firmware_agent.contract.errors import NotACaptureError
from firmware_agent.service.run import run_agent
from firmware_agent.settings import load_config
from tests.agent.test_privacy import (
    RECORD_KEYS_CHILD,
    _key_encodings,
    _leaks,
    _secrets_of,
    on_shared_captures_in_both_modes,
    u64_hits,
)
from tests.support.agent_harness import prepare_agent
from tests.support.mqtt_broker import Mosquitto, TestCertificates

_SITE, _AGENT = "lab", "a1"


def _device_ids(macs: set[bytes], keys: list[np.ndarray]) -> np.ndarray:
    """SipHash-2-4 (libsodium) of every address under every key, as 64-bit integers."""
    ids = [
        int.from_bytes(nacl.hash.siphash24(mac, key, encoder=nacl.encoding.RawEncoder), "little")
        for key in (words.astype("<u8").tobytes() for words in keys)
        for mac in macs
    ]
    return np.array(ids, np.uint64)


def _holds_an_id(blob: bytes, ids: np.ndarray) -> bool:
    """Whether ``blob`` holds any of ``ids`` (see the module docstring for the encodings)."""
    wanted = np.unique(np.concatenate([ids, ids.byteswap()]))  # either byte order, sorted
    either = set(wanted.tolist())
    if u64_hits(blob, wanted):
        return True
    for run in re.findall(rb"[0-9a-fA-F]{16,}", blob):
        if any(int(run[i : i + 16], 16) in either for i in range(len(run) - 15)):
            return True
    for run in re.findall(rb"[A-Za-z0-9+/]{11,}", blob):
        for i in range(len(run) - 10):
            raw = base64.b64decode(run[i : i + 11] + b"=")
            if int.from_bytes(raw, "little") in either:
                return True
    for run in re.findall(rb"[0-9]{15,}", blob):
        windows = (run[i : i + n] for n in range(15, 21) for i in range(len(run) - n + 1))
        if any(int(w) in either for w in windows):
            return True
    return False


def test_the_id_search_finds_each_encoding() -> None:
    ids = np.array([0x0123456789ABCDEF], np.uint64)
    raw = (0x0123456789ABCDEF).to_bytes(8, "little")
    for blob in (
        b"x" + raw + b"y",
        b"id " + raw[::-1],
        b'{"d":"0123456789ABCDEF"}',
        b"efcdab8967452301 ",
        b"b64 " + base64.b64encode(raw),
        f"n={0x0123456789ABCDEF}".encode(),
    ):
        assert _holds_an_id(blob, ids), blob
    assert not _holds_an_id(b'{"window_start":"2023-02-08T11:40:00Z","devices":88}', ids)


@pytest.fixture(scope="module")
def lab_broker(
    mosquitto_bin: str,
    test_certificates: TestCertificates,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Mosquitto]:
    """One Mosquitto for every run of this module (each run has its own directories)."""
    broker = Mosquitto(
        mosquitto_bin,
        tmp_path_factory.mktemp("broker"),
        test_certificates,
        {(_SITE, _AGENT): "pw-a1"},
    )
    broker.start()
    yield broker
    broker.kill()


def _run_then_search(
    capture: Path, mode: str, root: Path, broker: Mosquitto, keys: list[np.ndarray]
) -> list[str]:
    """Run the agent on ``capture`` (a file that is no capture is refused: nothing to count),
    then assert that no file under ``root`` holds a secret; the files searched."""
    files = prepare_agent(
        root, broker, _SITE, _AGENT, {"privacy.mode": mode, "source.path": str(capture)}
    )
    try:
        assert run_agent(load_config(files.config, environ={})) == 0
    except NotACaptureError:
        assert not keys
    return _search(capture, root, keys)


def _search(capture: Path, root: Path, keys: list[np.ndarray]) -> list[str]:
    """Assert that no file under ``root`` holds a secret of a run on ``capture`` that drew
    ``keys``; the files searched."""
    written = {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }
    # One search over all files (the search costs per needle, and there may be a million).
    # The config names the capture, whose file name may hold an SSID ("linksys"): no leak.
    blob = b"\n--\n".join(written.values()).replace(str(capture).encode(), b"<capture>")
    macs, ssids = _secrets_of(capture)
    where = f"the files of a run on {capture.name} ({', '.join(written)})"
    assert not _leaks(blob, macs), f"an address in {where}"
    assert not any(s in blob for s in ssids), f"an SSID in {where}"
    assert not any(n in blob for words in keys for n in _key_encodings(words)), f"a key in {where}"
    assert not _holds_an_id(blob, _device_ids(macs, keys)), f"a device id in {where}"
    return list(written)


_RUN_CHILD = RECORD_KEYS_CHILD + textwrap.dedent(
    """
    import sys
    from firmware_agent import cli

    status = cli.main(["run", "--config", sys.argv[1]])
    print(*keys, sep="\\n")
    sys.exit(status)
    """
)


@pytest.mark.parametrize("mode", ["standard", "strict"])
def test_footfall_agent_run_in_its_own_process_leaves_no_secret(
    mode: str, lab_broker: Mosquitto, tmp_path: Path
) -> None:
    """The command line's ``run`` in a process of its own, which reports its keys on exit."""
    files = prepare_agent(
        tmp_path, lab_broker, _SITE, _AGENT,
        {"privacy.mode": mode, "source.path": str(BUNDLED_SAMPLE)},
    )  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", _RUN_CHILD, str(files.config)],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    keys = [
        np.array([int(word, 16) for word in line.split()], np.uint64)
        for line in result.stdout.splitlines()
    ]
    assert keys
    assert "stopped site=lab agent=a1" in result.stderr  # it ran to the end of the capture
    written = _search(BUNDLED_SAMPLE, tmp_path, keys)
    assert "state/spool.sqlite3" in written


@pytest.mark.parametrize("mode", ["standard", "strict"])
def test_after_a_run_no_file_holds_a_key_address_or_device_id(
    mode: str, lab_broker: Mosquitto, tmp_path: Path, recorded_keys: list[np.ndarray]
) -> None:
    written = _run_then_search(BUNDLED_SAMPLE, mode, tmp_path, lab_broker, recorded_keys)
    assert recorded_keys
    assert "state/spool.sqlite3" in written and "etc/signing.key" in written


@on_shared_captures_in_both_modes
def test_after_a_run_on_a_shared_capture_no_file_holds_a_secret(
    name: str,
    mode: str,
    pcaps_dir: Path,
    lab_broker: Mosquitto,
    tmp_path: Path,
    recorded_keys: list[np.ndarray],
) -> None:
    written = _run_then_search(pcaps_dir / name, mode, tmp_path, lab_broker, recorded_keys)
    assert "etc/signing.key" in written
