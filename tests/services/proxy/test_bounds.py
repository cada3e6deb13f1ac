"""Resource attacks on a real proxy process: each bound is hit, and `/healthz` still
answers within a second while the attack runs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS
from nats.js.api import DeliverPolicy

from keyveil.servers import ServerProcess, free_port, redis_binary
from services.proxy.settings import with_database
from shared.tokens import Scope
from tests.attacks import close_raw, healthz_latency, open_raw, read_response, request_head
from tests.support import FakeUpstream, ServiceProcess

from .conftest import CHAT, SPEECH, STT, Browser, chat_body, multipart, proxy_env

MIB = 1024 * 1024
WRITE_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.0


def _metric(text: str, line_start: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture(scope="module")
def bounded_proxy(
    proxy_nats: ServerProcess,
    redis_url: str,
    fake_upstream: FakeUpstream,
    key_manager: ServiceProcess,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServiceProcess]:
    logs = tmp_path_factory.mktemp("bounded-proxy")
    spool = logs / "spool"
    spool.mkdir()
    env = proxy_env(
        proxy_nats.url,
        redis_url,
        fake_upstream,
        VOICE_AGENT_PROXY_RATE_LIMIT="1000",
        UPSTREAM_MAX_CONNECTIONS="1",
        UPSTREAM_CONNECT_TIMEOUT_S="2",
        UPSTREAM_READ_TIMEOUT_S="5",
        PROXY_WRITE_TIMEOUT_S=str(WRITE_TIMEOUT_S),
        PROXY_BODY_READ_TIMEOUT_S=str(BODY_TIMEOUT_S),
        PROXY_BODY_TOTAL_TIMEOUT_S="3",
        PROXY_MAX_UPLOAD_BYTES=str(MIB),
        PROXY_SPOOL_BUDGET_BYTES=str(MIB + MIB // 4),
        PROXY_SPOOL_DIR=str(spool),
        HTTP_HEADER_TIMEOUT_S="1",
        RATE_LIMIT_BLOCK_AFTER_STRIKES="100000",
    )
    service = ServiceProcess("proxy", env, logs / "proxy.log").start()
    yield service
    service.stop()


@pytest.fixture
async def client(bounded_proxy: ServiceProcess) -> AsyncIterator[Browser]:
    browser = Browser(bounded_proxy.url)
    yield browser
    await browser.close()


async def _attack_and_probe(url: str, attack: Any) -> tuple[Any, float]:
    """Run `attack` and, once it is under way, time a `/healthz` from another client."""
    task = asyncio.ensure_future(attack)
    await asyncio.sleep(0.05)
    latency = await healthz_latency(url)
    return await task, latency


# -- headers and request line --------------------------------------------------------


def _repeated(n: int) -> list[tuple[str, str]]:
    return [("X-Repeat", "a")] * n


@pytest.mark.parametrize(
    ("path", "headers", "status", "code"),
    [
        (CHAT, _repeated(10_000), 431, "headers_too_large"),  # the red-team request
        (CHAT, _repeated(150), 431, "headers_too_large"),  # count, well under the bytes
        (CHAT, [("X-Big", "b" * 256 * 1024)], 431, "headers_too_large"),  # one endless field
        (CHAT + "?" + "q" * 64 * 1024, [], 414, "url_too_long"),
    ],
    ids=["10k-repeats", "150-fields", "256k-field", "64k-url"],
)
async def test_oversized_heads_are_refused_before_the_app(
    bounded_proxy: ServiceProcess,
    path: str,
    headers: list[tuple[str, str]],
    status: int,
    code: str,
) -> None:
    async def attack() -> tuple[Any, float]:
        started = time.monotonic()
        reader, writer = await open_raw(bounded_proxy.url)
        try:
            writer.write(request_head("POST", path, headers) + b"{}")
            response = await read_response(reader)
        finally:
            await close_raw(writer)
        return response, time.monotonic() - started

    (response, elapsed), latency = await _attack_and_probe(bounded_proxy.url, attack())
    assert response.status == status
    assert response.code == code
    assert response.headers["connection"] == "close"
    assert elapsed < 2.0
    assert latency < 1.0
    metrics = (await _get(bounded_proxy, "/metrics")).decode()
    assert f'keyveil_http_edge_refusals_total{{reason="{code}"}}' in metrics


async def _get(service: ServiceProcess, path: str) -> bytes:
    import httpx

    async with httpx.AsyncClient(base_url=service.url, timeout=5) as http:
        return (await http.get(path)).content


async def test_a_trickled_head_gets_408(bounded_proxy: ServiceProcess) -> None:
    async def attack() -> Any:
        reader, writer = await open_raw(bounded_proxy.url)
        try:
            writer.write(b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: x\r\n")
            for _ in range(4):  # a field now and then, never the end of the head
                await asyncio.sleep(0.4)
                if writer.is_closing():
                    break
                writer.write(b"X-Slow: 1\r\n")
            return await read_response(reader, timeout=5)
        finally:
            await close_raw(writer)

    response, latency = await _attack_and_probe(bounded_proxy.url, attack())
    assert response.status == 408
    assert response.code == "header_timeout"
    assert latency < 1.0


# -- answers nobody reads ------------------------------------------------------------


async def test_a_client_that_stops_reading_is_cut_and_frees_the_upstream_slot(
    bounded_proxy: ServiceProcess, client: Browser, upstream: FakeUpstream
) -> None:
    """UPSTREAM_MAX_CONNECTIONS=1: the stalled answer holds the only upstream slot until
    the write timeout cuts it; then the next caller gets it."""
    metric = 'keyveil_http_edge_refusals_total{reason="write_timeout"}'
    before = _metric((await _get(bounded_proxy, "/metrics")).decode(), metric)
    upstream.behave(stream_chunks=200_000)  # ~200 MB of audio, far beyond any buffer
    body = orjson.dumps({"model": "tts-1", "input": "hello", "voice": "alloy"})
    headers = client.signed_headers(client.token(), SPEECH, body)
    headers["Content-Length"] = str(len(body))
    reader, writer = await open_raw(bounded_proxy.url, receive_buffer=4096)
    try:
        writer.write(request_head("POST", SPEECH, headers, host=_netloc(client)) + body)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200")
        # Now read nothing: the proxy's buffers fill, writing pauses, the timer runs.
        assert await healthz_latency(bounded_proxy.url) < 1.0
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            metrics = (await _get(bounded_proxy, "/metrics")).decode()
            if _metric(metrics, metric) > before:
                break
            assert await healthz_latency(bounded_proxy.url) < 1.0
            await asyncio.sleep(0.2)
        else:
            pytest.fail("the stalled client was never cut")
        upstream.behave()
        started = time.monotonic()
        response = await client.post(SPEECH, body)
        assert response.status_code == 200  # not 502 `no free upstream connection`
        assert time.monotonic() - started < 2.0  # got the slot without waiting for one
        # The stalled connection was closed by the proxy: draining it ends.
        async with asyncio.timeout(10):
            try:
                while await reader.read(1 << 20):
                    pass
            except ConnectionResetError:
                pass
    finally:
        await close_raw(writer)


def _netloc(browser: Browser) -> str:
    import httpx

    return httpx.URL(browser.base_url).netloc.decode()


# -- held bodies and the upload budget -----------------------------------------------


async def _hold_body(
    browser: Browser, path: str, body: bytes, content_type: str, send: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Send the head and the first `send` bytes of a signed body, then nothing."""
    headers = browser.signed_headers(browser.token(), path, body, content_type=content_type)
    headers["Content-Length"] = str(len(body))
    reader, writer = await open_raw(browser.base_url)
    writer.write(request_head("POST", path, headers, host=_netloc(browser)) + body[:send])
    await writer.drain()
    return reader, writer


