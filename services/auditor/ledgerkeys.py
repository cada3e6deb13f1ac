"""Ed25519 keys for the audit ledger: the auditor signs, anyone with a public key verifies.

The private seed lives only in the auditor process (`LEDGER_SIGNING_KEY`), never in a
NATS login, so a compromised bus account can append bytes to the ledger stream but
cannot make a record or a checkpoint that verifies. Each signature names its key by
`key_id` (a digest of the public key); a verifier holds a set of public keys, so records
signed before a key rotation keep verifying.

    LedgerKeyError           a seed or public key that is not 32 base64url bytes
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

__all__ = [
    "CHECKPOINT_CONTEXT",
    "RECORD_CONTEXT",
    "LedgerKeyError",
    "LedgerSigner",
    "LedgerVerifier",
    "b64url_decode",
    "b64url_encode",
    "key_id_of",
]

# Domain separation: a record signature can never be replayed as a checkpoint's.
RECORD_CONTEXT = b"keyveil.ledger.record.v2"
CHECKPOINT_CONTEXT = b"keyveil.ledger.checkpoint.v1"
_KEY_LEN = 32


class LedgerKeyError(ValueError):
    """A ledger key that cannot be used; the message never contains the key."""


def b64url_encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    """Padding-tolerant base64url; LedgerKeyError on anything else."""
    value = text.strip()
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        raise LedgerKeyError("not base64url") from None


def _raw_public(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(Encoding.Raw, PublicFormat.Raw)


def key_id_of(public: Ed25519PublicKey) -> str:
    """A short, stable name for a public key (not secret)."""
    return "ed25519:" + hashlib.sha256(_raw_public(public)).hexdigest()[:16]


def _message(context: bytes, payload: bytes) -> bytes:
    return context + b"\n" + payload


class LedgerSigner:
    """Holds the private key; signs record and checkpoint payloads."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public_key = private.public_key()
        self.key_id = key_id_of(self.public_key)

    @classmethod
    def from_seed(cls, seed: str) -> LedgerSigner:
        raw = b64url_decode(seed)
        if len(raw) != _KEY_LEN:
            raise LedgerKeyError(f"a ledger signing seed is {_KEY_LEN} bytes, not {len(raw)}")
        return cls(Ed25519PrivateKey.from_private_bytes(raw))

    @classmethod
    def generate(cls) -> LedgerSigner:
        return cls(Ed25519PrivateKey.generate())

    @property
    def public_key_b64(self) -> str:
        return b64url_encode(_raw_public(self.public_key))

    def seed_b64(self) -> str:
        """The private seed, for `keyveil audit keygen` and tests only: it is the secret."""
        raw = self._private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        return b64url_encode(raw)

    def sign(self, context: bytes, payload: bytes) -> str:
        return b64url_encode(self._private.sign(_message(context, payload)))

    def verifier(self, *extra: Ed25519PublicKey) -> LedgerVerifier:
        return LedgerVerifier([self.public_key, *extra])


class LedgerVerifier:
    """The public keys a ledger may be signed with, by key id."""

    def __init__(self, public_keys: Iterable[Ed25519PublicKey]) -> None:
        self._keys = {key_id_of(k): k for k in public_keys}

    @classmethod
    def from_strings(cls, values: Iterable[str]) -> LedgerVerifier:
        """Base64url raw 32-byte public keys, as `LedgerSigner.public_key_b64` prints them."""
        keys: list[Ed25519PublicKey] = []
        for value in values:
            raw = b64url_decode(value)
            if len(raw) != _KEY_LEN:
                raise LedgerKeyError(f"a ledger public key is {_KEY_LEN} bytes, not {len(raw)}")
            keys.append(Ed25519PublicKey.from_public_bytes(raw))
        return cls(keys)

    def merged(self, other: LedgerVerifier) -> LedgerVerifier:
        return LedgerVerifier([*self._keys.values(), *other._keys.values()])

    @property
    def key_ids(self) -> frozenset[str]:
        return frozenset(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def verify(self, key_id: str, context: bytes, payload: bytes, signature: str) -> bool:
        key = self._keys.get(key_id)
        if key is None:
            return False
        try:
            key.verify(b64url_decode(signature), _message(context, payload))
        except (InvalidSignature, LedgerKeyError):
            return False
        return True
