"""Auditor settings: defaults per contract, and refusals that name the variable."""

from __future__ import annotations

import pytest

from services.auditor.ledgerkeys import LedgerSigner
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
    ok = load_settings(
        Settings,
        node_env="production",
        alert_webhook_url="https://hooks.local/x",
        ledger_signing_key=LedgerSigner.generate().seed_b64(),
        ledger_checkpoint_dir="/tmp/cp",
    )
    assert ok.alert_webhook_url is not None


def test_thresholds_are_validated() -> None:
    with pytest.raises(ConfigError, match="AUDITOR_PROXY_ERROR_RATIO"):
        load_settings(Settings, proxy_error_ratio=1.5)


def test_ledger_signing_key_is_required_in_production_and_must_be_a_seed() -> None:
    seed = LedgerSigner.generate().seed_b64()
    with pytest.raises(ConfigError, match="LEDGER_SIGNING_KEY"):
        load_settings(Settings, node_env="production", ledger_checkpoint_dir="/tmp/cp")
    with pytest.raises(ConfigError, match="LEDGER_CHECKPOINT_DIR"):
        load_settings(Settings, node_env="production", ledger_signing_key=seed)
    with pytest.raises(ConfigError) as refused:
        load_settings(Settings, ledger_signing_key=seed[:-3])
    assert "LEDGER_SIGNING_KEY" in str(refused.value)
    assert seed[:-3] not in str(refused.value)
    ok = load_settings(
        Settings, node_env="production", ledger_signing_key=seed, ledger_checkpoint_dir="/tmp/cp"
    )
    signer = ok.ledger_signer()
    assert signer is not None
    assert signer.seed_b64() == seed
    # The redactor is given the seed, so it is masked wherever it would appear.
    assert seed in ok.secret_values()
    # Development may run without one (the app then generates one per process).
    assert load_settings(Settings).ledger_signer() is None


def test_ledger_verify_keys_are_a_comma_list_of_public_keys() -> None:
    a, b = LedgerSigner.generate(), LedgerSigner.generate()
    settings = load_settings(Settings, ledger_verify_keys=f"{a.public_key_b64}, {b.public_key_b64}")
    assert settings.ledger_verifier().key_ids == {a.key_id, b.key_id}
    with pytest.raises(ConfigError, match="LEDGER_VERIFY_KEY"):
        load_settings(Settings, ledger_verify_keys="not-a-key")
