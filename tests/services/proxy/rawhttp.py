"""Pieces for tests that put a raw asyncio server where the provider would be."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from shared.leases import LeaseReply

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


class StaticKeys:
    """A key source with one fixed key and lease (no key manager)."""

    def __init__(self, authorization: str) -> None:
        self._authorization = authorization

    async def authorization(self, provider: str = "openai") -> tuple[str, LeaseReply]:
        lease = LeaseReply(
            lease_id="l",
            key_id="k",
            version=1,
            provider=provider,
            environment="test",
            expires_at=0.0,
            sealed="",
        )
        return self._authorization, lease


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request, head and Content-Length body."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await reader.readexactly(length)
