"""Store a key through the admin subjects, then lease it with the real LeaseClient."""

from __future__ import annotations

import json
import uuid

import nats.errors
import pytest
from nats.aio.client import Client as NATS
from prometheus_client import REGISTRY

from services.auditor.detectors import Detectors
from services.keymanager.app import KeyManager
from shared import bus
from shared.crypto import Kem, RequesterKeyPair, b64url_encode
from shared.errors import UnavailableError
from shared.events import AuditEvent
from shared.keyadmin import KeyAdminClient, KeyStatus
from shared.leases import LEASE_SUBJECT, LeaseClient, LeaseReply, LeaseRequest
from tests.services.auditor.helpers import settings as auditor_settings
from tests.services.keymanager.conftest import new_provider_key


def leases(result: str) -> float:
    value = REGISTRY.get_sample_value("keyveil_keymanager_leases_total", {"result": result})
    return value or 0.0


async def test_stored_key_is_leased_sealed_and_opened_by_the_requester(
    nc: NATS, keymanager: KeyManager
) -> None:
    key = new_provider_key()
    info = await KeyAdminClient(nc).add(key.encode(), environment="development")
    assert info.status is KeyStatus.active
    assert info.last4 == key[-4:]
    assert info.fingerprint.startswith("hs256:")
    assert key not in info.model_dump_json()

    granted = leases("granted")
    client = LeaseClient(nc, requester="proxy", environment="development")
    await client.start()
    try:
        header, reply = await client.authorization("openai")
    finally:
        await client.stop()
    assert header == f"Bearer {key}"
    assert (reply.key_id, reply.version) == (info.key_id, 1)
    assert leases("granted") == granted + 1


async def test_hybrid_post_quantum_kem_lease(nc: NATS, keymanager: KeyManager) -> None:
    key = new_provider_key()
    await KeyAdminClient(nc).add(key.encode(), environment="development")
    client = LeaseClient(nc, requester="token", environment="development", kem=Kem.mlkem768_x25519)
    header, _ = await client.authorization()
    assert header == f"Bearer {key}"


async def test_lease_is_bound_to_its_metadata(nc: NATS, keymanager: KeyManager) -> None:
    key = new_provider_key()
    await KeyAdminClient(nc).add(key.encode(), environment="development")
    pair = RequesterKeyPair()
    request = LeaseRequest(
        requester="proxy",
        instance_id="i-1",
        environment="development",
        public_key=b64url_encode(pair.public_bytes),
    )
    reply = await bus.request(nc, LEASE_SUBJECT, request, LeaseReply, timeout=5, requester="proxy")
    from shared.crypto import SealError, b64url_decode

    assert pair.open(b64url_decode(reply.sealed), info=reply.info_for(request)) == key.encode()
    forged = reply.model_copy(update={"expires_at": reply.expires_at + 3600})
    with pytest.raises(SealError):
        pair.open(b64url_decode(forged.sealed), info=forged.info_for(request))
    other = request.model_copy(update={"instance_id": "i-2"})
    with pytest.raises(SealError):
        pair.open(b64url_decode(reply.sealed), info=reply.info_for(other))


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"not json", "malformed_request"),
        (b"{}", "malformed_request"),
        (b'{"requester": "proxy"}', "malformed_request"),
    ],
)
async def test_malformed_requests_get_typed_errors(
    nc: NATS, keymanager: KeyManager, payload: bytes, code: str
) -> None:
    denied = leases("denied")
    answer = await _ask(nc, payload, reply=f"_INBOX_proxy.rpc.{uuid.uuid4().hex}")
    assert answer is not None
    assert json.loads(answer)["error"]["code"] == code
    assert leases("denied") == denied + 1


async def _ask(nc: NATS, payload: bytes, *, reply: str, timeout: float = 5) -> bytes | None:
    """Publish a lease request naming `reply`; its answer there, or None if none came."""
    sub = await nc.subscribe(reply, max_msgs=1)
    try:
        await nc.publish(LEASE_SUBJECT, payload, reply=reply)
        return (await sub.next_msg(timeout=timeout)).data
    except nats.errors.TimeoutError:
        return None
    finally:
        await sub.unsubscribe()


