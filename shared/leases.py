"""Key leases over NATS: the contract, and the requester's sealed-lease cache.

A token or proxy instance makes an HPKE key pair at start-up (never persisted;
X25519, or the hybrid ML-KEM-768 + X25519 with `kem=Kem.mlkem768_x25519`),
asks `keyveil.km.lease` for a key, and gets it back sealed to that public key.
The cache keeps the sealed lease until it expires; the plaintext exists only for
the moment a caller builds an upstream Authorization header.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import BaseModel, ConfigDict

from shared import bus
from shared.crypto import Kem, RequesterKeyPair, SealError, b64url_decode, b64url_encode
from shared.errors import BusError, UnavailableError

__all__ = [
    "KEYMANAGER_QUEUE",
    "LEASE_SUBJECT",
    "ROTATED_SUBJECT",
    "LeaseClient",
    "LeaseReply",
    "LeaseRequest",
    "RotatedNotice",
]

log = logging.getLogger(__name__)

LEASE_SUBJECT = "keyveil.km.lease"
ROTATED_SUBJECT = "keyveil.km.rotated"
KEYMANAGER_QUEUE = "keymanager"
# Refresh a little before expiry so no request holds a lease that dies in flight.
_EARLY_REFRESH_S = 5.0


class LeaseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    requester: str
    instance_id: str
    public_key: str
    kem: Kem = Kem.x25519
    provider: str = "openai"
    environment: str


class LeaseReply(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    lease_id: str
    key_id: str
    version: int
    provider: str
    environment: str
    expires_at: float
    sealed: str

    def info_for(self, request: LeaseRequest) -> bytes:
        """The HPKE info binding the sealed key to this lease and this requester."""
        parts = (
            "keyveil-lease-v1",
            self.lease_id,
            self.key_id,
            str(self.version),
            self.provider,
            self.environment,
            f"{self.expires_at:.3f}",
            request.requester,
            request.instance_id,
        )
        return "|".join(parts).encode()


class RotatedNotice(BaseModel):
    """Broadcast when a key version changes status: requesters drop cached leases."""

    provider: str
    environment: str
    key_id: str
    version: int
    status: str


class LeaseClient:
    """Fetches, caches and opens sealed leases for one service instance."""

    def __init__(
        self,
        nc: NATS,
        *,
        requester: str,
        environment: str,
        timeout_s: float = 2.0,
        kem: Kem = Kem.x25519,
    ) -> None:
        self._nc = nc
        self._keypair = RequesterKeyPair(kem)
        public = self._keypair.public_bytes
        self._environment = environment
        self._requester = requester
        self.instance_id = uuid.uuid4().hex
        self._public_key = b64url_encode(public)
        self._timeout = timeout_s
        self._cache: dict[str, tuple[LeaseRequest, LeaseReply]] = {}
        self._lock = asyncio.Lock()
        self._subscription: Subscription | None = None

    async def start(self) -> None:
        self._subscription = await self._nc.subscribe(ROTATED_SUBJECT, cb=self._on_rotated)

    async def stop(self) -> None:
        if self._subscription is not None:
            await self._subscription.unsubscribe()

    def invalidate(self) -> None:
        self._cache.clear()

    async def _on_rotated(self, msg: Msg) -> None:
        log.info("key rotation notice: dropping cached leases")
        self.invalidate()

    async def lease(self, provider: str = "openai") -> tuple[LeaseRequest, LeaseReply]:
        """The cached sealed lease for `provider`, fetched when absent or near expiry."""
        cached = self._cache.get(provider)
        if cached and cached[1].expires_at - _EARLY_REFRESH_S > time.time():
            return cached
        async with self._lock:  # one fetch for many waiting requests
            cached = self._cache.get(provider)
            if cached and cached[1].expires_at - _EARLY_REFRESH_S > time.time():
                return cached
            request = LeaseRequest(
                requester=self._requester,
                instance_id=self.instance_id,
                public_key=self._public_key,
                kem=self._keypair.kem,
                provider=provider,
                environment=self._environment,
            )
            try:
                reply = await bus.request(
                    self._nc,
                    LEASE_SUBJECT,
                    request,
                    LeaseReply,
                    timeout=self._timeout,
                    requester=self._requester,
                )
            except BusError as exc:
                log.warning("key lease failed: %s", exc)
                raise UnavailableError(
                    "the key manager is unavailable", code="key_unavailable"
                ) from None
            self._cache[provider] = (request, reply)
            return request, reply

    async def authorization(self, provider: str = "openai") -> tuple[str, LeaseReply]:
        """`Bearer <key>` for one upstream request, and the lease it came from."""
        request, reply = await self.lease(provider)
        try:
            key = self._keypair.open(b64url_decode(reply.sealed), info=reply.info_for(request))
        except (SealError, ValueError):
            self._cache.pop(provider, None)
            raise UnavailableError(
                "key lease could not be opened", code="key_unavailable"
            ) from None
        return f"Bearer {key.decode()}", reply
