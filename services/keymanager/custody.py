"""Key custody: the KEK providers, the custody record that proves them, the service ring.

The bucket holds one custody record (`meta.custody`) beside the key records: a random
root seed wrapped by the KEK provider. From the seed come the keys every replica must
share that are not KEKs: fingerprints, derived key ids, the intake key, the backup
signature (`ServiceRing`). Opening the record at start-up proves the configured KEK is
the one the bucket was written with, before any lease is asked for; when it does not
open, the key-manager is not ready and says why.

Unwrapped data keys of remote providers are cached in memory (`DataKeyCache`), so leases
keep flowing through a short provider outage and stop, fail closed, when the TTL ends.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import BaseModel, ConfigDict

from services.keymanager import metrics
from services.keymanager.kek import (
    DataKeyCache,
    KekProvider,
    KekUnavailableError,
    LocalKek,
    WrapContext,
    WrappedKey,
)
from shared.crypto import (
    Envelope,
    EnvelopeError,
    IntegrityError,
    Kek,
    KekRing,
    UnknownKekError,
    b64url_decode,
    b64url_encode,
)
from shared.errors import UnavailableError

__all__ = [
    "CUSTODY_CONTEXT",
    "CUSTODY_KEY",
    "Custody",
    "CustodyRecord",
    "CustodyStatus",
    "ServiceRing",
]

log = logging.getLogger(__name__)

CUSTODY_KEY = "meta.custody"
CUSTODY_CONTEXT = WrapContext(aad=b"keyveil-custody-v1", fields={"keyveil": "custody-v1"})
_NONCE_LEN = 12
_SEED_LEN = 32


class CustodyRecord(BaseModel):
    """The root seed, wrapped by the KEK provider; never the seed itself."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    schema_version: int = 1
    kek_id: str
    wrapped_seed: str
    created_at: float
    updated_at: float
    updated_by: str

    @property
    def wrapped(self) -> WrappedKey:
        return WrappedKey(self.kek_id, b64url_decode(self.wrapped_seed))


@dataclass
class CustodyStatus:
    ok: bool
    reason: str
    custody_kek_id: str | None = None
    checked_at: float = field(default_factory=time.time)


class ServiceRing(KekRing):
    """The ring KeyService signs fingerprints with; filled once the custody record opens.

    Until then it holds a random placeholder, and writes are refused (`Custody.require`).
    """

    def __init__(self) -> None:
        super().__init__(Kek(secrets.token_urlsafe(48)))

    def replace(self, current: Kek, previous: Sequence[Kek]) -> None:
        KekRing.__init__(self, current, previous)


