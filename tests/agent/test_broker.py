"""The contract's broker base (:mod:`firmware_agent.contract.broker`): the settings checks and
TLS context both programs inherit, the reason codes in words, the one backoff."""

from __future__ import annotations

from pathlib import Path

import pytest

from firmware_agent.contract.broker import Backoff, BrokerBase, reason_in_words
from firmware_agent.contract.errors import ConfigError
from firmware_agent.service.publish import BrokerSettings


def test_backoff_doubles_with_equal_jitter_after_its_quick_retries() -> None:
    backoff = Backoff(0.5, 8, quick=3, quick_s=0.1)
    delays = [backoff.next() for _ in range(10)]
    assert delays[:3] == [0.1] * 3
    for n, delay in enumerate(delays[3:]):
        ceiling = min(8, 0.5 * 2**n)
        assert ceiling / 2 <= delay <= ceiling
    backoff.reset()
    assert backoff.next() == 0.1 and backoff.attempt == 1


def test_reason_codes_in_words_for_both_versions() -> None:
    assert reason_in_words(0x87).startswith("not authorised (check broker.username")
    assert reason_in_words(0x05, v5=False) == reason_in_words(0x87)
    assert reason_in_words(0x8D) == "no answer within the keep-alive (broker.keepalive_s)"
    assert reason_in_words(0xFE) == "reason code 0xfe"
    assert reason_in_words(0x00, default="success") == "success"


def test_the_agent_checks_the_common_settings_and_its_own_together() -> None:
    with pytest.raises(ConfigError) as caught:
        BrokerSettings(port=0, tls_cert="c.pem", max_inflight=0, backoff_max_s=0)
    message = str(caught.value)
    for rule in (
        "broker.port must be between 1 and 65535, got 0",
        "broker.backoff_max_s must be between 1 and 3600, got 0",
        "broker.tls_cert and broker.tls_key go together",
        "broker.max_inflight must be between 1 and 65535, got 0",
    ):
        assert rule in message
    assert BrokerSettings().problems() == []


def test_the_tls_context_names_the_file_it_cannot_use(tmp_path: Path) -> None:
    assert BrokerBase().ssl_context() is None
    missing, garbage = tmp_path / "missing.pem", tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(ConfigError, match=f"broker.tls_ca {missing}: cannot read"):
        BrokerBase(tls_ca=str(missing)).ssl_context()
    with pytest.raises(ConfigError, match=f"broker.tls_ca {garbage}: not a PEM CA certificate"):
        BrokerBase(tls_ca=str(garbage)).ssl_context()
    assert BrokerBase(tls_ca="system").ssl_context() is not None
