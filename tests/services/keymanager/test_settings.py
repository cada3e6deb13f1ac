"""Start-up refuses a weak KEY_ENCRYPTION_SECRET; policy defaults follow NODE_ENV."""

from __future__ import annotations

import pytest

from services.keymanager.settings import Settings
from shared.errors import ConfigError
from shared.settings import load_settings
from tests.support import TEST_KEY_ENCRYPTION_SECRET


@pytest.mark.parametrize(
    ("secret", "rule"),
    [
        ("short-secret-Ab3", "at least 32"),
        ("ab" * 20, "entropy"),
        ("changeme-" + TEST_KEY_ENCRYPTION_SECRET, "placeholder"),
    ],
)
def test_weak_kek_secrets_are_refused(secret: str, rule: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(Settings, KEY_ENCRYPTION_SECRET=secret)
    assert caught.value.problems[0][0] == "KEY_ENCRYPTION_SECRET"
    assert rule in caught.value.problems[0][1]
    assert secret not in str(caught.value)


def test_missing_kek_is_named() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(Settings)
    assert ("KEY_ENCRYPTION_SECRET", "required by the local KEK provider") in caught.value.problems


def test_defaults_per_environment() -> None:
    prod = load_settings(
        Settings, KEY_ENCRYPTION_SECRET=TEST_KEY_ENCRYPTION_SECRET, NODE_ENV="production"
    )
    dev = load_settings(Settings, KEY_ENCRYPTION_SECRET=TEST_KEY_ENCRYPTION_SECRET)
    assert prod.port == dev.port == 8082
    assert prod.max_key_age_s == 7 * 86_400
    assert dev.allowed_requesters == ["token", "proxy"]


def test_unknown_kem_is_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(
            Settings,
            KEY_ENCRYPTION_SECRET=TEST_KEY_ENCRYPTION_SECRET,
            KEYMANAGER_LEASE_KEMS="x25519,rsa",
        )
    assert caught.value.problems[0][0] == "KEYMANAGER_LEASE_KEMS"


@pytest.mark.parametrize(
    ("values", "variables"),
    [
        ({"KEK_PROVIDER": "vault-transit"}, {"VAULT_ADDR", "VAULT_TRANSIT_KEY", "VAULT_TOKEN"}),
        (
            {
                "KEK_PROVIDER": "vault-transit",
                "VAULT_ADDR": "https://vault:8200",
                "VAULT_TRANSIT_KEY": "keyveil",
                "VAULT_ROLE_ID": "role",
            },
            {"VAULT_SECRET_ID"},
        ),
        (
            {
                "KEK_PROVIDER": "vault-transit",
                "VAULT_ADDR": "https://vault:8200",
                "VAULT_TRANSIT_KEY": "keyveil",
                "VAULT_TOKEN": "t",
                "VAULT_K8S_ROLE": "km",
            },
            {"VAULT_TOKEN"},
        ),
        ({"KEK_PROVIDER": "aws-kms"}, {"KMS_KEY_ID"}),
        (
            {"KEK_PROVIDER": "aws-kms", "KMS_KEY_ID": "k", "KEK_PREVIOUS_PROVIDER": "aws-kms"},
            {"KEK_PREVIOUS_PROVIDER"},
        ),
        (
            {"KEK_PROVIDER": "aws-kms", "KMS_KEY_ID": "k", "KEK_PREVIOUS_PROVIDER": "local"},
            {"KEY_ENCRYPTION_SECRET"},
        ),
        ({"KEK_PROVIDER": "gcp-kms"}, {"KEK_PROVIDER"}),
    ],
)
def test_each_kek_provider_names_what_it_lacks(values: dict[str, str], variables: set[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(Settings, KEY_ENCRYPTION_SECRET=None, **values)
    assert {name for name, _ in caught.value.problems} == variables


def test_remote_kek_needs_no_kek_secret() -> None:
    settings = load_settings(
        Settings,
        KEY_ENCRYPTION_SECRET=None,
        KEK_PROVIDER="vault-transit",
        VAULT_ADDR="https://vault:8200",
        VAULT_TRANSIT_KEY="keyveil",
        VAULT_K8S_ROLE="keyveil-keymanager",
        VAULT_TOKEN=None,
    )
    assert settings.key_encryption_secret is None
    assert settings.kek_cache_ttl_s == 300
    assert settings.vault_transit_mount == "transit"