@pytest.mark.parametrize("path", [STT, CHAT], ids=["upload", "json"])
async def test_a_held_body_gets_408(client: Browser, upstream: FakeUpstream, path: str) -> None:
    if path == STT:
        body, content_type = multipart(b"\0" * 200_000)
    else:
        body, content_type = chat_body(pad="x" * 50_000), "application/json"

    async def attack() -> Any:
        started = time.monotonic()
        reader, writer = await _hold_body(client, path, body, content_type, send=10_000)
        try:
            return await read_response(reader, timeout=10), time.monotonic() - started
        finally:
            await close_raw(writer)

    (response, elapsed), latency = await _attack_and_probe(client.base_url, attack())
    assert response.status == 408
    assert response.code == "body_timeout"
    assert BODY_TIMEOUT_S * 0.9 < elapsed < BODY_TIMEOUT_S + 2
    assert latency < 1.0
    assert upstream.calls() == []


async def test_a_trickled_body_meets_the_overall_deadline(
    client: Browser, upstream: FakeUpstream
) -> None:
    body, content_type = multipart(b"\0" * 200_000)
    started = time.monotonic()
    reader, writer = await _hold_body(client, STT, body, content_type, send=1000)
    sent = 1000
    response = None
    try:
        while response is None and time.monotonic() - started < 8:
            writer.write(body[sent : sent + 100])  # 100 bytes every 0.5 s: never idle 1 s
            sent += 100
            try:
                response = await read_response(reader, timeout=0.5)
            except TimeoutError:
                continue
    finally:
        await close_raw(writer)
    assert response is not None
    assert response.status == 408
    assert response.code == "body_timeout"
    assert 2.5 < time.monotonic() - started < 5  # PROXY_BODY_TOTAL_TIMEOUT_S=3
    assert upstream.calls() == []


