"""Accepted requests: forwarding, streaming both ways, the key that reaches the provider."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from nats.aio.client import Client as NATS

from shared.leases import ROTATED_SUBJECT, RotatedNotice
from tests.support import TEST_PROVIDER_KEY, FakeUpstream, ServiceProcess

from .conftest import CHAT, SPEECH, STT, Browser, chat_body, multipart

MIB = 1024 * 1024


async def test_chat_is_forwarded_with_the_key_managers_key_only(
    browser: Browser, upstream: FakeUpstream
) -> None:
    token = browser.token()
    response = await browser.post(CHAT, chat_body(), token)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "Hello from the fake."
    assert response.headers["RateLimit-Policy"] == '"per-token";q=5;w=60'
    assert response.headers["RateLimit"].startswith('"per-token";r=4;')
    calls = upstream.calls()
    assert [c["path"] for c in calls] == ["/v1/chat/completions"]
    assert calls[0]["authorization"] == f"Bearer {TEST_PROVIDER_KEY}"
    assert token.value not in str(calls)


async def test_sse_chunks_arrive_before_the_upstream_finishes(
    browser: Browser, upstream: FakeUpstream
) -> None:
    upstream.behave(chunk_delay_ms=250, stream_chunks=6)
    body = chat_body(stream=True, stream_options={"include_usage": True})
    headers = browser.signed_headers(browser.token(), CHAT, body)
    started = time.monotonic()
    arrivals: list[float] = []
    received = b""
    async with browser.http.stream("POST", CHAT, content=body, headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        async for chunk in response.aiter_raw():
            arrivals.append(time.monotonic() - started)
            received += chunk
    # Six 250 ms gaps upstream: the first event must be here long before the last.
    assert arrivals[0] < 0.8
    assert arrivals[-1] - arrivals[0] > 1.0
    assert received.rstrip().endswith(b"data: [DONE]")
    assert b'"usage"' in received


async def test_speech_streams_audio_back(browser: Browser, upstream: FakeUpstream) -> None:
    upstream.behave(stream_chunks=8)
    body = orjson.dumps({"model": "tts-1", "voice": "alloy", "input": "hello"})
    response = await browser.post(SPEECH, body)
    assert response.status_code == 200
    assert response.headers["content-type"] == "audio/mpeg"
    assert response.content.startswith(b"ID3")
    assert len(response.content) == 8 * (10 + 4 * 256)


async def test_large_upload_within_the_cap(browser: Browser, upstream: FakeUpstream) -> None:
    audio = b"\x01" * (24 * MIB)
    body, content_type = multipart(audio)
    response = await browser.post(STT, body, content_type=content_type)
    assert response.status_code == 200, response.text
    assert response.json()["text"] == f"transcribed {len(audio)} bytes"
    assert upstream.calls()[0]["authorization"] == f"Bearer {TEST_PROVIDER_KEY}"


async def test_upload_above_the_cap_is_refused(browser: Browser, upstream: FakeUpstream) -> None:
    body, content_type = multipart(b"\x01" * (26 * MIB))
    response = await browser.post(STT, body, content_type=content_type)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    assert upstream.calls() == []


async def test_opted_in_speech_is_served_from_the_cache(
    browser: Browser, upstream: FakeUpstream
) -> None:
    token = browser.token()
    body = orjson.dumps({"model": "tts-1", "voice": "alloy", "input": "cache me"})
    extra = {"X-Keyveil-Cache": "1"}
    first = await browser.post(SPEECH, body, token, extra=extra)
    assert first.status_code == 200
    for _ in range(50):  # the cache write happens after the response
        second = await browser.post(SPEECH, body, token, extra=extra)
        if second.headers.get("X-Keyveil-Cache") == "hit":
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("never served from the cache")
    assert second.content == first.content
    # Another subject with the same request does not see this cache entry.
    other = await browser.post(SPEECH, body, extra=extra)
    assert other.headers.get("X-Keyveil-Cache") is None


async def test_upstream_errors_are_mapped(browser: Browser, upstream: FakeUpstream) -> None:
    upstream.behave(fail_status=500)
    response = await browser.post(CHAT, chat_body())
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_error"

    upstream.behave(fail_status=429, retry_after=7)
    response = await browser.post(CHAT, chat_body())
    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    assert response.json()["error"]["type"] == "rate_limit_exceeded"

    upstream.behave(fail_status=400)
    response = await browser.post(CHAT, chat_body())
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "injected failure"

    upstream.behave(fail_status=401)
    response = await browser.post(CHAT, chat_body())
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_auth_failed"

    upstream.behave(delay_ms=2500)
    response = await browser.post(CHAT, chat_body())
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "upstream_timeout"


async def test_key_manager_unreachable_is_503(
    browser: Browser, upstream: FakeUpstream, key_manager: ServiceProcess, bus: NATS
) -> None:
    assert (await browser.post(CHAT, chat_body())).status_code == 200
    key_manager.stop()
    try:
        # A rotation notice drops the proxy's cached lease (and the key opened from
        # it); with no key manager left, nothing else may supply a key.
        notice = RotatedNotice(
            provider="openai", environment="development", key_id="k", version=2, status="active"
        )
        await bus.publish(ROTATED_SUBJECT, notice.model_dump_json().encode())
        await bus.flush()
        response = None
        for _ in range(40):
            response = await browser.post(CHAT, chat_body())
            if response.status_code == 503:
                break
            await asyncio.sleep(0.05)
        assert response is not None
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "key_unavailable"
    finally:
        key_manager.start()
    calls = upstream.calls()
    assert calls, "the first request reached the provider"
    assert all(c["authorization"] == f"Bearer {TEST_PROVIDER_KEY}" for c in calls)
    count = len(calls)
    response = await browser.post(CHAT, chat_body())
    assert response.status_code == 200
    assert len(upstream.calls()) == count + 1


async def _usage_event(bus: NATS, token_id: str, timeout: float = 10.0) -> dict[str, Any] | None:
    """The proxy's usage event for `token_id`, from the KEYVEIL_USAGE stream."""
    js = bus.jetstream()
    sub = await js.subscribe("keyveil.usage.proxy", ordered_consumer=True)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                msg = await sub.next_msg(timeout=0.5)
            except TimeoutError:
                continue
            event: dict[str, Any] = orjson.loads(msg.data)
            if event.get("token_id") == token_id:
                return event
    finally:
        await sub.unsubscribe()
    return None


