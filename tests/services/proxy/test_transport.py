"""One conformance suite for the upstream transports (services/proxy/transport.py).

Every case runs against both `http1` and `httpx`, through the Forwarder that uses them,
against real servers started here: the fake upstream, small raw asyncio servers for the
edges (framing, streaming, broken answers, timeouts, TLS with a test CA) and a real
CONNECT proxy (egress.py) for the egress case.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest

from services.proxy.routes import ROUTES
from services.proxy.transport import EgressProxyError
from services.proxy.upstream import Forwarder, UpstreamResponse, UpstreamStreamError
from shared.errors import UpstreamError, UpstreamTimeoutError
from shared.testing.tlsrelay import certificates
from tests.support import FakeUpstream

from .conftest import CHAT, STT, multipart
from .egress import EgressProxy
from .rawhttp import OK, Handler, StaticKeys, read_request

KINDS = ("http1", "httpx")

_KEYS = StaticKeys("Bearer sk-test-transport")


@dataclass
class _Server:
    """A raw asyncio server that counts the connections it accepted."""

    handler: Handler
    tls: ssl.SSLContext | None = None
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    server: asyncio.Server | None = None
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def start(self) -> str:
        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            self.writers.append(writer)
            try:
                await self.handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(accept, "127.0.0.1", 0, ssl=self.tls)
        port = self.server.sockets[0].getsockname()[1]
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{port}/v1"

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
        await self.server.wait_closed()


def _answering(answer: bytes, seen: list[bytes] | None = None) -> Handler:
    """Answers every request on a connection with `answer` (keep-alive)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                request = await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            if seen is not None:
                seen.append(request)
            writer.write(answer)
            await writer.drain()

    return handle


@dataclass
class _Pki:
    """A test CA and a certificate it issued for 127.0.0.1."""

    server: ssl.SSLContext
    client: ssl.SSLContext


def _pki(tmp_path: Path) -> _Pki:
    ca_path, cert_path, key_path = certificates(tmp_path)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_path, key_path)
    return _Pki(server=server, client=ssl.create_default_context(cafile=str(ca_path)))


async def _chat(forwarder: Forwarder) -> tuple[int, bytes]:
    response = await forwarder.send(
        ROUTES[CHAT], client_headers={"content-type": "application/json"}, content=b"{}"
    )
    length = response.content_length
    assert length is not None
    body = await response.read_exactly(length)
    response.release()
    return response.status, body


async def _open(forwarder: Forwarder) -> UpstreamResponse:
    return await forwarder.send(
        ROUTES[CHAT], client_headers={"content-type": "application/json"}, content=b"{}"
    )


async def _read_all(response: UpstreamResponse) -> list[bytes]:
    chunks = []
    while chunk := await response.readany():
        chunks.append(chunk)
    return chunks


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def servers() -> AsyncIterator[Callable[..., Awaitable[tuple[_Server, str]]]]:
    started: list[_Server] = []

    async def start(handler: Handler, tls: ssl.SSLContext | None = None) -> tuple[_Server, str]:
        server = _Server(handler, tls)
        started.append(server)
        return server, await server.start()

    yield start
    for server in started:
        await server.stop()


@pytest.fixture
async def forwarders(kind: str) -> AsyncIterator[Callable[..., Forwarder]]:
    """Forwarders on this test's transport; every one is closed afterwards."""
    made: list[Forwarder] = []

    def make(base_url: str, **options: object) -> Forwarder:
        options.setdefault("read_timeout_s", 2.0)
        options.setdefault("proxies", {})
        forwarder = Forwarder(
            base_url=base_url,
            keys=_KEYS,
            transport=kind,
            **options,
        )  # type: ignore[arg-type]
        assert forwarder.transport_kind == kind
        made.append(forwarder)
        return forwarder

    yield make
    for forwarder in made:
        await forwarder.aclose()


