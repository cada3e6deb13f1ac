"""Proxy fixtures: a real proxy process leasing its provider key from the real key
manager (bootstrapped with TEST_PROVIDER_KEY) on a NATS of their own, and a client
that issues tokens and signs requests like a browser SDK would."""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from nats.aio.client import Client as NATS

from keyveil.servers import ServerProcess, start_nats
from shared.signing import sign_request
from shared.tokens import ProxyClaims, Scope, TokenKeyring
from tests.support import (
    TEST_PROXY_SIGNING_KEY,
    FakeUpstream,
    ServiceProcess,
    key_manager_process,
)

ORIGIN = "https://app.example.com"
PREFIX = "/api/voice-agent/proxy/v1"
CHAT = f"{PREFIX}/chat/completions"
SPEECH = f"{PREFIX}/audio/speech"
STT = f"{PREFIX}/audio/transcriptions"


@pytest.fixture(scope="package")
def proxy_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A NATS of the proxy tests' own, so no other key manager answers their leases."""
    server = start_nats(tmp_path_factory.mktemp("proxy-nats"), streams=True)
    yield server
    server.stop()


@pytest.fixture(scope="package")
def key_manager(
    proxy_nats: ServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    """The real key-manager process, bootstrapped with the test provider key."""
    process = key_manager_process(proxy_nats.url, tmp_path_factory.mktemp("proxy-km"))
    process.start()
    yield process
    process.stop()


@pytest.fixture
async def bus(proxy_nats: ServerProcess) -> AsyncIterator[NATS]:
    client = await nats.connect(proxy_nats.url)
    yield client
    await client.drain()


def proxy_env(
    nats_url: str, redis_url: str, fake_upstream: FakeUpstream, **extra: str
) -> dict[str, str]:
    env = {
        "NATS_URL": nats_url,
        "REDIS_URL": redis_url,
        "OPENAI_BASE_URL": fake_upstream.base_url,
        "PROXY_SIGNING_KEY": TEST_PROXY_SIGNING_KEY,
        "ALLOWED_ORIGINS": ORIGIN,
        "VOICE_AGENT_PROXY_RATE_LIMIT": "5",
        "VOICE_AGENT_PROXY_IP_RATE_LIMIT": "100000",
        "UPSTREAM_READ_TIMEOUT_S": "1.5",
        "LOG_FORMAT": "text",
    }
    env.update(extra)
    return env


@pytest.fixture(scope="package")
def proxy(
    proxy_nats: ServerProcess,
    redis_url: str,
    fake_upstream: FakeUpstream,
    key_manager: ServiceProcess,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServiceProcess]:
    log = tmp_path_factory.mktemp("proxy") / "proxy.log"
    service = ServiceProcess("proxy", proxy_env(proxy_nats.url, redis_url, fake_upstream), log)
    service.start()
    yield service
    service.stop()


@dataclass
class Token:
    value: str
    claims: ProxyClaims
    signing_key: bytes


class Browser:
    """Issues proxy tokens (as the token service would) and signs requests."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.keyring = TokenKeyring(TEST_PROXY_SIGNING_KEY)
        self.http = httpx.AsyncClient(base_url=base_url, timeout=30)

    def token(
        self,
        *,
        scopes: tuple[Scope, ...] = (Scope.chat, Scope.speech, Scope.transcriptions),
        origin: str | None = ORIGIN,
        ttl: int = 300,
        keyring: TokenKeyring | None = None,
    ) -> Token:
        now = int(time.time())
        claims = ProxyClaims(
            jti=uuid.uuid4().hex,
            sid=f"sess-{uuid.uuid4().hex[:8]}",
            scopes=list(scopes),
            iat=now,
            exp=now + ttl,
            origin=origin,
        )
        ring = keyring or self.keyring
        value = ring.issue(claims)
        return Token(value, claims, ring.request_signing_key(value, claims.jti))

    def signed_headers(
        self,
        token: Token,
        path: str,
        body: bytes,
        *,
        content_type: str = "application/json",
        origin: str | None = ORIGIN,
        extra: Mapping[str, str] | None = None,
        **sign: Any,
    ) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {token.value}", "Content-Type": content_type}
        if origin:
            headers["Origin"] = origin
        headers.update(extra or {})
        sign.setdefault("key", token.signing_key)
        sign.setdefault("keyid", token.claims.jti)
        headers.update(
            sign_request(
                method="POST",
                path=path,
                body=body,
                authority=httpx.URL(self.base_url).netloc.decode(),
                scheme="http",
                headers=headers,
                nonce=secrets.token_urlsafe(12),
                **sign,
            )
        )
        return headers

    async def post(
        self, path: str, body: bytes, token: Token | None = None, **kw: Any
    ) -> httpx.Response:
        token = token or self.token()
        return await self.http.post(
            path, content=body, headers=self.signed_headers(token, path, body, **kw)
        )

    async def close(self) -> None:
        await self.http.aclose()


@pytest.fixture
async def browser(proxy: ServiceProcess) -> AsyncIterator[Browser]:
    client = Browser(proxy.url)
    yield client
    await client.close()


@pytest.fixture
def upstream(fake_upstream: FakeUpstream) -> Iterator[FakeUpstream]:
    fake_upstream.behave()
    fake_upstream.clear()
    yield fake_upstream
    fake_upstream.behave()


def chat_body(**extra: Any) -> bytes:
    import orjson

    payload = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], **extra}
    return orjson.dumps(payload)


def multipart(
    file_bytes: bytes | None, *, model: str | None = "whisper-1", **fields: str
) -> tuple[bytes, str]:
    boundary = "keyveilboundary" + secrets.token_hex(8)
    parts: list[bytes] = []
    named = ({"model": model} if model is not None else {}) | fields
    for name, value in named.items():
        parts.append(
            f"--{boundary}\r\nContent-Disposition: form-data; "
            f'name="{name}"\r\n\r\n{value}\r\n'.encode()
        )
    if file_bytes is not None:
        parts.append(
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
                f'filename="a.wav"\r\nContent-Type: audio/wav\r\n\r\n'
            ).encode()
            + file_bytes
            + b"\r\n"
        )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def state_dir(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir(exist_ok=True)
    return path
