"""The rules token and proxy share, checked once on both services' settings models."""

from __future__ import annotations

import time

import pytest

from services.proxy.settings import Settings as ProxySettings
from services.token.settings import Settings as TokenSettings
from shared.errors import ConfigError
from shared.settings import EdgeSettings, load_settings
from shared.tokens import ProxyClaims
from tests.support import TEST_PROXY_SIGNING_KEY

MODELS = [TokenSettings, ProxySettings]
PRODUCTION_OK = {
    "NODE_ENV": "production",
    "PROXY_SIGNING_KEY": TEST_PROXY_SIGNING_KEY,
    "ALLOWED_ORIGINS": "https://app.example.com",
    "OPENAI_BASE_URL": "https://api.openai.com/v1",
    "PROXY_PUBLIC_URL": "https://keyveil.example.com/api/voice-agent/proxy/v1",
    "KEYVEIL_ALLOW_ANONYMOUS": "true",  # the token service's identity rules: test_identity.py
}


def build(model: type[EdgeSettings], monkeypatch: pytest.MonkeyPatch, **env: str) -> EdgeSettings:
    for name in ("NODE_ENV", "APP_ENV", "ALLOWED_ORIGINS", "VOICE_AGENT_DEMO_MODE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {**PRODUCTION_OK, **env}.items():
        monkeypatch.setenv(name, value)
    return load_settings(model)


def problems(model: type[EdgeSettings], monkeypatch: pytest.MonkeyPatch, **env: str) -> set[str]:
    with pytest.raises(ConfigError) as caught:
        build(model, monkeypatch, **env)
    assert TEST_PROXY_SIGNING_KEY not in str(caught.value)
    return {name for name, _ in caught.value.problems}


@pytest.mark.parametrize("model", MODELS)
def test_a_sound_production_configuration_starts(
    model: type[EdgeSettings], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = build(model, monkeypatch)
    assert settings.is_production
    assert settings.keyring().current_kid


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"VOICE_AGENT_DEMO_MODE": "true"}, "VOICE_AGENT_DEMO_MODE"),
        ({"ALLOWED_ORIGINS": "http://app.example.com"}, "ALLOWED_ORIGINS"),
        ({"ALLOWED_ORIGINS": ""}, "ALLOWED_ORIGINS"),
        ({"OPENAI_BASE_URL": "http://api.openai.com/v1"}, "OPENAI_BASE_URL"),
        ({"PROXY_SIGNING_KEY": "short"}, "PROXY_SIGNING_KEY"),
        ({"PROXY_SIGNING_KEY_PREVIOUS": "x" * 40}, "PROXY_SIGNING_KEY_PREVIOUS"),
    ],
)
def test_production_rules_name_the_variable(
    model: type[EdgeSettings], monkeypatch: pytest.MonkeyPatch, env: dict[str, str], variable: str
) -> None:
    assert variable in problems(model, monkeypatch, **env)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"ALLOWED_ORIGINS": "*"}, "ALLOWED_ORIGINS"),
        ({"ALLOWED_ORIGINS": "https://app.example.com/path"}, "ALLOWED_ORIGINS"),
        ({"TRUSTED_PROXIES": "not-a-network"}, "TRUSTED_PROXIES"),
        ({"OPENAI_BASE_URL": "ftp://example.com"}, "OPENAI_BASE_URL"),
    ],
)
def test_malformed_values_are_refused_everywhere(
    model: type[EdgeSettings], monkeypatch: pytest.MonkeyPatch, env: dict[str, str], variable: str
) -> None:
    assert variable in problems(model, monkeypatch, NODE_ENV="development", **env)


def test_previous_signing_keys_still_verify(monkeypatch: pytest.MonkeyPatch) -> None:
    old = build(TokenSettings, monkeypatch, PROXY_SIGNING_KEY="old-" + TEST_PROXY_SIGNING_KEY)
    rotated = build(
        ProxySettings,
        monkeypatch,
        PROXY_SIGNING_KEY="new-" + TEST_PROXY_SIGNING_KEY,
        PROXY_SIGNING_KEY_PREVIOUS="old-" + TEST_PROXY_SIGNING_KEY,
    )
    now = int(time.time())
    token = old.keyring().issue(ProxyClaims(jti="j", sid="s", scopes=[], iat=now, exp=now + 60))
    assert rotated.keyring().verify(token).jti == "j"
    assert "old-" + TEST_PROXY_SIGNING_KEY in rotated.secret_values()
