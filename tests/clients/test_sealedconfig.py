"""`enc:v1:` values: sealed per variable, opened at start-up by load_settings."""

from __future__ import annotations

import pytest

from services.proxy.settings import Settings as ProxySettings
from shared.errors import ConfigError
from shared.sealedconfig import (
    SealedConfigError,
    decrypt_value,
    encrypt_value,
    is_sealed,
    open_environment,
)
from shared.settings import load_settings
from tests.support import TEST_KEY_ENCRYPTION_SECRET, TEST_PROXY_SIGNING_KEY

OTHER_SECRET = "other-kek-Zx8Cv6Bn4Mm2Qq1Ww3Ee5Rr7Tt9Yy0Uu"


def test_round_trip_and_fresh_ciphertext_each_time() -> None:
    first = encrypt_value("NATS_PASSWORD", "hunter2", secret=TEST_KEY_ENCRYPTION_SECRET)
    second = encrypt_value("NATS_PASSWORD", "hunter2", secret=TEST_KEY_ENCRYPTION_SECRET)
    assert is_sealed(first)
    assert first != second
    assert "hunter2" not in first
    opened = decrypt_value("NATS_PASSWORD", first, secrets=[TEST_KEY_ENCRYPTION_SECRET])
    assert opened == "hunter2"


def test_wrong_secret_other_variable_and_damage_are_refused_without_the_value() -> None:
    sealed = encrypt_value("NATS_PASSWORD", "hunter2", secret=TEST_KEY_ENCRYPTION_SECRET)
    with pytest.raises(SealedConfigError) as wrong:
        decrypt_value("NATS_PASSWORD", sealed, secrets=[OTHER_SECRET])
    assert "hunter2" not in str(wrong.value)
    with pytest.raises(SealedConfigError):
        decrypt_value("REDIS_URL", sealed, secrets=[TEST_KEY_ENCRYPTION_SECRET])
    damaged = sealed[:-4] + ("AAAA" if not sealed.endswith("AAAA") else "BBBB")
    with pytest.raises(SealedConfigError):
        decrypt_value("NATS_PASSWORD", damaged, secrets=[TEST_KEY_ENCRYPTION_SECRET])
    with pytest.raises(SealedConfigError, match="too short"):
        decrypt_value("NATS_PASSWORD", "enc:v1:AAAA", secrets=[TEST_KEY_ENCRYPTION_SECRET])
    with pytest.raises(SealedConfigError, match="not set"):
        decrypt_value("NATS_PASSWORD", sealed, secrets=["", ""])


def test_previous_secret_still_opens_during_rotation() -> None:
    sealed = encrypt_value("NATS_PASSWORD", "x", secret=OTHER_SECRET)
    environ = {
        "KEY_ENCRYPTION_SECRET": TEST_KEY_ENCRYPTION_SECRET,
        "KEY_ENCRYPTION_SECRET_PREVIOUS": OTHER_SECRET,
        "NATS_PASSWORD": sealed,
    }
    assert open_environment(environ) == {"NATS_PASSWORD": "x"}


def test_open_environment_names_every_bad_variable() -> None:
    environ = {
        "KEY_ENCRYPTION_SECRET": TEST_KEY_ENCRYPTION_SECRET,
        "A": encrypt_value("B", "x", secret=TEST_KEY_ENCRYPTION_SECRET),
        "C": "enc:v1:!!!",
        "PLAIN": "value",
    }
    with pytest.raises(ConfigError) as caught:
        open_environment(environ)
    assert [name for name, _ in caught.value.problems] == ["A", "C"]


def test_the_sealing_secret_cannot_be_sealed() -> None:
    environ = {"KEY_ENCRYPTION_SECRET": "enc:v1:AAAA"}
    with pytest.raises(ConfigError, match="KEY_ENCRYPTION_SECRET"):
        open_environment(environ)


def test_load_settings_opens_sealed_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEY_ENCRYPTION_SECRET", TEST_KEY_ENCRYPTION_SECRET)
    monkeypatch.setenv(
        "PROXY_SIGNING_KEY",
        encrypt_value(
            "PROXY_SIGNING_KEY", TEST_PROXY_SIGNING_KEY, secret=TEST_KEY_ENCRYPTION_SECRET
        ),
    )
    monkeypatch.setenv(
        "VOICE_AGENT_PROXY_RATE_LIMIT",
        encrypt_value("VOICE_AGENT_PROXY_RATE_LIMIT", "7", secret=TEST_KEY_ENCRYPTION_SECRET),
    )
    settings = load_settings(ProxySettings)
    assert settings.proxy_signing_key.get_secret_value() == TEST_PROXY_SIGNING_KEY
    assert settings.rate_limit_per_min == 7


def test_load_settings_refuses_a_value_it_cannot_open(monkeypatch: pytest.MonkeyPatch) -> None:
    sealed = encrypt_value("PROXY_SIGNING_KEY", TEST_PROXY_SIGNING_KEY, secret=OTHER_SECRET)
    monkeypatch.setenv("KEY_ENCRYPTION_SECRET", TEST_KEY_ENCRYPTION_SECRET)
    monkeypatch.setenv("PROXY_SIGNING_KEY", sealed)
    with pytest.raises(ConfigError) as caught:
        load_settings(ProxySettings)
    assert caught.value.problems[0][0] == "PROXY_SIGNING_KEY"
    assert TEST_PROXY_SIGNING_KEY not in str(caught.value)
