"""Tamper and swap attacks on stored records; KEK rotation with rewrap."""

from __future__ import annotations

import base64
import json

import pytest
from nats.aio.client import Client as NATS
from prometheus_client import REGISTRY

from services.keymanager.app import KeyManager
from services.keymanager.records import KeyRecord
from shared.crypto import b64url_decode, b64url_encode
from shared.errors import UnavailableError
from shared.keyadmin import KeyAdminClient
from shared.leases import LeaseClient
from tests.services.keymanager.conftest import (
    KeyManagerFactory,
    Sniffer,
    make_settings,
    new_provider_key,
)
from tests.support import until

OTHER_KEK = "other-kek-Vb7Nm3Qx9Lp2Wr5Ty8Zc1Hs4Jd6Kf0Ga"


async def _edit(nc: NATS, bucket: str, key: str, **changes: str) -> None:
    kv = await nc.jetstream().key_value(bucket)
    entry = await kv.get(key)
    assert entry.value is not None
    record = json.loads(entry.value)
    record.update(changes)
    await kv.update(key, json.dumps(record).encode(), last=entry.revision)


async def _record(nc: NATS, bucket: str, key: str) -> KeyRecord:
    entry = await (await nc.jetstream().key_value(bucket)).get(key)
    assert entry.value is not None
    return KeyRecord.model_validate_json(entry.value)


def _flip(text: str, index: int) -> str:
    raw = bytearray(b64url_decode(text))
    raw[index] ^= 0x01
    return b64url_encode(bytes(raw))


async def _lease_error(nc: NATS) -> UnavailableError:
    with pytest.raises(UnavailableError) as caught:
        await LeaseClient(nc, requester="proxy", environment="development").authorization()
    return caught.value


@pytest.mark.parametrize("field", ["ciphertext", "wrapped_key"])
async def test_tampered_record_is_refused_naming_the_key(
    nc: NATS, keymanager: KeyManager, field: str
) -> None:
    info = await KeyAdminClient(nc).add(new_provider_key().encode(), environment="development")
    bucket = keymanager.settings.kv_bucket
    key = f"openai.development.{info.key_id}.1"
    stored = await _record(nc, bucket, key)
    before = (
        REGISTRY.get_sample_value(
            "keyveil_keymanager_integrity_failures_total", {"reason": "integrity"}
        )
        or 0.0
    )
    await _edit(nc, bucket, key, **{field: _flip(getattr(stored, field), -3)})
    with pytest.raises(UnavailableError) as direct:
        await keymanager.keys.decrypt(await _record(nc, bucket, key), actor="test")
    assert info.key_id in str(direct.value)
    assert "v1" in str(direct.value)
    await _lease_error(nc)
    after = REGISTRY.get_sample_value(
        "keyveil_keymanager_integrity_failures_total", {"reason": "integrity"}
    )
    assert after is not None
    assert after >= before + 2


async def test_swapped_ciphertexts_both_fail(nc: NATS, keymanager: KeyManager) -> None:
    admin = KeyAdminClient(nc)
    a = await admin.add(new_provider_key().encode(), environment="development")
    b = await admin.add(new_provider_key().encode(), environment="staging")
    bucket = keymanager.settings.kv_bucket
    key_a = f"openai.development.{a.key_id}.1"
    key_b = f"openai.staging.{b.key_id}.1"
    rec_a, rec_b = await _record(nc, bucket, key_a), await _record(nc, bucket, key_b)
    swap = ("wrapped_key", "ciphertext")
    await _edit(nc, bucket, key_a, **{f: getattr(rec_b, f) for f in swap})
    await _edit(nc, bucket, key_b, **{f: getattr(rec_a, f) for f in swap})
    for key, key_id in ((key_a, a.key_id), (key_b, b.key_id)):
        with pytest.raises(UnavailableError) as caught:
            await keymanager.keys.decrypt(await _record(nc, bucket, key), actor="test")
        assert caught.value.code == "key_integrity"
        assert key_id in caught.value.message
    # The version number is bound too: relabelling v1 as v2 fails.
    relabelled = (await _record(nc, bucket, key_a)).model_copy(update={"version": 2})
    with pytest.raises(UnavailableError):
        await keymanager.keys.decrypt(relabelled, actor="test")


