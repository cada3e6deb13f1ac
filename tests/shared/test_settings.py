"""Configuration is refused with the variable and the rule, never the value."""

from __future__ import annotations

import pytest
from pydantic import Field, SecretStr, field_validator

from shared.errors import ConfigError
from shared.settings import (
    CommaList,
    CommonSettings,
    Environment,
    check_secret_strength,
    load_settings,
    split_commas,
)


class ExampleSettings(CommonSettings):
    signing_key: SecretStr = Field(validation_alias="PROXY_SIGNING_KEY")
    rate_limit: int = Field(default=10, ge=1, le=1000, validation_alias="VOICE_AGENT_RATE_LIMIT")
    origins: CommaList = Field(default_factory=list, validation_alias="ALLOWED_ORIGINS")

    _split = field_validator("origins", mode="before")(split_commas)


def test_missing_and_out_of_range_variables_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROXY_SIGNING_KEY", raising=False)
    monkeypatch.setenv("VOICE_AGENT_RATE_LIMIT", "999999")
    with pytest.raises(ConfigError) as caught:
        load_settings(ExampleSettings)
    names = {name for name, _ in caught.value.problems}
    assert names == {"PROXY_SIGNING_KEY", "VOICE_AGENT_RATE_LIMIT"}
    assert "999999" not in str(caught.value)


def test_value_never_appears_in_the_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROXY_SIGNING_KEY", "s3cr3t-value-that-must-not-leak")
    monkeypatch.setenv("VOICE_AGENT_RATE_LIMIT", "not-a-number-s3cr3t")
    with pytest.raises(ConfigError) as caught:
        load_settings(ExampleSettings)
    assert "s3cr3t" not in str(caught.value)
    assert caught.value.problems[0][0] == "VOICE_AGENT_RATE_LIMIT"


def test_node_env_aliases_and_comma_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROXY_SIGNING_KEY", "x")
    monkeypatch.setenv("APP_ENV", "prod")
    monkeypatch.setenv("ALLOWED_ORIGINS", "https://a.example, https://b.example,")
    settings = load_settings(ExampleSettings)
    assert settings.node_env is Environment.production
    assert settings.is_production
    assert settings.origins == ["https://a.example", "https://b.example"]


@pytest.mark.parametrize(
    ("secret", "rule"),
    [
        ("short", "at least 32"),
        ("a" * 40, "entropy"),
        ("changeme-changeme-changeme-changeme-123", "placeholder"),
        ("abababababababababababababababababababab", "entropy"),
        ("abcdefghijklmnopqrstuvwxyz012345", "predictable"),  # the red-team's example
        ("zyxwvutsrqponmlkjihgfedcba9876543210", "predictable"),
    ],
)
def test_weak_secrets_are_refused(secret: str, rule: str) -> None:
    problem = check_secret_strength(secret)
    assert problem is not None
    assert rule in problem


def test_generated_secret_is_strong() -> None:
    import secrets

    # Random secrets pass (a false refusal has odds of about 3 in a million per draw).
    assert all(check_secret_strength(secrets.token_urlsafe(32)) is None for _ in range(200))
