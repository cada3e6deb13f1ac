"""The proxy's upstream HTTP/1.1 client against real sockets: reuse, stale keep-alive
connections, broken answers, streamed uploads."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import orjson
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from services.proxy.routes import ROUTES
from services.proxy.upstream import Forwarder, UpstreamStreamError
from shared.errors import UpstreamError
from shared.leases import LeaseReply
from tests.support import FakeUpstream

from .conftest import CHAT, STT, multipart

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
_OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


class _Keys:
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
        return "Bearer sk-test-http1", lease


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await reader.readexactly(length)


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
        forwarder = Forwarder(base_url=base_url, keys=_Keys(), read_timeout_s=2.0)
        made.append(forwarder)
        return forwarder

    yield make
    for forwarder in made:
        await forwarder.aclose()


async def _chat(forwarder: Forwarder) -> tuple[int, bytes]:
    response = await forwarder.send(
        ROUTES[CHAT], client_headers={"content-type": "application/json"}, content=b"{}"
    )
    length = response.content_length
    assert length is not None
    body = await response.read_exactly(length)
    response.release()
    return response.status, body


async def test_keep_alive_connections_are_reused(
    fake_upstream: FakeUpstream, forwarder_for: Callable[[str], Forwarder]
) -> None:
    forwarder = forwarder_for(fake_upstream.base_url)
    for _ in range(5):
        status, _ = await _chat(forwarder)
        assert status == 200
    assert forwarder._pool.opened == 1
    statuses = await asyncio.gather(*(_chat(forwarder) for _ in range(8)))
    assert [s for s, _ in statuses] == [200] * 8
    assert forwarder._pool.opened <= 8


async def test_a_connection_closed_by_the_server_is_replaced_once(
    forwarder_for: Callable[[str], Forwarder],
) -> None:
    seen: list[bytes] = []

    async def answer_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Answers the first request, then drops the connection when the next arrives,
        # as a server does with an idle keep-alive connection it has just timed out.
        seen.append(await _read_request(reader))
        writer.write(_OK)
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
    assert forwarder._pool.opened == 2
    assert len(seen) == 2
    assert all(b"authorization: Bearer sk-test-http1" in request for request in seen)


async def test_garbage_from_the_upstream_is_an_upstream_error(
    forwarder_for: Callable[[str], Forwarder],
) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()
        writer.close()

    server, base_url = await _serve(garbage)
    try:
        with pytest.raises(UpstreamError) as caught:
            await _chat(forwarder_for(base_url))
    finally:
        server.close()
    assert caught.value.code == "upstream_unreachable"


async def test_a_body_cut_short_is_a_stream_error(
    forwarder_for: Callable[[str], Forwarder],
) -> None:
    async def short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b'HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{"partial"')
        await writer.drain()
        writer.close()

    server, base_url = await _serve(short)
    forwarder = forwarder_for(base_url)
    try:
        response = await forwarder.send(
            ROUTES[CHAT], client_headers={"content-type": "application/json"}, content=b"{}"
        )
        with pytest.raises(UpstreamStreamError):
            await response.read_exactly(100)
        response.abort()
    finally:
        server.close()


async def test_nothing_listening_is_unreachable(
    forwarder_for: Callable[[str], Forwarder],
) -> None:
    server, base_url = await _serve(lambda r, w: asyncio.sleep(0))
    server.close()
    await server.wait_closed()
    with pytest.raises(UpstreamError) as caught:
        await _chat(forwarder_for(base_url))
    assert caught.value.code == "upstream_unreachable"


async def test_streamed_upload_with_its_length(
    fake_upstream: FakeUpstream, forwarder_for: Callable[[str], Forwarder]
) -> None:
    body, content_type = multipart(b"\x02" * (3 * 1024 * 1024))

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 256 * 1024):
            yield body[start : start + 256 * 1024]

    forwarder = forwarder_for(fake_upstream.base_url)
    response = await forwarder.send(
        ROUTES[STT],
        client_headers={"content-type": content_type},
        content=chunks(),
        content_length=len(body),
    )
    assert response.status == 200
    answer = await response.read_capped(10_000)
    response.release()
    assert orjson.loads(answer)["text"] == "transcribed 3145728 bytes"


async def test_the_pool_is_bounded(forwarder_for: Callable[[str], Forwarder]) -> None:
    release = asyncio.Event()
    arrived = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        arrived.set()
        await release.wait()
        writer.write(_OK)
        await writer.drain()
        writer.close()

    server, base_url = await _serve(slow)
    forwarder = Forwarder(base_url=base_url, keys=_Keys(), max_connections=1, connect_timeout_s=0.3)
    try:
        first = asyncio.create_task(_chat(forwarder))
        await arrived.wait()  # the first request holds the only connection
        with pytest.raises(UpstreamError) as caught:
            await _chat(forwarder)
        assert caught.value.code == "upstream_unreachable"
        release.set()
        assert await first == (200, b"{}")
        assert forwarder._pool.opened == 1
    finally:
        await forwarder.aclose()
        server.close()


async def test_an_unasked_second_answer_is_never_served(
    forwarder_for: Callable[[str], Forwarder],
) -> None:
    injected = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nEVIL!"

    async def two_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = True
        while True:
            try:
                await _read_request(reader)
            except asyncio.IncompleteReadError:
                return
            writer.write(_OK + injected if first else _OK)
            first = False
            await writer.drain()

    server, base_url = await _serve(two_answers)
    forwarder = forwarder_for(base_url)
    try:
        assert await _chat(forwarder) == (200, b"{}")
        assert await _chat(forwarder) == (200, b"{}")
    finally:
        server.close()
    assert forwarder._pool.opened == 2  # the connection that carried extra bytes was dropped


def _tls_pair(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A throwaway CA-less self-signed certificate for 127.0.0.1: (server, client) contexts."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "keyveil-test-upstream")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_path, key_path)
    client = ssl.create_default_context(cafile=str(cert_path))
    return server, client


async def test_https_upstream_verifies_the_certificate(tmp_path: Path) -> None:
    server_ctx, client_ctx = _tls_pair(tmp_path)
    seen: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await _read_request(reader))
        writer.write(_OK)
        await writer.drain()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    trusted = Forwarder(
        base_url=f"https://127.0.0.1:{port}/v1", keys=_Keys(), ssl_context=client_ctx
    )
    untrusted = Forwarder(base_url=f"https://127.0.0.1:{port}/v1", keys=_Keys())
    try:
        assert await _chat(trusted) == (200, b"{}")
        assert seen[0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
        assert f"host: 127.0.0.1:{port}\r\n".encode() in seen[0]
        # The system trust store does not know this certificate: no request is sent.
        with pytest.raises(UpstreamError) as caught:
            await _chat(untrusted)
        assert caught.value.code == "upstream_unreachable"
        assert len(seen) == 1
    finally:
        await trusted.aclose()
        await untrusted.aclose()
        server.close()
        await server.wait_closed()
