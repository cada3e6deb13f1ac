"""Admin requests on `keyveil.km.admin.<op>` from the operator CLI, one typed model each."""

from __future__ import annotations

import logging
from typing import TypeVar

from cryptography.hazmat.primitives import serialization
from nats.aio.msg import Msg
from pydantic import BaseModel, ValidationError

from services.keymanager import metrics
from services.keymanager.keys import KeyService
from services.keymanager.settings import Settings
from shared.bus import Responder, parse_request
from shared.crypto import (
    KekRing,
    Kem,
    SealError,
    UnknownKekError,
    b64url_decode,
    b64url_encode,
    open_sealed,
)
from shared.errors import ApiError, BadRequestError
from shared.eventschema import Dropped, Listed, RefusedDetail, Shown
from shared.keyadmin import (
    OPERATOR_USER,
    AddKeyRequest,
    AdminOp,
    IntakeReply,
    IntakeRequest,
    KeyListReply,
    KeyMutationReply,
    ListKeysRequest,
    RevokeKeyRequest,
    RewrapRequest,
    RotateKeyRequest,
    SealedSecret,
    ShowKeyRequest,
    intake_info,
)

__all__ = ["OPERATOR", "AdminDesk"]

log = logging.getLogger(__name__)

OPERATOR = OPERATOR_USER
M = TypeVar("M", bound=BaseModel)
_MAX_REQUEST_BYTES = 1_048_576  # a restore carries a whole (encrypted) backup


class AdminDesk:
    def __init__(
        self, *, keys: KeyService, keyring: KekRing, settings: Settings, responder: Responder
    ) -> None:
        self._keys = keys
        self._keyring = keyring
        self._settings = settings
        self._responder = responder

    async def handle(self, msg: Msg) -> None:
        """Only requests answered on the operator's own inbox are heard; others are dropped."""
        name = msg.subject.rsplit(".", 1)[-1][:32]
        if self._responder.reply_user(msg) is None:
            metrics.ADMIN_OPERATIONS.labels("unknown", "dropped").inc()
            self._keys.audit(
                "admin_dropped",
                actor="unknown",
                outcome="denied",
                detail=Dropped(reply=(msg.reply or "")[:80], operation=name),
            )
            return
        try:
            op = AdminOp(name)
        except ValueError:
            await self._responder.error(msg, "unknown_operation", "no such admin operation")
            return
        try:
            if len(msg.data) > _MAX_REQUEST_BYTES:
                raise BadRequestError("request too large", code="malformed_request")
            reply = await self._dispatch(op, msg)
        except ApiError as exc:
            metrics.ADMIN_OPERATIONS.labels(op.value, "denied").inc()
            self._keys.audit(
                f"admin_{op.value}",
                actor=OPERATOR,
                outcome="denied",
                detail=RefusedDetail.of(exc),
            )
            await self._responder.error(msg, exc.code, exc.message)
            return
        except Exception as exc:  # an admin mistake must never take the service down
            log.error("admin %s failed: %s", op.value, type(exc).__name__, exc_info=exc)
            metrics.ADMIN_OPERATIONS.labels(op.value, "error").inc()
            await self._responder.error(msg, "internal_error", f"{op.value} failed")
            return
        metrics.ADMIN_OPERATIONS.labels(op.value, "ok").inc()
        await self._responder.reply(msg, reply)

    async def _dispatch(self, op: AdminOp, msg: Msg) -> BaseModel:
        keys = self._keys
        if op is AdminOp.intake:
            _parse(msg, IntakeRequest)
            kek = self._keyring.current
            public = (
                kek.intake_key()
                .public_key()
                .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            )
            return IntakeReply(kek_id=kek.kek_id, kem=Kem.x25519, public_key=b64url_encode(public))
        if op is AdminOp.add:
            add = _parse(msg, AddKeyRequest)
            target = f"{add.provider}/{add.environment}"
            secret = self._unseal(add.secret, op, target)
            record = await keys.add(
                secret, provider=add.provider, environment=add.environment, actor=add.actor
            )
            return KeyMutationReply(changed=[record.info()])
        if op is AdminOp.rotate:
            rotate = _parse(msg, RotateKeyRequest)
            secret = self._unseal(rotate.secret, op, rotate.key_id)
            new, retiring = await keys.rotate(
                rotate.key_id, secret, actor=rotate.actor, grace_s=rotate.grace_s
            )
            return KeyMutationReply(changed=[new.info(), *(r.info() for r in retiring)])
        if op is AdminOp.revoke:
            revoke = _parse(msg, RevokeKeyRequest)
            revoked = await keys.revoke(revoke.key_id, actor=revoke.actor, version=revoke.version)
            return KeyMutationReply(changed=[r.info() for r in revoked])
        if op is AdminOp.rewrap:
            rewrap = _parse(msg, RewrapRequest)
            return await keys.rewrap(actor=rewrap.actor)
        if op is AdminOp.list:
            listing = _parse(msg, ListKeysRequest)
            infos = await keys.list_keys(
                provider=listing.provider,
                environment=listing.environment,
                include_retired=listing.include_retired,
            )
            keys.audit("admin_list", actor=listing.actor, detail=Listed(count=len(infos)))
            return KeyListReply(keys=infos)
        show = _parse(msg, ShowKeyRequest)
        infos = await keys.show(show.key_id)
        keys.audit("admin_show", actor=show.actor, detail=Shown(shown_key_id=show.key_id))
        return KeyListReply(keys=infos)

    def _unseal(self, secret: SealedSecret, op: AdminOp, target: str) -> bytes:
        if secret.kem is not Kem.x25519:
            raise BadRequestError("keys are sealed with x25519 to the intake key", code="bad_seal")
        try:
            kek = self._keyring.get(secret.kek_id)
            return open_sealed(
                b64url_decode(secret.sealed),
                kek.intake_key(),
                info=intake_info(op, target=target, nonce=secret.nonce),
                kem=Kem.x25519,
            )
        except UnknownKekError:
            raise BadRequestError(
                "sealed to an intake key this key manager does not hold; ask `intake` again",
                code="stale_intake_key",
            ) from None
        except (SealError, ValueError):
            raise BadRequestError("the sealed key does not open", code="bad_seal") from None


def _parse(msg: Msg, model: type[M]) -> M:
    try:
        return parse_request(msg, model)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:5]
        )
        raise BadRequestError(problems or "malformed request", code="malformed_request") from None
