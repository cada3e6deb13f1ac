"""Key-manager fixtures: in-process replicas on the session NATS, and a bus sniffer.

The sniffer subscribes to `>` for the whole session; after every test it must not have
seen any provider key used by the tests, raw or base64-encoded.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import secrets
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from keyveil.servers import ServerProcess, bootstrap_nats, start_nats
from services.keymanager.app import KeyManager
from services.keymanager.settings import Settings
from shared import bus
from shared.errors import BusTimeoutError
from shared.keyadmin import OPERATOR_USER, AdminOp, IntakeReply, IntakeRequest, admin_subject
from shared.settings import load_settings
from tests.services.keymanager.kms_servers import (
    AWS_ENV,
    KekBackend,
    OpenBao,
    start_moto,
    start_openbao,
)
from tests.support import TEST_KEY_ENCRYPTION_SECRET, TEST_PROVIDER_KEY

PROVIDER_KEYS: set[str] = {TEST_PROVIDER_KEY}


def new_provider_key() -> str:
    """A fresh provider-shaped key, registered with the sniffer."""
    key = f"sk-test-{secrets.token_urlsafe(30)}"
    PROVIDER_KEYS.add(key)
    return key


def _forms(key: str) -> set[bytes]:
    raw = key.encode()
    forms = {raw}
    for offset in range(3):  # base64 of the key at every alignment inside a larger blob
        chunk = raw[offset:]
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            text = encode(chunk).rstrip(b"=")
            forms.add(text[4:-4])
    forms.add(raw.hex().encode())
    return forms


class Sniffer:
    """Everything published on the bus since the last check."""

    def __init__(self) -> None:
        self.unchecked: list[bytes] = []

    async def on_message(self, msg: Msg) -> None:
        headers = "".join(f"{k}:{v}" for k, v in (msg.headers or {}).items())
        self.unchecked.append(msg.subject.encode() + headers.encode() + msg.data)

    def leaks(self) -> list[str]:
        """The keys found in what arrived since the last call (then forgotten).

        A key is made before it is used, so a message that arrived before it was made
        cannot hold it: each message is checked once, against every key known at the
        check. Checking everything ever seen against every key after each test grew
        with the square of the package (seconds per teardown, the loop blocked).
        """
        blobs, self.unchecked = self.unchecked, []
        found = []
        for key in PROVIDER_KEYS:
            forms = _forms(key)
            if any(form in blob for blob in blobs for form in forms):
                found.append(key[:7] + "…")
        return found


@pytest.fixture(scope="package")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A NATS of the key-manager tests' own. Their admin and lease calls go to a queue
    group; on the suite's shared server an intake call sometimes got no answer in 10 s,
    only ever in the full suite (never with this package alone). A server of their own
    keeps every other package's clients out of that queue group."""
    server = start_nats(tmp_path_factory.mktemp("keymanager-nats"))
    bootstrap_nats(server.url)
    yield server.url
    server.stop()


@pytest.fixture(scope="package")
async def sniffer(nats_url: str) -> AsyncIterator[Sniffer]:
    sniffer = Sniffer()
    client = await nats.connect(nats_url, name="sniffer")
    await client.subscribe(
        ">", cb=sniffer.on_message, pending_msgs_limit=1_000_000, pending_bytes_limit=1 << 30
    )
    yield sniffer
    await client.drain()


@pytest.fixture(autouse=True)
async def no_key_on_the_bus(sniffer: Sniffer, nc: NATS) -> AsyncIterator[None]:
    yield
    await nc.flush()
    assert sniffer.leaks() == [], "a provider key crossed the bus"


def make_settings(nats_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "NATS_URL": nats_url,
        "KEY_ENCRYPTION_SECRET": TEST_KEY_ENCRYPTION_SECRET,
        "KEYMANAGER_KV_BUCKET": f"KEYS_{uuid.uuid4().hex[:12]}",
        "KEYMANAGER_POLICY_INTERVAL_S": 3600,
        "KEYMANAGER_ROTATION_GRACE_S": 60,
        "NODE_ENV": "development",
    }
    values.update(overrides)
    return load_settings(Settings, **values)


KeyManagerFactory = Callable[..., Awaitable[KeyManager]]


@pytest.fixture
async def start_keymanager(nats_url: str) -> AsyncIterator[KeyManagerFactory]:
    """Start in-process replicas; each call may share a bucket (pass KEYMANAGER_KV_BUCKET)."""
    started: list[KeyManager] = []

    async def start(settings: Settings | None = None, **overrides: Any) -> KeyManager:
        manager = KeyManager(settings or make_settings(nats_url, **overrides))
        await manager.start()
        started.append(manager)
        await _answers_on_the_bus(manager.settings.nats_url)
        return manager

    yield start
    for manager in reversed(started):
        await manager.stop()


