"""Who a token was issued to, without saying who: keyed hashes of user ids.

The raw subject (a user id, often an email) never leaves the token service's memory:
tokens, events, logs, metrics and Redis keys carry `PrincipalHasher.hash(sub)`, an
HMAC under KEYVEIL_PRINCIPAL_KEY (or, when that is unset, a key derived from
PROXY_SIGNING_KEY with HKDF, so rotating the signing key also changes the hashes).
An operator who knows a user's id computes the same hash (`keyveil tokens revoke --user`).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from shared.crypto import b64url_encode

__all__ = ["Principal", "PrincipalHasher", "revoked_user_key"]

_HASH_BYTES = 16  # 128 bits: collision-free for any realistic user count, short in a token


@dataclass(frozen=True)
class Principal:
    """The caller a token is issued to; `sub` is already the keyed hash (or None: anonymous)."""

    sub: str | None
    app: str | None = None
    tier: str | None = None


class PrincipalHasher:
    """`hash(sub)`: the stable, keyed, non-reversible name of a user."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("a principal key needs at least 16 bytes")
        self._key = key

    @classmethod
    def from_secrets(cls, *, principal_key: str | None, signing_key: str) -> PrincipalHasher:
        """KEYVEIL_PRINCIPAL_KEY when set, else a key derived from PROXY_SIGNING_KEY."""
        if principal_key:
            return cls(principal_key.encode())
        derived = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=b"keyveil principal v1"
        ).derive(signing_key.encode())
        return cls(derived)

    def hash(self, sub: str) -> str:
        digest = hmac.new(self._key, b"sub\x00" + sub.encode(), hashlib.sha256).digest()
        return "u_" + b64url_encode(digest[:_HASH_BYTES])


def revoked_user_key(sub_hash: str) -> str:
    """The Redis key holding the time (unix s) before which a user's tokens are revoked."""
    return f"kv:revoked-user:{{{sub_hash}}}"  # hash tag: the user's slot (shared.ratelimit)
