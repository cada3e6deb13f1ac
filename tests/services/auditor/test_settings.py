"""Auditor settings: defaults per contract, and refusals that name the variable."""

from __future__ import annotations

import pytest

from services.auditor.settings import Settings
from shared.errors import ConfigError
from shared.settings import load_settings


def test_defaults_follow_the_contract() -> None:
    settings = load_settings(Settings)
    assert settings.port == 8083
    assert settings.alert_webhook_url is None


def test_webhook_must_be_http_and_https_in_production() -> None:
    with pytest.raises(ConfigError, match="ALERT_WEBHOOK_URL"):
        load_settings(Settings, alert_webhook_url="ftp://hooks.example.net/x")
    with pytest.raises(ConfigError) as refused:
        load_settings(Settings, node_env="production", alert_webhook_url="http://hooks.local/x")
    assert "https" in str(refused.value)
    assert "hooks.local" not in str(refused.value)
    ok = load_settings(Settings, node_env="production", alert_webhook_url="https://hooks.local/x")
    assert ok.alert_webhook_url is not None


def test_thresholds_are_validated() -> None:
    with pytest.raises(ConfigError, match="AUDITOR_PROXY_ERROR_RATIO"):
        load_settings(Settings, proxy_error_ratio=1.5)
