"""Server-Sent Events from the chat endpoint, as an async iterator of chunk dicts."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any

import httpx

from .errors import ResponseInterrupted, service_error

__all__ = ["ChatStream", "iter_sse_data"]


async def iter_sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The `data` of each event (multi-line data joined with newlines), in order."""
    data: list[str] = []
    async for line in lines:
        if line == "":
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith(":"):
            continue  # a comment / keep-alive
        name, _, value = line.partition(":")
        if name == "data":
            data.append(value.removeprefix(" "))
    if data:
        yield "\n".join(data)


class ChatStream:
    """A streamed chat completion: `async for chunk in stream` yields each chunk dict.

    The request is sent on first iteration (or `async with`); the connection is
    closed when the stream ends, breaks, or the block exits. Once the answer has
    started, an interruption raises `ResponseInterrupted` and nothing is retried.
    """

    def __init__(self, send: Callable[[], Awaitable[httpx.Response]]) -> None:
        self._send = send
        self._response: httpx.Response | None = None
        self._chunks: AsyncIterator[dict[str, Any]] | None = None
        self.usage: dict[str, Any] | None = None

    async def __aenter__(self) -> ChatStream:
        await self._open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> ChatStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        await self._open()
        assert self._chunks is not None
        try:
            return await self._chunks.__anext__()
        except StopAsyncIteration:
            await self.aclose()
            raise

    async def text(self) -> AsyncIterator[str]:
        """Only the content deltas, as they arrive."""
        async for chunk in self:
            for choice in chunk.get("choices") or ():
                content = (choice.get("delta") or {}).get("content")
                if content:
                    yield content

    async def collect(self) -> str:
        """The whole answer text."""
        return "".join([part async for part in self.text()])

    async def aclose(self) -> None:
        if self._response is not None:
            await self._response.aclose()

    async def _open(self) -> None:
        if self._chunks is None:
            self._response = await self._send()
            self._chunks = self._parse(self._response)

    async def _parse(self, response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
        try:
            async for data in iter_sse_data(response.aiter_lines()):
                if data.strip() == "[DONE]":
                    return
                chunk: Any = json.loads(data)
                if not isinstance(chunk, dict):
                    continue
                if isinstance(chunk.get("error"), dict):
                    error = chunk["error"]
                    raise service_error(
                        502,
                        str(error.get("code") or "upstream_error"),
                        str(error.get("message") or "the stream failed"),
                    )
                if chunk.get("usage"):
                    self.usage = chunk["usage"]
                yield chunk
        except httpx.TransportError as exc:
            raise ResponseInterrupted(f"the stream broke off: {exc}") from None
        finally:
            await response.aclose()
