"""Lease requests on `keyveil.km.lease`: check who asks, then seal the key to them.

The reply subject is checked before anything else: only a fresh inbox of an allowed
requester's own NATS user (`_INBOX_token.…`, `_INBOX_proxy.…`), whose user is also the
requester the body names. Anything else is dropped unanswered and audited, so nobody can
aim the key-manager's reply at a stream, a bucket or another service's inbox, nor lease
a key in another service's name. A refusal is a typed error reply, never a crash; every
answer is counted and audited, with the requester's service identity as actor.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from nats.aio.msg import Msg
from pydantic import ValidationError

from services.keymanager import metrics
from services.keymanager.keys import KeyService
from services.keymanager.settings import Settings
from shared.bus import Responder, parse_request
from shared.contract import Refusal
from shared.crypto import SealError, b64url_decode, b64url_encode, seal_for_requester
from shared.errors import ApiError, BadRequestError, ForbiddenError
from shared.eventschema import Dropped, Lease, RefusedDetail
from shared.keyadmin import PROVIDER_PATTERN, KeyStatus
from shared.leases import LeaseReply, LeaseRequest

__all__ = ["LeaseDesk"]

log = logging.getLogger(__name__)

_PROVIDER = re.compile(PROVIDER_PATTERN)
_MAX_REQUEST_BYTES = 8192


class LeaseDesk:
    def __init__(self, *, keys: KeyService, settings: Settings, responder: Responder) -> None:
        self._keys = keys
        self._settings = settings
        self._allowed = frozenset(settings.allowed_requesters)
        self._responder = responder

    async def handle(self, msg: Msg) -> None:
        started = time.perf_counter()
        user = self._responder.reply_user(msg)
        if user is None:
            self._count("unknown", "dropped")
            self._keys.audit(
                "lease_dropped",
                actor="unknown",
                outcome="denied",
                detail=Dropped(reply=(msg.reply or "")[:80]),
            )
            return
        actor = user
        try:
            request = self._parse(msg)
            self._authorise(request, user)
            reply = await self._grant(request)
        except ApiError as exc:
            refused = isinstance(exc, BadRequestError | ForbiddenError)
            result = "denied" if refused else "error"
            self._count(actor, result)
            self._keys.audit(
                "lease_denied" if refused else "lease_failed",
                actor=actor,
                outcome="denied" if refused else "failure",
                detail=RefusedDetail.of(exc, key_id=getattr(exc, "key_id", None)),
            )
            await self._responder.error(msg, exc.code, exc.message)
            return
        except Exception as exc:  # a lease request must never take the service down
            log.error("lease request failed: %s", type(exc).__name__, exc_info=exc)
            self._count(actor, "error")
            self._keys.audit(
                "lease_failed",
                actor=actor,
                outcome="failure",
                detail=RefusedDetail.of(Refusal.INTERNAL_ERROR),
            )
            await self._responder.error(msg, "internal_error", "the key manager could not answer")
            return
        finally:
            metrics.LEASE_SECONDS.observe(time.perf_counter() - started)
        await self._responder.reply(msg, reply)
        self._count(actor, "granted")

    def _parse(self, msg: Msg) -> LeaseRequest:
        if len(msg.data) > _MAX_REQUEST_BYTES:
            raise BadRequestError("lease request too large", code="malformed_request")
        try:
            return parse_request(msg, LeaseRequest)
        except ValidationError as exc:
            fields = sorted({str(e["loc"][0]) for e in exc.errors() if e["loc"]})
            detail = f" ({', '.join(fields)})" if fields else ""
            raise BadRequestError(
                f"malformed lease request{detail}", code="malformed_request"
            ) from None

    def _authorise(self, request: LeaseRequest, user: str) -> None:
        if request.requester != user:
            raise ForbiddenError(
                "requester does not match the reply inbox", code="requester_mismatch"
            )
        if request.environment != self._settings.node_env.value:
            raise ForbiddenError(
                f"this key manager serves {self._settings.node_env.value} only",
                code="environment_mismatch",
            )
        if not _PROVIDER.match(request.provider):
            raise BadRequestError("unknown provider", code="malformed_request")
        if request.kem not in self._settings.kems:
            raise BadRequestError(
                f"KEM {request.kem.value} is not allowed here", code="kem_not_allowed"
            )

    async def _grant(self, request: LeaseRequest) -> LeaseReply:
        try:
            public_key = b64url_decode(request.public_key)
        except ValueError:
            raise BadRequestError(
                "public key is not base64url", code="invalid_public_key"
            ) from None
        record = await self._keys.leasable(request.provider, request.environment)
        expires_at = time.time() + self._settings.lease_ttl_s
        if record.status is KeyStatus.retiring and record.retire_at is not None:
            expires_at = min(expires_at, record.retire_at)
        shell = LeaseReply(
            lease_id=uuid.uuid4().hex,
            key_id=record.key_id,
            version=record.version,
            provider=record.provider,
            environment=record.environment,
            expires_at=round(expires_at, 3),
            sealed="",
        )
        plaintext = await self._keys.decrypt(record, actor=request.requester)
        try:
            sealed = seal_for_requester(
                plaintext, public_key, info=shell.info_for(request), kem=request.kem
            )
        except SealError:
            raise BadRequestError(
                f"not a valid {request.kem.value} public key", code="invalid_public_key"
            ) from None
        finally:
            del plaintext
        self._keys.audit(
            "lease_granted",
            actor=request.requester,
            record=record,
            detail=Lease(
                lease_id=shell.lease_id,
                expires_at=shell.expires_at,
                kem=request.kem.value,
                instance_id=request.instance_id[:64],
            ),
        )
        return shell.model_copy(update={"sealed": b64url_encode(sealed)})

    def _count(self, actor: str, result: str) -> None:
        metrics.LEASES.labels(result).inc()
        requester = actor if actor in self._allowed else "other"
        metrics.REQUESTER_LEASES.labels(requester, result).inc()
