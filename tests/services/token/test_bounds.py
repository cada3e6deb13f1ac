"""Resource attacks on a real token service process: the same HTTP bounds as the proxy,
and a full Redis answered 503, with `/healthz` answering within a second meanwhile."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
import redis.exceptions

from keyveil.servers import ServerProcess, free_port, redis_binary
from tests.attacks import close_raw, healthz_latency, open_raw, read_response, request_head
from tests.services.token.conftest import ORIGIN, browser
from tests.support import TEST_PROXY_SIGNING_KEY, FakeUpstream, ServiceProcess

SECURE = "/api/voice-agent/secure-token"


@pytest.fixture(scope="module")
def full_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A valkey with `--maxmemory 2mb --maxmemory-policy noeviction` (filled by the test)."""
    state = tmp_path_factory.mktemp("token-full-redis")
    port = free_port()
    server = ServerProcess(
        name="full-redis",
        url=f"redis://127.0.0.1:{port}/0",
        port=port,
        argv=[
            *(redis_binary(), "--bind", "127.0.0.1", "--port", str(port), "--save", ""),
            *("--appendonly", "no", "--maxmemory", "2mb", "--maxmemory-policy", "noeviction"),
        ],
        log_path=state / "redis.log",
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def token_service(
    private_nats: ServerProcess,
    full_redis: ServerProcess,
    fake_upstream: FakeUpstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServiceProcess]:
    env = {
        "NATS_URL": private_nats.url,
        "REDIS_URL": full_redis.url,
        "PROXY_SIGNING_KEY": TEST_PROXY_SIGNING_KEY,
        "OPENAI_BASE_URL": fake_upstream.base_url,
        "ALLOWED_ORIGINS": ORIGIN,
        "TRUSTED_PROXIES": "127.0.0.1/32",
        "HTTP_HEADER_TIMEOUT_S": "1",
        "HTTP_BODY_TIMEOUT_S": "1",
        "LOG_FORMAT": "text",
    }
    log = tmp_path_factory.mktemp("token-bounds") / "token.log"
    service = ServiceProcess("token", env, log).start()
    yield service
    service.stop()


async def _probe_during(url: str, attack: Any) -> tuple[Any, float]:
    task = asyncio.ensure_future(attack)
    await asyncio.sleep(0.05)
    latency = await healthz_latency(url)
    return await task, latency


@pytest.mark.parametrize(
    ("path", "headers", "status", "code"),
    [
        (SECURE, [("X-Repeat", "a")] * 10_000, 431, "headers_too_large"),
        (SECURE, [("X-Big", "b" * 256 * 1024)], 431, "headers_too_large"),
        (SECURE + "?" + "q" * 64 * 1024, [], 414, "url_too_long"),
    ],
    ids=["10k-repeats", "256k-field", "64k-url"],
)
async def test_oversized_heads_are_refused(
    token_service: ServiceProcess,
    path: str,
    headers: list[tuple[str, str]],
    status: int,
    code: str,
) -> None:
    async def attack() -> Any:
        started = time.monotonic()
        reader, writer = await open_raw(token_service.url)
        try:
            writer.write(request_head("POST", path, headers) + b"{}")
            return await read_response(reader), time.monotonic() - started
        finally:
            await close_raw(writer)

    (response, elapsed), latency = await _probe_during(token_service.url, attack())
    assert (response.status, response.code) == (status, code)
    assert elapsed < 2.0
    assert latency < 1.0


async def test_a_trickled_head_gets_408(token_service: ServiceProcess) -> None:
    async def attack() -> Any:
        reader, writer = await open_raw(token_service.url)
        try:
            writer.write(b"POST " + SECURE.encode() + b" HTTP/1.1\r\nHost: x\r\n")
            return await read_response(reader, timeout=5)
        finally:
            await close_raw(writer)

    response, latency = await _probe_during(token_service.url, attack())
    assert (response.status, response.code) == (408, "header_timeout")
    assert latency < 1.0


async def test_a_held_body_gets_408(token_service: ServiceProcess) -> None:
    async def attack() -> Any:
        started = time.monotonic()
        reader, writer = await open_raw(token_service.url)
        try:
            head = request_head("DELETE", f"{SECURE}/abc", [("Content-Length", "100")])
            writer.write(head + b"0123456789")  # a tenth of it, then nothing
            return await read_response(reader, timeout=5), time.monotonic() - started
        finally:
            await close_raw(writer)

    (response, elapsed), latency = await _probe_during(token_service.url, attack())
    assert (response.status, response.code) == (408, "body_timeout")
    assert 0.9 < elapsed < 3.0
    assert latency < 1.0


async def test_a_full_redis_is_503_not_500(
    token_service: ServiceProcess, full_redis: ServerProcess
) -> None:
    filler = aioredis.from_url(full_redis.url)
    try:
        for i in range(10_000):
            try:
                await filler.set(f"fill:{i}", b"x" * 8192)
            except redis.exceptions.OutOfMemoryError:
                break
    finally:
        await filler.aclose()

    async def issue() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=token_service.url, timeout=10) as client:
            return [
                await client.post(SECURE, json={"mode": "proxy"}, headers=browser())
                for _ in range(5)
            ]

    answers, latency = await _probe_during(token_service.url, issue())
    for answer in answers:
        assert answer.status_code == 503
        assert answer.json()["error"]["code"] == "security_unavailable"
        assert answer.headers["retry-after"] == "1"
        assert "token" not in answer.json()
    assert latency < 1.0
    assert "rate limiting backend unreachable (OOM)" in token_service.log()
    assert "Traceback" not in token_service.log()
