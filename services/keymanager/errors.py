"""Errors the key-manager answers with; each maps to a typed bus error reply by its `code`.

ApiError (shared.errors)
├── ConflictError          a concurrent or duplicate change (409)
└── UnavailableError
    └── KeyIntegrityError  a record did not decrypt: tampered, swapped or unknown KEK
"""

from __future__ import annotations

from shared.errors import ApiError, UnavailableError

__all__ = ["ConflictError", "KeyIntegrityError"]


class ConflictError(ApiError):
    status = 409
    default_code = "conflict"


class KeyIntegrityError(UnavailableError):
    """Names the key version and why; never carries any byte of the record."""

    default_code = "key_integrity"

    def __init__(self, key_id: str, version: int, reason: str) -> None:
        self.key_id = key_id
        self.version = version
        self.reason = reason
        super().__init__(f"key {key_id} v{version} did not decrypt: {reason}")
