"""Cryptographic building blocks: HPKE sealing of leases, and envelope encryption at rest.

Sealing uses HPKE (RFC 9180, base mode) from `cryptography` itself; the lease
metadata is the HPKE `info`, so a sealed key cannot be replayed under other metadata.
Two KEMs are offered: X25519, and the hybrid post-quantum ML-KEM-768 + X25519.

Envelope encryption follows the KMS pattern: each record gets a fresh 256-bit data
key (AES-256-GCM, random 96-bit nonce, associated data binding the record), and the
data key is wrapped by a key-encryption key (KEK) derived from KEY_ENCRYPTION_SECRET
with HKDF-SHA256. Each KEK has a version id derived from its secret and stored beside
every wrapped key, so a previous secret can still decrypt until `rewrap` moves the
data keys under the current one.

    EnvelopeError            an envelope did not open (never partial plaintext)
    ├── UnknownKekError      wrapped under a KEK this process does not hold
    └── IntegrityError       tampered ciphertext or wrong associated data
    SealError                a sealed lease did not open
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hpke, serialization
from cryptography.hazmat.primitives.asymmetric import mlkem
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "Envelope",
    "EnvelopeError",
    "IntegrityError",
    "Kek",
    "KekRing",
    "Kem",
    "RequesterKeyPair",
    "RequesterPrivateKey",
    "SealError",
    "UnknownKekError",
    "b64url_decode",
    "b64url_encode",
    "open_envelope",
    "open_sealed",
    "rewrap_envelope",
    "seal_envelope",
    "seal_for_requester",
]


class Kem(StrEnum):
    x25519 = "x25519"
    mlkem768_x25519 = "mlkem768_x25519"


_SUITES = {
    Kem.x25519: hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
    Kem.mlkem768_x25519: hpke.Suite(
        hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM
    ),
}
_X25519_PUBLIC_LEN = 32
_MLKEM768_PUBLIC_LEN = 1184

RequesterPrivateKey = X25519PrivateKey | hpke.MLKEM768X25519PrivateKey
RequesterPublicKey = X25519PublicKey | hpke.MLKEM768X25519PublicKey


class SealError(Exception):
    """A sealed payload could not be opened (wrong key, wrong info, or tampered)."""


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _raw(public: X25519PublicKey | mlkem.MLKEM768PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class RequesterKeyPair:
    """An ephemeral HPKE key pair, made at start-up and never persisted.

    The hybrid public key travels as the ML-KEM-768 encapsulation key followed by
    the X25519 public key (1184 + 32 bytes), the order of the hybrid KEM itself.
    """

    def __init__(self, kem: Kem = Kem.x25519) -> None:
        self.kem = kem
        x25519 = X25519PrivateKey.generate()
        if kem is Kem.x25519:
            self.private_key: RequesterPrivateKey = x25519
            self.public_bytes = _raw(x25519.public_key())
        else:
            pq = mlkem.MLKEM768PrivateKey.generate()
            self.private_key = hpke.MLKEM768X25519PrivateKey(pq, x25519)
            self.public_bytes = _raw(pq.public_key()) + _raw(x25519.public_key())

    def open(self, sealed: bytes, *, info: bytes) -> bytes:
        return open_sealed(sealed, self.private_key, info=info, kem=self.kem)

    def __repr__(self) -> str:
        return f"RequesterKeyPair(kem={self.kem.value})"


def _public_key(public_key: bytes, kem: Kem) -> RequesterPublicKey:
    try:
        if kem is Kem.x25519:
            if len(public_key) != _X25519_PUBLIC_LEN:
                raise ValueError("wrong length")
            return X25519PublicKey.from_public_bytes(public_key)
        if len(public_key) != _MLKEM768_PUBLIC_LEN + _X25519_PUBLIC_LEN:
            raise ValueError("wrong length")
        return hpke.MLKEM768X25519PublicKey(
            mlkem.MLKEM768PublicKey.from_public_bytes(public_key[:_MLKEM768_PUBLIC_LEN]),
            X25519PublicKey.from_public_bytes(public_key[_MLKEM768_PUBLIC_LEN:]),
        )
    except ValueError:
        raise SealError(f"not a valid {kem.value} public key") from None


def seal_for_requester(plaintext: bytes, public_key: bytes, *, info: bytes, kem: Kem) -> bytes:
    """Encrypt `plaintext` so only the holder of the matching private key can read it."""
    return _SUITES[kem].encrypt(plaintext, _public_key(public_key, kem), info=info)


def open_sealed(sealed: bytes, private_key: RequesterPrivateKey, *, info: bytes, kem: Kem) -> bytes:
    try:
        return _SUITES[kem].decrypt(sealed, private_key, info=info)
    except (InvalidTag, ValueError, TypeError):
        raise SealError("sealed lease does not open with this key and metadata") from None


# --- envelope encryption at rest -------------------------------------------------------

_NONCE_LEN = 12
_DATA_KEY_BITS = 256


def _hkdf(secret: bytes, *, salt: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(secret)


class EnvelopeError(Exception):
    """An envelope could not be opened; nothing of the plaintext is returned."""


class UnknownKekError(EnvelopeError):
    def __init__(self, kek_id: str) -> None:
        self.kek_id = kek_id
        super().__init__(f"wrapped under unknown KEK version {kek_id}")


class IntegrityError(EnvelopeError):
    """Authentication failed: the ciphertext, wrapped key or associated data changed."""


class Kek:
    """A key-encryption key and the keys derived beside it from one secret.

    The version id is itself an HKDF output, so it names the secret without
    revealing it, and a new secret gets a new id with no extra configuration.
    """

    __slots__ = ("_fingerprint_key", "_intake_seed", "_key", "kek_id")

    def __init__(self, secret: str) -> None:
        ikm = secret.encode()
        self.kek_id = "kek-" + _hkdf(ikm, salt=b"keyveil-kek-id-v1", info=b"id", length=8).hex()
        scope = self.kek_id.encode()
        self._key = _hkdf(ikm, salt=b"keyveil-kek-v1", info=b"wrap|" + scope)
        self._fingerprint_key = _hkdf(ikm, salt=b"keyveil-kek-v1", info=b"fingerprint|" + scope)
        self._intake_seed = _hkdf(ikm, salt=b"keyveil-kek-v1", info=b"intake|" + scope)

    def wrap(self, data_key: bytes, associated_data: bytes) -> bytes:
        nonce = os.urandom(_NONCE_LEN)
        return nonce + AESGCM(self._key).encrypt(nonce, data_key, self._wrap_ad(associated_data))

    def unwrap(self, wrapped: bytes, associated_data: bytes) -> bytes:
        nonce, body = wrapped[:_NONCE_LEN], wrapped[_NONCE_LEN:]
        try:
            return AESGCM(self._key).decrypt(nonce, body, self._wrap_ad(associated_data))
        except (InvalidTag, ValueError):
            raise IntegrityError("wrapped data key failed authentication") from None

    def _wrap_ad(self, associated_data: bytes) -> bytes:
        return b"keyveil-dek-v1|" + self.kek_id.encode() + b"|" + associated_data

    def fingerprint(self, plaintext: bytes) -> str:
        """HMAC-SHA256 under a key derived from the KEK secret: not a bare hash of the key."""
        digest = hmac.new(self._fingerprint_key, plaintext, hashlib.sha256).digest()
        return "hs256:" + digest[:16].hex()

    def derived_id(self, label: str, plaintext: bytes) -> str:
        """A stable, keyed identifier for `plaintext` (the same key gets the same id)."""
        mac = hmac.new(self._fingerprint_key, label.encode() + b"|" + plaintext, hashlib.sha256)
        return mac.hexdigest()[:16]

    def signature(self, label: str, data: bytes) -> str:
        """A full-length keyed HMAC-SHA256 of `data`, separated by `label` (e.g. a backup)."""
        mac = hmac.new(self._fingerprint_key, b"sig|" + label.encode() + b"|" + data, "sha256")
        return mac.hexdigest()

    def intake_key(self) -> X25519PrivateKey:
        """The X25519 key every replica shares, to which operators seal keys they add."""
        return X25519PrivateKey.from_private_bytes(self._intake_seed)

    def __repr__(self) -> str:
        return f"Kek({self.kek_id})"


class KekRing:
    """The current KEK (encrypts) and previous ones (decrypt only)."""

    def __init__(self, current: Kek, previous: Iterable[Kek] = ()) -> None:
        self.current = current
        self._by_id = {kek.kek_id: kek for kek in previous}
        self._by_id[current.kek_id] = current

    @classmethod
    def from_secrets(cls, current: str, *previous: str | None) -> KekRing:
        return cls(Kek(current), [Kek(p) for p in previous if p])

    def get(self, kek_id: str) -> Kek:
        try:
            return self._by_id[kek_id]
        except KeyError:
            raise UnknownKekError(kek_id) from None

    def __contains__(self, kek_id: object) -> bool:
        return kek_id in self._by_id

    @property
    def kek_ids(self) -> list[str]:
        return list(self._by_id)


@dataclass(frozen=True)
class Envelope:
    """Ciphertext at rest: data-key ciphertext, and the data key wrapped under `kek_id`."""

    kek_id: str
    wrapped_key: bytes
    ciphertext: bytes


def seal_envelope(plaintext: bytes, *, kek: Kek, associated_data: bytes) -> Envelope:
    data_key = AESGCM.generate_key(bit_length=_DATA_KEY_BITS)
    nonce = os.urandom(_NONCE_LEN)
    ciphertext = nonce + AESGCM(data_key).encrypt(nonce, plaintext, associated_data)
    return Envelope(kek.kek_id, kek.wrap(data_key, associated_data), ciphertext)


def open_envelope(envelope: Envelope, *, keyring: KekRing, associated_data: bytes) -> bytes:
    """The plaintext, or an `EnvelopeError`; AES-GCM never releases unauthenticated bytes."""
    data_key = keyring.get(envelope.kek_id).unwrap(envelope.wrapped_key, associated_data)
    nonce, body = envelope.ciphertext[:_NONCE_LEN], envelope.ciphertext[_NONCE_LEN:]
    try:
        return AESGCM(data_key).decrypt(nonce, body, associated_data)
    except (InvalidTag, ValueError):
        raise IntegrityError("ciphertext failed authentication") from None


def rewrap_envelope(envelope: Envelope, *, keyring: KekRing, associated_data: bytes) -> Envelope:
    """Re-wrap the data key under the current KEK; the ciphertext itself is untouched.

    The data ciphertext is authenticated first, so a tampered record is never
    blessed with a fresh wrap.
    """
    open_envelope(envelope, keyring=keyring, associated_data=associated_data)
    data_key = keyring.get(envelope.kek_id).unwrap(envelope.wrapped_key, associated_data)
    current = keyring.current
    return Envelope(current.kek_id, current.wrap(data_key, associated_data), envelope.ciphertext)
