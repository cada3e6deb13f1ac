"""The Python SDK against the real running system (`keyveil up --fake-upstream`).

Every mode, token caching and refresh, a fresh token on `401 token_expired`, 429
backoff against a proxy with a tightened limit, 503 retries honouring Retry-After,
streaming, and no blind retry once the provider may have acted.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from keyveil.client import (
    RateLimitedError,
    ResponseInterrupted,
    RetryPolicy,
    SecureAPIClient,
    ServiceError,
    Token,
)
from keyveil.servers import ServerProcess, start_redis
from shared.crypto import b64url_encode
from shared.tokens import ProxyClaims, Scope, TokenKeyring
from tests.stack import ORIGIN, Stack
from tests.support import TEST_PROVIDER_KEY, ServiceProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

HELLO = [{"role": "user", "content": "hello"}]


class Sleeps:
    """Records each backoff the client asks for, then really waits."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        await asyncio.sleep(seconds)


def fake(stack: Stack) -> str:
    return str(stack.info["fake_upstream_url"])


def upstream_calls(stack: Stack, path: str) -> int:
    calls = httpx.get(f"{fake(stack)}/_fake/calls").json()["calls"]
    return sum(1 for call in calls if call["path"] == path)


def behave(stack: Stack, **behaviour: Any) -> None:
    httpx.post(f"{fake(stack)}/_fake/behaviour", json=behaviour).raise_for_status()


@pytest.fixture
def misbehaving(stack: Stack) -> Iterator[None]:
    yield
    behave(stack)  # back to normal for every later test


@pytest.fixture(scope="module")
async def client(stack: Stack) -> AsyncIterator[SecureAPIClient]:
    # One client for the module: tokens are cached, so the token service's per-IP
    # issuance limit (shared with the other e2e suites) is barely touched.
    async with SecureAPIClient(base_url=stack.url("token"), origin=ORIGIN) as sdk:
        yield sdk


async def test_proxy_mode_chat_speech_and_transcription(
    stack: Stack, client: SecureAPIClient
) -> None:
    token = await client.request_token("proxy")
    assert token.mode == "proxy"
    assert token.can_sign
    assert TEST_PROVIDER_KEY not in json.dumps(dict(token.raw))

    answer = await client.chat(HELLO)
    assert answer["choices"][0]["message"]["content"] == "Hello from the fake."
    audio = await client.speech("hello there")
    assert audio.startswith(b"ID3")
    text = await client.transcribe(("clip.webm", b"\x1a\x45\xdf\xa3" * 100, "audio/webm"))
    assert text["text"] == "transcribed 400 bytes"
    assert await client.request_token("proxy") is token  # cached, not re-issued