async def test_client_disconnect_cancels_the_upstream_call(
    browser: Browser, upstream: FakeUpstream, bus: NATS
) -> None:
    # Events 1.2 s apart (under the proxy's 1.5 s read timeout here): a 12 s stream,
    # unless the proxy closes it as soon as the client leaves, not merely when the
    # next event would have been relayed.
    upstream.behave(chunk_delay_ms=1200, stream_chunks=10)
    token = browser.token()
    body = chat_body(stream=True)
    headers = browser.signed_headers(token, CHAT, body)
    metrics = (await browser.http.get("/metrics")).text
    before = _metric(metrics, "keyveil_proxy_upstream_cancelled_total")
    started = time.monotonic()
    async with browser.http.stream("POST", CHAT, content=body, headers=headers) as response:
        assert response.status_code == 200
        async for chunk in response.aiter_raw():
            assert chunk.startswith(b"data: ")
            break  # one event, then the browser tab closes
    # Leaving the block mid-body closes the client's connection.
    event = await _usage_event(bus, token.claims.jti)
    assert event is not None
    assert event["status"] == 499
    # Recorded when the provider call was closed, before even the second event.
    assert event["upstream_latency_ms"] < 900
    assert time.monotonic() - started < 8
    metrics = (await browser.http.get("/metrics")).text
    assert _metric(metrics, "keyveil_proxy_upstream_cancelled_total") == before + 1
    assert len(upstream.calls()) == 1


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


async def test_usage_event_and_metrics(
    browser: Browser, upstream: FakeUpstream, bus: NATS, proxy: ServiceProcess
) -> None:
    token = browser.token()
    response = await browser.post(CHAT, chat_body(), token)
    assert response.status_code == 200
    found = await _usage_event(bus, token.claims.jti)
    assert found is not None
    assert found["status"] == 200
    assert found["path"] == "/chat/completions"
    assert found["model"] == "gpt-4o-mini"
    assert found["total_tokens"] == 14
    assert found["client_ip"] == "127.0.0.1"
    assert found["latency_ms"] >= found["upstream_latency_ms"] > 0
    metrics = (await browser.http.get("/metrics")).text
    assert 'keyveil_proxy_requests_total{endpoint="chat_completions",status_class="2xx"}' in metrics
    assert "keyveil_proxy_added_latency_seconds_bucket" in metrics
    assert "127.0.0.1" not in metrics
    assert token.claims.jti not in metrics