class Custody:
    """Current provider (wraps), an optional previous one (unwraps until rewrap), the cache."""

    def __init__(
        self,
        *,
        provider: KekProvider,
        previous: KekProvider | None = None,
        cache: DataKeyCache,
    ) -> None:
        self.provider = provider
        self.previous = previous
        self.cache = cache
        self.ring = ServiceRing()
        self.status = CustodyStatus(ok=False, reason="custody not verified yet")
        self._custody_kek: Kek | None = None

    @property
    def providers(self) -> list[KekProvider]:
        return [p for p in (self.provider, self.previous) if p is not None]

    def provider_for(self, kek_id: str) -> KekProvider:
        for provider in self.providers:
            if provider.owns(kek_id):
                return provider
        raise UnknownKekError(kek_id)

    def require(self) -> None:
        """Refuse to write records while the custody record has not opened."""
        if not self.status.ok:
            raise UnavailableError(
                f"key custody is not verified: {self.status.reason}", code="kek_unavailable"
            )

    async def current_kek_id(self) -> str:
        return await self.provider.current_kek_id()

    # --- data keys ----------------------------------------------------------------------

    async def unwrap(
        self, wrapped: WrappedKey, context: WrapContext, *, cached: bool = True
    ) -> bytes:
        provider = self.provider_for(wrapped.kek_id)
        remote = not isinstance(provider, LocalKek)
        if cached and remote:
            hit = self.cache.get(wrapped, context)
            if hit is not None:
                metrics.DATA_KEY_CACHE.labels("hit").inc()
                return hit
            metrics.DATA_KEY_CACHE.labels("miss").inc()
        started = time.perf_counter()
        try:
            data_key = await provider.unwrap(wrapped, context)
        except KekUnavailableError as exc:
            metrics.KEK_ERRORS.labels(provider.name, "unavailable").inc()
            log.error("KEK provider %s unavailable: %s", exc.provider, exc.reason)
            raise
        finally:
            metrics.KEK_SECONDS.labels(provider.name, "unwrap").observe(
                time.perf_counter() - started
            )
        if remote:
            self.cache.put(wrapped, context, data_key)
        return data_key

    async def seal(self, plaintext: bytes, context: WrapContext) -> Envelope:
        started = time.perf_counter()
        try:
            data_key, wrapped = await self.provider.new_data_key(context)
        finally:
            metrics.KEK_SECONDS.labels(self.provider.name, "wrap").observe(
                time.perf_counter() - started
            )
        if not isinstance(self.provider, LocalKek):
            self.cache.put(wrapped, context, data_key)
        return Envelope(wrapped.kek_id, wrapped.blob, _encrypt(data_key, plaintext, context.aad))

    async def open(self, envelope: Envelope, context: WrapContext) -> bytes:
        """The plaintext, or an EnvelopeError / KekUnavailableError; never partial bytes."""
        data_key = await self.unwrap(WrappedKey(envelope.kek_id, envelope.wrapped_key), context)
        return _decrypt(data_key, envelope.ciphertext, context.aad)

    async def rewrap(self, envelope: Envelope, context: WrapContext) -> Envelope:
        """The data key under the current KEK version; the ciphertext is authenticated first.

        Within one remote provider the provider rewraps (Vault `rewrap`, KMS `ReEncrypt`);
        from another provider the data key is unwrapped here and wrapped by the new one.
        """
        await self.open(envelope, context)
        wrapped = WrappedKey(envelope.kek_id, envelope.wrapped_key)
        source = self.provider_for(envelope.kek_id)
        if source is self.provider:
            moved = await self.provider.rewrap(wrapped, context)
        else:
            moved = await self.provider.wrap(await self.unwrap(wrapped, context), context)
        return Envelope(moved.kek_id, moved.blob, envelope.ciphertext)

    # --- the custody record -------------------------------------------------------------

    def adopt(self, seed: bytes) -> None:
        """Fill the service ring from the seed (plus local KEKs, for records made before)."""
        root = Kek(seed.hex())
        previous: list[Kek] = []
        for provider in self.providers:
            if isinstance(provider, LocalKek):
                previous += [provider.ring.get(kek_id) for kek_id in provider.ring.kek_ids]
        self.ring.replace(root, previous)
        self._custody_kek = root

    async def new_custody_record(self, *, actor: str) -> tuple[CustodyRecord, bytes]:
        seed = os.urandom(_SEED_LEN)
        wrapped = await self.provider.wrap(seed, CUSTODY_CONTEXT)
        now = time.time()
        record = CustodyRecord(
            kek_id=wrapped.kek_id,
            wrapped_seed=b64url_encode(wrapped.blob),
            created_at=now,
            updated_at=now,
            updated_by=actor,
        )
        return record, seed

    async def open_custody(self, record: CustodyRecord) -> bytes:
        """The seed; the provider is always asked (a health check of decrypt rights too)."""
        seed = await self.unwrap(record.wrapped, CUSTODY_CONTEXT, cached=False)
        if len(seed) != _SEED_LEN:
            raise IntegrityError("custody seed has the wrong length")
        return seed

    async def rewrap_custody(self, record: CustodyRecord, *, actor: str) -> CustodyRecord | None:
        """The record under the current KEK version, or None when it already is."""
        if record.kek_id == await self.current_kek_id():
            return None
        source = self.provider_for(record.kek_id)
        if source is self.provider:
            moved = await self.provider.rewrap(record.wrapped, CUSTODY_CONTEXT)
        else:
            moved = await self.provider.wrap(await self.open_custody(record), CUSTODY_CONTEXT)
        return record.model_copy(
            update={
                "kek_id": moved.kek_id,
                "wrapped_seed": b64url_encode(moved.blob),
                "updated_at": time.time(),
                "updated_by": actor,
            }
        )

    def mark(self, ok: bool, reason: str, custody_kek_id: str | None = None) -> bool:
        """Record a verification result; True when it changed from the last one."""
        changed = ok != self.status.ok or reason != self.status.reason
        self.status = CustodyStatus(ok=ok, reason=reason, custody_kek_id=custody_kek_id)
        metrics.KEK_READY.set(1 if ok else 0)
        return changed

    async def describe(self) -> dict[str, str]:
        info: dict[str, str] = {}
        for label, provider in (("current", self.provider), ("previous", self.previous)):
            if provider is None:
                continue
            try:
                for name, value in (await provider.describe()).items():
                    info[f"{label}.{name}"] = value
            except KekUnavailableError as exc:
                info[f"{label}.provider"] = provider.name
                info[f"{label}.error"] = exc.reason
        info["cache.entries"] = str(len(self.cache))
        return info

    def close(self) -> None:
        self.cache.clear()
        for provider in self.providers:
            provider.close()


def explain(exc: Exception, *, what: str) -> str:
    """Why `what` did not open, in words an operator can act on; never key bytes."""
    if isinstance(exc, KekUnavailableError):
        return f"KEK provider {exc.provider} unavailable: {exc.reason}"
    if isinstance(exc, UnknownKekError):
        return (
            f"{what} is wrapped under {exc.kek_id}, which no configured KEK provider holds "
            "(wrong KEY_ENCRYPTION_SECRET / VAULT_TRANSIT_KEY / KMS_KEY_ID, or the previous "
            "KEK is missing: set KEY_ENCRYPTION_SECRET_PREVIOUS or KEK_PREVIOUS_PROVIDER)"
        )
    if isinstance(exc, EnvelopeError):
        detail = getattr(exc, "reason", None) or "authentication failed"
        return f"{what} did not open under the configured KEK: {detail} (wrong KEK, or tampered)"
    return f"{what} did not open: {type(exc).__name__}"


def _encrypt(data_key: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    nonce = os.urandom(_NONCE_LEN)
    return nonce + AESGCM(data_key).encrypt(nonce, plaintext, associated_data)


def _decrypt(data_key: bytes, ciphertext: bytes, associated_data: bytes) -> bytes:
    nonce, body = ciphertext[:_NONCE_LEN], ciphertext[_NONCE_LEN:]
    try:
        return AESGCM(data_key).decrypt(nonce, body, associated_data)
    except (InvalidTag, ValueError):
        raise IntegrityError("ciphertext failed authentication") from None