async def _answers_on_the_bus(nats_url: str, attempts: int = 3) -> None:
    """Wait until a replica answers `intake` (idempotent, read-only) before the test asks.

    CI once saw a just-started replica leave a test's first admin call unanswered for
    10 s, only in the full suite and never reproduced. A late answer (or one lost) is
    asked again here, and said as a test warning, so it stays visible without turning
    the test red; one never answered still fails the test, with this message.
    """
    client = await nats.connect(nats_url)
    try:
        for attempt in range(1, attempts + 1):
            began = time.monotonic()
            try:
                await bus.request(
                    client,
                    admin_subject(AdminOp.intake),
                    IntakeRequest(actor="probe"),
                    IntakeReply,
                    timeout=10.0,
                    requester=OPERATOR_USER,
                )
            except bus.RemoteError:
                pass  # an answer (a replica not ready says why): it hears the bus
            except BusTimeoutError:
                warnings.warn(
                    f"key-manager intake unanswered in 10 s (try {attempt})", stacklevel=1
                )
                continue
            if attempt > 1 or time.monotonic() - began > 1.0:
                warnings.warn(
                    f"key-manager answered intake after {time.monotonic() - began:.1f}s "
                    f"(try {attempt})",
                    stacklevel=1,
                )
            return
        raise AssertionError(f"no key-manager answered intake in {attempts} tries of 10 s")
    finally:
        await client.close()


@pytest.fixture
async def keymanager(start_keymanager: KeyManagerFactory) -> KeyManager:
    return await start_keymanager()


# --- KEK providers on real servers (see kms_servers.py) --------------------------------

KEK_PROVIDERS = ["local", "vault-transit", "aws-kms"]


@pytest.fixture(scope="session")
def openbao(infra_dir: Path) -> Iterator[OpenBao]:
    bao = start_openbao(infra_dir)
    yield bao
    bao.server.stop()


@pytest.fixture(scope="session")
def moto_kms(infra_dir: Path) -> Iterator[ServerProcess]:
    with pytest.MonkeyPatch.context() as patch:
        for name, value in AWS_ENV.items():  # the standard credential chain, as in a pod
            patch.setenv(name, value)
        server = start_moto(infra_dir)
        yield server
        server.stop()


def backend(name: str, request: pytest.FixtureRequest) -> KekBackend:
    if name == "vault-transit":
        return KekBackend(name, bao=request.getfixturevalue("openbao"))
    if name == "aws-kms":
        return KekBackend(name, moto=request.getfixturevalue("moto_kms"))
    return KekBackend(name)


@pytest.fixture(params=KEK_PROVIDERS)
def kek(request: pytest.FixtureRequest) -> KekBackend:
    """Each provider in turn, with a KEK of its own for this test."""
    return backend(request.param, request)


@pytest.fixture(params=["vault-transit", "aws-kms"])
def remote_kek(request: pytest.FixtureRequest) -> KekBackend:
    return backend(request.param, request)


# --- diagnostics for an answer that never comes ----------------------------------------


@pytest.fixture(autouse=True, scope="package")
async def loop_lag_watch() -> AsyncIterator[None]:
    """Log every stall of the event loop over half a second: a key-manager that answers
    nothing for 10 s is either not asked or cannot run, and this tells the two apart."""
    log = logging.getLogger("tests.loop")
    loop = asyncio.get_running_loop()

    async def watch() -> None:
        while True:
            before = loop.time()
            await asyncio.sleep(0.1)
            lag = loop.time() - before - 0.1
            if lag > 0.5:
                log.warning("event loop stalled %.2fs", lag)

    task = asyncio.create_task(watch(), name="loop-lag-watch")
    yield
    task.cancel()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On a failed call, add the loop's tasks to the report (what was waiting on what)."""
    report = yield
    if call.when == "call" and report.failed:
        with contextlib.suppress(RuntimeError):
            lines = []
            for task in asyncio.all_tasks(asyncio.get_event_loop_policy().get_event_loop()):
                frames = task.get_stack(limit=3)
                where = " <- ".join(f"{f.f_code.co_name}:{f.f_lineno}" for f in frames)
                lines.append(f"{task.get_name()}: {where}")
            report.sections.append(("asyncio tasks", "\n".join(sorted(lines))))
    return report
