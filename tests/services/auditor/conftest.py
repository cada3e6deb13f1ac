"""A private nats-server per test: the auditor's durable consumers and ledger are
server-wide state, so tests must not share them through the session server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NATS

from keyveil.servers import ServerProcess, start_nats


@pytest.fixture
def private_nats(tmp_path: Path) -> Iterator[ServerProcess]:
    server = start_nats(tmp_path)
    yield server
    server.stop()


@pytest.fixture
async def pnc(private_nats: ServerProcess) -> AsyncIterator[NATS]:
    client = await nats.connect(private_nats.url)
    yield client
    await client.drain()