async def test_rewrap_after_kek_change(
    nc: NATS, nats_url: str, start_keymanager: KeyManagerFactory
) -> None:
    first = await start_keymanager()
    bucket = first.settings.kv_bucket
    admin = KeyAdminClient(nc)
    dev, stage = new_provider_key(), new_provider_key()
    info = await admin.add(dev.encode(), environment="development")
    await admin.add(stage.encode(), environment="staging")
    old_kek = (await _record(nc, bucket, f"openai.development.{info.key_id}.1")).kek_id
    assert old_kek.startswith("kek-")
    await first.stop()

    # Only the new KEK: the records are unreadable, and the error names the key and KEK.
    blind = await start_keymanager(
        make_settings(nats_url, KEYMANAGER_KV_BUCKET=bucket, KEY_ENCRYPTION_SECRET=OTHER_KEK)
    )
    # It says so at start-up: not ready, naming the KEK the bucket was written with.
    assert not await blind.kek_ready()
    assert old_kek in blind.custody.status.reason
    error = await _lease_error(nc)
    assert error.code == "key_unavailable"
    with pytest.raises(UnavailableError) as caught:
        await blind.keys.decrypt(
            await _record(nc, bucket, f"openai.development.{info.key_id}.1"), actor="t"
        )
    assert info.key_id in caught.value.message
    assert old_kek in caught.value.message
    await blind.stop()

    # New KEK with the previous one: everything still decrypts; rewrap moves it all.
    both = await start_keymanager(
        make_settings(
            nats_url,
            KEYMANAGER_KV_BUCKET=bucket,
            KEY_ENCRYPTION_SECRET=OTHER_KEK,
            KEY_ENCRYPTION_SECRET_PREVIOUS=first.settings.key_encryption_secret.get_secret_value(),
        )
    )
    assert (await LeaseClient(nc, requester="proxy", environment="development").authorization())[
        0
    ] == f"Bearer {dev}"
    result = await admin.rewrap()
    assert (result.rewrapped, result.failed) == (2, [])
    assert result.kek_id == await both.custody.current_kek_id() != old_kek
    again = await admin.rewrap()
    assert (again.rewrapped, again.already_current) == (0, 2)
    listed = await admin.list_keys()
    assert {k.kek_id for k in listed} == {result.kek_id}
    await both.stop()

    # The old KEK is no longer needed.
    await start_keymanager(
        make_settings(nats_url, KEYMANAGER_KV_BUCKET=bucket, KEY_ENCRYPTION_SECRET=OTHER_KEK)
    )
    assert (await LeaseClient(nc, requester="proxy", environment="development").authorization())[
        0
    ] == f"Bearer {dev}"
    # Fingerprints moved with the KEK: the same key is still recognised as stored.
    from shared import bus

    with pytest.raises(bus.RemoteError) as duplicate:
        await admin.add(dev.encode(), environment="development")
    assert duplicate.value.code == "conflict"


async def test_the_bus_sniffer_finds_a_planted_key_in_any_encoding(
    sniffer: Sniffer, nc: NATS
) -> None:
    """The check every test here ends with can fail: a key inside a larger base64 blob."""
    key = new_provider_key()
    blob = base64.b64encode(b'{"note": "' + key.encode() + b'"}')
    await nc.publish("keyveil.test.planted", b"prefix " + blob)
    await nc.flush()
    await until(lambda: any(b"planted" in seen for seen in sniffer.unchecked))
    assert sniffer.leaks() == [key[:7] + "…"]
    assert sniffer.leaks() == []  # each message is checked once
