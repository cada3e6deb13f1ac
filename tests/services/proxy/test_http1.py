"""What only the proxy's own HTTP/1.1 client does, against real sockets: the retry on a
kept-alive connection the server closed as the request arrived, the unasked second
answer, connection counts. What every transport does is in test_transport.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from services.proxy.http1 import Http1Pool
from services.proxy.routes import ROUTES
from services.proxy.upstream import Forwarder

from .conftest import CHAT
from .rawhttp import OK, Handler, StaticKeys, read_request

_KEYS = StaticKeys("Bearer sk-test-http1")


async def _serve(handler: Handler) -> tuple[asyncio.Server, str]:
    async def closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        finally:
            writer.close()  # every server-side stream is closed, whatever the handler did

    server = await asyncio.start_server(closing, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}/v1"


@pytest.fixture
async def forwarder_for() -> AsyncIterator[Callable[[str], Forwarder]]:
    made: list[Forwarder] = []

    def make(base_url: str) -> Forwarder:
        forwarder = Forwarder(
            base_url=base_url,
            keys=_KEYS,
            transport="http1",
            proxies={},
            read_timeout_s=2.0,
        )
        made.append(forwarder)
        return forwarder

    yield make
    for forwarder in made:
        await forwarder.aclose()


def _opened(forwarder: Forwarder) -> int:
    pool = forwarder.transport
    assert isinstance(pool, Http1Pool)
    return pool.opened


async def _chat(forwarder: Forwarder) -> tuple[int, bytes]:
    response = await forwarder.send(
        ROUTES[CHAT], client_headers={"content-type": "application/json"}, content=b"{}"
    )
    length = response.content_length
    assert length is not None
    body = await response.read_exactly(length)
    response.release()
    return response.status, body


async def test_a_connection_closed_by_the_server_is_replaced_once(
    forwarder_for: Callable[[str], Forwarder],
) -> None:
    seen: list[bytes] = []

    async def answer_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Answers the first request, then drops the connection when the next arrives,
        # as a server does with an idle keep-alive connection it has just timed out.
        seen.append(await read_request(reader))
        writer.write(OK)
        await writer.drain()
        await reader.read(1)
        writer.close()

    server, base_url = await _serve(answer_once)
    forwarder = forwarder_for(base_url)
    try:
        assert await _chat(forwarder) == (200, b"{}")
        assert await _chat(forwarder) == (200, b"{}")
    finally:
        server.close()
    assert _opened(forwarder) == 2
    assert len(seen) == 2
    assert all(b"authorization: Bearer sk-test-http1" in request for request in seen)


async def test_an_unasked_second_answer_is_never_served(
    forwarder_for: Callable[[str], Forwarder],
) -> None:
    injected = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nEVIL!"

    async def two_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = True
        while True:
            try:
                await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            writer.write(OK + injected if first else OK)
            first = False
            await writer.drain()

    server, base_url = await _serve(two_answers)
    forwarder = forwarder_for(base_url)
    try:
        assert await _chat(forwarder) == (200, b"{}")
        assert await _chat(forwarder) == (200, b"{}")
    finally:
        server.close()
    assert _opened(forwarder) == 2  # the connection that carried extra bytes was dropped