async def test_streaming_chat_yields_chunks_as_they_arrive(
    stack: Stack, client: SecureAPIClient, misbehaving: None
) -> None:
    behave(stack, stream_chunks=4, chunk_delay_ms=150)
    stream = client.chat(HELLO, stream=True)
    arrivals: list[float] = []
    parts: list[str] = []
    async with stream:
        async for text in stream.text():
            arrivals.append(time.monotonic())
            parts.append(text)
    assert "".join(parts) == "Hello from the fake"
    assert stream.usage is not None
    counts = {k: stream.usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    assert counts == {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
    # Chunks were relayed as produced, not buffered until the end.
    assert arrivals[-1] - arrivals[0] > 0.3


async def test_realtime_and_auto_modes_get_an_ephemeral_secret(client: SecureAPIClient) -> None:
    realtime = await client.request_token("realtime")
    assert realtime.mode == "realtime"
    assert realtime.token.startswith("ek_")
    assert not realtime.can_sign
    assert realtime.session is not None
    auto = await client.request_token("auto")
    assert auto.mode == "realtime"  # the provider answered, so no proxy fallback
    assert TEST_PROVIDER_KEY not in json.dumps(dict(auto.raw))


async def test_demo_mode_is_refused_when_the_stack_is_not_in_demo_mode(
    client: SecureAPIClient,
) -> None:
    with pytest.raises(ServiceError) as refused:
        await client.request_token("demo")
    assert (refused.value.status, refused.value.code) == (400, "demo_disabled")


async def test_token_is_refreshed_before_expiry(stack: Stack, client: SecureAPIClient) -> None:
    now = [time.monotonic()]
    async with SecureAPIClient(
        base_url=stack.url("token"), origin=ORIGIN, clock=lambda: now[0]
    ) as sdk:
        first = await client.request_token()
        sdk.tokens.adopt(first)
        await sdk.chat(HELLO)
        assert sdk.tokens.fetches == 0
        # Inside the refresh margin, though still valid: the next call gets a new token.
        now[0] = first.obtained_at + first.lifetime_s - 10
        answer = await sdk.chat(HELLO)
        second = await sdk.request_token()
        assert answer["choices"]
        assert second.token_id != first.token_id
        assert sdk.tokens.fetches == 1


def _expired_token(stack: Stack) -> Token:
    """A token the token service would have issued two minutes ago, now expired."""
    key = json.loads((Path(stack.info["state_dir"]) / "dev-secrets.json").read_text())
    keyring = TokenKeyring(key["PROXY_SIGNING_KEY"])
    now = int(time.time())
    jti = secrets.token_urlsafe(18)
    claims = ProxyClaims(
        jti=jti,
        sid=uuid.uuid4().hex,
        scopes=list(Scope),
        iat=now - 400,
        exp=now - 100,
        origin=ORIGIN,
    )
    token = keyring.issue(claims)
    answer = {
        "mode": "proxy",
        "token": token,
        "token_id": jti,
        "signing_key": b64url_encode(keyring.request_signing_key(token, jti)),
        "expires_at": now + 300,  # what a client with a skewed clock would believe
        "proxy_url": stack.url("proxy"),
    }
    return Token.from_answer(answer, server_now=now, obtained_at=time.monotonic())


async def test_token_expired_answer_gets_a_fresh_token_and_one_upstream_call(
    stack: Stack,
) -> None:
    async with SecureAPIClient(base_url=stack.url("token"), origin=ORIGIN) as sdk:
        stale = _expired_token(stack)
        sdk.tokens.adopt(stale)
        before = upstream_calls(stack, "/v1/chat/completions")
        answer = await sdk.chat(HELLO)
        assert answer["choices"][0]["message"]["content"]
        fresh = await sdk.request_token()
        assert fresh.token_id != stale.token_id
        assert sdk.tokens.fetches == 1
        # The refused attempt never reached the provider.
        assert upstream_calls(stack, "/v1/chat/completions") == before + 1


@dataclass
class TightProxy:
    url: str
    redis: ServerProcess


@pytest.fixture(scope="module")
def tight_proxy(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TightProxy]:
    """Another proxy on the same bus, allowing 20 calls a minute per token, with its own Redis.

    Its own Redis can be stopped without disturbing the shared stack.
    """
    workdir = tmp_path_factory.mktemp("tight-proxy")
    redis = start_redis(workdir)
    state = Path(stack.info["state_dir"])
    keys = json.loads((state / "dev-secrets.json").read_text())
    passwords = json.loads((state / "nats-passwords.json").read_text())
    proxy = ServiceProcess(
        "proxy",
        env={
            "NATS_URL": stack.info["nats_url"],
            "NATS_USER": "proxy",
            "NATS_PASSWORD": passwords["proxy"],
            "REDIS_URL": redis.url,
            "PROXY_SIGNING_KEY": keys["PROXY_SIGNING_KEY"],
            "OPENAI_BASE_URL": stack.info["openai_base_url"],
            "ALLOWED_ORIGINS": ORIGIN,
            "VOICE_AGENT_PROXY_RATE_LIMIT": "20",
            "NODE_ENV": "development",
        },
        log_path=workdir / "proxy.log",
    )
    proxy.start(timeout=45)
    yield TightProxy(proxy.url, redis)
    proxy.stop()
    redis.stop()


async def test_429_is_retried_after_retry_after_against_a_tightened_limit(
    stack: Stack, client: SecureAPIClient, tight_proxy: TightProxy
) -> None:
    sleeps = Sleeps()
    async with SecureAPIClient(
        base_url=stack.url("token"), proxy_url=tight_proxy.url, origin=ORIGIN, sleep=sleeps
    ) as sdk:
        # The tight proxy keeps its limits in its own Redis: this token's budget there is whole.
        sdk.tokens.adopt(await client.request_token())
        # The burst is the limit (20); the 21st call is refused with Retry-After.
        for _ in range(20):
            await sdk.chat(HELLO)
        assert sleeps.delays == []
        started = time.monotonic()
        answer = await sdk.chat(HELLO)
        waited = time.monotonic() - started
    assert answer["choices"]
    assert len(sleeps.delays) >= 1
    # 20/min is one call per 3 s: the proxy says Retry-After: 3 and the client waits that long.
    assert sleeps.delays[0] >= 2.0
    assert waited >= sleeps.delays[0]


async def test_503_is_retried_with_backoff_until_the_proxy_recovers(
    stack: Stack, client: SecureAPIClient, tight_proxy: TightProxy
) -> None:
    """The proxy fails closed (503) while its Redis is down; the client backs off and retries."""

    class RestartRedisOnFirstBackoff(Sleeps):
        async def __call__(self, seconds: float) -> None:
            if not self.delays:
                await asyncio.to_thread(tight_proxy.redis.start)
            await super().__call__(seconds)

    sleeps = RestartRedisOnFirstBackoff()
    async with SecureAPIClient(
        base_url=stack.url("token"),
        proxy_url=tight_proxy.url,
        origin=ORIGIN,
        sleep=sleeps,
        retry=RetryPolicy(max_attempts=6, base_delay_s=0.2),
    ) as sdk:
        sdk.tokens.adopt(await client.request_token())  # reuse: no new issuance
        before = upstream_calls(stack, "/v1/audio/speech")
        tight_proxy.redis.stop()
        audio = await sdk.speech("back soon")
    assert audio.startswith(b"ID3")
    assert sleeps.delays  # it was refused at least once, and waited
    assert sleeps.delays[0] >= 1.0  # the proxy's Retry-After: 1
    # Refusals happened before the provider: exactly one call reached it.
    assert upstream_calls(stack, "/v1/audio/speech") == before + 1


async def test_provider_429_is_retried_then_reported_with_retry_after(
    stack: Stack, client: SecureAPIClient, misbehaving: None
) -> None:
    behave(stack, fail_status=429, retry_after=1, fail_paths=["/v1/audio/speech"])
    sleeps = Sleeps()
    async with SecureAPIClient(
        base_url=stack.url("token"),
        origin=ORIGIN,
        sleep=sleeps,
        retry=RetryPolicy(max_attempts=3, base_delay_s=0.1),
    ) as sdk:
        sdk.tokens.adopt(await client.request_token())
        before = upstream_calls(stack, "/v1/audio/speech")
        with pytest.raises(RateLimitedError) as failed:
            await sdk.speech("hi")
    assert failed.value.retry_after_s == 1.0
    assert upstream_calls(stack, "/v1/audio/speech") == before + 3
    assert len(sleeps.delays) == 2
    assert all(1.0 <= d <= 1.1 for d in sleeps.delays)


async def test_a_failed_upstream_call_is_not_retried(
    stack: Stack, client: SecureAPIClient, misbehaving: None
) -> None:
    behave(stack, fail_status=500, fail_paths=["/v1/chat/completions"])
    before = upstream_calls(stack, "/v1/chat/completions")
    with pytest.raises(ServiceError) as failed:
        await client.chat(HELLO)
    assert (failed.value.status, failed.value.code) == (502, "upstream_error")
    assert upstream_calls(stack, "/v1/chat/completions") == before + 1


async def test_a_call_lost_after_sending_is_not_resent(
    stack: Stack, client: SecureAPIClient, misbehaving: None
) -> None:
    behave(stack, delay_ms=1500)
    async with SecureAPIClient(base_url=stack.url("token"), origin=ORIGIN, timeout_s=0.5) as sdk:
        sdk.tokens.adopt(await client.request_token())
        before = upstream_calls(stack, "/v1/chat/completions")
        with pytest.raises(ResponseInterrupted):
            await sdk.chat(HELLO)
    behave(stack)
    assert upstream_calls(stack, "/v1/chat/completions") == before + 1
