"""A private nats-server per test: the auditor's durable consumers and ledger are
server-wide state, so tests must not share them through the session server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client as NATS

from keyveil.servers import ServerProcess, start_nats


@pytest.fixture
async def private_nats(tmp_path: Path) -> AsyncIterator[ServerProcess]:
    server = start_nats(tmp_path, streams=True)
    # The port opens a moment before JetStream answers; wait for the API, not the socket.
    client = await nats.connect(server.url)
    try:
        async with asyncio.timeout(10):
            while True:
                try:
                    await client.jetstream().account_info()
                    break
                except (nats.errors.Error, nats.js.errors.Error, TimeoutError):
                    await asyncio.sleep(0.05)
    finally:
        await client.close()
    yield server
    server.stop()


@pytest.fixture
async def pnc(private_nats: ServerProcess) -> AsyncIterator[NATS]:
    client = await nats.connect(private_nats.url)
    yield client
    await client.drain()
