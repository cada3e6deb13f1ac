"""The edge protocol in process (a real uvicorn server on a free port): bounds per request,
not per connection; bodies are not counted as head; an unread answer is cut."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from keyveil.servers import free_port
from shared.httpprotocol import EdgeProtocol, ProtocolLimits
from tests.attacks import close_raw, open_raw, read_response, request_head

LIMITS = ProtocolLimits(
    max_header_count=20,
    max_header_bytes=4096,
    max_url_bytes=1024,
    header_timeout_s=0.5,
    write_timeout_s=0.5,
)


class _App:
    """Echoes the body size; `/endless` streams until the client leaves."""

    def __init__(self) -> None:
        self.disconnected = asyncio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/endless":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            watcher = asyncio.ensure_future(self._watch(receive))
            try:
                chunk = {"type": "http.response.body", "body": b"x" * 65536, "more_body": True}
                while not self.disconnected.is_set():
                    await send(chunk)
            finally:
                watcher.cancel()
            return
        size = 0
        while True:
            message = await receive()
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = str(size).encode()
        headers = [(b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.disconnected.set()


@pytest.fixture
async def served() -> AsyncIterator[tuple[str, _App]]:
    app = _App()
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        http=EdgeProtocol.bounded(LIMITS),
        log_config=None,
        lifespan="off",
        loop="asyncio",
    )
    server = uvicorn.Server(config)
    task = asyncio.ensure_future(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    yield f"http://127.0.0.1:{port}", app
    server.should_exit = True
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_limits_count_per_request_on_a_kept_alive_connection(
    served: tuple[str, Any],
) -> None:
    url, _ = served
    reader, writer = await open_raw(url)
    try:
        for _ in range(5):  # 15 fields each: 75 on the connection, under 20 per request
            body = b"y" * 10_000  # sent in the same write: not head bytes
            fields = [("X-F", "v" * 200)] * 15 + [("Content-Length", str(len(body)))]
            writer.write(request_head("POST", "/echo", fields) + body)
            response = await read_response(reader)
            assert (response.status, response.body) == (200, b"10000")
        writer.write(request_head("POST", "/echo", [("X-F", "v")] * 21) + b"")
        refused = await read_response(reader)
        assert (refused.status, refused.code) == (431, "headers_too_large")
    finally:
        await close_raw(writer)


async def test_invalid_http_is_still_a_json_400(served: tuple[str, Any]) -> None:
    url, _ = served
    reader, writer = await open_raw(url)
    try:
        writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nX-Bad: a\x00b\r\n\r\n")
        response = await read_response(reader)
    finally:
        await close_raw(writer)
    assert (response.status, response.code) == (400, "invalid_http")


async def test_an_unread_answer_is_cut_and_the_app_sees_the_disconnect(
    served: tuple[str, _App],
) -> None:
    url, app = served
    reader, writer = await open_raw(url, receive_buffer=4096)
    try:
        writer.write(request_head("GET", "/endless", []))
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.wait_for(app.disconnected.wait(), timeout=10)
    finally:
        await close_raw(writer)


async def test_an_idle_connection_between_requests_is_not_refused(
    served: tuple[str, Any],
) -> None:
    url, _ = served
    reader, writer = await open_raw(url)
    try:
        writer.write(request_head("POST", "/echo", [("Content-Length", "0")]))
        assert (await read_response(reader)).status == 200
        await asyncio.sleep(0.8)  # longer than the head timeout, but no head has begun
        writer.write(request_head("POST", "/echo", [("Content-Length", "0")]))
        assert (await read_response(reader)).status == 200
    finally:
        await close_raw(writer)


async def _pair() -> tuple[Any, Any]:
    """(our transport's wrapper, the peer socket) over a real socket pair."""
    import socket

    from shared.coalesce import CoalescedWrites

    ours, peer = socket.socketpair()
    peer.setblocking(False)
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_connection(asyncio.Protocol, sock=ours)
    return CoalescedWrites(transport, loop), peer


def _received(peer: Any) -> bytes:
    try:
        return bytes(peer.recv(1 << 20))
    except BlockingIOError:
        return b""


async def test_a_head_and_its_body_leave_in_one_write() -> None:
    writes, peer = await _pair()
    try:
        writes.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        writes.write(b"ok")
        assert _received(peer) == b""  # held, not sent write by write
        await asyncio.sleep(0.05)  # the flush runs at the end of the iteration
        got = _received(peer)
        assert got == b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
        # A large write sends what waits first: order is kept, nothing is held back.
        writes.write(b"head")
        writes.write(b"x" * (64 * 1024))
        await asyncio.sleep(0.05)
        big = b""
        for _ in range(50):
            big += _received(peer)
            if len(big) >= 4 + 64 * 1024:
                break
            await asyncio.sleep(0.01)
        assert big == b"head" + b"x" * (64 * 1024)
        # Close sends what waits before closing; abort drops it.
        writes.write(b"last")
        writes.close()
        await asyncio.sleep(0.05)
        assert _received(peer) == b"last"
    finally:
        peer.close()


async def test_an_abort_drops_what_waits() -> None:
    writes, peer = await _pair()
    try:
        writes.write(b"never")
        writes.abort()
        await asyncio.sleep(0.05)
        assert _received(peer) == b""
    finally:
        peer.close()
