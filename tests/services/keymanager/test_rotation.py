"""Rotation with grace under concurrent leases, retirement, revocation, the age policy."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from nats.aio.client import Client as NATS

from services.keymanager.app import KeyManager
from shared import bus
from shared.errors import UnavailableError
from shared.keyadmin import KeyAdminClient, KeyStatus
from shared.leases import ROTATED_SUBJECT, LeaseClient
from tests.services.keymanager.conftest import KeyManagerFactory, new_provider_key


async def test_rotation_under_concurrent_leases_loses_none(
    nc: NATS, nats_url: str, start_keymanager: KeyManagerFactory
) -> None:
    # Two replicas on one bucket share the lease queue group.
    first = await start_keymanager()
    await start_keymanager(KEYMANAGER_KV_BUCKET=first.settings.kv_bucket)
    admin = KeyAdminClient(nc)
    old, new = new_provider_key(), new_provider_key()
    info = await admin.add(old.encode(), environment="development")

    clients = [LeaseClient(nc, requester="proxy", environment="development") for _ in range(8)]
    for client in clients:
        await client.start()
    seen: set[str] = set()
    failures: list[BaseException] = []
    rotated = asyncio.Event()
    switched = asyncio.Event()

    async def hammer(client: LeaseClient) -> None:
        # Until the notice arrives, keep leasing; after it, every fresh lease is the new key.
        for _ in range(400):
            try:
                header, _ = await client.authorization()
            except BaseException as exc:
                failures.append(exc)
                continue
            seen.add(header)
            if rotated.is_set() and header == f"Bearer {new}":
                switched.set()
            client.invalidate()  # force a real lease round trip every time
            if switched.is_set() and rotated.is_set():
                return

    tasks = [asyncio.create_task(hammer(c)) for c in clients]
    await asyncio.sleep(0.05)
    changed = await admin.rotate(info.key_id, new.encode(), grace_s=60)
    rotated.set()
    await asyncio.gather(*tasks)
    for client in clients:
        await client.stop()

    assert failures == []
    assert seen == {f"Bearer {old}", f"Bearer {new}"}
    assert [(c.version, c.status) for c in changed] == [
        (2, KeyStatus.active),
        (1, KeyStatus.retiring),
    ]
    retiring = changed[1]
    assert retiring.retire_at is not None
    assert retiring.retire_at == pytest.approx(time.time() + 60, abs=5)
    # A fresh lease after the rotation is the new version.
    header, reply = await LeaseClient(
        nc, requester="proxy", environment="development"
    ).authorization()
    assert (header, reply.version) == (f"Bearer {new}", 2)


async def test_rotated_notice_drops_cached_leases(nc: NATS, keymanager: KeyManager) -> None:
    admin = KeyAdminClient(nc)
    old, new = new_provider_key(), new_provider_key()
    info = await admin.add(old.encode(), environment="development")
    notices = await nc.subscribe(ROTATED_SUBJECT)
    client = LeaseClient(nc, requester="token", environment="development")
    await client.start()
    try:
        assert (await client.authorization())[0] == f"Bearer {old}"
        await admin.rotate(info.key_id, new.encode())
        notice = json.loads((await notices.next_msg(timeout=5)).data)
        assert notice["key_id"] == info.key_id
        assert notice["version"] == 2
        await nc.flush()
        await asyncio.sleep(0)  # let the client's own subscription callback run
        for _ in range(50):
            header, _ = await client.authorization()
            if header == f"Bearer {new}":
                break
            await asyncio.sleep(0.02)
        assert header == f"Bearer {new}"
    finally:
        await client.stop()
        await notices.unsubscribe()


async def test_retiring_version_is_served_in_grace_then_retired(
    nc: NATS, keymanager: KeyManager
) -> None:
    admin = KeyAdminClient(nc)
    old, new = new_provider_key(), new_provider_key()
    info = await admin.add(old.encode(), environment="development")
    await admin.rotate(info.key_id, new.encode(), grace_s=1)
    # The new version is revoked (a bad key): the retiring one keeps working in its grace.
    await admin.revoke(info.key_id, version=2)
    header, reply = await LeaseClient(
        nc, requester="proxy", environment="development"
    ).authorization()
    assert (header, reply.version) == (f"Bearer {old}", 1)
    assert reply.expires_at <= time.time() + 1.5  # a lease never outlives the grace
    await asyncio.sleep(1.1)
    await keymanager.keys.enforce_policy()
    versions = {v.version: v.status for v in await admin.show(info.key_id)}
    assert versions == {1: KeyStatus.retired, 2: KeyStatus.revoked}
    with pytest.raises(UnavailableError):
        await LeaseClient(nc, requester="proxy", environment="development").authorization()


async def test_revoke_stops_a_key_at_once(nc: NATS, keymanager: KeyManager) -> None:
    admin = KeyAdminClient(nc)
    info = await admin.add(new_provider_key().encode(), environment="development")
    await LeaseClient(nc, requester="proxy", environment="development").authorization()
    revoked = await admin.revoke(info.key_id)
    assert [(r.version, r.status) for r in revoked] == [(1, KeyStatus.revoked)]
    with pytest.raises(UnavailableError) as caught:
        await LeaseClient(nc, requester="proxy", environment="development").authorization()
    assert caught.value.code == "key_unavailable"
    listed = await admin.list_keys(environment="development")
    assert [(k.key_id, k.status) for k in listed] == [(info.key_id, KeyStatus.revoked)]


async def test_revocation_on_one_replica_is_honoured_by_another(
    nc: NATS, start_keymanager: KeyManagerFactory
) -> None:
    first = await start_keymanager()
    second = await start_keymanager(KEYMANAGER_KV_BUCKET=first.settings.kv_bucket)
    admin = KeyAdminClient(nc)
    info = await admin.add(new_provider_key().encode(), environment="development")
    await second.keys.refresh()  # second's view now says "active"
    await admin.revoke(info.key_id)
    with pytest.raises(UnavailableError):
        await second.keys.leasable("openai", "development")


async def test_duplicate_and_second_active_key_are_refused(
    nc: NATS, keymanager: KeyManager
) -> None:
    admin = KeyAdminClient(nc)
    key = new_provider_key()
    await admin.add(key.encode(), environment="development")
    with pytest.raises(bus.RemoteError) as duplicate:
        await admin.add(key.encode(), environment="development")
    assert duplicate.value.code == "conflict"
    with pytest.raises(bus.RemoteError) as second:
        await admin.add(new_provider_key().encode(), environment="development")
    assert second.value.code == "conflict"
    # Another environment is its own slot.
    other = await admin.add(new_provider_key().encode(), environment="staging")
    assert other.environment == "staging"


async def test_old_keys_raise_rotation_due_audit_events(
    nc: NATS, start_keymanager: KeyManagerFactory
) -> None:
    manager = await start_keymanager(KEYMANAGER_MAX_KEY_AGE_DAYS=0.000001)  # ~0.09 s
    info = await KeyAdminClient(nc).add(new_provider_key().encode(), environment="development")
    await asyncio.sleep(0.2)
    sub = await nc.jetstream().subscribe("keyveil.audit.keymanager", ordered_consumer=True)
    await manager.keys.enforce_policy()
    await manager.keys.enforce_policy()  # reported once per interval, not every round
    assert await manager.events.flush(5)
    due = []
    try:
        while True:
            event = json.loads((await sub.next_msg(timeout=1)).data)
            if event["type"] == "rotation_due" and event["key_id"] == info.key_id:
                due.append(event)
    except TimeoutError:
        pass
    finally:
        await sub.unsubscribe()
    assert len(due) == 1
    assert due[0]["detail"]["max_age_s"] == 0
    assert due[0]["actor"] == "keymanager"
