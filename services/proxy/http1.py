"""A small HTTP/1.1 client for the one upstream the proxy talks to.

Why not aiohttp or httpx: on this path the general-purpose clients cost 300-700 us of
CPU per request (request objects, header multidicts, tracing hooks, a writer task,
pool bookkeeping), several times the HTTP work itself. This client does only what
the proxy needs, on asyncio protocols with httptools' C parser (uvicorn's):

- one bounded keep-alive pool per process (at most `max_connections` requests in
  flight, idle connections reused LIFO and dropped after `keepalive_s`, or as soon as
  the server closes them); TLS with the system trust store for https;
- the request head and a bytes body in one write (TCP_NODELAY is asyncio's default),
  or a streamed body with a Content-Length, respecting write flow control;
- the response body streamed as it arrives, reading paused while more than
  `_HIGH_WATER` bytes wait for the consumer, so a slow client never makes the proxy
  buffer a whole answer;
- a connect timeout (including waiting for a pool slot) and a read timeout on every
  wait for the server; `abort()` closes the connection, which is how the provider
  learns that the call is cancelled;
- a response head of at most `MAX_RESPONSE_HEAD_BYTES`.

It is one `transport.UpstreamTransport` (the pool) whose exchanges are the connections
themselves, so the interface costs no object per call. It connects directly: with an
egress proxy, the httpx transport is used instead (services/proxy/transport.py).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence

import httptools

from shared.errors import UpstreamError, UpstreamTimeoutError

from .transport import MAX_RESPONSE_HEAD_BYTES, UpstreamStreamError

__all__ = ["Http1Connection", "Http1Pool", "UpstreamConnectError", "UpstreamReadError"]

_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024


class UpstreamConnectError(Exception):
    """No connection to the upstream could be had (refused, unreachable, TLS)."""


class UpstreamReadError(Exception):
    """The connection broke, or the answer was not valid HTTP/1.1."""


class Http1Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time (its `transport.UpstreamExchange`)."""

    def __init__(self, pool: Http1Pool, read_timeout_s: float) -> None:
        self._pool = pool
        self._read_timeout_s = read_timeout_s
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self._parser = httptools.HttpResponseParser(self)
        self._head: asyncio.Future[None] | None = None
        self._body: deque[bytes] = deque()
        self._buffered = 0
        self._complete = False
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._write_paused = False
        self._drained: asyncio.Future[None] | None = None
        self._framed = False  # Content-Length or chunked: the end is known
        self._keep_alive = False
        # The answer's head is bounded: bytes fed while it was incomplete, and, once
        # those pass the bound, its header fields counted exactly.
        self._head_fed = 0
        self._count_fields = False
        self._head_bytes = 0

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._head is None or self._complete:
            self.close()  # bytes nobody asked for (e.g. a second answer): never reuse
            return
        large = False
        if self.status < 200:  # the head is not complete yet (a 1xx does not count)
            fed = self._head_fed + len(data)
            self._head_fed = fed
            if fed > MAX_RESPONSE_HEAD_BYTES:
                # Rare (a large first read, or a large head): from now on the header fields
                # are counted one by one; everything fed before was head.
                large = True
                if not self._count_fields:
                    self._count_fields = True
                    self._head_bytes = fed - len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamReadError(f"invalid HTTP from the upstream ({type(exc).__name__})"))
            self.close()
            return
        if large and self.status < 200:  # all of it head, and still no end: too large
            self._head_too_large()

    def eof_received(self) -> bool:
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._head is not None and self._head.done() and not self._framed:
            self._complete = True  # a body delimited by the connection closing
            self._wake()
        elif not self._complete:
            self._fail(UpstreamReadError("the upstream closed the connection"))
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # -- httptools callbacks ---------------------------------------------------------

    def on_header(self, name: bytes, value: bytes | None) -> None:
        if not self._complete:
            value = value or b""
            if self._count_fields:
                self._head_bytes += len(name) + len(value) + 4
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self._complete:  # a second answer to one request
            self._fail(UpstreamReadError("the upstream sent more than one answer"))
            self.close()
            return
        if self._count_fields and self._head_bytes > MAX_RESPONSE_HEAD_BYTES:
            self._head_too_large()
            return
        self.status = self._parser.get_status_code()
        for name, value in self.headers:
            lower = name.lower()
            if lower == b"content-length" or (
                lower == b"transfer-encoding" and b"chunked" in value.lower()
            ):
                self._framed = True
        if self.status < 200:  # 1xx: wait for the real answer
            self.headers = []
            return
        if self._head is not None and not self._head.done():
            self._head.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self._complete:
            return
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._reading_paused and self.transport:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.status >= 200:
            # Asked here: after the message the parser no longer answers True.
            self._keep_alive = self._parser.should_keep_alive()
            self._complete = True
            self._wake()

    # -- one exchange ----------------------------------------------------------------

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _head_too_large(self) -> None:
        self._fail(UpstreamReadError("the upstream's answer head is too large"))
        self.headers = []
        self.close()

    def _fail(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
        if self._head is not None and not self._head.done():
            self._head.set_exception(error)
        self._wake()

    def begin(self) -> None:
        """Reset for the next request on this connection."""
        self.status = 0
        self.headers = []
        self._parser = httptools.HttpResponseParser(self)
        self._head = asyncio.get_running_loop().create_future()
        self._body.clear()
        self._buffered = 0
        self._complete = False
        self._error = None
        self._framed = False
        self._keep_alive = False
        self._head_fed = 0
        self._count_fields = False
        self._head_bytes = 0

    def write(self, data: bytes) -> None:
        if self.closed or self.transport is None:
            raise UpstreamReadError("the upstream connection is closed")
        self.transport.write(data)

    async def drain(self) -> None:
        if self._write_paused and not self.closed:
            self._drained = asyncio.get_running_loop().create_future()
            await self._drained
        if self.closed:
            raise UpstreamReadError("the upstream closed the connection")

    async def head(self, timeout_s: float) -> None:
        assert self._head is not None
        async with asyncio.timeout(timeout_s):
            await self._head

    async def readany(self) -> bytes:
        """The body received so far (b"" at its end); waits up to the read timeout for more."""
        while not self._body:
            if self._complete:
                return b""
            if self._error is not None:
                raise UpstreamStreamError(str(self._error)) from None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(self._read_timeout_s):
                    await self._waiter
            except TimeoutError:
                raise UpstreamStreamError("the upstream went silent mid-answer") from None
        chunk = self._body.popleft() if len(self._body) == 1 else b"".join(self._body)
        self._body.clear()
        self._buffered = 0
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        return chunk

    @property
    def reusable(self) -> bool:
        return (
            self._complete
            and not self._body
            and not self.closed
            and self._error is None
            and self._keep_alive
        )

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True

    def release(self) -> None:
        """Done with the body: back to the pool when it finished cleanly, else closed."""
        self._pool.release(self)

    def abort(self) -> None:
        """Close now (the provider learns that the call is cancelled) and free the slot."""
        self.close()
        self._pool.release(self)


class Http1Pool:
    """Bounded keep-alive connections to one origin (scheme, host, port)."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        tls: bool,
        default_headers: Sequence[tuple[str, str]] = (),
        max_connections: int = 200,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 120.0,
        keepalive_s: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """`default_headers` go on every request; `ssl_context` replaces the system trust
        store for https (tests only)."""
        self.host = host
        self.port = port
        self._ssl: ssl.SSLContext | None = None
        if tls:
            self._ssl = ssl_context or ssl.create_default_context()
        default_port = port == (443 if tls else 80)
        name = host if ":" not in host else f"[{host}]"
        self._fixed_head = f"host: {name if default_port else f'{name}:{port}'}\r\n" + "".join(
            f"{field}: {value}\r\n" for field, value in default_headers
        )
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[Http1Connection] = []
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self._keepalive_s = keepalive_s
        self._closed = False
        self.opened = 0  # connections made so far (tests, debugging)

    async def open(
        self,
        method: str,
        target: str,
        headers: Sequence[tuple[str, str]],
        body: bytes | AsyncIterator[bytes],
        content_length: int,
    ) -> Http1Connection:
        """Send one request and wait for the answer's head (see transport.UpstreamTransport)."""
        lines = [f"{method} {target} HTTP/1.1\r\n", self._fixed_head]
        for name, value in headers:
            lines.append(f"{name}: {value}\r\n")
        lines.append(f"content-length: {content_length}\r\n\r\n")
        head = "".join(lines).encode("latin-1")
        for attempt in (1, 2):
            try:
                conn, reused = await self.acquire()
            except UpstreamConnectError as exc:
                raise UpstreamError(
                    f"the provider is unreachable ({exc})", code="upstream_unreachable"
                ) from None
            try:
                conn.begin()
                if isinstance(body, bytes):
                    conn.write(head + body)
                else:
                    conn.write(head)
                    async with asyncio.timeout(self._read_timeout_s):
                        await send_body(conn, body)
                await conn.head(self._read_timeout_s)
            except TimeoutError:
                conn.abort()
                raise UpstreamTimeoutError(
                    "the provider did not answer in time", code="upstream_timeout"
                ) from None
            except UpstreamReadError as exc:
                conn.abort()
                # A kept-alive connection the provider had just closed: nothing of the
                # request was answered, so a bytes body is sent once more on a new one.
                if attempt == 1 and reused and conn.status == 0 and isinstance(body, bytes):
                    continue
                raise UpstreamError(
                    f"the provider is unreachable ({exc})", code="upstream_unreachable"
                ) from None
            except BaseException:
                conn.abort()
                raise
            return conn
        raise AssertionError("unreachable")  # pragma: no cover

    async def acquire(self) -> tuple[Http1Connection, bool]:
        """A connection for one request (and whether it was reused); see `release`."""
        if self._slots.locked():  # every slot busy: wait, but not for ever
            try:
                async with asyncio.timeout(self._connect_timeout_s):
                    await self._slots.acquire()
            except TimeoutError:
                raise UpstreamConnectError("no free upstream connection in time") from None
        else:
            await self._slots.acquire()  # a free slot: returns at once
        try:
            now = time.monotonic()
            while self._idle:
                conn = self._idle.pop()
                if not conn.closed and now - conn.idle_since < self._keepalive_s:
                    return conn, True
                conn.close()
            return await self._connect(), False
        except BaseException:
            self._slots.release()
            raise

    async def _connect(self) -> Http1Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                _, conn = await loop.create_connection(
                    lambda: Http1Connection(self, self._read_timeout_s),
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.host if self._ssl else None,
                )
        except TimeoutError:
            raise UpstreamConnectError("connecting to the upstream timed out") from None
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamConnectError(type(exc).__name__) from None
        self.opened += 1
        return conn

    def release(self, conn: Http1Connection) -> None:
        """Back to the pool when the exchange finished cleanly, else closed."""
        if conn.reusable and not self._closed:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()
        self._slots.release()

    async def aclose(self) -> None:
        """Close the idle connections; those in use close when released."""
        self._closed = True
        while self._idle:
            self._idle.pop().close()


async def send_body(conn: Http1Connection, body: AsyncIterator[bytes]) -> None:
    """Stream a body whose Content-Length was already sent."""
    async for chunk in body:
        conn.write(chunk)
        await conn.drain()
