"""Build the KEK providers and the custody object from settings (`KEK_PROVIDER`)."""

from __future__ import annotations

from services.keymanager.custody import Custody
from services.keymanager.kek import (
    AwsKmsKek,
    DataKeyCache,
    KekProvider,
    LocalKek,
    VaultAuth,
    VaultTransitKek,
)
from services.keymanager.settings import KekProviderName, Settings
from shared.crypto import KekRing

__all__ = ["build_custody", "build_provider"]


def _secret(value: object) -> str | None:
    get = getattr(value, "get_secret_value", None)
    return str(get()) if get is not None else None


def build_provider(settings: Settings, name: KekProviderName) -> KekProvider:
    if name is KekProviderName.local:
        if settings.key_encryption_secret is None:
            raise ValueError("KEY_ENCRYPTION_SECRET is required by the local KEK provider")
        return LocalKek(
            KekRing.from_secrets(
                settings.key_encryption_secret.get_secret_value(),
                _secret(settings.key_encryption_secret_previous),
            )
        )
    if name is KekProviderName.vault_transit:
        assert settings.vault_addr is not None
        assert settings.vault_transit_key is not None
        return VaultTransitKek(
            addr=settings.vault_addr,
            key=settings.vault_transit_key,
            mount=settings.vault_transit_mount,
            auth=VaultAuth(
                token=_secret(settings.vault_token),
                role_id=settings.vault_role_id,
                secret_id=_secret(settings.vault_secret_id),
                k8s_role=settings.vault_k8s_role,
                k8s_token_path=settings.vault_k8s_token_path,
                approle_mount=settings.vault_approle_mount,
                k8s_mount=settings.vault_k8s_mount,
            ),
            timeout_s=settings.kek_timeout_s,
            verify=settings.vault_cacert or True,
        )
    assert settings.kms_key_id is not None
    return AwsKmsKek(
        key_id=settings.kms_key_id,
        region=settings.aws_region,
        endpoint_url=settings.aws_endpoint_url,
        timeout_s=settings.kek_timeout_s,
    )


def build_custody(settings: Settings) -> Custody:
    previous = settings.kek_previous_provider
    return Custody(
        provider=build_provider(settings, settings.kek_provider),
        previous=build_provider(settings, previous) if previous is not None else None,
        cache=DataKeyCache(ttl_s=settings.kek_cache_ttl_s, max_entries=settings.kek_cache_max),
    )
