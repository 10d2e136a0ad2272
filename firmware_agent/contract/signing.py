"""The agent's Ed25519 signing key on disk: made once by ``footfall-agent keygen``, read at start.

The key lives in ``<agent.config_dir>/signing.key``: one line, the 32-byte seed in base64,
mode 0600 (refused if the group or others may read it, as ssh does). It signs every message
the agent publishes; the aggregator verifies with the public key printed at enrolment. It is
not the hashing key, which lives in memory only and is never written anywhere.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from pathlib import Path

import nacl.signing

from firmware_agent.contract.errors import SigningKeyError

__all__ = ["KEY_FILE", "create_signing_key", "load_signing_key", "read_signing_key"]

KEY_FILE = "signing.key"


def create_signing_key(config_dir: Path, *, replace: bool = False) -> nacl.signing.SigningKey:
    """A new key, written with mode 0600 to ``config_dir/signing.key``; an existing one is
    kept unless ``replace`` (the aggregator must then enrol the new public key)."""
    path = config_dir / KEY_FILE
    key = nacl.signing.SigningKey.generate()
    try:
        config_dir.mkdir(parents=True, exist_ok=True)
        if replace:
            path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise SigningKeyError(
            f"{path} already exists; --force replaces it (then enrol the new public key)"
        ) from exc
    except OSError as exc:
        raise SigningKeyError(f"{path}: cannot write the signing key: {exc.strerror}") from exc
    with os.fdopen(fd, "w") as out:
        out.write(base64.b64encode(bytes(key)).decode() + "\n")
    return key


def load_signing_key(config_dir: Path) -> nacl.signing.SigningKey:
    """The key in ``config_dir/signing.key``, after checking that only its owner can read it."""
    return read_signing_key(config_dir / KEY_FILE)


def read_signing_key(path: Path) -> nacl.signing.SigningKey:
    """The key in ``path`` (one line, the seed in base64), after checking that only its owner
    can read it (the aggregator's receipt key is kept the same way)."""
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except FileNotFoundError as exc:
        raise SigningKeyError(
            f"{path} does not exist: run 'footfall-agent keygen' and enrol the public key it prints"
        ) from exc
    except OSError as exc:
        raise SigningKeyError(f"{path}: cannot read the signing key: {exc.strerror}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SigningKeyError(
            f"{path} may be read by others (mode {stat.S_IMODE(mode):04o}): chmod 600 it"
        )
    try:
        seed = base64.b64decode(text.strip(), validate=True)
    except binascii.Error:
        seed = b""
    if len(seed) != 32:
        raise SigningKeyError(
            f"{path} is not a footfall signing key (one line of base64, 32 bytes)"
        )
    return nacl.signing.SigningKey(seed)