async def test_uploads_over_the_spool_budget_get_503(
    client: Browser, upstream: FakeUpstream
) -> None:
    held_body, held_type = multipart(b"\0" * (MIB - 4096))
    reader, writer = await _hold_body(client, STT, held_body, held_type, send=20_000)
    try:
        await asyncio.sleep(0.3)  # the held upload has its reservation now
        body, content_type = multipart(b"\1" * (MIB // 2))

        async def second() -> Any:
            return await client.post(STT, body, content_type=content_type)

        refused, latency = await _attack_and_probe(client.base_url, second())
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "upload_capacity"
        assert int(refused.headers["Retry-After"]) >= 1
        assert latency < 1.0
        assert upstream.calls() == []
        held = await read_response(reader, timeout=10)  # the held one times out ...
    finally:
        await close_raw(writer)
    assert held.status == 408
    accepted = await client.post(STT, body, content_type=content_type)  # ... and frees its room
    assert accepted.status_code == 200
    assert accepted.json()["text"] == f"transcribed {MIB // 2} bytes"


# -- unauthenticated refusals: counted, events sampled --------------------------------


async def _usage_events(bus: NATS, since: float, settle_s: float = 2.0) -> list[dict[str, Any]]:
    js = bus.jetstream()
    sub = await js.subscribe(
        "keyveil.usage.proxy", ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    events: list[dict[str, Any]] = []
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=settle_s)
            except TimeoutError:
                return events
            event: dict[str, Any] = orjson.loads(msg.data)
            if event["ts"] >= since:
                events.append(event)
    finally:
        await sub.unsubscribe()


async def test_unauthenticated_refusals_are_counted_but_sampled(
    client: Browser, bus: NATS, bounded_proxy: ServiceProcess
) -> None:
    rejections = 'keyveil_proxy_rejections_total{reason="auth"}'
    before = _metric((await _get(bounded_proxy, "/metrics")).decode(), rejections)
    since = time.time()

    async def flood() -> list[Any]:
        return [  # each one strikes the address: stay under the block (20)
            await client.http.post(
                CHAT, content=chat_body(), headers={"Authorization": "Bearer forged"}
            )
            for _ in range(15)
        ]

    responses, latency = await _attack_and_probe(client.base_url, flood())
    assert [r.status_code for r in responses] == [401] * 15
    assert latency < 1.0
    speech_only = client.token(scopes=(Scope.speech,))
    for _ in range(3):  # a verified token refused: one event each
        assert (await client.post(CHAT, chat_body(), speech_only)).status_code == 403
    await asyncio.sleep(1.5)  # the sampler's interval ends and the sum goes out
    events = await _usage_events(bus, since)
    codes = [(e["reason"] or {}).get("code") for e in events]
    invalid = [e for e, code in zip(events, codes, strict=True) if code == "token_invalid"]
    assert 1 <= len(invalid) <= 3
    assert sum(e["count"] for e in invalid) == 15
    assert all(e["client_ip"] == "127.0.0.1" for e in invalid)
    assert all(e["reason"]["category"] == "auth" for e in invalid)
    scope = [e for e, code in zip(events, codes, strict=True) if code == "scope_denied"]
    assert len(scope) == 3
    assert all(e["count"] is None for e in scope)
    metrics = (await _get(bounded_proxy, "/metrics")).decode()
    assert _metric(metrics, rejections) == before + 15 + 3  # forged tokens, then scope


# -- a full Redis --------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A valkey at its `maxmemory` with `noeviction`: every write answers OOM."""
    state = tmp_path_factory.mktemp("full-redis")
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


async def _fill(url: str) -> None:
    client = aioredis.from_url(url)
    try:
        for i in range(10_000):
            try:
                await client.set(f"fill:{i}", b"x" * 8192)
            except Exception as exc:  # the OOM reply is the point
                assert "maxmemory" in str(exc)
                return
        pytest.fail("the server never filled up")
    finally:
        await client.aclose()


async def test_a_full_redis_is_503_not_500(
    proxy_nats: ServerProcess,
    key_manager: ServiceProcess,
    fake_upstream: FakeUpstream,
    upstream: FakeUpstream,
    full_redis: ServerProcess,
    tmp_path: Path,
) -> None:
    env = proxy_env(proxy_nats.url, full_redis.url, fake_upstream)
    service = ServiceProcess("proxy", env, tmp_path / "proxy.log").start()
    browser = Browser(service.url)
    try:
        await _fill(full_redis.url)

        async def requests() -> list[Any]:
            return [await browser.post(CHAT, chat_body()) for _ in range(5)]

        responses, latency = await _attack_and_probe(service.url, requests())
        for response in responses:
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "security_unavailable"
            assert int(response.headers["Retry-After"]) >= 1
        assert latency < 1.0
        assert upstream.calls() == []
        assert "rate limiting backend unreachable (OOM)" in service.log()
        assert "Traceback" not in service.log()
    finally:
        await browser.close()
        service.stop()


async def test_the_cache_has_its_own_redis_and_a_full_one_is_a_miss(
    proxy_nats: ServerProcess,
    redis_url: str,
    key_manager: ServiceProcess,
    fake_upstream: FakeUpstream,
    upstream: FakeUpstream,
    full_redis: ServerProcess,
    tmp_path: Path,
) -> None:
    await _fill(full_redis.url)
    env = proxy_env(
        proxy_nats.url,
        redis_url,
        fake_upstream,
        PROXY_CACHE_REDIS_URL=full_redis.url,
        VOICE_AGENT_PROXY_RATE_LIMIT="1000",
    )
    service = ServiceProcess("proxy", env, tmp_path / "proxy.log").start()
    browser = Browser(service.url)
    body = orjson.dumps({"model": "tts-1", "input": "cache me", "voice": "alloy"})
    token = browser.token()
    try:

        async def cached_calls() -> list[Any]:
            return [
                await browser.post(SPEECH, body, token, extra={"X-Keyveil-Cache": "1"})
                for _ in range(3)
            ]

        responses, latency = await _attack_and_probe(service.url, cached_calls())
        for response in responses:
            assert response.status_code == 200
            assert response.headers.get("x-keyveil-cache") != "hit"
        assert latency < 1.0
        await asyncio.sleep(0.3)  # cache writes run after the answer
        assert len(upstream.calls()) == 3  # every one a miss, none an error
        assert service.log().count("response cache write failed (OutOfMemoryError)") == 1
    finally:
        await browser.close()
        service.stop()


async def test_the_cache_defaults_to_database_1(
    browser: Browser, upstream: FakeUpstream, redis_url: str
) -> None:
    """The package proxy has REDIS_URL=.../0 and no PROXY_CACHE_REDIS_URL."""
    body = orjson.dumps({"model": "tts-1", "input": "which database", "voice": "alloy"})
    token = browser.token()
    response = await browser.post(SPEECH, body, token, extra={"X-Keyveil-Cache": "1"})
    assert response.status_code == 200
    limits = aioredis.from_url(redis_url)
    cache = aioredis.from_url(with_database(redis_url, 1))
    try:
        deadline = time.monotonic() + 5
        while not [k async for k in cache.scan_iter(match="kv:cache:*")]:
            assert time.monotonic() < deadline, "no cache entry in database 1"
            await asyncio.sleep(0.1)
        assert [k async for k in limits.scan_iter(match="kv:cache:*")] == []
    finally:
        await limits.aclose()
        await cache.aclose()
