"""Hostile clients on raw sockets, and the check that the service still answers.

Every resource attack test runs the attack, asserts the bound was hit (status and
JSON code), and meanwhile measures a `/healthz` request from another client.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import orjson

__all__ = [
    "RawResponse",
    "close_raw",
    "healthz_latency",
    "open_raw",
    "read_response",
    "request_head",
]


@dataclass(frozen=True)
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def code(self) -> str:
        error: dict[str, str] = orjson.loads(self.body)["error"]
        return error["code"]


async def healthz_latency(base_url: str) -> float:
    """Seconds a fresh client waits for `/healthz` (asserting it answered 200)."""
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=base_url, timeout=5) as client:
        response = await client.get("/healthz")
    assert response.status_code == 200
    return time.monotonic() - started


async def open_raw(
    base_url: str, *, receive_buffer: int | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A plain TCP connection to the service; a small `receive_buffer` makes a slow reader."""
    url = urlsplit(base_url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (url.hostname, url.port))
    return await asyncio.open_connection(sock=sock, limit=64 * 1024)


def request_head(
    method: str, path: str, headers: dict[str, str] | list[tuple[str, str]], host: str = "x"
) -> bytes:
    items = headers.items() if isinstance(headers, dict) else headers
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", *(f"{k}: {v}" for k, v in items)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def read_response(reader: asyncio.StreamReader, timeout: float = 10.0) -> RawResponse:
    """One HTTP/1.1 response with a Content-Length body."""
    async with asyncio.timeout(timeout):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return RawResponse(status, headers, body)


async def close_raw(writer: asyncio.StreamWriter) -> None:
    """Close and wait until the socket is really closed (no unclosed-transport warning)."""
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
