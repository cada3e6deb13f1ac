"""Cryptographic building blocks: HPKE sealing of leases to a requester.

Sealing uses HPKE (RFC 9180, base mode) from `cryptography` itself; the lease
metadata is the HPKE `info`, so a sealed key cannot be replayed under other metadata.
"""

from __future__ import annotations

import base64
from enum import StrEnum

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

__all__ = [
    "Kem",
    "SealError",
    "b64url_decode",
    "b64url_encode",
    "open_sealed",
    "seal_for_requester",
]


class Kem(StrEnum):
    x25519 = "x25519"


_SUITES = {
    Kem.x25519: hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
}


class SealError(Exception):
    """A sealed payload could not be opened (wrong key, wrong info, or tampered)."""


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def seal_for_requester(plaintext: bytes, public_key: bytes, *, info: bytes, kem: Kem) -> bytes:
    """Encrypt `plaintext` so only the holder of the matching private key can read it."""
    recipient = X25519PublicKey.from_public_bytes(public_key)
    return _SUITES[kem].encrypt(plaintext, recipient, info=info)


def open_sealed(sealed: bytes, private_key: X25519PrivateKey, *, info: bytes, kem: Kem) -> bytes:
    try:
        return _SUITES[kem].decrypt(sealed, private_key, info=info)
    except (InvalidTag, ValueError):
        raise SealError("sealed lease does not open with this key and metadata") from None