async def _lease_error(nc: NATS, inbox: str | None = None, **fields: object) -> str:
    """The error code a lease request gets, or "dropped" when it goes unanswered."""
    pair = RequesterKeyPair()
    base: dict[str, object] = {
        "requester": "proxy",
        "instance_id": "i",
        "environment": "development",
        "public_key": b64url_encode(pair.public_bytes),
    }
    base.update(fields)
    reply = f"{inbox or '_INBOX_' + str(base['requester']) + '.rpc'}.{uuid.uuid4().hex}"
    answer = await _ask(nc, json.dumps(base).encode(), reply=reply, timeout=1)
    if answer is None:
        return "dropped"
    body = json.loads(answer)
    assert "sealed" not in body
    return str(body["error"]["code"])


async def test_unauthorised_and_bad_requests_are_refused(nc: NATS, keymanager: KeyManager) -> None:
    await KeyAdminClient(nc).add(new_provider_key().encode(), environment="development")
    assert await _lease_error(nc, requester="auditor") == "dropped"  # not a lease requester
    assert await _lease_error(nc, environment="production") == "environment_mismatch"
    assert await _lease_error(nc, public_key="AAAA") == "invalid_public_key"
    assert await _lease_error(nc, public_key="!!not base64!!") == "invalid_public_key"
    assert await _lease_error(nc, kem="rsa") == "malformed_request"
    assert await _lease_error(nc, provider="../etc") == "malformed_request"
    # The service is still serving after all of that.
    header, _ = await LeaseClient(nc, requester="proxy", environment="development").authorization()
    assert header.startswith("Bearer sk-test-")


async def test_requester_must_own_the_reply_inbox(nc: NATS, keymanager: KeyManager) -> None:
    await KeyAdminClient(nc).add(new_provider_key().encode(), environment="development")
    assert await _lease_error(nc, "_INBOX_token.rpc", requester="proxy") == "requester_mismatch"
    dropped = leases("dropped")
    # Anything but an allowed requester's own inbox is never answered: not the plain
    # inbox, not another user's, not a stream, bucket or broadcast subject.
    inboxes = ("_INBOX", "_INBOX_proxy", "_INBOX_auditor.rpc", "_INBOX_proxy.*", "$KV.KEYS")
    for inbox in inboxes:
        assert await _lease_error(nc, inbox, requester="proxy") == "dropped", inbox
    assert leases("dropped") == dropped + len(inboxes)


async def test_no_key_means_key_unavailable(nc: NATS, keymanager: KeyManager) -> None:
    client = LeaseClient(nc, requester="proxy", environment="development")
    with pytest.raises(UnavailableError) as caught:
        await client.authorization()
    assert caught.value.code == "key_unavailable"


async def test_audit_events_name_the_actor_and_carry_no_key(
    nc: NATS, keymanager: KeyManager
) -> None:
    key = new_provider_key()
    info = await KeyAdminClient(nc).add(key.encode(), environment="development")
    await LeaseClient(nc, requester="token", environment="development").authorization()
    await _lease_error(nc, requester="auditor")
    assert await keymanager.events.flush(5)
    js = nc.jetstream()
    sub = await js.subscribe("keyveil.audit.keymanager", ordered_consumer=True)
    events = []
    try:
        while True:
            msg = await sub.next_msg(timeout=1)
            events.append(json.loads(msg.data))
    except TimeoutError:
        pass
    finally:
        await sub.unsubscribe()
    mine = [e for e in events if e.get("key_id") == info.key_id]
    kinds = {(e["type"], e["actor"], e["outcome"]) for e in mine}
    assert ("key_store", "operator", "success") in kinds
    assert ("lease_granted", "token", "success") in kinds
    dropped = next(
        e
        for e in events
        if e["type"] == "lease_dropped" and e["detail"]["reason"] == "reply_not_allowed"
    )
    # The auditor alerts on it, fed the event as the key-manager recorded it.
    findings = Detectors(auditor_settings()).observe_audit(AuditEvent.model_validate(dropped))
    assert [f.type for f in findings] == ["bus_reply_refused"]
    assert all(key not in json.dumps(e) for e in events)