@contextlib.contextmanager
def _unanswered_listener() -> Iterator[int]:
    """A port whose accept queue is full: a new connection's SYN goes unanswered."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


class TestUpstreamTransport:
    """What the Forwarder relies on, the same from every transport."""

    async def test_the_fake_upstream_json_and_a_streamed_upload(
        self, fake_upstream: FakeUpstream, forwarders: Callable[..., Forwarder]
    ) -> None:
        forwarder = forwarders(fake_upstream.base_url)
        for _ in range(3):
            status, body = await _chat(forwarder)
            assert status == 200
            assert orjson.loads(body)["object"] == "chat.completion"
        upload, content_type = multipart(b"\x02" * (3 * 1024 * 1024))

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(upload), 256 * 1024):
                yield upload[start : start + 256 * 1024]

        response = await forwarder.send(
            ROUTES[STT],
            client_headers={"content-type": content_type},
            content=chunks(),
            content_length=len(upload),
        )
        assert response.status == 200
        answer = await response.read_capped(10_000)
        response.release()
        assert orjson.loads(answer)["text"] == "transcribed 3145728 bytes"

    async def test_the_request_on_the_wire(
        self,
        servers: Callable[..., Awaitable[tuple[_Server, str]]],
        forwarders: Callable[..., Forwarder],
    ) -> None:
        seen: list[bytes] = []
        _, base_url = await servers(_answering(OK, seen))
        forwarder = forwarders(base_url)

        async def body() -> AsyncIterator[bytes]:
            yield b'{"a":'
            yield b"1}"

        await _chat(forwarder)
        response = await forwarder.send(
            ROUTES[CHAT],
            client_headers={"content-type": "application/json", "authorization": "Bearer kv"},
            content=body(),
            content_length=7,
        )
        await response.read_exactly(2)
        response.release()
        port = base_url.split(":")[2].split("/")[0]
        for request in seen:
            head, _, sent = request.partition(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            assert lines[0] == "POST /v1/chat/completions HTTP/1.1"
            fields = dict(line.lower().split(": ", 1) for line in lines[1:])
            # Exactly these fields: nothing a general-purpose client adds on its own.
            assert set(fields) == {
                "host",
                "user-agent",
                "accept-encoding",
                "content-type",
                "authorization",
                "content-length",
            }
            assert fields["host"] == f"127.0.0.1:{port}"
            assert fields["accept-encoding"] == "identity"
            assert fields["authorization"] == "bearer sk-test-transport"  # never the client's
            assert int(fields["content-length"]) == len(sent)
        assert seen[1].endswith(b'\r\n\r\n{"a":1}')

    async def test_keep_alive_connections_are_reused(
        self,
        servers: Callable[..., Awaitable[tuple[_Server, str]]],
        forwarders: Callable[..., Forwarder],
    ) -> None:
        server, base_url = await servers(_answering(OK))
        forwarder = forwarders(base_url)
        for _ in range(5):
            assert await _chat(forwarder) == (200, b"{}")
        assert server.connections == 1
        results = await asyncio.gather(*(_chat(forwarder) for _ in range(6)))
        assert results == [(200, b"{}")] * 6
        assert server.connections <= 6

    async def test_a_connection_the_server_closed_while_idle_is_replaced(
        self,
        servers: Callable[..., Awaitable[tuple[_Server, str]]],
        forwarders: Callable[..., Forwarder],
    ) -> None:
        async def one_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(OK)  # keep-alive by default in HTTP/1.1, then closed anyway
            await writer.drain()

        server, base_url = await servers(one_answer)
        forwarder = forwarders(base_url)
        assert await _chat(forwarder) == (200, b"{}")
        await asyncio.sleep(0.2)  # the server's FIN arrives while the connection is idle
        assert await _chat(forwarder) == (200, b"{}")
        assert server.connections == 2

    async def test_chunked_and_content_length_answers(
        self,
        servers: Callable[..., Awaitable[tuple[_Server, str]]],
        forwarders: Callable[..., Forwarder],
    ) -> None:
        chunked = (
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
            b'3\r\n{"a\r\n4\r\n":1}\r\n0\r\n\r\n'
        )
        big = b"x" * 300_000  # more than one read, more than http1's high-water mark
        sized = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(big), big)
        answers = iter([chunked, sized, chunked])

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                await read_request(reader)
                writer.write(next(answers))
                await writer.drain()

        server, base_url = await servers(handle)
        forwarder = forwarders(base_url)
        first = await _open(forwarder)
        assert first.content_length is None
        assert b"".join(await _read_all(first)) == b'{"a":1}'
        first.release()
        second = await _open(forwarder)
        assert second.content_length == len(big)
        assert await second.read_exactly(len(big)) == big
        second.release()
        third = await _open(forwarder)
        assert await third.read_capped(4) == b'{"a"'
        third.abort()
        assert server.connections == 1  # framed answers read to the end keep the connection

    async def test_sse_is_relayed_chunk_by_chunk(
        self,
        servers: Callable[..., Awaitable[tuple[_Server, str]]],
        forwarders: Callable[..., Forwarder],
    ) -> None:
        got_first = asyncio.Event()

        async def sse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"transfer-encoding: chunked\r\n\r\n"
            )
            for n in range(3):
                event = b'data: {"n": %d}\n\n' % n
                writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                await writer.drain()
                # The next event is sent only once the client has this one: a transport
                # that waited for more would hang here.
                await got_first.wait()
                got_first.clear()
            writer.write(b"0\r\n\r\n")
            await writer.drain()

        _, base_url = await servers(sse)
        forwarder = forwarders(base_url)
        response = await _open(forwarder)
        assert response.headers["content-type"] == "text/event-stream"
        events = []
        async with asyncio.timeout(5):
            while chunk := await response.readany():
                events.append(chunk)
                got_first.set()
        response.release()
        assert events == [b'data: {"n": %d}\n\n' % n for n in range(3)]

    async def test_a_body_cut_short_is_a_stream_error(
        self,
        servers: Callable[..., Awaitable[tuple[_Server, str]]],
        forwarders: Callable[..., Forwarder],
    ) -> None:
        answers = iter(
            [
                b'HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{"partial"',
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
            ]
        )

        async def short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(next(answers))
            await writer.drain()
            await asyncio.sleep(0.05)  # the client has the head; then the connection drops

        _, base_url = await servers(short)
        forwarder = forwarders(base_url)
        sized = await _open(forwarder)
        with pytest.raises(UpstreamStreamError):
            await sized.read_exactly(100)
        sized.abort()
        chunked = await _open(forwarder)
        with pytest.raises(UpstreamStreamError):
            await _read_all(chunked)
        chunked.abort()

    async def test_garbage_from_the_upstream_is_unreachable(
        self,
        servers: Callable[..., Awaitable[tuple[_Server, str]]],
        forwarders: Callable[..., Forwarder],
    ) -> None:
        _, base_url = await servers(_answering(b"NOT HTTP AT ALL\r\n\r\n"))
        with pytest.raises(UpstreamError) as caught:
            await _chat(forwarders(base_url))
        assert caught.value.code == "upstream_unreachable"

    async def test_nothing_listening_is_unreachable(
        self, forwarders: Callable[..., Forwarder]
    ) -> None:
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            port = closed.getsockname()[1]
        with pytest.raises(UpstreamError) as caught:
            await _chat(forwarders(f"http://127.0.0.1:{port}/v1"))
        assert caught.value.code == "upstream_unreachable"

    async def test_a_connect_timeout_is_unreachable(
        self, forwarders: Callable[..., Forwarder]
    ) -> None:
        with _unanswered_listener() as port:
            forwarder = forwarders(f"http://127.0.0.1:{port}/v1", connect_timeout_s=0.3)
            started = time.monotonic()
            with pytest.raises(UpstreamError) as caught:
                async with asyncio.timeout(5):
                    await _chat(forwarder)
        assert caught.value.code == "upstream_unreachable"
        assert time.monotonic() - started >= 0.25  # it waited: a timeout, not a refusal

    async def test_no_answer_in_time_is_a_timeout(
        self,
        servers: Callable[..., Awaitable[tuple[_Server, str]]],
        forwarders: Callable[..., Forwarder],
    ) -> None:
        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            await reader.read()  # never answers

        _, base_url = await servers(silent)
        with pytest.raises(UpstreamTimeoutError) as caught:
            await _chat(forwarders(base_url, read_timeout_s=0.3))
        assert caught.value.code == "upstream_timeout"

    async def test_a_server_that_stops_reading_the_upload_is_a_timeout(
        self,
        servers: Callable[..., Awaitable[tuple[_Server, str]]],
        forwarders: Callable[..., Forwarder],
    ) -> None:
        stop = asyncio.Event()

        async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            await stop.wait()  # reads nothing more: the socket buffers fill up

        _, base_url = await servers(deaf)
        size = 64 * 1024 * 1024

        async def upload() -> AsyncIterator[bytes]:
            piece = b"\x00" * (256 * 1024)
            for _ in range(size // len(piece)):
                yield piece

        forwarder = forwarders(base_url, read_timeout_s=0.5)
        try:
            with pytest.raises(UpstreamTimeoutError):
                async with asyncio.timeout(10):
                    await forwarder.send(
                        ROUTES[STT],
                        client_headers={"content-type": "application/octet-stream"},
                        content=upload(),
                        content_length=size,
                    )
        finally:
            stop.set()

    async def test_abort_closes_the_connection_and_frees_the_slot(
        self,
        servers: Callable[..., Awaitable[tuple[_Server, str]]],
        forwarders: Callable[..., Forwarder],
    ) -> None:
        closed_by_client = asyncio.Event()

        async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n")
            await writer.drain()
            if await reader.read() == b"":  # the client hung up: the provider's cancel
                closed_by_client.set()

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await (endless if server.connections == 1 else _answering(OK))(reader, writer)

        server, base_url = await servers(answer)
        forwarder = forwarders(base_url, max_connections=1, connect_timeout_s=1.0)
        response = await _open(forwarder)
        assert await response.readany() == b"abc"
        response.abort()
        async with asyncio.timeout(2):
            await closed_by_client.wait()
            # The only slot is free again.
            assert await _chat(forwarder) == (200, b"{}")
        assert server.connections == 2

    async def test_abort_wakes_a_reader_waiting_for_the_body(
        self,
        servers: Callable[..., Awaitable[tuple[_Server, str]]],
        forwarders: Callable[..., Forwarder],
    ) -> None:
        closed_by_client = asyncio.Event()

        async def stalled(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n")
            writer.write(b"transfer-encoding: chunked\r\n\r\n")
            await writer.drain()
            if await reader.read() == b"":
                closed_by_client.set()

        _, base_url = await servers(stalled)
        # As the proxy does when the browser leaves mid-stream: abort from another task.
        response = await _open(forwarders(base_url, read_timeout_s=30.0))
        reading = asyncio.get_running_loop().create_task(response.readany())
        await asyncio.sleep(0.1)
        response.abort()
        async with asyncio.timeout(2):
            with pytest.raises(UpstreamStreamError):
                await reading
            await closed_by_client.wait()

    async def test_a_full_pool_refuses_after_the_connect_timeout(
        self,
        servers: Callable[..., Awaitable[tuple[_Server, str]]],
        forwarders: Callable[..., Forwarder],
    ) -> None:
        release = asyncio.Event()

        async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            await release.wait()
            writer.write(OK)
            await writer.drain()

        _, base_url = await servers(slow)
        forwarder = forwarders(base_url, max_connections=1, connect_timeout_s=0.3)
        first = asyncio.create_task(_chat(forwarder))
        await asyncio.sleep(0.1)  # the first request holds the only connection
        with pytest.raises(UpstreamError) as caught:
            await _chat(forwarder)
        assert caught.value.code == "upstream_unreachable"
        release.set()
        assert await first == (200, b"{}")

    @pytest.mark.parametrize(("size", "accepted"), [(16 * 1024, True), (256 * 1024, False)])
    async def test_an_oversized_answer_head_is_refused(
        self,
        servers: Callable[..., Awaitable[tuple[_Server, str]]],
        forwarders: Callable[..., Forwarder],
        size: int,
        accepted: bool,
    ) -> None:
        fields = b"".join(b"x-filler-%d: %s\r\n" % (n, b"v" * 990) for n in range(size // 1000))
        answer = b"HTTP/1.1 200 OK\r\n" + fields + b"content-length: 2\r\n\r\n{}"
        _, base_url = await servers(_answering(answer))
        forwarder = forwarders(base_url)
        if accepted:
            assert await _chat(forwarder) == (200, b"{}")
        else:
            with pytest.raises(UpstreamError) as caught:
                await _chat(forwarder)
            assert caught.value.code == "upstream_unreachable"

    async def test_https_with_a_test_ca(
        self,
        tmp_path: Path,
        servers: Callable[..., Awaitable[tuple[_Server, str]]],
        forwarders: Callable[..., Forwarder],
    ) -> None:
        pki = _pki(tmp_path)
        seen: list[bytes] = []
        _, base_url = await servers(_answering(OK, seen), pki.server)
        assert await _chat(forwarders(base_url, ssl_context=pki.client)) == (200, b"{}")
        # The system trust store does not know the test CA: no request is sent.
        with pytest.raises(UpstreamError) as caught:
            await _chat(forwarders(base_url))
        assert caught.value.code == "upstream_unreachable"
        assert len(seen) == 1

    async def test_the_egress_proxy_is_used_or_refused_and_no_proxy_bypasses_it(
        self,
        kind: str,
        tmp_path: Path,
        servers: Callable[..., Awaitable[tuple[_Server, str]]],
        forwarders: Callable[..., Forwarder],
    ) -> None:
        pki = _pki(tmp_path)
        seen: list[bytes] = []
        _, base_url = await servers(_answering(OK, seen), pki.server)
        egress = EgressProxy()
        proxy_url = await egress.start()
        try:
            proxies = {"https": proxy_url}
            if kind == "http1":  # connects directly: refuses rather than bypass the proxy
                with pytest.raises(EgressProxyError) as refused:
                    forwarders(base_url, proxies=proxies, ssl_context=pki.client)
                assert refused.value.variable == "HTTPS_PROXY"
                assert "NO_PROXY" in refused.value.rule
            else:
                proxied = forwarders(base_url, proxies=proxies, ssl_context=pki.client)
                assert await _chat(proxied) == (200, b"{}")
                assert egress.targets == [base_url.split("/")[2]]
            direct = forwarders(
                base_url, proxies={**proxies, "no": "localhost,127.0.0.1"}, ssl_context=pki.client
            )
            assert await _chat(direct) == (200, b"{}")
            assert len(egress.targets) == (0 if kind == "http1" else 1)
            assert len(seen) == (1 if kind == "http1" else 2)
        finally:
            await egress.stop()


async def test_auto_uses_httpx_exactly_when_an_egress_proxy_applies() -> None:
    async def chosen(proxies: dict[str, str]) -> str:
        forwarder = Forwarder(
            base_url="https://api.openai.com/v1",
            keys=_KEYS,
            proxies=proxies,
        )
        await forwarder.aclose()
        return forwarder.transport_kind

    assert await chosen({}) == "http1"
    assert await chosen({"https": "http://egress:3128"}) == "httpx"
    assert await chosen({"https": "http://egress:3128", "no": ".openai.com"}) == "http1"
    assert await chosen({"http": "http://egress:3128"}) == "http1"  # only for http:// upstreams
