"""The key-manager as a real process: bootstrap import, edge routes, NATS restart."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import httpx
import nats
from nats.aio.client import Client as NATS

from keyveil.servers import ServerProcess, free_port, start_nats
from shared.keyadmin import KeyAdminClient
from shared.leases import LeaseClient
from tests.support import TEST_KEY_ENCRYPTION_SECRET, TEST_PROVIDER_KEY, ServiceProcess


def _env(nats_url: str, bucket: str) -> dict[str, str]:
    return {
        "NATS_URL": nats_url,
        "KEY_ENCRYPTION_SECRET": TEST_KEY_ENCRYPTION_SECRET,
        "OPENAI_API_KEY": TEST_PROVIDER_KEY,
        "KEYMANAGER_KV_BUCKET": bucket,
        "NODE_ENV": "development",
        "LOG_FORMAT": "json",
    }


async def test_bootstrap_import_edge_routes_and_no_key_in_logs(
    nc: NATS, nats_url: str, tmp_path: Path
) -> None:
    bucket = f"KEYS_{uuid.uuid4().hex[:12]}"
    service = ServiceProcess("keymanager", _env(nats_url, bucket), tmp_path / "km.log")
    await asyncio.to_thread(service.start)
    try:
        header, reply = await LeaseClient(
            nc, requester="proxy", environment="development"
        ).authorization()
        assert header == f"Bearer {TEST_PROVIDER_KEY}"
        async with httpx.AsyncClient(base_url=service.url) as http:
            assert (await http.get("/healthz")).status_code == 200
            assert (await http.get("/readyz")).json()["status"] == "ready"
            metrics = (await http.get("/metrics")).text
            assert 'keyveil_keymanager_leases_total{result="granted"} 1.0' in metrics
            assert "keyveil_keymanager_decrypt_seconds_bucket" in metrics
            assert (await http.get("/api/anything")).status_code == 404
    finally:
        await asyncio.to_thread(service.stop)
    log = service.log()
    assert f"imported as {reply.key_id} v1" in log
    assert TEST_PROVIDER_KEY not in log
    assert TEST_KEY_ENCRYPTION_SECRET not in log

    # A second start finds the fingerprint and imports nothing.
    again = ServiceProcess("keymanager", _env(nats_url, bucket), tmp_path / "km2.log")
    await asyncio.to_thread(again.start)
    try:
        listed = await KeyAdminClient(nc).list_keys()
    finally:
        await asyncio.to_thread(again.stop)
    assert f"already stored as {reply.key_id} v1" in again.log()
    assert [(k.key_id, k.version) for k in listed] == [(reply.key_id, 1)]


def test_weak_kek_refuses_to_start(tmp_path: Path, nats_url: str) -> None:
    env = _env(nats_url, "KEYS_x") | {
        "KEY_ENCRYPTION_SECRET": "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
    }
    service = ServiceProcess("keymanager", env, tmp_path / "weak.log").start(wait_ready=False)
    assert service.process is not None
    assert service.process.wait(30) == 2
    assert "KEY_ENCRYPTION_SECRET" in service.log()
    assert "aaaaaaaa" not in service.log()


async def test_survives_a_nats_restart(tmp_path: Path) -> None:
    port = free_port()
    server: ServerProcess = start_nats(tmp_path, port=port, name="private", streams=True)
    env = _env(server.url, "KEYVEIL_KEYS") | {
        "OPENAI_API_KEY": "sk-test-restart-" + uuid.uuid4().hex
    }
    service = ServiceProcess("keymanager", env, tmp_path / "km.log")
    client: NATS | None = None
    try:
        await asyncio.to_thread(service.start)
        client = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
        leases = LeaseClient(client, requester="proxy", environment="development")
        first, reply = await leases.authorization()
        await asyncio.to_thread(server.kill)
        await asyncio.to_thread(server.start)  # same port, same store directory
        leases.invalidate()
        for _ in range(100):
            try:
                again, reply_after = await leases.authorization()
                break
            except Exception:
                await asyncio.sleep(0.2)
        else:
            raise AssertionError(f"no lease after the restart:\n{service.log()[-2000:]}")
        assert again == first
        assert reply_after.key_id == reply.key_id  # the record came back from disk
        assert service.process is not None
        assert service.process.poll() is None
    finally:
        if client is not None:
            await client.close()
        await asyncio.to_thread(service.stop)
        server.stop()


async def test_wrong_kek_process_is_alive_but_not_ready_and_says_why(
    nc: NATS, nats_url: str, tmp_path: Path
) -> None:
    bucket = f"KEYS_{uuid.uuid4().hex[:12]}"
    first = ServiceProcess("keymanager", _env(nats_url, bucket), tmp_path / "km.log")
    await asyncio.to_thread(first.start)
    await asyncio.to_thread(first.stop)

    wrong_secret = "wrong-kek-Zq8Xw3Lm5Np7Rt2Vb4Hc6Jd9Kf1Gs0"
    wrong = ServiceProcess(
        "keymanager",
        {**_env(nats_url, bucket), "KEY_ENCRYPTION_SECRET": wrong_secret},
        tmp_path / "wrong.log",
    )
    await asyncio.to_thread(wrong.start, wait_ready=False)
    try:
        async with httpx.AsyncClient(base_url=wrong.url) as http:
            for _ in range(100):
                try:
                    if (await http.get("/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
            for _ in range(50):  # NATS connects first; then the custody check has run
                ready = await http.get("/readyz")
                if ready.json()["checks"].get("nats"):
                    break
                await asyncio.sleep(0.1)
            assert ready.status_code == 503
            checks = ready.json()["checks"]
            assert (checks["nats"], checks["kek"]) == (True, False)
            metrics = (await http.get("/metrics")).text
            assert "keyveil_keymanager_kek_ready 0.0" in metrics
    finally:
        await asyncio.to_thread(wrong.stop)
    log = wrong.log()
    assert "key custody not verified: the custody record is wrapped under kek-" in log
    assert "KEY_ENCRYPTION_SECRET_PREVIOUS" in log
    assert wrong_secret not in log
    assert "imported as" not in log  # nothing is written under a KEK that did not prove itself
