"""Encrypted configuration values (`enc:v1:`) that a ConfigMap can carry safely.

A value is sealed with AES-256-GCM under a key derived by HKDF-SHA256 from
KEY_ENCRYPTION_SECRET (a fresh random salt per value). The variable's name is the
associated data, so a sealed value moved to another variable does not open. Services
open every `enc:v1:` variable at start-up (`open_environment`, called by
`shared.settings.load_settings`); the previous secret is tried too, so values keep
opening while KEY_ENCRYPTION_SECRET rotates.

    enc:v1:<base64url(salt[16] | nonce[12] | ciphertext+tag)>

Errors: `SealedConfigError` (a `ConfigError`, naming the variable, never the value).
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Iterable, Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from shared.errors import ConfigError

__all__ = [
    "PREFIX",
    "SECRET_VARIABLES",
    "SealedConfigError",
    "decrypt_value",
    "encrypt_value",
    "is_sealed",
    "open_environment",
]

PREFIX = "enc:v1:"
# The secret that seals values, and its predecessor during a rotation.
SECRET_VARIABLES = ("KEY_ENCRYPTION_SECRET", "KEY_ENCRYPTION_SECRET_PREVIOUS")
_INFO = b"keyveil/sealed-config/v1"
_SALT_BYTES = 16
_NONCE_BYTES = 12
_TAG_BYTES = 16


class SealedConfigError(ConfigError):
    """An `enc:v1:` value cannot be opened (wrong secret, other variable, damaged)."""

    def __init__(self, name: str, rule: str) -> None:
        self.name = name
        super().__init__([(name, rule)])


def is_sealed(value: str) -> bool:
    return value.startswith(PREFIX)


def _key(secret: str, salt: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=_INFO).derive(secret.encode())


def encrypt_value(name: str, plaintext: str, *, secret: str) -> str:
    """Seal `plaintext` for the variable `name` under `secret` (KEY_ENCRYPTION_SECRET)."""
    if not name:
        raise ValueError("a variable name is required (it is bound into the ciphertext)")
    salt = os.urandom(_SALT_BYTES)
    nonce = os.urandom(_NONCE_BYTES)
    sealed = AESGCM(_key(secret, salt)).encrypt(nonce, plaintext.encode(), name.encode())
    blob = base64.urlsafe_b64encode(salt + nonce + sealed).rstrip(b"=").decode()
    return PREFIX + blob


def decrypt_value(name: str, value: str, *, secrets: Iterable[str]) -> str:
    """Open an `enc:v1:` value of variable `name`, trying each secret in turn."""
    if not is_sealed(value):
        raise SealedConfigError(name, f"is not an {PREFIX} value")
    body = value.removeprefix(PREFIX).strip()
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError):
        raise SealedConfigError(name, f"is not valid {PREFIX} base64url") from None
    if len(raw) < _SALT_BYTES + _NONCE_BYTES + _TAG_BYTES:
        raise SealedConfigError(name, f"is too short to be an {PREFIX} value")
    salt, nonce = raw[:_SALT_BYTES], raw[_SALT_BYTES : _SALT_BYTES + _NONCE_BYTES]
    sealed = raw[_SALT_BYTES + _NONCE_BYTES :]
    tried = False
    for secret in secrets:
        if not secret:
            continue
        tried = True
        try:
            plain = AESGCM(_key(secret, salt)).decrypt(nonce, sealed, name.encode())
        except InvalidTag:
            continue
        try:
            return plain.decode()
        except UnicodeDecodeError:
            raise SealedConfigError(name, "decrypts to something that is not UTF-8") from None
    if not tried:
        raise SealedConfigError(name, f"is {PREFIX}-encrypted but KEY_ENCRYPTION_SECRET is not set")
    raise SealedConfigError(
        name, "does not decrypt with KEY_ENCRYPTION_SECRET (wrong secret or another variable)"
    )


def open_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """Every `enc:v1:` variable of `environ`, opened: {name: plaintext}.

    Raises `ConfigError` naming every variable that does not open. The sealing secret
    itself cannot be sealed.
    """
    sealed = {name: value for name, value in environ.items() if is_sealed(value)}
    if not sealed:
        return {}
    problems: list[tuple[str, str]] = []
    for name in SECRET_VARIABLES:
        if name in sealed:
            problems.append((name, f"cannot itself be {PREFIX}-encrypted"))
    secrets = [environ.get(name, "") for name in SECRET_VARIABLES]
    opened: dict[str, str] = {}
    for name, value in sealed.items():
        if name in SECRET_VARIABLES:
            continue
        try:
            opened[name] = decrypt_value(name, value, secrets=secrets)
        except SealedConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    return opened
