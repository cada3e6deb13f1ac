"""A small real egress proxy for tests: CONNECT tunnels (https upstreams) and forwarding of
absolute-form requests (http upstreams), recording what went through it."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from urllib.parse import urlsplit

__all__ = ["EgressProxy"]


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
    dst.close()


@dataclass
class EgressProxy:
    """`targets`: each CONNECT authority, or each forwarded request's absolute URL."""

    targets: list[str] = field(default_factory=list)
    server: asyncio.Server | None = None
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            method, target, _ = head.split(b"\r\n", 1)[0].split(b" ", 2)
            if method == b"CONNECT":
                self.targets.append(target.decode())
                host, _, port = target.decode().rpartition(":")
                up_reader, up_writer = await asyncio.open_connection(host, int(port))
                self.writers.append(up_writer)
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
                return
            url = urlsplit(target.decode())
            up_reader, up_writer = await asyncio.open_connection(url.hostname, url.port or 80)
            self.writers.append(up_writer)
            back = asyncio.get_running_loop().create_task(_pipe(up_reader, writer))
            while True:  # one origin per client connection, request after request
                self.targets.append(head.split(b" ", 2)[1].decode())
                up_writer.write(self._origin_form(head) + await self._body(reader, head))
                await up_writer.drain()
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    break
            up_writer.close()
            await back
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    @staticmethod
    def _origin_form(head: bytes) -> bytes:
        method, target, rest = head.split(b" ", 2)
        url = urlsplit(target.decode())
        path = url.path + (f"?{url.query}" if url.query else "")
        return b" ".join([method, path.encode(), rest])

    @staticmethod
    async def _body(reader: asyncio.StreamReader, head: bytes) -> bytes:
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                return await reader.readexactly(int(line.split(b":")[1]))
        return b""
