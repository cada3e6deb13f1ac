"""The key-manager suite over each KEK provider, against the real servers.

store, lease, rotate, revoke, tamper, KEK rotation with rewrap, a wrong KEK at start-up,
a KEK that stops answering (and comes back), backup -> wipe -> restore, migration from
`local` to `vault-transit`, and what the OpenBao audit log may contain.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from prometheus_client import REGISTRY

from services.keymanager.app import KeyManager
from services.keymanager.custody import CUSTODY_KEY
from shared import bus
from shared.crypto import b64url_decode, b64url_encode
from shared.errors import UnavailableError
from shared.keyadmin import BackupDocument, KeyAdminClient, KeyStatus
from shared.leases import LeaseClient
from tests.services.keymanager.conftest import (
    PROVIDER_KEYS,
    KeyManagerFactory,
    _forms,
    make_settings,
    new_provider_key,
)
from tests.services.keymanager.kms_servers import KekBackend, OpenBao

KEK_PREFIX = {"local": "kek-", "vault-transit": "vault-transit:", "aws-kms": "aws-kms:"}


def _bucket() -> str:
    return f"KEYS_{uuid.uuid4().hex[:12]}"


async def _start(
    start: KeyManagerFactory, nats_url: str, kek: KekBackend, bucket: str, **extra: Any
) -> KeyManager:
    return await start(
        make_settings(nats_url, KEYMANAGER_KV_BUCKET=bucket, **{**kek.overrides(), **extra})
    )


async def _lease(nc: NATS, environment: str = "development") -> str:
    header, _ = await LeaseClient(nc, requester="proxy", environment=environment).authorization()
    return header


async def _lease_error(nc: NATS) -> UnavailableError:
    with pytest.raises(UnavailableError) as caught:
        await _lease(nc)
    return caught.value


async def _kv_record(nc: NATS, bucket: str, key: str) -> dict[str, Any]:
    entry = await (await nc.jetstream().key_value(bucket)).get(key)
    assert entry.value is not None
    record: dict[str, Any] = json.loads(entry.value)
    return record


async def test_store_lease_rotate_revoke(
    nc: NATS, nats_url: str, start_keymanager: KeyManagerFactory, kek: KekBackend
) -> None:
    bucket = _bucket()
    manager = await _start(start_keymanager, nats_url, kek, bucket)
    assert await manager.kek_ready(), manager.custody.status.reason
    admin = KeyAdminClient(nc)
    old, new = new_provider_key(), new_provider_key()
    info = await admin.add(old.encode(), environment="development")
    assert info.kek_id.startswith(KEK_PREFIX[kek.name])
    stored = await _kv_record(nc, bucket, f"openai.development.{info.key_id}.1")
    assert old not in json.dumps(stored)
    assert await _lease(nc) == f"Bearer {old}"

    changed = await admin.rotate(info.key_id, new.encode(), grace_s=60)
    assert [(c.version, c.status) for c in changed] == [
        (2, KeyStatus.active),
        (1, KeyStatus.retiring),
    ]
    assert await _lease(nc) == f"Bearer {new}"
    # The same key is recognised whichever version holds it (fingerprints need no KEK call).
    with pytest.raises(bus.RemoteError) as duplicate:
        await admin.add(old.encode(), environment="staging")
    assert duplicate.value.code == "conflict"

    await admin.revoke(info.key_id)
    assert (await _lease_error(nc)).code == "key_unavailable"


@pytest.mark.parametrize("field", ["ciphertext", "wrapped_key"])
async def test_tampered_or_swapped_record_is_refused(
    nc: NATS, nats_url: str, start_keymanager: KeyManagerFactory, kek: KekBackend, field: str
) -> None:
    bucket = _bucket()
    manager = await _start(start_keymanager, nats_url, kek, bucket)
    admin = KeyAdminClient(nc)
    a = await admin.add(new_provider_key().encode(), environment="development")
    b = await admin.add(new_provider_key().encode(), environment="staging")
    kv = await nc.jetstream().key_value(bucket)
    key_a, key_b = f"openai.development.{a.key_id}.1", f"openai.staging.{b.key_id}.1"
    rec_a, rec_b = await _kv_record(nc, bucket, key_a), await _kv_record(nc, bucket, key_b)
    manager.custody.cache.clear()

    # Swap the field between two records: the identity binding refuses both.
    for key, mine, theirs in ((key_a, rec_a, rec_b), (key_b, rec_b, rec_a)):
        entry = await kv.get(key)
        swapped = {**mine, field: theirs[field]}
        await kv.update(key, json.dumps(swapped).encode(), last=entry.revision)
    error = await _lease_error(nc)
    assert error.code in ("key_integrity", "key_unavailable")
    for key, key_id in ((key_a, a.key_id), (key_b, b.key_id)):
        record = await manager.keys.store.get(key)
        assert record is not None
        with pytest.raises(UnavailableError) as caught:
            await manager.keys.decrypt(record.record, actor="test")
        assert caught.value.code == "key_integrity"
        assert key_id in caught.value.message

    # A flipped byte is refused too.
    entry = await kv.get(key_a)
    raw = bytearray(b64url_decode(rec_a[field]))
    raw[-3] ^= 0x01
    flipped = {**rec_a, field: b64url_encode(bytes(raw))}
    await kv.update(key_a, json.dumps(flipped).encode(), last=entry.revision)
    record = await manager.keys.store.get(key_a)
    assert record is not None
    with pytest.raises(UnavailableError) as flipped_error:
        await manager.keys.decrypt(record.record, actor="test")
    assert flipped_error.value.code == "key_integrity"


async def test_kek_rotation_then_rewrap_moves_every_record(
    nc: NATS, nats_url: str, start_keymanager: KeyManagerFactory, kek: KekBackend
) -> None:
    bucket = _bucket()
    first = await _start(start_keymanager, nats_url, kek, bucket)
    admin = KeyAdminClient(nc)
    dev = new_provider_key()
    await admin.add(dev.encode(), environment="development")
    await admin.add(new_provider_key().encode(), environment="staging")
    before = await first.custody.current_kek_id()
    await first.stop()

    kek.rotate()
    second = await _start(start_keymanager, nats_url, kek, bucket)
    assert await second.kek_ready(), second.custody.status.reason
    current = await second.custody.current_kek_id()
    assert current != before
    assert await _lease(nc) == f"Bearer {dev}"  # old version still decrypts
    result = await admin.rewrap()
    assert (result.rewrapped, result.failed, result.kek_id) == (2, [], current)
    assert {k.kek_id for k in await admin.list_keys()} == {current}
    custody = await _kv_record(nc, bucket, CUSTODY_KEY)
    assert custody["kek_id"] == current
    again = await admin.rewrap()
    assert (again.rewrapped, again.already_current) == (0, 2)
    doctor = await admin.doctor()
    assert doctor.ok
    assert doctor.stale_records == 0
    await second.stop()

    # The old KEK version is gone (local) or refused by Vault (min_decryption_version).
    kek.retire_old_versions()
    third = await _start(start_keymanager, nats_url, kek, bucket)
    assert await third.kek_ready(), third.custody.status.reason
    assert await _lease(nc) == f"Bearer {dev}"


async def test_wrong_kek_makes_the_key_manager_not_ready_and_doctor_says_why(
    nc: NATS, nats_url: str, start_keymanager: KeyManagerFactory, kek: KekBackend
) -> None:
    bucket = _bucket()
    first = await _start(start_keymanager, nats_url, kek, bucket)
    await KeyAdminClient(nc).add(new_provider_key().encode(), environment="development")
    await first.stop()

    audit = await nc.jetstream().subscribe("keyveil.audit.keymanager", ordered_consumer=True)
    wrong = await _start(start_keymanager, nats_url, kek.other(), bucket)
    assert not await wrong.kek_ready()
    assert REGISTRY.get_sample_value("keyveil_keymanager_kek_ready") == 0.0
    reason = wrong.custody.status.reason
    assert "custody record" in reason
    doctor = await KeyAdminClient(nc).doctor()
    assert not doctor.ok
    assert doctor.reason == reason
    assert doctor.provider == kek.name
    # Fail closed: no lease, and no new key is written under the wrong KEK.
    assert (await _lease_error(nc)).code in ("key_unavailable", "key_integrity")
    with pytest.raises(bus.RemoteError) as refused:
        await KeyAdminClient(nc).add(new_provider_key().encode(), environment="staging")
    assert refused.value.code == "kek_unavailable"
    assert await wrong.events.flush(5)
    events = []
    try:
        while True:
            events.append(json.loads((await audit.next_msg(timeout=1)).data))
    except TimeoutError:
        pass
    finally:
        await audit.unsubscribe()
    verify = [e for e in events if e["type"] == "kek_verify"]
    assert verify
    assert verify[-1]["outcome"] == "failure"
    assert verify[-1]["detail"]["kek_provider"] == kek.name


async def test_kek_outage_serves_cached_keys_then_fails_closed_then_recovers(
    nc: NATS,
    nats_url: str,
    start_keymanager: KeyManagerFactory,
    remote_kek: KekBackend,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ttl = 5.0  # room for a loaded machine between the unwrap and the cached lease
    bucket = _bucket()
    manager = await _start(
        start_keymanager, nats_url, remote_kek, bucket, KEK_CACHE_TTL_S=ttl, KEK_TIMEOUT_S=0.5
    )
    key = new_provider_key()
    await KeyAdminClient(nc).add(key.encode(), environment="development")
    manager.custody.cache.clear()
    assert await _lease(nc) == f"Bearer {key}"  # unwrapped now: cached for `ttl`
    unwrapped_at = time.monotonic()
    remote_kek.deny()
    try:
        assert await _lease(nc) == f"Bearer {key}"  # served from the cache
        await asyncio.sleep(max(0.0, ttl - (time.monotonic() - unwrapped_at)) + 0.2)
        error = await _lease_error(nc)
        assert error.code == "key_unavailable"
        # The requester sees the code; the key-manager's reply names the provider and why.
        assert f"KEK provider {remote_kek.name} unavailable" in caplog.text
        assert time.monotonic() - unwrapped_at < ttl + 10  # stopped within the TTL (+ timeout)
    finally:
        remote_kek.allow()
    # Recovers without a restart.
    assert await _lease(nc) == f"Bearer {key}"


async def test_backup_wipe_restore_then_leases_work(
    nc: NATS, nats_url: str, start_keymanager: KeyManagerFactory, kek: KekBackend, tmp_path: Any
) -> None:
    bucket = _bucket()
    first = await _start(start_keymanager, nats_url, kek, bucket)
    admin = KeyAdminClient(nc)
    dev, stage = new_provider_key(), new_provider_key()
    info = await admin.add(dev.encode(), environment="development")
    await admin.add(stage.encode(), environment="staging")
    document = await admin.backup()
    text = document.model_dump_json()
    for key in (dev, stage):
        assert not any(form.decode() in text for form in _forms(key))
    assert len(document.records) == 2
    await first.stop()

    # JetStream loses the bucket; a fresh key-manager starts on an empty one.
    await nc.jetstream().delete_key_value(bucket)
    fresh = await _start(start_keymanager, nats_url, kek, bucket)
    assert await fresh.kek_ready()
    assert (await _lease_error(nc)).code == "key_unavailable"

    # A tampered backup is refused before anything is written.
    edited = json.loads(text)
    edited["records"][0]["status"] = (
        "revoked" if edited["records"][0]["status"] != "revoked" else "active"
    )
    with pytest.raises(bus.RemoteError) as tampered:
        await admin.restore(BackupDocument.model_validate(edited))
    assert tampered.value.code == "bad_backup_signature"
    assert await fresh.keys.list_keys(provider=None, environment=None, include_retired=True) == []

    restored = await admin.restore(document)
    assert (restored.restored, restored.already_present, restored.conflicts) == (2, 0, [])
    assert await _lease(nc) == f"Bearer {dev}"
    staged = fresh.keys.active_for("openai", "staging")
    assert staged is not None
    assert await fresh.keys.decrypt(staged, actor="test") == stage.encode()
    # Fingerprints came back under the restored custody: the key is known again.
    with pytest.raises(bus.RemoteError) as duplicate:
        await admin.add(dev.encode(), environment="development")
    assert duplicate.value.code == "conflict"
    again = await admin.restore(document)
    assert (again.restored, again.already_present) == (0, 2)
    assert [k.key_id for k in await admin.show(info.key_id)] == [info.key_id]


async def test_migration_local_to_vault_transit(
    nc: NATS,
    nats_url: str,
    start_keymanager: KeyManagerFactory,
    openbao: OpenBao,
) -> None:
    bucket = _bucket()
    local = KekBackend("local")
    vault = KekBackend("vault-transit", bao=openbao)
    first = await _start(start_keymanager, nats_url, local, bucket)
    admin = KeyAdminClient(nc)
    key = new_provider_key()
    await admin.add(key.encode(), environment="development")
    await first.stop()

    migrating = await _start(
        start_keymanager,
        nats_url,
        vault,
        bucket,
        KEK_PREVIOUS_PROVIDER="local",
        KEY_ENCRYPTION_SECRET=local.secret,
    )
    assert await migrating.kek_ready(), migrating.custody.status.reason
    assert await _lease(nc) == f"Bearer {key}"
    result = await admin.rewrap()
    assert result.rewrapped == 1
    assert result.kek_id.startswith("vault-transit:")
    custody = await _kv_record(nc, bucket, CUSTODY_KEY)
    assert custody["kek_id"].startswith("vault-transit:")
    await migrating.stop()

    # Vault alone now: no KEY_ENCRYPTION_SECRET anywhere.
    after = await _start(start_keymanager, nats_url, vault, bucket)
    assert after.settings.key_encryption_secret is None
    assert await after.kek_ready(), after.custody.status.reason
    assert await _lease(nc) == f"Bearer {key}"
    with pytest.raises(bus.RemoteError) as duplicate:
        await admin.add(key.encode(), environment="development")
    assert duplicate.value.code == "conflict"


async def test_scheduled_rewrap_follows_a_rotated_transit_key(
    nc: NATS, nats_url: str, start_keymanager: KeyManagerFactory, openbao: OpenBao
) -> None:
    vault = KekBackend("vault-transit", bao=openbao)
    manager = await _start(start_keymanager, nats_url, vault, _bucket(), KEK_REWRAP_INTERVAL_S=0.3)
    info = await KeyAdminClient(nc).add(new_provider_key().encode(), environment="development")
    assert info.kek_id.endswith(":v1")
    vault.rotate()
    for _ in range(50):
        await asyncio.sleep(0.1)
        listed = await KeyAdminClient(nc).list_keys()
        if listed[0].kek_id.endswith(":v2"):
            break
    assert listed[0].kek_id.endswith(":v2")
    assert await manager.custody.current_kek_id() == listed[0].kek_id


async def test_approle_login(
    nc: NATS, nats_url: str, start_keymanager: KeyManagerFactory, openbao: OpenBao
) -> None:
    vault = KekBackend("vault-transit", bao=openbao)
    root = openbao.root()
    root.auth.approle.create_or_update_approle(
        vault.key, token_policies=[vault.key], token_ttl="1h"
    )
    role_id = root.auth.approle.read_role_id(vault.key)["data"]["role_id"]
    secret_id = root.auth.approle.generate_secret_id(vault.key)["data"]["secret_id"]
    overrides = {**vault.overrides(), "VAULT_TOKEN": None}
    manager = await start_keymanager(
        make_settings(
            nats_url,
            KEYMANAGER_KV_BUCKET=_bucket(),
            **overrides,
            VAULT_ROLE_ID=role_id,
            VAULT_SECRET_ID=secret_id,
        )
    )
    assert await manager.kek_ready(), manager.custody.status.reason
    key = new_provider_key()
    await KeyAdminClient(nc).add(key.encode(), environment="development")
    assert await _lease(nc) == f"Bearer {key}"
    assert (await KeyAdminClient(nc).doctor()).details["current.auth"] == "approle"


async def test_no_provider_or_data_key_in_what_the_kek_servers_log(
    nc: NATS,
    nats_url: str,
    start_keymanager: KeyManagerFactory,
    remote_kek: KekBackend,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Any,
) -> None:
    """OpenBao's audit log (and server log), moto's request log, the key-manager's logs
    and a backup file: the provider key and the data keys appear in none of them."""
    manager = await _start(start_keymanager, nats_url, remote_kek, _bucket())
    admin = KeyAdminClient(nc)
    key, rotated = new_provider_key(), new_provider_key()
    info = await admin.add(key.encode(), environment="development")
    manager.custody.cache.clear()
    assert await _lease(nc) == f"Bearer {key}"
    await admin.rotate(info.key_id, rotated.encode())
    assert await _lease(nc) == f"Bearer {rotated}"
    remote_kek.rotate()
    assert (await admin.rewrap()).rewrapped == 2
    backup = tmp_path / "backup.json"
    backup.write_text((await admin.backup()).model_dump_json())
    data_keys = [data_key for _, data_key in manager.custody.cache._entries.values()]
    assert len(data_keys) == 2

    logs: dict[str, str] = {"key-manager": caplog.text, "backup": backup.read_text()}
    if remote_kek.bao is not None:
        logs["openbao audit"] = remote_kek.bao.audit_log.read_text()
        logs["openbao server"] = remote_kek.bao.server.log_path.read_text()
        # The unwraps were audited, bound to the record's identity...
        assert f"transit/decrypt/{remote_kek.key}" in logs["openbao audit"]
        assert f"transit/rewrap/{remote_kek.key}" in logs["openbao audit"]
    else:
        assert remote_kek.moto is not None
        logs["moto requests"] = remote_kek.moto.log_path.read_text()
        assert "POST / HTTP" in logs["moto requests"]
    # ...but no provider key, and no data key, in any encoding.
    for channel, text in logs.items():
        for secret in PROVIDER_KEYS:
            assert not any(form.decode() in text for form in _forms(secret)), channel
        for data_key in data_keys:
            for encoded in (base64.b64encode(data_key), base64.urlsafe_b64encode(data_key)):
                assert encoded.decode().rstrip("=") not in text, channel
            assert data_key.hex() not in text, channel


async def test_min_decryption_version_is_respected_and_named(
    nc: NATS, nats_url: str, start_keymanager: KeyManagerFactory, openbao: OpenBao
) -> None:
    vault = KekBackend("vault-transit", bao=openbao)
    bucket = _bucket()
    manager = await _start(start_keymanager, nats_url, vault, bucket)
    info = await KeyAdminClient(nc).add(new_provider_key().encode(), environment="development")
    vault.rotate()
    vault.retire_old_versions()  # v1 refused by Vault before anything was rewrapped
    manager.custody.cache.clear()
    record = await manager.keys.store.get(f"openai.development.{info.key_id}.1")
    assert record is not None
    with pytest.raises(UnavailableError) as caught:
        await manager.keys.decrypt(record.record, actor="test")
    assert caught.value.code == "key_integrity"
    assert "min_decryption_version" in caught.value.message
    assert not await manager.keys.verify_custody()
    assert "min_decryption_version" in manager.custody.status.reason
    doctor = await KeyAdminClient(nc).doctor()
    assert not doctor.ok
    assert doctor.details["current.min_decryption_version"] == "2"


async def test_kek_unreachable_at_start_is_not_ready_then_recovers_and_bootstraps(
    nc: NATS, nats_url: str, start_keymanager: KeyManagerFactory, moto_kms: Any
) -> None:
    kms = KekBackend("aws-kms", moto=moto_kms)
    key = new_provider_key()
    kms.deny()
    try:
        manager = await _start(
            start_keymanager, nats_url, kms, _bucket(), KEK_TIMEOUT_S=0.5, OPENAI_API_KEY=key
        )
        assert not await manager.kek_ready()
        assert "KEK provider aws-kms unavailable" in manager.custody.status.reason
        assert manager.keys.records() == []  # nothing imported under an unproven KEK
    finally:
        kms.allow()
    for _ in range(150):
        if await manager.kek_ready() and manager.keys.records():
            break
        await asyncio.sleep(0.1)
    assert await manager.kek_ready(), manager.custody.status.reason
    assert await _lease(nc) == f"Bearer {key}"


async def test_a_transit_key_that_ignores_context_is_refused(
    nc: NATS, nats_url: str, start_keymanager: KeyManagerFactory, openbao: OpenBao
) -> None:
    # Vault silently ignores `context` on a key that is not derived: the record identity
    # would not be bound, so the key-manager refuses such a key before wrapping anything.
    vault = KekBackend("vault-transit", bao=openbao)
    plain = vault.key + "-plain"
    root = openbao.root()
    root.secrets.transit.create_key(name=plain)
    root.sys.create_or_update_policy(
        vault.key,
        root.sys.read_policy(vault.key)["data"]["rules"].replace(vault.key, plain),
    )
    bucket = _bucket()
    manager = await _start(start_keymanager, nats_url, vault, bucket, VAULT_TRANSIT_KEY=plain)
    assert not await manager.kek_ready()
    assert "is not derived" in manager.custody.status.reason
    assert await manager.keys.store.get_custody() is None  # nothing wrapped under it
    with pytest.raises(bus.RemoteError) as refused:
        await KeyAdminClient(nc).add(new_provider_key().encode(), environment="development")
    assert refused.value.code == "kek_unavailable"
