"""`SecureAPIClient`: tokens, signed proxy calls, retries, for application code.

async with SecureAPIClient(base_url=TOKEN_URL, origin=ORIGIN) as client:
    print(await client.chat([{"role": "user", "content": "hi"}]))
    async for text in client.chat(messages, stream=True).text():
        ...
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, overload

import httpx

from .auth import KeyveilAuth, sign_proxy_request
from .errors import (
    ClientError,
    ConnectionFailed,
    ResponseInterrupted,
    ServiceError,
    TokenExpiredError,
)
from .retry import RetryPolicy
from .streaming import ChatStream
from .tokens import (
    PROXY_API_PATH,
    LoginCallback,
    Mode,
    Token,
    TokenSource,
    error_from_response,
    proxy_root,
)

__all__ = ["SecureAPIClient"]

Message = Mapping[str, Any]
FileInput = bytes | str | Path | tuple[str, bytes] | tuple[str, bytes, str]


class SecureAPIClient:
    """Async client for the token service and the signing proxy.

    Never holds a provider key: it holds a short-lived proxy token and its
    per-token signing key, refreshed before expiry. Every proxy request is signed
    with a fresh nonce. 429/503 answers are retried with backoff and jitter
    (honouring Retry-After); `401 token_expired` gets one fresh token; a request
    that was sent and then lost is never re-sent.
    """

    def __init__(
        self,
        base_url: str,
        proxy_url: str | None = None,
        origin: str | None = None,
        *,
        session: Mapping[str, Any] | None = None,
        retry: RetryPolicy | None = None,
        refresh_margin_s: float = 30.0,
        timeout_s: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        auth: LoginCallback | None = None,
    ) -> None:
        self.origin = origin
        self.retry = retry or RetryPolicy()
        self._proxy_url = proxy_root(proxy_url) if proxy_url else None
        self._sleep = sleep
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not a secret
        self._http = httpx.AsyncClient(
            transport=transport, timeout=httpx.Timeout(timeout_s, connect=10.0)
        )
        self.tokens = TokenSource(
            base_url,
            origin=origin,
            session=session,
            refresh_margin_s=refresh_margin_s,
            retry=self.retry,
            timeout_s=timeout_s,
            transport=transport,
            clock=clock,
            sleep=sleep,
            rng=self._rng,
            auth=auth,
        )

    async def __aenter__(self) -> SecureAPIClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # --- tokens ---------------------------------------------------------------------

    async def request_token(
        self,
        mode: Mode = "proxy",
        *,
        session: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> Token:
        """A token for `mode`: the cached one while it is fresh, else a new one."""
        return await self.tokens.get(self._http, mode, session=session, force=force)

    def auth(self) -> KeyveilAuth:
        """An `httpx.Auth` sharing this client's token cache (for the `openai` package)."""
        return KeyveilAuth(tokens=self.tokens, origin=self.origin)

    async def proxy_base_url(self) -> str:
        """`<proxy>/api/voice-agent/proxy/v1`, as an OpenAI-compatible base URL."""
        if self._proxy_url is None:
            token = await self.request_token("proxy")
            if not token.proxy_url:
                raise ClientError("no proxy_url given and the token service did not name one")
            self._proxy_url = proxy_root(token.proxy_url)
        return self._proxy_url + PROXY_API_PATH

    # --- proxy calls ------------------------------------------------------------------

    @overload
    def chat(
        self,
        messages: Sequence[Message],
        *,
        model: str = ...,
        stream: Literal[False] = ...,
        **params: Any,
    ) -> Awaitable[dict[str, Any]]: ...

    @overload
    def chat(
        self,
        messages: Sequence[Message],
        *,
        model: str = ...,
        stream: Literal[True],
        **params: Any,
    ) -> ChatStream: ...

    def chat(
        self,
        messages: Sequence[Message],
        *,
        model: str = "gpt-4o-mini",
        stream: bool = False,
        **params: Any,
    ) -> Awaitable[dict[str, Any]] | ChatStream:
        """A chat completion; with `stream=True`, a `ChatStream` to iterate."""
        body: dict[str, Any] = {"model": model, "messages": [dict(m) for m in messages], **params}
        if stream:
            body["stream"] = True
            body.setdefault("stream_options", {"include_usage": True})
            return ChatStream(lambda: self._send("chat/completions", json=body, stream=True))
        return self._json("chat/completions", json=body)

    async def speech(
        self,
        text: str,
        *,
        voice: str = "alloy",
        model: str = "gpt-4o-mini-tts",
        response_format: str = "mp3",
        **params: Any,
    ) -> bytes:
        """Text to speech: the audio bytes."""
        body = {
            "model": model,
            "voice": voice,
            "input": text,
            "response_format": response_format,
            **params,
        }
        response = await self._send("audio/speech", json=body, stream=True)
        try:
            return await response.aread()
        except httpx.TransportError as exc:
            raise ResponseInterrupted(f"the audio broke off: {exc}") from None
        finally:
            await response.aclose()

    async def transcribe(
        self, file: FileInput, *, model: str = "whisper-1", **fields: Any
    ) -> dict[str, Any]:
        """Speech to text: the provider's JSON answer (`{"text": ...}`)."""
        files = {"file": _file_part(file)}
        data = {"model": model, **{k: str(v) for k, v in fields.items()}}
        return await self._json("audio/transcriptions", data=data, files=files)

    async def _json(self, endpoint: str, **content: Any) -> dict[str, Any]:
        response = await self._send(endpoint, stream=False, **content)
        answer: Any = response.json()
        if not isinstance(answer, dict):
            raise ClientError(f"{endpoint} answered with something other than a JSON object")
        return answer

    async def _send(self, endpoint: str, *, stream: bool, **content: Any) -> httpx.Response:
        """POST to the proxy, signed, with the retry rules; returns a successful response."""
        url = f"{await self.proxy_base_url()}/{endpoint}"
        attempt = 0
        refreshed = False
        while True:
            token = await self.request_token("proxy")
            request = self._http.build_request("POST", url, **content)
            request.read()
            sign_proxy_request(request, token, origin=self.origin)
            try:
                response = await self._http.send(request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
                # Nothing was sent, so trying again cannot duplicate the call.
                delay = self.retry.delay_s(attempt, None, self._rng)
                if delay is None:
                    raise ConnectionFailed(f"cannot reach the proxy: {exc}") from None
                await self._sleep(delay)
                attempt += 1
                continue
            except httpx.TransportError as exc:
                # Sent, outcome unknown: the provider may have acted. Not retried.
                raise ResponseInterrupted(f"{endpoint}: {exc}") from None
            if response.status_code < 400:
                if not stream:
                    try:
                        await response.aread()
                    except httpx.TransportError as exc:
                        raise ResponseInterrupted(f"{endpoint}: {exc}") from None
                    finally:
                        await response.aclose()
                return response
            try:
                await response.aread()
            finally:
                await response.aclose()
            error = error_from_response(response)
            if isinstance(error, TokenExpiredError) and not refreshed:
                self.tokens.invalidate(token)
                refreshed = True
                continue
            if isinstance(error, ServiceError) and error.status in self.retry.retry_statuses:
                delay = self.retry.delay_s(attempt, error.retry_after_s, self._rng)
                if delay is not None:
                    await self._sleep(delay)
                    attempt += 1
                    continue
            raise error


def _file_part(file: FileInput) -> tuple[str, bytes] | tuple[str, bytes, str]:
    if isinstance(file, tuple):
        return file
    if isinstance(file, bytes):
        return ("audio.webm", file, "application/octet-stream")
    path = Path(file)
    return (path.name, path.read_bytes())
